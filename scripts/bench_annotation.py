#!/usr/bin/env python
"""Benchmark of the annotation studio: time to serve one instance page with all its crops, cold and cached.

    python scripts/bench_annotation.py [--size 512] [--candidates 4] [--samples 4] [--top-k 5]

Builds a work folder of generated images (LQ size/4, N bicubic-plus-noise candidates, SLIC label maps) in a
temporary folder, serves its instance study with uvicorn on a loopback port, and for every item requests
the page and its 1 + N crops over HTTP, one after the other, as a browser opening the page does. Cold: the
study's image and PNG caches are emptied before each page (the files are read, cropped, outlined and
encoded); cached: the same requests again. Prints the median and the ratio of the two, measured in one run.
"""
import argparse
import http.cookiejar
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import cv2
import torch
import torch.nn.functional as F

from dspo_basicsr.annotation.server import create_app
from dspo_basicsr.annotation.studio import open_study
from dspo_basicsr.bench.timer import time_call
from dspo_basicsr.preference.candidates import expand_settings_grid
from dspo_basicsr.preference.pipeline import WorkFolder, discover_inputs, run_candidate_step, run_segment_step
from dspo_basicsr.preference.segmentation import SLICSegmenter


class BicubicCandidates:
    """Candidates for the benchmark: bicubic x4 plus seeded noise (the framework ``sample`` interface)."""

    scale = 4

    def sample(self, lq, prompt, negative_prompt=None, steps=None, guidance_scale=None, generator=None):
        sr = F.interpolate(lq, scale_factor=self.scale, mode='bicubic', align_corners=False)
        return (sr + torch.randn(sr.shape, generator=generator) * 0.05 / (guidance_scale or 1.0)).clamp(0, 1)


def build_work(root, size, samples, candidates):
    import skimage.data
    lq_dir = os.path.join(root, 'lq')
    os.makedirs(lq_dir, exist_ok=True)
    photos = ('astronaut', 'chelsea', 'coffee', 'rocket')
    for n in range(samples):
        photo = getattr(skimage.data, photos[n % len(photos)])()[..., :3]
        lq = cv2.resize(photo, (size // 4, size // 4), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(lq_dir, f'img{n}.png'), lq[..., ::-1])
    work = WorkFolder(os.path.join(root, 'work'))
    settings = expand_settings_grid({'guidance_scale': [1.0 + k for k in range(candidates - 1)]},
                                    {'steps': 1, 'guidance_scale': 0.5, 'seed': 0})
    run_candidate_step(work, discover_inputs(lq_dir), BicubicCandidates(), settings, num_keep=candidates,
                       metrics={'niqe': {'type': 'calculate_niqe', 'crop_border': 0}}, progress=False)
    run_segment_step(work, SLICSegmenter(n_segments=12), min_area=size, progress=False)
    return work


# keeps each annotator's secret cookie (issued at the first page), as a browser does
_BROWSER = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))


def get(url):
    """``(body, server milliseconds from the Server-Timing header)``."""
    with _BROWSER.open(url, timeout=60) as reply:
        timing = re.search(r'dur=([0-9.]+)', reply.headers.get('Server-Timing', ''))
        return reply.read(), float(timing.group(1))


def page_with_crops(base, annotator):
    """``(server ms, end-to-end ms)`` to fetch the annotator's current page and every image it shows."""
    server_ms = []

    def fetch_page():
        page, ms = get(base + f'annotate?annotator={annotator}')
        server_ms.append(ms)
        for src in re.findall(r'<img alt="[^"]*" src="([^"]+)"', page.decode()):
            server_ms.append(get(base + src.replace('&amp;', '&'))[1])
    end_to_end_s = time_call(fetch_page)
    return sum(server_ms), 1000 * end_to_end_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=512, help='SR size of the generated images')
    parser.add_argument('--candidates', type=int, default=4)
    parser.add_argument('--samples', type=int, default=4)
    parser.add_argument('--top-k', type=int, default=5)
    args = parser.parse_args(argv)
    import uvicorn

    root = tempfile.mkdtemp(prefix='bench_annotation_')
    work = build_work(root, args.size, args.samples, args.candidates)
    study, store = open_study(os.path.join(root, 'a.sqlite'), {'kind': 'instances', 'work': work.root,
                                                               'top_k': args.top_k})
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(study, store), host='127.0.0.1', port=port,
                                           log_level='warning'))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f'http://127.0.0.1:{port}/'
    cold, cached = [], []
    # one annotator per item, so each request renders the item that annotator is on
    order = study.order('bench', 0)
    for n, key in enumerate(order):
        annotator = f'bench{n}'
        # make `key` this annotator's next item by answering the ones before it in their order
        for earlier in study.order(annotator, 0):
            if earlier == key:
                break
            store.add_answer(annotator, earlier, 0, {'no_preference': True, 'best': None, 'worst': None,
                                                     'hallucinated': []}, {}, None)
        study.png_cache.clear()
        study.image_cache.clear()
        cold.append(page_with_crops(base, annotator))
        cached.append(page_with_crops(base, annotator))
    server.should_exit = True
    thread.join(10)
    print(f'instance page + {1 + args.candidates} crops, {len(order)} items, SR {args.size}x{args.size}, '
          f'{args.candidates} candidates; median over items (server: sum of Server-Timing of the '
          f'{2 + args.candidates} requests; end to end: HTTP on loopback, one request after the other)')
    for label, index in (('server', 0), ('end to end', 1)):
        cold_ms = statistics.median(c[index] for c in cold)
        cached_ms = statistics.median(c[index] for c in cached)
        print(f'{label:10}  cold {cold_ms:7.1f} ms   cached {cached_ms:6.1f} ms   '
              f'cold / cached {cold_ms / cached_ms:5.1f}x')
    print('target: cached server time < 50 ms')
    return 0


if __name__ == '__main__':
    sys.exit(main())
