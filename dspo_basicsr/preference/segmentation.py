"""Semantic instances for DSPO: segmenters and their conversion to a partition label map.

DSPO (section 4 of the paper) applies the preference loss per semantic instance. Instances come from
SAM's automatic mask generation ("Segment Anything", Kirillov et al., ICCV 2023) run on one image per
LQ (the default candidate, or the GT when present); the masks overlap and leave holes, so
:func:`masks_to_partition` turns them into a label map in which every pixel belongs to exactly one
instance (docs/preference_lmdb.md: ``{sid}/seg`` is a uint16 partition with compact ids ``0..M-1``).

Weights: SAM checkpoints are the official state dicts released by Meta under Apache-2.0
(``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth`` from
https://github.com/facebookresearch/segment-anything#model-checkpoints). They are read from a local
path only; nothing is downloaded.

Every segmenter is a callable ``segmenter(image) -> list of (H, W) bool masks`` (possibly overlapping,
possibly empty); :func:`segment_instances` chains it with :func:`masks_to_partition`.
"""
import os
from functools import partial

import numpy as np
from scipy import ndimage

__all__ = [
    'SAM_ARCHS', 'SAMSegmenter', 'SLICSegmenter', 'Segmenter', 'build_sam', 'build_segmenter',
    'is_partition', 'masks_to_partition', 'segment_instances'
]

# Image-encoder settings of the three released SAM models (segment_anything/build_sam.py).
SAM_ARCHS = {
    'vit_b': dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    'vit_l': dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    'vit_h': dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
# Settings shared by the released models; ``arch`` overrides any of these and of SAM_ARCHS (tiny test models).
_SAM_COMMON = dict(image_size=1024, patch_size=16, window_size=14, prompt_embed_dim=256, mlp_ratio=4,
                   decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8, iou_head_hidden_dim=256)
SAM_CHECKPOINT_NAMES = {
    'vit_b': 'sam_vit_b_01ec64.pth', 'vit_l': 'sam_vit_l_0b3195.pth', 'vit_h': 'sam_vit_h_4b8939.pth'
}


def masks_to_partition(masks, min_area=0, uncovered='background', shape=None):
    """Turn overlapping binary masks into a partition label map with compact ids.

    Larger masks are painted first and smaller ones on top (a small object inside a large region keeps
    its own id). Then pixels covered by no mask either form one extra background instance
    (``uncovered='background'``) or join the nearest instance (``'neighbours'``). Finally instances
    smaller than ``min_area`` pixels are merged, smallest first, into their largest adjacent instance.
    Ids are renumbered ``0..M-1`` by decreasing area, so id 0 is the largest instance.

    Args:
        masks (list[np.ndarray]): (H, W) bool masks; may overlap, leave holes, or be empty.
        min_area (int): Instances with fewer pixels are merged into a neighbour. Default: 0.
        uncovered (str): ``'background'`` or ``'neighbours'``. Default: ``'background'``.
        shape (tuple[int, int], optional): (H, W); required when ``masks`` is empty.

    Returns:
        np.ndarray: (H, W) uint16 label map, every pixel in exactly one instance, ids ``0..M-1``.
    """
    if uncovered not in ('background', 'neighbours'):
        raise ValueError(f"uncovered must be 'background' or 'neighbours', got {uncovered!r}.")
    masks = [np.asarray(m, dtype=bool) for m in masks]
    if shape is None:
        if not masks:
            raise ValueError('masks_to_partition needs shape=(H, W) when there is no mask.')
        shape = masks[0].shape
    shape = tuple(int(s) for s in shape)
    for i, m in enumerate(masks):
        if m.shape != shape:
            raise ValueError(f'Mask {i} has shape {m.shape}, expected {shape}.')

    labels = np.zeros(shape, dtype=np.int64)  # 0 = not covered yet; mask i painted as i + 1
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    for rank, i in enumerate(order):
        labels[masks[i]] = rank + 1

    hole = labels == 0
    if hole.all():
        labels[:] = 1  # no mask at all: the whole image is one instance
    elif hole.any():
        if uncovered == 'background':
            labels[hole] = labels.max() + 1
        else:
            # every uncovered pixel takes the label of its nearest covered pixel
            _, (iy, ix) = ndimage.distance_transform_edt(hole, return_indices=True)
            labels = labels[iy, ix]

    labels = _merge_small_instances(labels, min_area)
    return _compact_by_area(labels)


def _merge_small_instances(labels, min_area):
    """Merge instances below ``min_area`` pixels, smallest first, into their largest 4-neighbour."""
    if min_area <= 0:
        return labels
    areas = dict(zip(*np.unique(labels, return_counts=True)))
    structure = ndimage.generate_binary_structure(2, 1)
    while len(areas) > 1:
        small = [lab for lab, a in areas.items() if a < min_area]
        if not small:
            break
        lab = min(small, key=lambda l_: (areas[l_], l_))
        # look only inside the bounding box grown by one pixel
        ys, xs = np.nonzero(labels == lab)
        y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, labels.shape[0])
        x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, labels.shape[1])
        window = labels[y0:y1, x0:x1]
        inside = window == lab
        ring = ndimage.binary_dilation(inside, structure) & ~inside
        neighbours = np.unique(window[ring])
        if neighbours.size == 0:  # cannot happen in a partition with several labels; be safe
            break
        target = max(neighbours, key=lambda n: (areas[n], -n))
        window[inside] = target
        areas[target] += areas.pop(lab)
    return labels


def _compact_by_area(labels):
    """Renumber labels to 0..M-1 by decreasing area (ties by old label) as uint16."""
    values, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if values.size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f'{values.size} instances do not fit a uint16 label map; raise min_area.')
    order = np.lexsort((values, -counts))  # new id -> old position
    new_id = np.empty_like(order)
    new_id[order] = np.arange(order.size)
    return new_id[inverse.reshape(labels.shape)].astype(np.uint16)


def is_partition(seg):
    """Whether ``seg`` is a 2-D integer label map with compact ids 0..M-1 (every id present)."""
    seg = np.asarray(seg)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer) or seg.size == 0:
        return False
    ids = np.unique(seg)
    return bool(ids[0] == 0 and ids[-1] == ids.size - 1)


class Segmenter:
    """Interface: ``segmenter(image)`` with ``image`` (H, W, 3) uint8 RGB returns a list of (H, W) bool masks."""

    name = 'segmenter'

    def __call__(self, image):
        raise NotImplementedError

    def describe(self):
        """JSON-friendly settings recorded next to each label map."""
        return {'type': type(self).__name__}


class SLICSegmenter(Segmenter):
    """SLIC superpixels (scikit-image) as instances; no weights, for tests and the demo.

    Args:
        n_segments (int): Approximate number of superpixels. Default: 16.
        compactness (float): SLIC colour/space trade-off. Default: 10.
        sigma (float): Gaussian pre-smoothing. Default: 1.
    """

    name = 'slic'

    def __init__(self, n_segments=16, compactness=10.0, sigma=1.0):
        self.n_segments = int(n_segments)
        self.compactness = float(compactness)
        self.sigma = float(sigma)

    def __call__(self, image):
        from skimage.segmentation import slic
        labels = slic(np.asarray(image), n_segments=self.n_segments, compactness=self.compactness,
                      sigma=self.sigma, start_label=0, channel_axis=-1)
        return [labels == lab for lab in np.unique(labels)]

    def describe(self):
        return {'type': 'SLIC', 'n_segments': self.n_segments, 'compactness': self.compactness, 'sigma': self.sigma}


def build_sam(model_type='vit_b', checkpoint=None, arch=None):
    """Build SAM with segment-anything's classes and load a local state dict (never downloads).

    Args:
        model_type (str): ``'vit_b'``, ``'vit_l'`` or ``'vit_h'``.
        checkpoint (str): Path of the official ``sam_vit_*.pth`` state dict (or one saved the same way).
        arch (dict, optional): Overrides of the architecture (``embed_dim``, ``depth``, ``num_heads``,
            ``global_attn_indexes``, ``image_size``, ``patch_size``, ``window_size``,
            ``prompt_embed_dim``, ``decoder_depth``, ``decoder_mlp_dim``, ``decoder_num_heads``,
            ``iou_head_hidden_dim``, ``mlp_ratio``); used for tiny test models.

    Returns:
        segment_anything.modeling.Sam: The model in eval mode.
    """
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from dspo_basicsr.utils.checkpoint import read_checkpoint

    if model_type not in SAM_ARCHS:
        raise ValueError(f'Unknown SAM model_type {model_type!r}; choose one of {sorted(SAM_ARCHS)}.')
    if checkpoint is None:
        raise ValueError(f'SAM needs a local checkpoint path (e.g. {SAM_CHECKPOINT_NAMES[model_type]}); '
                         'set segmenter.checkpoint in the YAML.')
    checkpoint = os.path.expanduser(str(checkpoint))
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(
            f'SAM checkpoint not found: {checkpoint}. Download {SAM_CHECKPOINT_NAMES[model_type]} from '
            'https://github.com/facebookresearch/segment-anything#model-checkpoints and put it at that path '
            '(nothing is downloaded at run time).')
    unknown = set(arch or {}) - set(_SAM_COMMON) - set(SAM_ARCHS[model_type])
    if unknown:
        raise ValueError(f'Unknown SAM arch keys {sorted(unknown)}.')
    cfg = {**_SAM_COMMON, **SAM_ARCHS[model_type], **(arch or {})}
    embedding_size = cfg['image_size'] // cfg['patch_size']
    dim = cfg['prompt_embed_dim']
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg['depth'], embed_dim=cfg['embed_dim'], img_size=cfg['image_size'], mlp_ratio=cfg['mlp_ratio'],
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg['num_heads'],
            patch_size=cfg['patch_size'], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=tuple(cfg['global_attn_indexes']), window_size=cfg['window_size'], out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(embedding_size, embedding_size),
                                     input_image_size=(cfg['image_size'], cfg['image_size']), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=cfg['decoder_depth'], embedding_dim=dim,
                                          mlp_dim=cfg['decoder_mlp_dim'], num_heads=cfg['decoder_num_heads']),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=cfg['iou_head_hidden_dim']),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    state = read_checkpoint(checkpoint, f'SAM checkpoint ({model_type})', unwrap=('model',))
    try:
        sam.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f'SAM checkpoint {checkpoint} does not match model_type {model_type!r} '
                         f'(arch overrides: {arch or {}}): {str(err).splitlines()[0]}') from err
    return sam.eval()


class SAMSegmenter(Segmenter):
    """SAM automatic mask generation (``SamAutomaticMaskGenerator``) from a local checkpoint.

    Args:
        checkpoint (str): Local path of the SAM state dict.
        model_type (str): ``'vit_b'`` | ``'vit_l'`` | ``'vit_h'``. Default: ``'vit_b'``.
        device (str): Torch device. Default: ``'cpu'``.
        arch (dict, optional): Architecture overrides (see :func:`build_sam`).
        **generator_opt: Keyword options of ``SamAutomaticMaskGenerator`` (``points_per_side``,
            ``pred_iou_thresh``, ``stability_score_thresh``, ``min_mask_region_area``, ...).
    """

    name = 'sam'

    def __init__(self, checkpoint, model_type='vit_b', device='cpu', arch=None, **generator_opt):
        from segment_anything import SamAutomaticMaskGenerator

        self.checkpoint = str(checkpoint)
        self.model_type = model_type
        self.generator_opt = dict(generator_opt)
        self.model = build_sam(model_type, checkpoint, arch).to(device)
        self.generator = SamAutomaticMaskGenerator(self.model, output_mode='binary_mask', **generator_opt)

    def __call__(self, image):
        import torch
        with torch.no_grad():
            records = self.generator.generate(np.ascontiguousarray(image))
        return [np.asarray(r['segmentation'], dtype=bool) for r in records]

    def describe(self):
        return {'type': 'SAM', 'model_type': self.model_type, 'checkpoint': self.checkpoint, **self.generator_opt}


def build_segmenter(opt):
    """Build a segmenter from an option dict: ``{type: SAM|SLIC, ...keyword options}``."""
    opt = dict(opt or {'type': 'SLIC'})
    kind = str(opt.pop('type', 'SLIC')).upper()
    if kind == 'SAM':
        return SAMSegmenter(**opt)
    if kind == 'SLIC':
        return SLICSegmenter(**opt)
    raise ValueError(f"Unknown segmenter type {kind!r}; use 'SAM' or 'SLIC'.")


def segment_instances(segmenter, image, min_area=0, uncovered='background'):
    """Run ``segmenter`` on ``image`` and return its partition label map (see :func:`masks_to_partition`).

    Args:
        segmenter (callable): ``segmenter(image) -> list of (H, W) bool masks``.
        image (np.ndarray): (H, W, 3) uint8 RGB.
        min_area (int): Minimum instance area in pixels.
        uncovered (str): ``'background'`` or ``'neighbours'``.

    Returns:
        np.ndarray: (H, W) uint16 partition label map.
    """
    masks = segmenter(image)
    return masks_to_partition(masks, min_area=min_area, uncovered=uncovered, shape=image.shape[:2])
