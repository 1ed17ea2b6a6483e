"""SR outputs of BasicSR archs (tiny RRDBNet / MSRResNet saved as BasicSR saves them) and a diffusion framework."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml

import dspo_basicsr  # noqa: F401  (registers everything)
from dspo_basicsr import sr_methods
from dspo_basicsr.data.sr_method_group_dataset import SRMethodGroupDataset
from dspo_basicsr.sr_methods import load_methods_file, run_sr_methods, tiled_forward

from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.archs.srresnet_arch import MSRResNet
from basicsr.models.sr_model import SRModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RRDB = {'type': 'RRDBNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'num_grow_ch': 4,
        'scale': 4}
SRRESNET = {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1, 'upscale': 4}


def save_like_basicsr(nets, models_dir, param_key):
    """BasicSR's own BaseModel.save_network: {param_key: state_dict} in <models>/net_g_latest.pth."""
    models_dir.mkdir(parents=True)   # BasicSR's experiment folders exist before it saves
    model = SRModel({'model_type': 'SRModel', 'is_train': False, 'dist': False, 'num_gpu': 0, 'network_g': dict(RRDB),
                     'path': {'models': str(models_dir)}})
    model.save_network(nets, 'net_g', 'latest', param_key=param_key)
    return str(models_dir / 'net_g_latest.pth')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('sr_methods')
    torch.manual_seed(0)
    rrdb = RRDBNet(**{k: v for k, v in RRDB.items() if k != 'type'})
    rrdb_ema = RRDBNet(**{k: v for k, v in RRDB.items() if k != 'type'})
    srresnet = MSRResNet(**{k: v for k, v in SRRESNET.items() if k != 'type'})
    # Real-ESRGAN / ESRGANModel layout: params and params_ema side by side; SRModel layout: params only
    rrdb_path = save_like_basicsr([rrdb, rrdb_ema], root / 'rrdb', ['params', 'params_ema'])
    srresnet_path = save_like_basicsr(srresnet, root / 'srresnet', 'params')
    lr_dir = root / 'lr'
    lr_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        cv2.imwrite(str(lr_dir / f'img_{k}.png'), rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    methods = {'methods': {
        'Real-ESRGAN-tiny': {'network_g': RRDB, 'path': rrdb_path, 'param_key': 'params_ema', 'scale': 4},
        'SRResNet-tiny': {'network_g': SRRESNET, 'path': srresnet_path, 'param_key': 'params_ema',  # falls back
                          'tile': 6, 'tile_pad': 8, 'scale': 4},
    }}
    methods_path = root / 'methods.yml'
    methods_path.write_text(yaml.safe_dump(methods, sort_keys=False))
    return {'root': root, 'lr': str(lr_dir), 'methods': str(methods_path), 'rrdb': rrdb, 'rrdb_ema': rrdb_ema,
            'srresnet': srresnet}


def read_png(path):
    return torch.from_numpy(cv2.imread(path)[:, :, ::-1].astype(np.float32) / 255).permute(2, 0, 1)[None]


def test_tiles_match_the_whole_image():
    torch.manual_seed(0)
    net = MSRResNet(num_feat=8, num_block=1, upscale=4).eval()
    lr = torch.rand(1, 3, 19, 26)
    whole = tiled_forward(net, lr)
    tiled = tiled_forward(net, lr, tile=8, tile_pad=8)
    assert tiled.shape == whole.shape == (1, 3, 76, 104)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)     # context covers the receptive field
    seams = tiled_forward(net, lr, tile=8, tile_pad=0)
    assert (seams - whole).abs().max() > 1e-3                           # without context the tiles differ
    padded = tiled_forward(net, lr, tile=8, tile_pad=8, pad_to=4)       # SwinIR-style window padding
    assert padded.shape == whole.shape


@pytest.mark.slow
def test_outputs_resume_and_feed_method_groups(setup, tmp_path, monkeypatch):
    out = tmp_path / 'sr_outputs'
    real_write, writes = sr_methods._write_png, []

    def interrupted_write(path, sr):
        if len(writes) == 5:          # Ctrl-C during the second method
            raise KeyboardInterrupt
        writes.append(path)
        real_write(path, sr)

    monkeypatch.setattr(sr_methods, '_write_png', interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run_sr_methods(setup['methods'], setup['lr'], str(out), progress=False)
    monkeypatch.setattr(sr_methods, '_write_png', real_write)
    report = run_sr_methods(setup['methods'], setup['lr'], str(out), progress=False)
    assert report.written == {'Real-ESRGAN-tiny': 0, 'SRResNet-tiny': 3}
    assert report.skipped == {'Real-ESRGAN-tiny': 4, 'SRResNet-tiny': 1}

    # BasicSR's loading picked params_ema (and fell back to params for the SRModel checkpoint)
    lr = read_png(os.path.join(setup['lr'], 'img_2.png'))
    with torch.no_grad():
        ema, plain = setup['rrdb_ema'](lr).clamp(0, 1), setup['rrdb'](lr).clamp(0, 1)
        srresnet = setup['srresnet'](lr).clamp(0, 1)
    written = read_png(str(out / 'Real-ESRGAN-tiny' / 'img_2.png'))
    assert written.shape == (1, 3, 40, 48)
    assert (written - ema).abs().max() <= 1 / 255 + 1e-6 < (written - plain).abs().max()
    assert (read_png(str(out / 'SRResNet-tiny' / 'img_2.png')) - srresnet).abs().max() <= 1 / 255 + 1e-6

    ranking = tmp_path / 'ranking.json'
    ranking.write_text(json.dumps({'scores': {'Real-ESRGAN-tiny': 0.4, 'SRResNet-tiny': -0.4}}))
    groups = SRMethodGroupDataset({'name': 'g', 'dataroot': str(out), 'ranking_json': str(ranking), 'group_size': 2})
    assert groups.methods == ['Real-ESRGAN-tiny', 'SRResNet-tiny'] and len(groups.images) == 4
    item = groups[0]
    assert item['group_a'].shape == (2, 3, 40, 48) and item['label'] in (0.0, 1.0)

    # the command line: everything is there, so a rerun only reports it
    result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'run_sr_methods.py'), '-opt',
                             setup['methods'], '--lr', setup['lr'], '--out', str(out), '--no-progress'],
                            capture_output=True, text=True, timeout=300, env={**os.environ, 'PYTHONPATH': REPO})
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'SRResNet-tiny: 0 written, 4 already there' in result.stdout


def test_bad_methods_file_names_every_problem(tmp_path):
    path = tmp_path / 'methods.yml'
    path.write_text(yaml.safe_dump({'methods': {
        'a': {'network_g': RRDB, 'path': str(tmp_path / 'missing_a.pth')},
        'b': {'network_g': RRDB, 'path': str(tmp_path / 'missing_b.pth'), 'tiles': 4},
        'c': {'sampling': {}}}}))
    with pytest.raises(ValueError) as info:
        load_methods_file(str(path))
    message = str(info.value)
    assert 'missing_a.pth' in message and 'missing_b.pth' in message and "['tiles']" in message
    assert 'c: give either network_g' in message


class Payload:
    """A Python object: ``weights_only=True`` refuses to unpickle it."""


def test_methods_file_and_checkpoints_go_through_the_strict_readers(setup, tmp_path):
    """The one option reader refuses Python tags; the one checkpoint reader refuses pickled objects."""
    from dspo_basicsr.utils.options import OptionFileError
    tagged = tmp_path / 'tagged.yml'
    tagged.write_text('methods: !!python/object/apply:os.system ["true"]\n')
    with pytest.raises(OptionFileError, match='tagged.yml.*safe YAML loader'):
        load_methods_file(str(tagged))
    with pytest.raises(OptionFileError, match='nowhere.yml.*does not exist'):
        load_methods_file(str(tmp_path / 'nowhere.yml'))
    methods = load_methods_file(setup['methods'])
    assert yaml.safe_load(yaml.safe_dump(methods)) == methods  # plain dicts: entries go into other YAML files
    entry = methods['Real-ESRGAN-tiny']
    pickled = tmp_path / 'pickled.pth'
    torch.save({'params_ema': {}, 'extra': Payload()}, pickled)
    with pytest.raises(ValueError, match='method x: checkpoint.*pickled.pth.*weights_only=True'):
        sr_methods.build_method('x', {**entry, 'path': str(pickled)})


def test_wrong_param_key_is_named(setup, tmp_path):
    entry = load_methods_file(setup['methods'])['Real-ESRGAN-tiny']
    state = torch.load(entry['path'], weights_only=True)
    bare = tmp_path / 'bare.pth'
    torch.save({'state_dict': state['params']}, bare)
    with pytest.raises(KeyError, match="no 'params_ema' \\(nor 'params'\\).*'state_dict'"):
        sr_methods.build_method('x', {**entry, 'path': str(bare)})


def test_diffusion_framework_entry(tmp_path):
    lr_dir = tmp_path / 'lr'
    lr_dir.mkdir()
    cv2.imwrite(str(lr_dir / 'a.png'), np.full((8, 8, 3), 120, np.uint8))
    methods = {'tiny-sd2': {'framework': {'network': {'type': 'TinyControlSD2Arch', 'scale': 4}},
                            'sampling': {'steps': 2, 'guidance_scale': 1.0, 'seed': 3, 'prompt': 'a photo'},
                            'scale': 4}}
    report = run_sr_methods(methods, str(lr_dir), str(tmp_path / 'out'), progress=False)
    assert report.written == {'tiny-sd2': 1}
    assert cv2.imread(str(tmp_path / 'out' / 'tiny-sd2' / 'a.png')).shape == (32, 32, 3)


def test_example_methods_file_builds_with_basicsr_archs():
    from basicsr.archs import build_network
    with open(os.path.join(REPO, 'options', 'sr_methods', 'example.yml'), encoding='utf-8') as f:
        methods = yaml.safe_load(f)['methods']
    for name, entry in methods.items():
        assert set(entry) <= sr_methods.NETWORK_KEYS, name
        net = build_network(dict(entry['network_g']))
        with torch.no_grad():
            out = tiled_forward(net.eval(), torch.rand(1, 3, 12, 12), pad_to=entry.get('pad_to', 1))
        assert out.shape == (1, 3, 12 * entry['scale'], 12 * entry['scale']), name


def test_candidate_sources_beside_the_settings_grid(setup, tmp_path):
    """generate_candidates.py with a `sources:` section: one more candidate per source model."""
    import runpy
    lq_dir = tmp_path / 'lq'
    lq_dir.mkdir()
    rng = np.random.default_rng(1)
    gt_dir = tmp_path / 'gt'
    gt_dir.mkdir()
    gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(gt_dir / 'img0.png'), gt)
    cv2.imwrite(str(lq_dir / 'img0.png'), cv2.resize(gt, (8, 8), interpolation=cv2.INTER_AREA))
    source = load_methods_file(setup['methods'])['SRResNet-tiny']
    chain = {'framework': {'network': {'type': 'TinyControlSD2Arch', 'scale': 4}},
             'sampling': {'default': {'steps': 2, 'guidance_scale': 2.0, 'seed': 0}, 'grid': {'guidance_scale': [1.0]},
                          'num_keep': 3},
             'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}},
             'sources': {'SRResNet-tiny': source}}
    chain_path = tmp_path / 'chain.yml'
    chain_path.write_text(yaml.safe_dump(chain, sort_keys=False))
    main = runpy.run_path(os.path.join(REPO, 'scripts', 'generate_candidates.py'), run_name='dspo_test')['main']
    work = tmp_path / 'work'
    assert main(['-opt', str(chain_path), '--lq', str(lq_dir), '--gt', str(gt_dir), '--work', str(work),
                 '--no-progress']) == 0
    record = json.loads((work / 'candidates' / 'img0' / 'candidates.json').read_text())
    assert record['grid'][-1] == {'source': 'SRResNet-tiny'} and len(record['grid']) == 3
    assert len(record['all_scores']['psnr']) == 3
    n = record['settings'].index({'source': 'SRResNet-tiny'})
    candidate = cv2.imread(str(work / 'candidates' / 'img0' / f'c{n}.png'))[:, :, ::-1].astype(np.float32) / 255
    lr = torch.from_numpy(cv2.imread(str(lq_dir / 'img0.png'))[:, :, ::-1].astype(np.float32) / 255)
    with torch.no_grad():
        expected = setup['srresnet'](lr.permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(candidate - expected).max() <= 1 / 255 + 1e-6


def test_sharded_ranks_write_each_output_once_and_equal_one_process(setup, tmp_path, monkeypatch):
    """Two ranks (threads here, meeting at a thread barrier instead of gloo's) split the unfinished images."""
    import threading

    from dspo_basicsr.utils.distributed import DataShard

    class ThreadShard(DataShard):
        meeting = threading.Barrier(2)

        def barrier(self):
            self.meeting.wait(timeout=120)

    one = tmp_path / 'one'
    run_sr_methods(setup['methods'], setup['lr'], str(one), progress=False)
    two, writes = tmp_path / 'two', []
    real_write = sr_methods._write_png

    def counted_write(path, sr):
        writes.append(os.path.relpath(path, two))
        real_write(path, sr)

    monkeypatch.setattr(sr_methods, '_write_png', counted_write)
    reports = [None, None]

    def rank_run(rank):
        reports[rank] = run_sr_methods(setup['methods'], setup['lr'], str(two), progress=False,
                                       shard=ThreadShard(rank, 2))

    threads = [threading.Thread(target=rank_run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [r.written['SRResNet-tiny'] for r in reports] == [2, 2]
    assert sorted(writes) == sorted(set(writes)) and len(writes) == 8
    for method in ('Real-ESRGAN-tiny', 'SRResNet-tiny'):
        names = sorted(n for n in os.listdir(one / method) if n.endswith('.png'))
        assert names == sorted(n for n in os.listdir(two / method) if n.endswith('.png')) and len(names) == 4
        for name in names:
            assert (one / method / name).read_bytes() == (two / method / name).read_bytes()
