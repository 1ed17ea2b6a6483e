"""Pictures of a run: the validation summary grid (tiles, order, values) and the training curves."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.utils.visualization import draw_summary, parse_training_log, plot_training_curves

from basicsr.data import build_dataloader, build_dataset
from basicsr.models import build_model

from conftest import make_paired_folders
from dspo_fixtures import in_process_options, make_tiny_preference_set

COLOURS = {'lq': (255, 0, 0), 'reference': (0, 255, 0), 'current': (0, 0, 255), 'gt': (255, 255, 0)}


def test_summary_tiles_in_order_with_their_metrics(tmp_path):
    rows = []
    for name in ('a', 'b'):
        images = {key: np.full((32 if key != 'lq' else 8, 32 if key != 'lq' else 8, 3), c, np.uint8)
                  for key, c in COLOURS.items()}
        metrics = {key: {'psnr': 20.0 + i + (name == 'b'), 'ssim': 0.5 + 0.1 * i}
                   for i, key in enumerate(('lq', 'reference', 'current'))}
        rows.append(dict(images, name=name, metrics=metrics))
    path = str(tmp_path / 'vis' / 'summary_7.png')
    layout = draw_summary(rows, path, tile_size=64)
    picture = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    assert layout == json.load(open(str(tmp_path / 'vis' / 'summary_7.json')))
    assert layout['rows'][1]['metrics']['current'] == pytest.approx({'psnr': 23.0, 'ssim': 0.7})
    assert layout['columns'] == ['lq', 'reference', 'current', 'gt']
    for r, row in enumerate(layout['rows']):
        for c, key in enumerate(layout['columns']):
            centre = picture[row['top'] + 32, c * (64 + 4) + 32]
            assert tuple(centre) == COLOURS[key], (r, key)
        assert row['captions']['current'] == ['current', f'psnr {22.0 + r:.2f}', 'ssim 0.700']
        assert row['captions']['lq'][1:] == [f'psnr {20.0 + r:.2f}', 'ssim 0.500']
        assert row['captions']['gt'] == ['GT', row['name']]
    # the caption band under a tile holds drawn (dark) text, not the tile
    band = picture[layout['rows'][0]['top'] + 64:layout['rows'][0]['top'] + 64 + layout['caption_height'], :64]
    assert (band < 128).any() and (band == 255).mean() > 0.5


def test_training_curves_from_a_basicsr_log(tmp_path):
    log = tmp_path / 'train_x_1.log'
    lines = ['2026-01-01 00:00:00,000 INFO: Model [DSPOModel] is created.']
    for it in (20, 40, 60):
        lines.append(f'2026-01-01 00:00:00,000 INFO: [x..][epoch:  0, iter:{it:8,d}, lr:(1.000e-04,)] '
                     f'[eta: 0:00:10, time (data): 0.100 (0.001)] l_dspo: {0.7 - it / 200:.4e} '
                     f'implicit_acc: {0.5 + it / 200:.4e} logit_mean: 1.0e-01 err_theta_w: {0.1 - it / 1e4:.4e} '
                     f'err_theta_l: 1.0000e-01 err_ref_w: 1.0000e-01 err_ref_l: 1.0000e-01 grad_norm: 1.0e+00 ')
    lines.append('2026-01-01 00:00:00,000 INFO: Validation demo_val\n\t # psnr: 23.1000\tBest: 23.1 @ 60 iter')
    log.write_text('\n'.join(lines) + '\n')
    series = parse_training_log(str(log))
    assert [i for i, _ in series['l_dspo']] == [20, 40, 60] and 'psnr' not in series and 'eta' not in series
    assert series['implicit_acc'][-1] == (60, pytest.approx(0.8))
    png = tmp_path / 'training_curves.png'
    panels = plot_training_curves(str(log), str(png))
    assert panels == ['l_dspo', 'implicit_acc', 'logit_mean', 'grad_norm', 'err_theta - err_ref'] or \
        panels[:3] == ['l_dspo', 'implicit_acc', 'logit_mean']
    assert 'err_theta - err_ref' in panels and cv2.imread(str(png)) is not None


def test_final_validation_writes_summary_from_the_validation_results(tmp_path):
    tiny_set = make_tiny_preference_set(str(tmp_path / 'set'))
    gt_dir, lq_dir = make_paired_folders(str(tmp_path / 'paired'), num=2, size=32)
    opt = in_process_options(tiny_set, tmp_path, total_iter=2)
    opt['path'].update(visualization=str(tmp_path / 'vis'), log=str(tmp_path))
    opt['val'] = {'save_img': False, 'sample': {'steps': 2, 'guidance_scale': 2.0, 'seed': 0, 'sampler': 'ddim'},
                  'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}}
    model = build_model(opt)
    dataset = build_dataset({'name': 'paired', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir,
                             'dataroot_lq': lq_dir, 'io_backend': {'type': 'disk'}, 'phase': 'val', 'scale': 4})
    loader = build_dataloader(dataset, {'phase': 'val'}, num_gpu=0, dist=False)

    model.validation(loader, 2, None, False)  # not the end of training: no summary
    assert not os.path.exists(tmp_path / 'vis')
    with torch.no_grad():  # move the policy away from the reference
        for p in model.bare.controlnet.controlnet_down_blocks.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.validation(loader, 3, None, False)
    layout = json.load(open(str(tmp_path / 'vis' / 'summary_3.json')))
    assert [r['name'] for r in layout['rows']] == ['000', '001']
    current = [r['captions']['current'][1] for r in layout['rows']]
    psnrs = [float(c.split()[1]) for c in current]
    assert psnrs == pytest.approx([r['metrics']['current']['psnr'] for r in layout['rows']], abs=0.005)
    # the tiles' values are the validation's: their mean is the logged PSNR of the current model
    assert np.mean(psnrs) == pytest.approx(model.metric_results['psnr'], abs=0.01)
    assert [r['captions']['reference'] for r in layout['rows']] != [r['captions']['current'] for r in layout['rows']]
    picture = cv2.imread(str(tmp_path / 'vis' / 'summary_3.png'))
    assert picture.shape[0] == 2 * (layout['tile_size'] + layout['caption_height'] + 4)
