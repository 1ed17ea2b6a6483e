"""Synthetic data for the BIQA rank-calibration demo and tests (``scripts/make_biqa_demo_data.py``).

Writes, under ``root``::

    sr_outputs/<method>/img_XXX.png   "SR outputs": the same synthetic scenes, degraded more for worse methods
    votes.csv                 simulated 2AFC votes per image and method pair (name1,name2,score1,score2)
    ranking.json              Thurstone scores of the methods from votes.csv
    mos/img_XXX.png, mos.csv  images with a mean opinion score (path,score)
    val_2afc.csv              human-style 2AFC pairs (pair,group,image_a,image_b,fraction_a,fraction_b)
    tiny_clip.pth             a randomly initialised tiny CLIP state dict (stands in for LIQE / CLIP weights)

Method quality is known by construction (``TRUE_SCORES``), so the pipeline can be checked end to end.
"""
import csv
import os

import cv2
import numpy as np
import torch
from scipy.stats import norm

__all__ = ['TRUE_SCORES', 'make_biqa_demo_data']

TRUE_SCORES = {'method_1': 1.0, 'method_2': 0.5, 'method_3': 0.0, 'method_4': -0.5, 'method_5': -1.0}


def _scene(rng, size):
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(4):
        fx, fy, phase = rng.uniform(1, 8), rng.uniform(1, 8), rng.uniform(0, 2 * np.pi)
        img += rng.uniform(0.1, 0.3, 3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(4, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(-0.5, 0.5, 3)
    return np.clip(img + 0.5, 0, 1)


def _degrade(img, level, rng):
    """Blur and noise growing with level (0 = clean)."""
    out = cv2.GaussianBlur(img, (0, 0), 0.3 + 0.7 * level) if level > 0 else img
    out = out + rng.normal(0, 0.012 * level, out.shape)
    return np.clip(out, 0, 1)


def _write(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, (img[..., ::-1] * 255).round().astype(np.uint8))


def make_biqa_demo_data(root, num_images=12, size=48, num_mos=16, votes_per_pair=10, num_val_pairs=12,
                        bootstrap_samples=200, seed=0):
    """Generate the demo data set (see module docstring). Returns the paths written, by name."""
    from dspo_basicsr.archs.clip_quality_arch import CLIPQualityArch
    from dspo_basicsr.demo.tiny_components import TINY_CLIP_CONFIG
    from dspo_basicsr.ranking.ranking_report import rank_methods, write_ranking_json

    rng = np.random.default_rng(seed)
    methods = list(TRUE_SCORES)
    scenes = [_scene(rng, size) for _ in range(num_images)]
    for level, method in enumerate(methods):
        for k, scene in enumerate(scenes):
            _write(os.path.join(root, 'sr_outputs', method, f'img_{k:03d}.png'), _degrade(scene, level, rng))

    votes_path = os.path.join(root, 'votes.csv')
    with open(votes_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'name1', 'name2', 'score1', 'score2'])
        for k in range(num_images):
            for i, a in enumerate(methods):
                for b in methods[i + 1:]:
                    wins = rng.binomial(votes_per_pair, norm.cdf(TRUE_SCORES[a] - TRUE_SCORES[b]))
                    writer.writerow([f'img_{k:03d}', a, b, wins / votes_per_pair, 1 - wins / votes_per_pair])
    ranking_path = os.path.join(root, 'ranking.json')
    write_ranking_json(rank_methods(votes_path, votes_per_pair, prior=0.5, num_samples=bootstrap_samples,
                                    seed=seed), ranking_path)

    mos_path = os.path.join(root, 'mos.csv')
    with open(mos_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['path', 'score'])
        for k in range(num_mos):
            level = rng.uniform(0, 4)
            _write(os.path.join(root, 'mos', f'img_{k:03d}.png'), _degrade(_scene(rng, size), level, rng))
            writer.writerow([f'mos/img_{k:03d}.png', f'{5 - level + rng.normal(0, 0.2):.3f}'])

    val_path = os.path.join(root, 'val_2afc.csv')
    with open(val_path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['pair', 'group', 'image_a', 'image_b', 'fraction_a', 'fraction_b'])
        for p in range(num_val_pairs):
            k = p % num_images
            a, b = rng.choice(methods, 2, replace=False)
            frac = rng.binomial(votes_per_pair, norm.cdf(TRUE_SCORES[a] - TRUE_SCORES[b])) / votes_per_pair
            writer.writerow([f'pair_{p:03d}', f'img_{k:03d}', f'sr_outputs/{a}/img_{k:03d}.png',
                             f'sr_outputs/{b}/img_{k:03d}.png', frac, 1 - frac])

    clip_path = os.path.join(root, 'tiny_clip.pth')
    torch.manual_seed(seed)
    torch.save(CLIPQualityArch(**TINY_CLIP_CONFIG).clip.state_dict(), clip_path)
    return {'sr': os.path.join(root, 'sr_outputs'), 'votes': votes_path, 'ranking': ranking_path, 'mos': mos_path,
            'val_2afc': val_path, 'clip': clip_path}
