"""MAD-competition selection: greedy rule, feature reuse (backbone pass counts), outputs."""
import csv
import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dspo_basicsr.ranking.mad import (
    VGG16_WEIGHTS,
    FeatureDistance,
    _greedy,
    _torch_hub_with_vgg16,
    build_distances,
    default_perceptual_distance,
    run_mad_selection,
    structure_texture_distance,
)


def tiny_d1():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    return FeatureDistance(lambda x: [x, net[:2](x), net(x)], structure_texture_distance, name='tiny DISTS')


def tiny_d2():
    return FeatureDistance(lambda x: torch.nn.functional.normalize(x.mean([2, 3]), dim=1)[0] + 0.0,
                           lambda a, b: 1 - torch.dot(a, b).item(), name='colour')


def write_folders(root, methods=3, images=5, size=24):
    rng = np.random.default_rng(0)
    for m in range(images):
        base = rng.random((size, size, 3))
        os.makedirs(root / 'lr', exist_ok=True)
        cv2.imwrite(str(root / 'lr' / f'im{m}.png'), (cv2.resize(base, (size // 2, size // 2)) * 255).astype(np.uint8))
        for i in range(methods):
            os.makedirs(root / 'sr' / f'method{i}', exist_ok=True)
            out = cv2.GaussianBlur(base, (0, 0), 0.2 + i * (m + 1) * 0.3)
            cv2.imwrite(str(root / 'sr' / f'method{i}' / f'im{m}.png'), (out * 255).astype(np.uint8))


def test_greedy_trades_difference_for_diversity():
    d1 = np.array([1.0, 0.95, 0.5])
    d2 = np.array([[0.0, 0.01, 1.0], [0.01, 0.0, 1.0], [1.0, 1.0, 0.0]])  # images 0 and 1 look alike
    assert [p[0] for p in _greedy(d1, d2, k=2, lam=0.0)] == [0, 1]       # no diversity: largest D1 first
    assert [p[0] for p in _greedy(d1, d2, k=2, lam=1.0)] == [0, 2]       # diversity favours the other scene


def test_features_are_reused_across_pairs(tmp_path):
    write_folders(tmp_path, methods=4, images=5)
    reused = run_mad_selection(str(tmp_path / 'sr'), str(tmp_path / 'lr'), str(tmp_path / 'out'), k=2,
                               d1=tiny_d1(), d2=tiny_d2())
    per_pair = run_mad_selection(str(tmp_path / 'sr'), str(tmp_path / 'lr'), str(tmp_path / 'out_pp'), k=2,
                                 d1=tiny_d1(), d2=tiny_d2(), reuse_features=False)
    n, m, pairs = 4, 5, 6
    assert reused.passes == {'d1': n * m, 'd2': m}                 # once per image and method
    assert per_pair.passes == {'d1': 2 * pairs * m, 'd2': pairs * m}
    np.testing.assert_allclose(reused.d1, per_pair.d1, rtol=1e-6)   # same distances, same picks
    assert reused.selections == per_pair.selections
    with open(tmp_path / 'out' / 'mad_pairs.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == pairs * 2 and rows[0]['group'] == 'method0_vs_method1'
    assert os.path.isfile(rows[0]['image_a']) and os.path.isfile(rows[0]['image_b'])
    sheet = cv2.imread(str(tmp_path / 'out' / 'contact_sheets' / 'method0_vs_method1.png'))
    assert sheet.shape == (2 * (16 + 16 + 24), 3 * 24, 3)   # per row: caption, tile labels, images
    assert (sheet[:16] < 128).any() and (sheet[56:72] < 128).any()   # both captions are written


def test_default_distance_names_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    with pytest.raises(FileNotFoundError, match='vgg16-397923af.pth'):
        default_perceptual_distance()


def test_every_missing_weight_file_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError) as info:
        build_distances('dists', 'vgg', dists_weights=str(tmp_path / 'my_dists.pth'))
    message = str(info.value)
    assert 'my_dists.pth' in message and 'vgg16-397923af.pth' in message
    assert '--dists-weights' in message and '--vgg16-weights' in message and '--d1 l1 --d2 thumbnail' in message
    d1, d2 = build_distances('l1', 'thumbnail')                     # no weights needed
    assert d1.name == 'L1' and d2.name == 'thumbnail'


class _Unpicklable:
    """A Python object: ``weights_only=True`` refuses to unpickle it."""


def test_vgg16_file_is_read_by_the_strict_checkpoint_reader(tmp_path):
    weights = tmp_path / 'my_vgg16.pth'
    torch.save({'features.0.weight': torch.zeros(1), 'note': _Unpicklable()}, weights)
    for d1, d2 in (('vgg', 'thumbnail'), ('l1', 'vgg')):
        with pytest.raises(ValueError, match='torchvision VGG16 weights.*my_vgg16.pth.*weights_only=True'):
            build_distances(d1, d2, vgg16_weights=str(weights))


def test_vgg16_file_elsewhere_is_found_by_torchvision(tmp_path):
    weights = tmp_path / 'my_vgg16.pth'
    weights.write_bytes(b'x')
    before = torch.hub.get_dir()
    with _torch_hub_with_vgg16(str(weights)):
        linked = os.path.join(torch.hub.get_dir(), 'checkpoints', VGG16_WEIGHTS)
        assert os.path.realpath(linked) == str(weights.resolve())
    assert torch.hub.get_dir() == before


@pytest.mark.slow
def test_command_line_offline_distances(tmp_path):
    import subprocess
    import sys
    write_folders(tmp_path, methods=3, images=4)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(repo, 'scripts', 'mad_select.py'), '--sr', str(tmp_path / 'sr'),
               '--lr', str(tmp_path / 'lr'), '--out', str(tmp_path / 'mad'), '--k', '2', '--d1', 'l1',
               '--d2', 'thumbnail']
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'PYTHONPATH': repo, 'TORCH_HOME': str(tmp_path / 'empty')})
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / 'mad' / 'mad_pairs.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 and float(rows[0]['d1']) > 0

    # The D1 feature pass split over two processes (each ranks half the images) selects the same pairs.
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port=29653']
    sharded = torchrun + command[1:6] + ['--out', str(tmp_path / 'mad2')] + command[8:] + ['--launcher', 'pytorch']
    result = subprocess.run(sharded, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, 'PYTHONPATH': repo, 'TORCH_HOME': str(tmp_path / 'empty'),
                                 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / 'mad2' / 'mad_pairs.csv').read_text() == (tmp_path / 'mad' / 'mad_pairs.csv').read_text()
    assert '(6 D1' in result.stdout   # rank 0 ran the backbone on 2 of the 4 images x 3 methods


def test_mad_pairs_with_votes_rank(tmp_path):
    """Step 3-4 of the loop in docs/biqa.md: votes added to mad_pairs.csv, ranked with --columns."""
    from dspo_basicsr.ranking import rank_methods
    write_folders(tmp_path, methods=3, images=5)
    result = run_mad_selection(str(tmp_path / 'sr'), str(tmp_path / 'lr'), str(tmp_path / 'mad'), k=3,
                               d1='l1', d2='thumbnail')
    assert result.passes['d1'] == 15
    with open(tmp_path / 'mad' / 'mad_pairs.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    quality = {'method0': 2, 'method1': 1, 'method2': 0}   # simulated subjects prefer the sharper method
    with open(tmp_path / 'votes.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ['score_a', 'score_b'])
        writer.writeheader()
        for row in rows:
            better = quality[row['method_a']] > quality[row['method_b']]
            writer.writerow({**row, 'score_a': 0.8 if better else 0.2, 'score_b': 0.2 if better else 0.8})
    ranking = rank_methods(str(tmp_path / 'votes.csv'), 10, ('method_a', 'method_b', 'score_a', 'score_b'),
                           num_samples=20)
    assert ranking['methods'] == ['method0', 'method1', 'method2']


def test_vgg16_hub_folder_leaves_torch_hub_unpinned(tmp_path, monkeypatch):
    """After the temporary hub folder, torch.hub follows TORCH_HOME again (later tests and jobs set it)."""
    from dspo_basicsr.ranking.mad import _torch_hub_with_vgg16
    vgg = tmp_path / 'my_vgg16.pth'
    vgg.write_bytes(b'')
    with _torch_hub_with_vgg16(str(vgg)):
        assert os.path.isfile(os.path.join(torch.hub.get_dir(), 'checkpoints', 'vgg16-397923af.pth'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'home'))
    assert torch.hub.get_dir() == str(tmp_path / 'home' / 'hub')
