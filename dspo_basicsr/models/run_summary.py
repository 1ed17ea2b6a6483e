"""What a DSPOModel run shows as pictures: ``visualization/summary_<iter>.png`` and ``training_curves.png``.

The summary samples every validation image with the frozen reference (the pretrained model) and with
the current policy, under the same ``val.sample`` settings and seed, and measures both (and bicubic
upsampling of the LQ) with the run's ``val.metrics``.
"""
import glob
import os

import numpy as np
import torch

from dspo_basicsr.metrics.calculate import calculate_metric
from dspo_basicsr.utils.visualization import draw_summary, plot_training_curves

from basicsr.utils import get_root_logger, tensor2img


def summary_due(opt, current_iter):
    """``val.summary``: ``end`` (default: after the last iteration and in ``basicsr test``), ``every``
    (each validation of an image set) or ``false``."""
    when = opt.get('val', {}).get('summary', 'end')
    if when in (False, None, 'false'):
        return False
    if when == 'every' or not opt['is_train']:
        return True
    return isinstance(current_iter, int) and current_iter > opt['train']['total_iter']


def _measure(image, gt, metric_opts):
    return {name: float(calculate_metric(dict(img=image, img2=gt), dict(opt))) for name, opt in metric_opts.items()}


@torch.no_grad()
def write_validation_summary(model, dataloader, current_iter):
    """Write ``<path.visualization>/summary_<iter>.png`` (and ``.json``) for an image validation set.

    Args:
        model (DSPOModel): The model being validated; its ``net_ref`` samples the reference column.
        dataloader: An image set (``PairedImageDataset``); images without GT are skipped.
        current_iter (int | str): The iteration (or, in ``basicsr test``, the run name).

    Returns:
        dict: The layout of :func:`draw_summary`, with per-row metrics under ``rows[i]['metrics']``.
    """
    metric_opts = model.opt['val'].get('metrics') or {}
    bare = model.bare
    rows = []
    for data in dataloader:
        model.feed_data(data)
        if not hasattr(model, 'gt') or 'gt' not in data:
            continue
        model.test()
        current = model.output
        with model.net_ref.sampling():
            model.test()
        reference = model.output
        gt = tensor2img(model.gt)
        bicubic = tensor2img(bare.upsample_lq(model.lq))
        images = {'lq': bicubic, 'reference': tensor2img(reference), 'current': tensor2img(current)}
        rgb = {key: np.ascontiguousarray(image[..., ::-1]) for key, image in dict(images, gt=gt).items()}
        rows.append(dict(rgb, name=os.path.splitext(os.path.basename(data['lq_path'][0]))[0],
                         metrics={key: _measure(image, gt, metric_opts) for key, image in images.items()}))
        model.lq = model.gt = model.output = None
    if not rows:
        return None
    dataset_name = dataloader.dataset.opt['name']
    folder = model.opt['path']['visualization']
    path = os.path.join(folder, f'summary_{current_iter}.png')
    image_sets = [d for phase, d in model.opt['datasets'].items()
                  if not phase.startswith('train') and d.get('type') != 'PreferenceLMDBDataset']
    if len(image_sets) > 1:  # several image sets: one file each
        path = os.path.join(folder, f'summary_{dataset_name}_{current_iter}.png')
    layout = draw_summary(rows, path, scale=model.opt['scale'])
    get_root_logger().info(f'Validation summary of {dataset_name} (LQ | reference | current | GT): {path}')
    return layout


def write_training_curves(opt):
    """Plot the newest ``train_*.log`` of the run into ``<path.visualization>/training_curves.png``."""
    logs = sorted(glob.glob(os.path.join(opt['path']['log'], f"train_{opt['name']}_*.log")), key=os.path.getmtime)
    if not logs:
        return None
    path = os.path.join(opt['path']['visualization'], 'training_curves.png')
    if plot_training_curves(logs[-1], path):
        get_root_logger().info(f'Training curves: {path}')
        return path
    return None
