"""BIQA rank calibration: fidelity loss, 2AFC, archs, feature cache, training through the CLI, metric."""
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registers everything)
from dspo_basicsr.archs.clip_quality_arch import CLIPQualityArch
from dspo_basicsr.archs.rank_calibrated_iqa_arch import RankCalibratedIQAArch
from dspo_basicsr.data.sr_method_group_dataset import SRMethodGroupDataset, collate_method_groups
from dspo_basicsr.demo.tiny_components import TINY_CLIP_CONFIG
from dspo_basicsr.losses.fidelity_loss import fidelity_loss
from dspo_basicsr.metrics.calibrated_iqa_metric import calculate_calibrated_iqa
from dspo_basicsr.metrics.two_afc import human_ceiling, model_choice, oracle_ceiling, pairs_csv_ceilings, two_afc_score
from dspo_basicsr.models.rank_calibration_model import RankCalibrationModel

from basicsr.losses import build_loss

from biqa_fixtures import REPO, make_data, model_options, train_dataset_options, write_cli_option


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp('biqa_data'))


@pytest.fixture(scope='module')
def trained(data, tmp_path_factory):
    """Train a few iterations through `python -m dspo_basicsr.cli train` and return (log text, run folder)."""
    run = tmp_path_factory.mktemp('biqa_run')
    option = write_cli_option(data, run, total_iter=6)
    result = subprocess.run([sys.executable, '-m', 'dspo_basicsr.cli', 'train', '-opt', option], cwd=run,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr, run / 'experiments' / 'biqa_calibration_demo'


# ------------------------------------------------------------------------------------------ fidelity / 2AFC
def test_fidelity_loss_by_hand():
    eps = 1e-8
    # equal scores: p = Phi(0) = 0.5; label 1 -> 1 - sqrt(0.5 + eps) - sqrt(0 + eps)
    expected_equal = 1 - math.sqrt(0.5 + eps) - math.sqrt(eps)
    # dQ = 1, scale 1: p = Phi(1) = 0.8413447461; label 0.3
    p = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    expected_soft = 1 - math.sqrt(p * 0.3 + eps) - math.sqrt((1 - p) * 0.7 + eps)
    # scale sqrt(2) (the paper's): p = Phi(2 / sqrt 2); label 1
    p2 = 0.5 * (1 + math.erf(1.0))
    expected_scaled = 1 - math.sqrt(p2 + eps) - math.sqrt(eps)
    got = fidelity_loss(torch.tensor([3.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.3]),
                        reduction='none')
    np.testing.assert_allclose(got.numpy(), [expected_equal, expected_soft], rtol=1e-6)
    scaled = fidelity_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]), scale=math.sqrt(2))
    assert scaled.item() == pytest.approx(expected_scaled, rel=1e-6)
    # a perfect, confident prediction costs (almost) nothing; the registered loss applies its weight
    assert fidelity_loss(torch.tensor([9.0]), torch.tensor([0.0]), torch.tensor([1.0])).item() < 1e-3
    registered = build_loss({'type': 'FidelityLoss', 'loss_weight': 2.0})
    assert registered(torch.tensor([3.0]), torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(
        2 * expected_equal, rel=1e-6)


def test_two_afc_by_hand():
    p = np.array([1.0, 0.7, 0.2])
    choice = model_choice([2.0, 1.0, 3.0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(choice, [1.0, 0.0, 0.5])
    # 1*1 ; 0.7*0 + 0.3*1 ; tie: 0.2*0.5 + 0.8*0.5
    assert two_afc_score(p, choice) == pytest.approx((1 + 0.3 + 0.5) / 3)
    assert human_ceiling(p) == pytest.approx((1 + (0.49 + 0.09) + (0.04 + 0.64)) / 3)
    assert oracle_ceiling(p) == pytest.approx((1 + 0.7 + 0.8) / 3)


def test_pairs_csv_ceilings(tmp_path):
    path = tmp_path / 'pairs.csv'
    path.write_text('pair,group,image_a,image_b,fraction_a,fraction_b\n'
                    'p0,g,a.png,b.png,7,3\np1,g,c.png,d.png,0.5,0.5\n')   # counts or fractions both normalise
    ceilings = pairs_csv_ceilings(str(path))
    assert ceilings['pairs'] == 2
    assert ceilings['human_ceiling'] == pytest.approx(((0.49 + 0.09) + 0.5) / 2)
    assert ceilings['oracle_ceiling'] == pytest.approx((0.7 + 0.5) / 2)


# ------------------------------------------------------------------------------------------------- archs
def test_clip_quality_arch_loads_back_and_reports_missing_weights(tmp_path):
    torch.manual_seed(0)
    arch = CLIPQualityArch(**TINY_CLIP_CONFIG)
    # a LIQE-style checkpoint: CLIP keys under 'clip_model.', wrapped in 'params'
    path = tmp_path / 'liqe_like.pth'
    torch.save({'params': {f'clip_model.{k}': v for k, v in arch.clip.state_dict().items()}}, path)
    loaded = CLIPQualityArch(load_path=str(path))
    x = torch.rand(3, 3, 40, 36)
    with torch.no_grad():
        out, ref = loaded.forward_features(x), arch.forward_features(x)
    torch.testing.assert_close(out['q'], ref['q'])
    assert out['features'].shape == (3, TINY_CLIP_CONFIG['embed_dim'])
    assert torch.all((out['q'] >= 1) & (out['q'] <= 5))
    torch.testing.assert_close(out['probs'].sum(-1), torch.ones(3))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in arch.clip.state_dict().items()}, str(tmp_path / 'clip.safetensors'))
    with torch.no_grad():
        torch.testing.assert_close(CLIPQualityArch(load_path=str(tmp_path / 'clip.safetensors'))(x), ref['q'])
    missing = tmp_path / 'LIQE.pt'
    with pytest.raises(FileNotFoundError, match='LIQE.pt'):
        CLIPQualityArch(load_path=str(missing))


def test_liqe_patch_mode():
    torch.manual_seed(0)
    arch = CLIPQualityArch(**TINY_CLIP_CONFIG, input_mode='patches', num_patch=3, step=8)
    resize = CLIPQualityArch(**TINY_CLIP_CONFIG)
    resize.load_state_dict(arch.state_dict())
    x = torch.rand(2, 3, 48, 40)                    # 3 x 2 grid of 32-pixel patches at stride 8
    patches = arch.patches(x)
    assert patches.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(patches[:, 0], x[:, :, :32, :32])  # evenly spaced grid picks, first is top-left
    assert arch.patches(torch.rand(1, 3, 20, 24)).shape[-2:] == (32, 32)  # short side upsampled to 32
    same = torch.rand(2, 3, 32, 32)                 # exactly one patch: both modes see the same pixels
    with torch.no_grad():
        torch.testing.assert_close(arch(same), resize(same))


def test_rectifier_keeps_alpha_at_least_one(data):
    torch.manual_seed(0)
    net = RankCalibratedIQAArch(backbone={'type': 'CLIPQualityArch', 'load_path': data['clip']}, hidden_dim=8)
    features = torch.randn(64, TINY_CLIP_CONFIG['embed_dim'])
    q = torch.rand(64) * 4 + 1
    for scale in (-50.0, 50.0):  # drive a strongly negative and strongly positive
        with torch.no_grad():
            net.rectifier.mlp[-1].weight.normal_(std=abs(scale))
        out = net.calibrate(features, q)
        a, b = net.rectifier(features)
        assert a.min() < -1 and a.max() > 1  # the rectifier really outputs large |a| of both signs
        assert torch.all(out['alpha'] >= 1)
        torch.testing.assert_close(out['Q'], (1 + a.abs()) * q + b)
        # with features fixed, Q grows with q (alpha >= 1 > 0): the backbone's order survives
        assert torch.all(net.calibrate(features, q + 0.5)['Q'] > out['Q'])


def test_pyiqa_backbone_through_feature_hook(tmp_path):
    options = {'type': 'pyiqa', 'arch': 'CNNIQA', 'feature_layer': 'fc2', 'probe_size': 32,
               'arch_opt': {'n_kers': 4, 'n1_nodes': 8, 'n2_nodes': 6}}
    torch.manual_seed(0)
    net = RankCalibratedIQAArch(backbone=options, hidden_dim=4)
    path = tmp_path / 'cnniqa.pth'
    torch.save(net.backbone.net.state_dict(), path)
    loaded = RankCalibratedIQAArch(backbone={**options, 'load_path': str(path)}, hidden_dim=4)
    x = torch.rand(2, 3, 32, 32)
    features, q = loaded.backbone_outputs(x)
    assert features.shape == (2, 6)
    torch.testing.assert_close(q, net.backbone_outputs(x)[1])


# --------------------------------------------------------------------------------------- feature cache
@pytest.mark.parametrize('backend', ['memory', 'lmdb'])
def test_cached_features_give_the_same_loss(data, tmp_path, backend):
    dataset = SRMethodGroupDataset(train_dataset_options(data))
    batch = collate_method_groups([dataset[0], dataset[1]])
    torch.manual_seed(0)
    cached = RankCalibrationModel(model_options(data, tmp_path, cache=True, backend=backend))
    uncached = RankCalibrationModel(model_options(data, tmp_path / 'u', cache=False))
    uncached.net_g.load_state_dict(cached.net_g.state_dict())

    first = cached.compute_losses(batch)            # fills the cache
    passes = cached.backbone_passes
    # each distinct image once: 2 items x 2 methods x B=3 plus 2 MOS pairs, less repeats across items
    keys = {k for side in ('a', 'b') for group in batch[f'keys_{side}'] for k in group}
    keys |= set(batch['mos_key_a']) | set(batch['mos_key_b'])
    assert passes == len(keys) and len(keys) > 8
    second = cached.compute_losses(batch)           # read back from the cache: no backbone pass
    assert cached.backbone_passes == passes
    reference = uncached.compute_losses(batch)
    for key in ('l_t', 'l_p', 'l_total'):
        torch.testing.assert_close(second[key], reference[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(first[key], reference[key], rtol=0, atol=1e-6)
    # gradients reach the rectifier through cached features too
    second['l_total'].backward()
    assert cached.net_g.rectifier.mlp[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in cached.net_g.backbone.parameters())
    if cached.feature_cache is not None:
        cached.feature_cache.close()


def test_non_finite_loss_stops_training(data, tmp_path):
    dataset = SRMethodGroupDataset(train_dataset_options(data))
    model = RankCalibrationModel(model_options(data, tmp_path))
    with torch.no_grad():
        model.net_g.rectifier.mlp[-1].bias.fill_(float('nan'))
    model.feed_data(collate_method_groups([dataset[0]]))
    with pytest.raises(FloatingPointError, match='iteration 7'):
        model.optimize_parameters(7)


# ------------------------------------------------------------------------------------- CLI and metric
@pytest.mark.slow
def test_calibration_trains_and_validates_through_cli(trained, data, tmp_path):
    log, run = trained
    assert 'l_t:' in log and 'l_p:' in log and 'l_total:' in log
    assert '# 2afc:' in log and '# srcc:' in log and '# plcc:' in log and '# human_ceiling:' in log
    assert (run / 'models' / 'net_g_latest.pth').is_file() and (run / 'models' / 'net_g_latest.json').is_file()
    saved = torch.load(run / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert saved and all(k.startswith('rectifier.') for k in saved)  # the frozen backbone is not copied
    # the checkpoint loads back as the starting point of another run (path.pretrain_network_g / resume)
    opt = model_options(data, tmp_path)
    opt['network_g']['hidden_dim'] = 32  # the demo option's width
    opt['path']['pretrain_network_g'] = str(run / 'models' / 'net_g_latest.pth')
    model = RankCalibrationModel(opt)
    for key, value in saved.items():
        torch.testing.assert_close(model.net_g.state_dict()[key], value)


def test_unknown_dataset_option_is_refused(data):
    with pytest.raises(KeyError, match=r"unknown option\(s\) \['group_szie'\]"):
        SRMethodGroupDataset({**train_dataset_options(data), 'group_szie': 4})


def _write_paired_images(root, names=('a', 'b', 'c')):
    rng = np.random.default_rng(0)
    for name in names:
        gt = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        os.makedirs(root / 'gt', exist_ok=True)
        os.makedirs(root / 'lq', exist_ok=True)
        cv2.imwrite(str(root / 'gt' / f'{name}.png'), gt)
        cv2.imwrite(str(root / 'lq' / f'{name}.png'), cv2.resize(gt, (16, 16), interpolation=cv2.INTER_AREA))


@pytest.mark.slow
def test_calibrated_metric_inside_srmodel_validation(trained, tmp_path):
    from basicsr.data import build_dataloader, build_dataset
    from basicsr.models import build_model
    from basicsr.utils import tensor2img

    model_path = str(trained[1] / 'models' / 'net_g_latest.pth')
    _write_paired_images(tmp_path)
    opt = {
        'name': 'msrresnet_val', 'model_type': 'SRModel', 'scale': 2, 'num_gpu': 0, 'is_train': False,
        'dist': False, 'path': {'pretrain_network_g': None, 'visualization': str(tmp_path / 'vis')},
        'network_g': {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1,
                      'upscale': 2},
        'val': {'save_img': False, 'suffix': None, 'metrics': {
            'calibrated_iqa': {'type': 'calculate_calibrated_iqa', 'model_path': model_path, 'better': 'higher'},
            'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': False}}},
    }
    dataset_opt = {'name': 'tiny_val', 'type': 'PairedImageDataset', 'phase': 'val', 'scale': 2,
                   'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'),
                   'io_backend': {'type': 'disk'}, 'filename_tmpl': '{}'}
    loader = build_dataloader(build_dataset(dataset_opt), dataset_opt, num_gpu=0, dist=False)
    torch.manual_seed(0)
    model = build_model(opt)
    model.validation(loader, current_iter=1, tb_logger=None, save_img=False)
    value = model.metric_results['calibrated_iqa']
    assert math.isfinite(value)
    assert model.best_metric_results['tiny_val']['calibrated_iqa']['better'] == 'higher'
    # the same number, computed image by image outside BasicSR
    direct = []
    for batch in loader:
        model.feed_data(batch)
        model.test()
        direct.append(calculate_calibrated_iqa(tensor2img([model.output.detach().cpu()]), model_path=model_path))
    assert value == pytest.approx(float(np.mean(direct)), rel=1e-5)


def test_metric_names_the_missing_checkpoint(tmp_path):
    missing = str(tmp_path / 'models' / 'net_g_latest.pth')
    with pytest.raises(FileNotFoundError, match='net_g_latest.pth'):
        calculate_calibrated_iqa(np.zeros((8, 8, 3), np.uint8), model_path=missing)


def test_frozen_text_features_are_encoded_once():
    torch.manual_seed(0)
    arch = CLIPQualityArch(**TINY_CLIP_CONFIG).requires_grad_(False)
    calls = []
    arch.clip.transformer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.rand(2, 3, 32, 32)
    first = arch(x)
    torch.testing.assert_close(arch(x), first)
    assert len(calls) == 1                          # the five prompts ran through the text tower once
    other = CLIPQualityArch(**TINY_CLIP_CONFIG)
    arch.load_state_dict(other.state_dict())        # new weights: the prompts are encoded again
    with torch.no_grad():
        torch.testing.assert_close(arch(x), other(x))
    assert len(calls) == 2
