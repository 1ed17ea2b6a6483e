"""Rank-calibrated blind IQA as a BasicSR validation metric.

Scores an SR output with a model trained by ``RankCalibrationModel`` ("Learning from Model Rankings
Improves Blind Super-Resolution Image Quality Assessment"). No reference is needed: ``img2`` is ignored.
Direction: higher is better. Range: the backbone q_w lies in [1, 5]; the calibrated Q = (1 + |a|) q_w + b
is a stretched and shifted version of it, typically around [1, 5] but not bounded.

Use in any ``val.metrics`` block, including BasicSR's own SRModel::

    val:
      metrics:
        calibrated_iqa:
          type: calculate_calibrated_iqa
          model_path: experiments/biqa_calibration/models/net_g_latest.pth
          better: higher
"""
import threading

import numpy as np
import torch

from dspo_basicsr.archs.rank_calibrated_iqa_arch import load_rank_calibrated_iqa

from basicsr.utils.registry import METRIC_REGISTRY

__all__ = ['calculate_calibrated_iqa', 'clear_calibrated_iqa_cache']

_MODELS = {}
_LOCK = threading.Lock()


def _default_device():
    return torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')


def _model(model_path, network, device):
    # one loaded model per checkpoint, network override and device: validation calls this per image
    key = (model_path, repr(sorted((network or {}).items())), str(device))
    with _LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_rank_calibrated_iqa(model_path, network).to(device)
        return _MODELS[key]


def clear_calibrated_iqa_cache():
    """Forget loaded models (e.g. after retraining into the same path)."""
    with _LOCK:
        _MODELS.clear()


@METRIC_REGISTRY.register()
def calculate_calibrated_iqa(img, img2=None, model_path=None, network=None, crop_border=0, input_order='HWC',
                             device=None, **kwargs):
    """Calibrated quality Q of one image.

    Args:
        img (ndarray): (H, W, 3) BGR uint8 (or float in [0, 255]) image, as BasicSR's validation passes it.
        img2 (ndarray, optional): Ignored (no-reference metric); accepted because validation passes GT.
        model_path (str): ``net_g_<iter>.pth`` written by ``RankCalibrationModel`` (with its ``.json``).
        network (dict, optional): Network options overriding the saved ones (e.g. ``backbone.load_path``).
        crop_border (int): Pixels cropped from each border before scoring.
        input_order (str): 'HWC' or 'CHW'.
        device (str, optional): Default: CUDA when available, else CPU.

    Returns:
        float: Q, higher is better.
    """
    if model_path is None:
        raise ValueError('calculate_calibrated_iqa needs model_path: the net_g_<iter>.pth of a trained '
                         'RankCalibrationModel.')
    if input_order not in ('HWC', 'CHW'):
        raise ValueError(f"calculate_calibrated_iqa: input_order must be 'HWC' or 'CHW', got {input_order!r}.")
    device = torch.device(device) if device is not None else _default_device()
    net = _model(model_path, network, device)
    img = np.asarray(img)
    if input_order == 'CHW':
        img = img.transpose(1, 2, 0)
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    rgb = np.ascontiguousarray(img[..., ::-1], dtype=np.float32) / 255.0                 # BGR -> RGB
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(device)                    # (1, 3, H, W)
    with torch.no_grad():
        return float(net(x)[0])
