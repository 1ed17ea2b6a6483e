"""pyiqa metrics as BasicSR validation metrics (issue 3, item 4).

Everything runs offline on the CPU: psnr/ssim/entropy need no weight files; the weight-needing metrics are
only exercised on their missing-weights path, with an empty ``$TORCH_HOME`` and Hugging Face cache.
"""
import math
import os
import socket

import numpy as np
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registers the metrics)
from dspo_basicsr.metrics import pyiqa_metric
from dspo_basicsr.metrics.metric_table import METRIC_TABLE, MissingWeightsError, metric_table_markdown

from basicsr.metrics import calculate_metric
from basicsr.utils.registry import METRIC_REGISTRY

OUR_TYPES = ('calculate_pyiqa', 'calculate_lpips', 'calculate_dists', 'calculate_musiq', 'calculate_maniqa',
             'calculate_clipiqa', 'calculate_pyiqa_niqe')


@pytest.fixture(scope='module')
def image_pair():
    """A colourful BGR uint8 ground truth and a noisy, colour-shifted restoration of it, as BasicSR gives them.

    The channels differ (horizontal / vertical / diagonal ramps) and the shift is channel-specific, so a
    metric computed on Y would change if the adapter forgot the BGR -> RGB swap.
    """
    rng = np.random.default_rng(0)
    height, width = 48, 40
    rows, cols = np.mgrid[0:height, 0:width]
    gt = np.stack([cols * 255 // width, rows * 255 // height, (rows + cols) * 255 // (height + width)], axis=-1)
    gt = gt.astype(np.uint8)
    sr = gt.astype(np.float64) + rng.normal(0, 8, gt.shape) + np.array([15.0, 0.0, -5.0])
    return np.clip(np.round(sr), 0, 255).astype(np.uint8), gt


@pytest.fixture
def offline_caches(monkeypatch, tmp_path):
    """Empty weight caches, and a socket that fails the test on any connection attempt."""
    from huggingface_hub import constants

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))
    attempts = []

    def no_connect(sock, address, *args):
        attempts.append(address)
        raise OSError(f'test: network access to {address} attempted')

    monkeypatch.setattr(socket.socket, 'connect', no_connect)
    monkeypatch.setattr(socket.socket, 'connect_ex', no_connect)
    monkeypatch.setattr(socket, 'getaddrinfo', lambda host, *args, **kwargs: no_connect(None, host))
    pyiqa_metric.clear_pyiqa_cache()
    yield tmp_path, attempts
    pyiqa_metric.clear_pyiqa_cache()


def test_registered_names_do_not_collide_with_basicsr():
    for name in OUR_TYPES + ('calculate_psnr', 'calculate_ssim', 'calculate_niqe'):
        assert name in METRIC_REGISTRY
    from basicsr.metrics import calculate_niqe, calculate_psnr
    assert METRIC_REGISTRY.get('calculate_psnr') is calculate_psnr  # BasicSR's own, untouched
    assert METRIC_REGISTRY.get('calculate_niqe') is calculate_niqe


# pyiqa computes in float32, BasicSR in float64: PSNR agrees to ~2e-4 dB on these images, well inside 1e-3.
@pytest.mark.parametrize('crop_border', [0, 4])
@pytest.mark.parametrize('test_y_channel', [False, True])
def test_psnr_through_calculate_metric_matches_basicsr(image_pair, crop_border, test_y_channel):
    sr, gt = image_pair
    data = {'img': sr, 'img2': gt}
    basicsr_psnr = calculate_metric(data, {'type': 'calculate_psnr', 'crop_border': crop_border,
                                           'test_y_channel': test_y_channel})
    # color_space ycbcr: BasicSR's Y (ITU-R BT.601); pyiqa's default for Y is YIQ.
    ours = calculate_metric(data, {'type': 'calculate_pyiqa', 'metric': 'psnr', 'crop_border': crop_border,
                                   'test_y_channel': test_y_channel, 'color_space': 'ycbcr', 'better': 'higher'})
    assert isinstance(ours, float)
    assert ours == pytest.approx(basicsr_psnr, abs=1e-3)

    # and the plain formula on the cropped RGB images
    if not test_y_channel:
        c = crop_border
        cropped_sr, cropped_gt = (x[c:x.shape[0] - c, c:x.shape[1] - c].astype(np.float64) for x in (sr, gt))
        mse = np.mean((cropped_sr - cropped_gt)**2)
        assert ours == pytest.approx(10 * math.log10(255.0**2 / mse), abs=1e-3)


def test_psnr_on_y_depends_on_channel_order(image_pair):
    """The comparison above can fail: the same images read as RGB instead of BGR give another Y-PSNR."""
    sr, gt = image_pair
    as_rgb = {'img': np.ascontiguousarray(sr[..., ::-1]), 'img2': np.ascontiguousarray(gt[..., ::-1])}
    swapped = calculate_metric(as_rgb, {'type': 'calculate_pyiqa', 'metric': 'psnr', 'test_y_channel': True,
                                        'color_space': 'ycbcr'})
    basicsr_psnr = calculate_metric({'img': sr, 'img2': gt},
                                    {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True})
    assert abs(swapped - basicsr_psnr) > 0.5


def _rounded_y(img):
    """BasicSR's Y channel (BT.601, [16, 235]) of a BGR uint8 image, rounded to integers as pyiqa does."""
    from basicsr.utils.color_util import bgr2ycbcr
    return np.round(bgr2ycbcr(img.astype(np.float32) / 255.0, y_only=True) * 255.0)[..., None]


# Both compute SSIM with an 11x11 Gaussian window (sigma 1.5) on the [0, 255] scale; per-channel SSIM is the
# mean over channels in both. On Y, pyiqa rounds Y to integers and BasicSR keeps it fractional (up to 2e-3
# apart on these images), so the Y reference is BasicSR's SSIM of the rounded Y channel. What remains is
# float32 against float64: below 1e-6, checked at 1e-5.
@pytest.mark.parametrize('crop_border', [0, 4])
@pytest.mark.parametrize('test_y_channel', [False, True])
def test_ssim_through_calculate_metric_matches_basicsr(image_pair, crop_border, test_y_channel):
    from basicsr.metrics import calculate_ssim

    sr, gt = image_pair
    if test_y_channel:
        basicsr_ssim = calculate_ssim(_rounded_y(sr), _rounded_y(gt), crop_border)
        pyiqa_name = 'ssim'
    else:
        basicsr_ssim = calculate_metric({'img': sr, 'img2': gt}, {'type': 'calculate_ssim',
                                                                  'crop_border': crop_border})
        pyiqa_name = 'ssimc'
    ours = calculate_metric({'img': sr, 'img2': gt}, {'type': 'calculate_pyiqa', 'metric': pyiqa_name,
                                                      'crop_border': crop_border, 'test_y_channel': test_y_channel,
                                                      'color_space': 'ycbcr'})
    assert ours == pytest.approx(basicsr_ssim, abs=1e-5)
    assert ours < 0.99  # the images differ: a metric returning 1 would not pass


def test_one_metric_object_per_name_device_and_options(image_pair, monkeypatch):
    import pyiqa

    pyiqa_metric.clear_pyiqa_cache()
    built = []
    create_metric = pyiqa.create_metric

    def counting_create_metric(name, *args, **kwargs):
        built.append(name)
        return create_metric(name, *args, **kwargs)

    monkeypatch.setattr(pyiqa, 'create_metric', counting_create_metric)
    sr, gt = image_pair
    first = pyiqa_metric.get_pyiqa_metric('psnr', 'cpu', test_y_channel=True)
    assert pyiqa_metric.get_pyiqa_metric('psnr', torch.device('cpu'), test_y_channel=True) is first
    for _ in range(3):
        calculate_metric({'img': sr, 'img2': gt},
                         {'type': 'calculate_pyiqa', 'metric': 'psnr', 'device': 'cpu', 'test_y_channel': True})
    assert built == ['psnr']
    other = pyiqa_metric.get_pyiqa_metric('psnr', 'cpu', test_y_channel=False)
    assert other is not first and built == ['psnr', 'psnr']
    assert not first.training and first.device == torch.device('cpu')


def test_no_reference_metric_without_ground_truth():
    """BasicSR gives no img2 when the validation set has no GT; pyiqa's `entropy` needs no weight files."""
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    noisy_entropy = calculate_metric({'img': noise}, {'type': 'calculate_pyiqa', 'metric': 'entropy'})
    flat_entropy = pyiqa_metric.calculate_pyiqa(flat, None, metric='entropy')
    assert flat_entropy == pytest.approx(0.0, abs=1e-6)
    assert 7.0 < noisy_entropy <= 8.0


def test_full_reference_metric_without_ground_truth_names_the_fix(image_pair):
    sr, _ = image_pair
    with pytest.raises(ValueError, match='full-reference.*ground truth'):
        calculate_metric({'img': sr}, {'type': 'calculate_pyiqa', 'metric': 'psnr'})


def test_unknown_pyiqa_name_suggests_close_names(image_pair):
    sr, gt = image_pair
    with pytest.raises(KeyError, match='lpips'):
        calculate_metric({'img': sr, 'img2': gt}, {'type': 'calculate_pyiqa', 'metric': 'lpipz'})


def test_missing_lpips_weights_fail_fast_with_the_folders(image_pair, offline_caches):
    tmp_path, attempts = offline_caches
    sr, gt = image_pair
    with pytest.raises(FileNotFoundError) as raised:
        calculate_metric({'img': sr, 'img2': gt}, {'type': 'calculate_lpips', 'better': 'lower'})
    assert isinstance(raised.value, MissingWeightsError)
    message = str(raised.value)
    pyiqa_dir = os.path.join(str(tmp_path / 'torch'), 'hub', 'pyiqa')
    checkpoints_dir = os.path.join(str(tmp_path / 'torch'), 'hub', 'checkpoints')
    assert f'LPIPS_v0.1_alex-df73285e.pth -> put it in {pyiqa_dir} ' in message
    assert f'alexnet-owt-7be5be79.pth -> put it in {checkpoints_dir} ' in message
    assert attempts == []


def test_unlisted_metric_is_stopped_by_the_download_guard(image_pair, offline_caches):
    """`brisque` is not in our table: pyiqa itself reaches its download, which raises instead."""
    import torch.hub
    from pyiqa.utils import download_util

    tmp_path, attempts = offline_caches
    sr, _ = image_pair
    with pytest.raises(MissingWeightsError) as raised:
        pyiqa_metric.calculate_pyiqa(sr, None, metric='brisque', device='cpu')
    pyiqa_dir = os.path.join(str(tmp_path / 'torch'), 'hub', 'pyiqa')
    assert f'brisque_svm_weights.pth -> put it in {pyiqa_dir} ' in str(raised.value)
    assert attempts == []
    # the guard is gone after the call
    assert download_util.download_url_to_file is torch.hub.download_url_to_file
    assert torch.hub.download_url_to_file.__module__ == 'torch.hub'


@pytest.mark.parametrize('info', [info for info in METRIC_TABLE if info.pyiqa_name],
                         ids=lambda info: info.basicsr_type)
def test_every_named_metric_names_all_its_missing_files(image_pair, offline_caches, info):
    tmp_path, attempts = offline_caches
    sr, gt = image_pair
    with pytest.raises(MissingWeightsError) as raised:
        calculate_metric({'img': sr, 'img2': gt}, {'type': info.basicsr_type})
    for weight in info.weights:
        assert weight.file_name in str(raised.value)
        assert str(tmp_path) in weight.folder()
    assert attempts == []


def test_table_agrees_with_installed_pyiqa():
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    for info in METRIC_TABLE:
        assert info.basicsr_type in METRIC_REGISTRY
        if info.pyiqa_name is None:
            continue
        config = DEFAULT_CONFIGS[info.pyiqa_name]
        assert info.reference == config['metric_mode'], info.basicsr_type
        assert info.lower_better == config.get('lower_better', False), info.basicsr_type
        assert info.score_range == config['score_range'], info.basicsr_type
    markdown = metric_table_markdown().splitlines()
    assert len(markdown) == 2 + len(METRIC_TABLE)
    lpips_row = next(line for line in markdown if line.startswith('| `calculate_lpips`'))
    assert '| lower |' in lpips_row and '$TORCH_HOME/hub/pyiqa/LPIPS_v0.1_alex-df73285e.pth' in lpips_row


def test_docs_show_the_current_table():
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'metrics.md')
    with open(docs, encoding='utf-8') as handle:
        assert metric_table_markdown() in handle.read(), 'docs/metrics.md: paste metric_table_markdown() again'
