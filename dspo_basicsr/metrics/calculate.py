"""``calculate_metric`` as our models, pipelines and data steps call it: BasicSR's, with two checks of ours.

* A metric ``type`` that is not registered names the registry and the closest registered names
  (:func:`dspo_basicsr.utils.registry.registry_get`).
* BasicSR's ``calculate_niqe`` gets an image of at least :data:`NIQE_MIN_SIZE` px after ``crop_border``, or a
  ``ValueError`` saying so; on a smaller one 1.4.2's SVD does not converge and it fails without saying why.

BasicSR's own ``calculate_metric`` and its registered ``calculate_niqe`` are left as they are.
"""
import copy

from dspo_basicsr.utils.registry import registry_get

from basicsr.metrics import calculate_niqe
from basicsr.utils.registry import METRIC_REGISTRY

__all__ = ['NIQE_MIN_SIZE', 'calculate_metric', 'check_niqe_size']

#: BasicSR's NIQE fits a Gaussian to 96-px block features of the image and of its half; below this side
#: there are too few blocks and its SVD does not converge (basicsr/metrics/niqe.py, block_size_h=96)
NIQE_MIN_SIZE = 192


def check_niqe_size(img, crop_border, input_order='HWC'):
    """Raise unless ``img`` is at least :data:`NIQE_MIN_SIZE` px on each side after ``crop_border``.

    Args:
        img (np.ndarray): (H, W, C) for ``input_order='HWC'``, (C, H, W) for ``'CHW'``.
        crop_border (int): Pixels cut from each edge before NIQE.
        input_order (str): ``'HWC'`` or ``'CHW'``.

    Raises:
        ValueError: names the size after cropping and what to do.
    """
    h, w = img.shape[:2] if input_order == 'HWC' else img.shape[1:3]
    h, w = h - 2 * crop_border, w - 2 * crop_border
    if min(h, w) < NIQE_MIN_SIZE:
        raise ValueError(f'calculate_niqe needs images of at least {NIQE_MIN_SIZE}x{NIQE_MIN_SIZE} px after '
                         f'crop_border, got {h}x{w}; validate on larger images or drop niqe from val.metrics.')


def calculate_metric(data, opt):
    """``basicsr.metrics.calculate_metric(data, opt)``: the metric ``opt['type']`` on ``data``, with our checks.

    Args:
        data (dict): The metric's image arguments, e.g. ``{'img': sr, 'img2': gt}`` (BGR uint8 HWC).
        opt (dict): ``type`` (a registered metric) and the metric's keyword arguments.

    Returns:
        float: The metric's value.

    Raises:
        KeyError: ``type`` is not a registered metric (names the closest ones).
        ValueError: ``calculate_niqe`` on an image under :data:`NIQE_MIN_SIZE` px.
    """
    opt = copy.deepcopy(opt)
    metric_type = opt.pop('type')
    metric = registry_get(METRIC_REGISTRY, metric_type)
    if metric is calculate_niqe:
        check_niqe_size(data['img'], opt.get('crop_border', 0), opt.get('input_order', 'HWC'))
    return metric(**data, **opt)
