"""Image files as tensors: the one reader the datasets, the taggers and the MAD tools share, and its inverse."""
import os

import cv2
import numpy as np
import torch

__all__ = ['read_rgb', 'to_uint8_rgb']


def read_rgb(path, crop_size=None):
    """Read an image file as an RGB tensor.

    Args:
        path (str): Image file.
        crop_size (int, optional): Side of a centre crop.

    Returns:
        Tensor: (3, H, W) float32 in [0, 1] (H = W = crop_size when cropping).

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: It is not a readable image, or smaller than ``crop_size``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'cannot read image {path!r}: the file is missing.')
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f'cannot read image {path!r}: not a readable image; remove it or convert it to PNG.')
    if crop_size:
        h, w = img.shape[:2]
        if h < crop_size or w < crop_size:
            raise ValueError(f'image {path!r} is {h}x{w}, smaller than crop_size {crop_size}.')
        top, left = (h - crop_size) // 2, (w - crop_size) // 2
        img = img[top:top + crop_size, left:left + crop_size]
    img = np.ascontiguousarray(img[:, :, ::-1], dtype=np.float32) / 255.0   # BGR -> RGB
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()           # (H, W, 3) -> (3, H, W)


def to_uint8_rgb(image):
    """An RGB image tensor as a uint8 array (what :func:`read_rgb` reads, back to pixels).

    Args:
        image (Tensor): (3, H, W) in [0, 1]; values outside are clamped.

    Returns:
        np.ndarray: (H, W, 3) uint8 RGB.
    """
    return (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)  # (3,H,W)->(H,W,3)
