"""Helpers of the annotation studio tests: a small work folder, a server process, headless Chromium."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import cv2
import numpy as np

from dspo_basicsr.preference.candidates import expand_settings_grid
from dspo_basicsr.preference.pipeline import WorkFolder, discover_inputs, run_candidate_step, run_segment_step
from dspo_basicsr.preference.segmentation import SLICSegmenter

from pipeline_fixtures import FakeFramework, make_image_folders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSNR = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}


def make_work_folder(root, num=2, num_keep=3, descriptions=None):
    """A work folder after the candidate and segment steps (32 px GT, x4), with ``num`` samples.

    Args:
        descriptions (dict, optional): ``{sid: {instance id: [text per candidate]}}`` written as the VLM
            feedback of ``instances/<sid>.json``, as ``score_instances.py`` with a feedback section does.
    """
    lq_dir, gt_dir = make_image_folders(os.path.join(root, 'data'), num=num, size=32)
    work = WorkFolder(os.path.join(root, 'work'))
    run_candidate_step(work, discover_inputs(lq_dir, gt_dir), FakeFramework(),
                       expand_settings_grid({'guidance_scale': [1.0, 4.0]},
                                            {'steps': 2, 'guidance_scale': 0.5, 'seed': 0}),
                       num_keep=num_keep, metrics=PSNR, negative_prompt='blurry', progress=False)
    run_segment_step(work, SLICSegmenter(n_segments=4), min_area=16, progress=False)
    for sid, per_instance in (descriptions or {}).items():
        write_descriptions(work, sid, per_instance)
    return work


def write_descriptions(work, sid, per_instance):
    """``instances/<sid>.json`` with VLM descriptions ``{instance id: [text per candidate]}`` in its feedback."""
    os.makedirs(os.path.dirname(work.instances_json(sid)), exist_ok=True)
    with open(work.seg_json(sid)) as handle:
        areas = json.load(handle)['areas']
    table = [{'id': i, 'area': a, 'win': -1, 'lose': -1} for i, a in enumerate(areas)]
    for i, texts in per_instance.items():
        table[i]['feedback'] = {'descriptions': texts, 'negative': [], 'source': 'vlm'}
    with open(work.instances_json(sid), 'w') as handle:
        json.dump({'instances': table, 'negative_prompt': 'blurry', 'top_k': 5, 'scorer': {'type': 'metric'}}, handle)


def make_method_folders(root, methods=('bicubic', 'ours', 'sharp'), images=('0001', '0002', '0003'), size=32):
    """``root/sr/<method>/<image>.png`` and ``root/lr/<image>.png``: methods differ in blur."""
    rng = np.random.default_rng(0)
    for image in images:
        gt = cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC)
        os.makedirs(os.path.join(root, 'lr'), exist_ok=True)
        cv2.imwrite(os.path.join(root, 'lr', f'{image}.png'), cv2.resize(gt, (size // 4, size // 4)))
        for k, method in enumerate(methods):
            os.makedirs(os.path.join(root, 'sr', method), exist_ok=True)
            cv2.imwrite(os.path.join(root, 'sr', method, f'{image}.png'), cv2.GaussianBlur(gt, (0, 0), 0.5 + k))
    return os.path.join(root, 'sr'), os.path.join(root, 'lr')


def write_pairs_csv(path, sr_root, pairs):
    """A pairs CSV in ``mad_select.py``'s columns for ``pairs`` = [(method_a, method_b, image)]."""
    lines = ['pair,group,rank,image,method_a,method_b,image_a,image_b,d1,d2']
    for rank, (a, b, image) in enumerate(pairs):
        lines.append(f'{a}_vs_{b}_{rank:02d},{a}_vs_{b},{rank},{image},{a},{b},'
                     f'{os.path.join(sr_root, a, image + ".png")},{os.path.join(sr_root, b, image + ".png")},0.1,0.0')
    with open(path, 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    return str(path)


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``scripts/annotate.py serve ARGS`` in a subprocess on a free loopback port."""

    def __init__(self, args):
        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}/'
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO, 'scripts', 'annotate.py'), 'serve',
                                         *args, '--port', str(self.port)], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.time() + 180  # importing the package (torch, diffusers) is slow on a busy machine
        while True:
            try:
                urllib.request.urlopen(self.url + 'api/progress', timeout=2).read()
                break
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f'the annotation server did not start: {self.output()}') from None
                time.sleep(0.2)

    def output(self):
        self.log.seek(0)
        return self.log.read().decode(errors='replace')

    def kill(self):
        """SIGKILL: no shutdown handler runs, as when the machine or the process dies."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def chromium():
    """Headless Chromium from Debian's packages through selenium (``.ci/run`` installs them)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in ('/usr/bin/chromium', '/usr/bin/chromedriver'):
        if not os.path.exists(path):
            raise RuntimeError(f'{path} is missing: apt-get install chromium chromium-driver (see .ci/run).')
    options = webdriver.ChromeOptions()
    options.binary_location = '/usr/bin/chromium'
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--disable-dev-shm-usage', '--window-size=1400,1000',
                 f'--user-data-dir={tempfile.mkdtemp(prefix="chromium-annotation-")}'):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service('/usr/bin/chromedriver'), options=options)


class ThreadServer:
    """The app of ``study`` and ``store`` served by uvicorn in a thread of the test process (fast restarts)."""

    def __init__(self, study, store, token=None, invited_only=False):
        import threading

        import uvicorn

        from dspo_basicsr.annotation.server import create_app

        self.port = free_port()
        self.url = f'http://127.0.0.1:{self.port}/'
        self.server = uvicorn.Server(uvicorn.Config(create_app(study, store, token, invited_only), host='127.0.0.1',
                                                    port=self.port, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError('the annotation server thread did not start')
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
