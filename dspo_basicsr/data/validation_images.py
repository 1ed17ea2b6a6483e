"""Validation images checked when a run starts, not at the first validation ``val_freq`` iterations later.

BasicSR's paired and single-image datasets list every file of their folders and read each only when the
validation reaches it, so a zero-byte or damaged image used to end a run after hours of training.
"""
import os

import cv2

__all__ = ['unreadable_validation_images', 'VALIDATION_FOLDER_KEYS']

VALIDATION_FOLDER_KEYS = ('dataroot_gt', 'dataroot_lq', 'dataroot')
#: BasicSR's datasets that list every file of a folder and read each at validation (others check their own data)
IMAGE_FOLDER_DATASETS = ('PairedImageDataset', 'SingleImageDataset')


def _problem(path):
    """Why ``path`` cannot be read as an image, or None."""
    try:
        if os.path.getsize(path) == 0:
            return '0 bytes'
    except OSError as error:
        return error.strerror or 'unreadable'
    # a full decode: a PNG cut short passes a header check but fails here
    return None if cv2.imread(path, cv2.IMREAD_UNCHANGED) is not None else 'not a readable image'


def unreadable_validation_images(opt, shown=5):
    """One line per validation folder holding files that cannot be read as images.

    Goes through the ``val*`` and ``test*`` phases of ``opt['datasets']`` that are BasicSR image-folder
    datasets (:data:`IMAGE_FOLDER_DATASETS`) read from disk (``io_backend`` ``disk``, the default), and
    through every file of their ``dataroot_gt`` / ``dataroot_lq`` / ``dataroot`` folders (BasicSR's folder
    datasets list every file, not only images).

    Args:
        opt (dict): The run's options.
        shown (int): Files named per folder (the line gives the count of the others).

    Returns:
        list[str]: E.g. ``datasets.val_1.dataroot_gt: 2 files cannot be read as images (x.png: 0 bytes; ...)``.
    """
    findings = []
    for phase, dataset in (opt.get('datasets') or {}).items():
        if not (phase.startswith('val') or phase.startswith('test')) or not isinstance(dataset, dict):
            continue
        if dataset.get('type') not in IMAGE_FOLDER_DATASETS:
            continue
        if ((dataset.get('io_backend') or {}).get('type') or 'disk') != 'disk':
            continue
        for key in VALIDATION_FOLDER_KEYS:
            folder = dataset.get(key)
            if not isinstance(folder, str) or not os.path.isdir(folder):
                continue
            bad = []
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    problem = _problem(path)
                    if problem:
                        bad.append(f'{name}: {problem}')
            if bad:
                more = f'; and {len(bad) - shown} more' if len(bad) > shown else ''
                findings.append(f"datasets.{phase}.{key}: {len(bad)} file(s) in '{folder}' cannot be read as "
                                f"images ({'; '.join(bad[:shown])}{more}); remove or replace them")
    return findings
