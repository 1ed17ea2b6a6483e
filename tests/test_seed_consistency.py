"""Seed consistency: Best@M >= Mean@M >= Worst@M, M = 1 is one sample, seeds batched through the sampler."""
import csv
import os
import runpy

import numpy as np
import pytest

from dspo_basicsr.demo.tiny_arch import TinyControlSD2Arch
from dspo_basicsr.seed_consistency import best_mean_worst, sample_counts

from conftest import REPO, make_paired_folders, write_options
from dspo_fixtures import dspo_options, make_tiny_preference_set


def test_best_mean_worst_by_hand():
    values = np.array([[1.0, 3.0, 2.0, 0.0], [4.0, 4.0, 1.0, 5.0]])
    counts = sample_counts(4)
    assert counts == [1, 2, 4] and sample_counts(6) == [1, 2, 4, 6] and sample_counts(1) == [1]
    up = best_mean_worst(values, counts)
    assert up['best'].tolist() == [2.5, 3.5, 4.0]      # max of the first M seeds, averaged over the 2 images
    assert up['mean'].tolist() == [2.5, 3.0, 2.5]
    assert up['worst'].tolist() == [2.5, 2.5, 0.5]
    down = best_mean_worst(values, counts, higher_better=False)  # e.g. LPIPS: the best is the smallest
    assert down['best'].tolist() == [2.5, 2.5, 0.5] and down['worst'].tolist() == [2.5, 3.5, 4.0]


def test_script_on_a_tiny_model(tmp_path):
    paths = make_tiny_preference_set(str(tmp_path / 'set'))
    gt, lq = make_paired_folders(str(tmp_path / 'paired'), num=2, size=32)
    opt = dspo_options(paths, val=False)
    opt['datasets'] = {'test_1': {'name': 'tiny_test', 'type': 'PairedImageDataset', 'dataroot_gt': gt,
                                  'dataroot_lq': lq, 'io_backend': {'type': 'disk'}}}
    opt['val'] = {'sample': {'steps': 2, 'guidance_scale': 1.0, 'sampler': 'ddim'}, 'metrics': {
        'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
        'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}}}
    option_file = write_options(tmp_path / 'test.yml', opt)
    main = runpy.run_path(os.path.join(REPO, 'scripts', 'seed_consistency.py'), run_name='dspo_test')['main']
    out = tmp_path / 'out'
    assert main(['-opt', option_file, '--seeds', '5', '--batch', '2', '--metrics', 'psnr',
                 '--checkpoint', 'pretrained=none', '--out', str(out)]) == 0
    with open(out / 'seed_consistency.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [int(r['M']) for r in rows] == [1, 2, 4, 5] and {r['metric'] for r in rows} == {'psnr'}
    for row in rows:
        assert float(row['best']) >= float(row['mean']) >= float(row['worst'])
    scores = np.load(out / 'scores_pretrained.npz')['psnr']  # (images, seeds)
    assert scores.shape == (2, 5) and len(np.unique(scores.round(6))) > 2  # different seeds, different samples
    first = rows[0]
    assert float(first['best']) == float(first['mean']) == float(first['worst']) == pytest.approx(scores[:, 0].mean())
    assert float(rows[-1]['best']) == pytest.approx(scores.max(axis=1).mean())
    assert (out / 'seed_consistency_psnr.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # M = 1 is a single sample: one seed, one sampler call of batch 1, scores the same (DDIM is deterministic
    # given the initial noise, whose first row a batch of 2 shares with a batch of 1).
    assert main(['-opt', option_file, '--seeds', '1', '--batch', '1', '--metrics', 'psnr',
                 '--checkpoint', 'pretrained=none', '--out', str(tmp_path / 'one')]) == 0
    single = np.load(tmp_path / 'one' / 'scores_pretrained.npz')['psnr']
    np.testing.assert_allclose(single[:, 0], scores[:, 0], rtol=1e-4)
    assert main(['-opt', option_file, '--metrics', 'lpips', '--out', str(tmp_path / 'x')]) == 2


def test_seeds_are_sampled_with_the_validation_colour_fix():
    """val.sample's protocol keys (color_fix, ...) reach the sampler, as in the model's own validation."""
    import torch

    from dspo_basicsr.seed_consistency import sample_seeds
    arch = TinyControlSD2Arch(sampler='ddim').eval()
    lq = torch.rand(1, 3, 8, 8)
    opt = dict(steps=2, guidance_scale=1.0, prompt='', sampler='ddim')
    plain = sample_seeds(arch, lq, 2, opt, batch_size=2)
    fixed = sample_seeds(arch, lq, 2, dict(opt, color_fix='adain'), batch_size=2)
    bicubic_mean = arch.upsample_lq(lq).mean(dim=(2, 3))
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), bicubic_mean.expand(2, -1), atol=0.05, rtol=0)
    assert not torch.allclose(plain, fixed)
