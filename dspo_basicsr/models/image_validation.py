"""Image validation split over the ranks: SR samples of an image set, saved PNGs and ``val.metrics``.

SRModel's validation, except that under a distributed launcher rank r takes samples r, r + W, ...
(:func:`~dspo_basicsr.models.validation_share.validation_share`) and rank 0 averages the per-image metrics in
sample order, so the numbers are those of one process.
"""
import os

import torch

from dspo_basicsr.metrics.calculate import calculate_metric
from dspo_basicsr.models.validation_share import validation_share
from dspo_basicsr.utils.distributed import gather_in_sample_order

from basicsr.utils import imwrite, tensor2img
from basicsr.utils.dist_util import get_dist_info


def image_path(opt, dataset_name, img_name, current_iter):
    """Where a validation SR image is saved: BasicSR's layout for training and for ``basicsr test``."""
    if opt['is_train']:
        return os.path.join(opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
    suffix = opt['val'].get('suffix') or opt['name']
    return os.path.join(opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')


@torch.no_grad()
def validate_images(model, dataloader, current_iter, save_img, show_progress=False):
    """Sample every image of this rank's share with ``model.test()``, save it, measure ``val.metrics``.

    Args:
        model (DSPOModel): Its ``feed_data``, ``test`` and ``get_current_visuals`` are used; its batch
            (``lq``, ``gt``, ``output``) is cleared after each image.
        dataloader: The image set's validation loader.
        current_iter (int): For the file names in training.
        save_img (bool): Save each SR image (:func:`image_path`).
        show_progress (bool): A progress bar on rank 0.

    Returns:
        dict[str, float] | None: the mean of each metric over the set, on rank 0; None on the other ranks and
        without ``val.metrics``.
    """
    opt = model.opt
    dataset_name = dataloader.dataset.opt['name']
    metrics = opt['val'].get('metrics') or {}
    per_image = []
    for i, val_data in validation_share(dataloader, f'validation {dataset_name}', show_progress):
        img_name = os.path.splitext(os.path.basename(val_data['lq_path'][0]))[0]
        model.feed_data(val_data)
        model.test()
        visuals = model.get_current_visuals()
        metric_data = {'img': tensor2img([visuals['result']])}
        if 'gt' in visuals:
            metric_data['img2'] = tensor2img([visuals['gt']])
        model.lq = model.gt = model.output = None
        if save_img:
            imwrite(metric_data['img'], image_path(opt, dataset_name, img_name, current_iter))
        per_image.append((i, {name: float(calculate_metric(metric_data, o)) for name, o in metrics.items()}))
    per_image = gather_in_sample_order(per_image)
    if not metrics or get_dist_info()[0] != 0:
        return None
    return {name: sum(m[name] for m in per_image) / max(len(per_image), 1) for name in metrics}
