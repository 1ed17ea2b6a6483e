"""BasicSR dataset over a preference LMDB set (docs/preference_lmdb.md), with aligned crops and instance tables.

Every training item holds the LQ image, its N candidates, the instance label map and the per-instance
preferences, all cropped and augmented identically. The label map is relabelled compactly per crop, so
the DSPO loss sees instance ids 0..M-1 of the instances actually present.
"""
import math
import os
import random

import numpy as np
import torch
from torch.utils import data as data

from dspo_basicsr.data.preference_set import CANDIDATE_LATENTS_KEY, PreferenceDataError, PreferenceLMDB
from dspo_basicsr.utils.option_schema import LOADER_OPTIONS, REQUIRED, Option, multiple_of_scale

from basicsr.utils.registry import DATASET_REGISTRY

# Per-instance tables, padded across a batch: key -> padding value.
INSTANCE_KEYS = {'win': -1, 'lose': -1, 'instance_ids': -1, 'area': 0, 'scores': np.nan}


def random_aligned_crop(sample, scale, gt_size, rng=random, align=1):
    """Crop offsets of one random ``gt_size`` patch on the SR grid, aligned with the LQ grid.

    Args:
        sample (PreferenceSample): The sample (for its sizes and id).
        scale (int): SR / LQ size ratio.
        gt_size (int): Patch size on the SR grid, a multiple of ``scale``.
        rng (random.Random): Source of randomness (the ``random`` module by default, which BasicSR's
            worker_init_fn seeds per worker).
        align (int): The SR offsets are also multiples of this (the VAE factor f with stored latents).

    Returns:
        tuple[int, int]: (top, left) of the LQ patch; the SR patch starts at (top * scale, left * scale).
    """
    h, w = sample.lq.shape[:2]
    lq_size = gt_size // scale
    if h < lq_size or w < lq_size:
        raise ValueError(f"sample '{sample.sid}' has an LQ of {h}x{w}, smaller than the LQ patch {lq_size}x{lq_size} "
                         f'(gt_size {gt_size} / scale {scale}); lower gt_size or remove the sample.')
    step = align // math.gcd(align, scale)  # LQ offsets that are multiples of step put SR offsets on the align grid
    return rng.randint(0, (h - lq_size) // step) * step, rng.randint(0, (w - lq_size) // step) * step


def stored_candidate_latents(sample, source=None):
    """The sample's precomputed candidate posteriors (N, 2, C, H/f, W/f), their VAE digest and f.

    Returns:
        tuple[ndarray, str, int] | None: None when the sample stores none.

    Raises:
        PreferenceDataError: The array or its meta record does not match the candidates.
    """
    latents = (sample.extras or {}).get(CANDIDATE_LATENTS_KEY)
    if latents is None:
        return None
    record = sample.meta.get(CANDIDATE_LATENTS_KEY)
    where = f'x/{CANDIDATE_LATENTS_KEY}'
    if not isinstance(record, dict) or not isinstance(record.get('vae_digest'), str):
        raise PreferenceDataError(source, sample.sid, 'meta', f"the sample stores '{CANDIDATE_LATENTS_KEY}' but its "
                                  "meta lacks their 'vae_digest'; rewrite them with scripts/add_candidate_latents.py.")
    height, width = sample.candidates[0].shape[:2]
    n = len(sample.candidates)
    factor = height // latents.shape[-2] if latents.ndim == 5 and latents.shape[-2] else 0
    if (latents.ndim != 5 or latents.shape[:2] != (n, 2) or not factor
            or latents.shape[-2:] != (height // factor, width // factor) or height % factor or width % factor):
        raise PreferenceDataError(source, sample.sid, where, f'shape {latents.shape} is not (N={n}, 2, C, H/f, W/f) '
                                  f'for {n} candidates of {height}x{width}; rewrite them with '
                                  'scripts/add_candidate_latents.py.')
    return latents, record['vae_digest'], factor


def _augment_latents(latents, hflip, vflip, rot90):
    """The flips / transpose of :func:`_augment` on the last two axes of (..., h, w) latents."""
    if hflip:
        latents = latents[..., ::-1]
    if vflip:
        latents = latents[..., ::-1, :]
    if rot90:
        latents = latents.swapaxes(-1, -2)
    return latents


def _augment(array, hflip, vflip, rot90):
    """Flip / transpose the first two axes of an (H, W) or (H, W, C) array, as ``basicsr``'s ``augment``."""
    if hflip:
        array = array[:, ::-1]
    if vflip:
        array = array[::-1]
    if rot90:
        array = array.swapaxes(0, 1)
    return array


def _images_to_tensor(images):
    """list of (H, W, 3) uint8 -> (len, 3, H, W) float32 in [0, 1].

    The conversion runs in numpy: torch's intra-op threads slow it down several-fold on a busy CPU.
    """
    stacked = np.stack(images)  # (K, H, W, 3), copies any flipped / transposed views
    out = np.empty((stacked.shape[0], 3) + stacked.shape[1:3], dtype=np.float32)
    np.divide(stacked.transpose(0, 3, 1, 2), np.float32(255.0), out=out)  # (K, H, W, 3) -> (K, 3, H, W)
    return torch.from_numpy(out)


def relabel_instances(seg, instances, max_instances=None):
    """Keep the instances present in ``seg`` and renumber them 0..M-1 in instance-table order.

    Args:
        seg (ndarray): (H, W) integer label map holding original instance ids (e.g. a crop).
        instances (list[dict]): The sample's instance table (``id``, ``win``, ``lose``).
        max_instances (int | None): Keep at most this many instances: paired ones first, then by
            area; the pixels of the others get label -1 (ignored by the losses).

    Returns:
        tuple: ``seg`` (H, W) int64 with new ids (or -1), ``kept`` (M,) int64 table rows kept,
        ``area`` (M,) int64 pixel counts of the kept instances in ``seg``.
    """
    ids = np.fromiter((row['id'] for row in instances), dtype=np.int64, count=len(instances))
    counts = np.bincount(seg.ravel(), minlength=int(ids.max()) + 1)
    area_all = counts[ids]
    kept = np.flatnonzero(area_all > 0)
    if max_instances is not None and len(kept) > max_instances:
        paired = np.array([instances[i]['win'] >= 0 for i in kept])
        # lexsort: last key is primary -> paired first, then larger area, then table order.
        order = np.lexsort((kept, -area_all[kept], ~paired))
        kept = np.sort(kept[order[:max_instances]])
    lut = np.full(len(counts), -1, dtype=np.int64)
    lut[ids[kept]] = np.arange(len(kept))
    return lut[seg], kept, area_all[kept]


def preference_item(sample, scale, gt_size=None, use_hflip=False, use_rot=False, max_instances=None, rng=random,
                    use_candidate_latents=True, source=None):
    """One training item: aligned crop, shared augmentation, compact instance tables, tensors.

    Args:
        sample (PreferenceSample): A checked sample.
        scale (int): SR / LQ size ratio.
        gt_size (int | None): Crop size on the SR grid (multiple of ``scale``); None keeps the whole image.
        use_hflip (bool): Random horizontal flip.
        use_rot (bool): Random vertical flip and transpose (rotations by multiples of 90 degrees).
        max_instances (int | None): Cap on M (see :func:`relabel_instances`).
        rng (random.Random): Source of randomness.
        use_candidate_latents (bool): Return the stored candidate latents (when the sample has them).
            With a crop they are the window of the whole candidate's latent (the crop is aligned to the VAE
            factor f), with flips the flipped latent: close to, not equal to, encoding the cropped / flipped
            image, since the VAE sees across the crop border and is not flip-equivariant.
        source (str | None): The set's path, for error messages.

    Returns:
        dict: ``lq`` (3, h, w), ``candidates`` (N, 3, H, W), ``gt`` (3, H, W) if the sample has one, all
        float32 in [0, 1]; ``seg`` (H, W) long with ids 0..M-1 (-1 for instances over ``max_instances``);
        ``win``, ``lose``, ``instance_ids`` (M,) long; ``area`` (M,) float pixel counts in the crop;
        ``pair`` (2,) long; ``scores`` (M, N) float per-candidate instance scores (higher is better, NaN =
        unscored; see :func:`instance_score_table`); ``extras`` dict of float tensors; ``prompt``,
        ``negative_prompt``, ``sid``, ``lq_path`` strings; with stored latents ``candidate_latents``
        (N, 2, C, H/f, W/f) float (posterior mean and std) and ``candidate_latents_vae`` (the VAE digest).
    """
    lq, candidates, seg, gt = sample.lq, sample.candidates, sample.seg, sample.gt
    stored = stored_candidate_latents(sample, source) if use_candidate_latents else None
    latents, factor = (stored[0], stored[2]) if stored else (None, 1)
    if gt_size is not None:
        if gt_size % factor:
            raise ValueError(f'gt_size {gt_size} must be a multiple of the VAE factor {factor} of the stored candidate '
                             "latents; change gt_size, or set use_candidate_latents: false in the dataset's options.")
        top, left = random_aligned_crop(sample, scale, gt_size, rng, align=factor)
        lq_size = gt_size // scale
        lq = lq[top:top + lq_size, left:left + lq_size]
        top, left = top * scale, left * scale
        window = (slice(top, top + gt_size), slice(left, left + gt_size))
        candidates = [c[window] for c in candidates]
        seg = seg[window]
        gt = None if gt is None else gt[window]
        if latents is not None:
            latents = latents[..., top // factor:(top + gt_size) // factor, left // factor:(left + gt_size) // factor]
    flips = (use_hflip and rng.random() < 0.5, use_rot and rng.random() < 0.5, use_rot and rng.random() < 0.5)
    lq = _augment(lq, *flips)
    candidates = [_augment(c, *flips) for c in candidates]
    seg = _augment(seg, *flips)

    seg, kept, area = relabel_instances(seg, sample.instances, max_instances)
    win = np.array([sample.instances[i]['win'] for i in kept], dtype=np.int64)
    lose = np.array([sample.instances[i]['lose'] for i in kept], dtype=np.int64)
    pair = sample.meta.get('pair')
    if pair is None:
        paired = np.flatnonzero(win >= 0)
        # argmax takes the first of equal areas, i.e. table order breaks ties.
        pair = (win[paired[area[paired].argmax()]], lose[paired[area[paired].argmax()]]) if len(paired) else (-1, -1)

    item = {
        'lq': _images_to_tensor([lq])[0],
        'candidates': _images_to_tensor(candidates),
        'seg': torch.from_numpy(seg),
        'win': torch.from_numpy(win),
        'lose': torch.from_numpy(lose),
        'area': torch.from_numpy(area.astype(np.float32)),
        'instance_ids': torch.tensor([sample.instances[i]['id'] for i in kept], dtype=torch.long),
        'pair': torch.tensor([int(pair[0]), int(pair[1])], dtype=torch.long),
        'scores': torch.from_numpy(instance_score_table([sample.instances[i] for i in kept], len(candidates))),
        'extras': {name: torch.from_numpy(np.asarray(value)).float() for name, value in (sample.extras or {}).items()
                   if name != CANDIDATE_LATENTS_KEY},
        'prompt': sample.prompt,
        'negative_prompt': sample.negative_prompt,
        'sid': sample.sid,
    }
    if gt is not None:
        item['gt'] = _images_to_tensor([_augment(gt, *flips)])[0]
    if latents is not None:
        item['candidate_latents'] = torch.from_numpy(np.ascontiguousarray(_augment_latents(latents, *flips),
                                                                          dtype=np.float32))
        item['candidate_latents_vae'] = stored[1]
    return item


def instance_score_table(instances, num_candidates):
    """(M, N) float32 per-candidate scores of the instances, higher is better, NaN = unscored.

    An instance's ``candidate_scores`` when it stores them; else (an instance with only its pair) 1 for
    ``win`` and 0 for ``lose``, so a ranking of the table still gives the stored pair. Instances without a
    pair stay unscored: the scorer left them out.
    """
    table = np.full((len(instances), num_candidates), np.nan, dtype=np.float32)
    for row, instance in enumerate(instances):
        if instance['win'] < 0:
            continue
        scores = instance.get('candidate_scores')
        if scores is not None:
            table[row] = [np.nan if v is None else v for v in scores]
        else:
            table[row, instance['win']], table[row, instance['lose']] = 1.0, 0.0
    return table


def _stack(key, values, sids):
    """Stack CPU tensors in numpy: torch.stack's threads slow it down several-fold on a busy CPU."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch '{key}' of samples {sids}: shapes {sorted(shapes)} differ; set gt_size to "
                         'crop to one size, or use batch_size_per_gpu 1.')
    return torch.from_numpy(np.stack([v.numpy() for v in values]))


def collate_preference_batch(batch):
    """Batch preference items, padding the per-instance tables to the largest M.

    Args:
        batch (list[dict]): Items from :func:`preference_item`.

    Returns:
        dict: Tensors stacked on a new first axis (B, ...); ``win``, ``lose``, ``instance_ids`` (B, M_max)
        padded with -1, ``area`` (B, M_max) padded with 0 and ``scores`` (B, M_max, N) padded with NaN;
        ``extras`` a dict of stacked tensors;
        strings as lists of length B.
    """
    sids = [item['sid'] for item in batch]
    keys = list(batch[0])
    for item in batch[1:]:
        if set(item) != set(keys):
            raise ValueError(f'cannot batch samples {sids}: some have keys {sorted(set(item) ^ set(keys))} and '
                             'others not (e.g. a ground truth stored for only part of the set).')
    out = {}
    for key in keys:
        values = [item[key] for item in batch]
        if key in INSTANCE_KEYS:
            padded = np.full((len(values), max(len(v) for v in values), *values[0].shape[1:]), INSTANCE_KEYS[key],
                             dtype=values[0].numpy().dtype)
            for row, value in enumerate(values):
                padded[row, :len(value)] = value.numpy()
            out[key] = torch.from_numpy(padded)
        elif key == 'extras':
            out[key] = {name: _stack(f'extras.{name}', [v[name] for v in values], sids) for name in values[0]}
        elif torch.is_tensor(values[0]):
            out[key] = _stack(key, values, sids)
        else:
            out[key] = values
    return out


@DATASET_REGISTRY.register()
class PreferenceLMDBDataset(data.Dataset):
    """Preference LMDB set as a BasicSR dataset (DSPO, Diffusion-DPO, SFT, Diffusion-DRO training).

    In the ``train`` phase each item is a random ``gt_size`` crop (the LQ crop is ``gt_size / scale`` at
    the matching position), with the same flips and rotation for the LQ, every candidate, the label map
    and the ground truth. In other phases items are whole images. See :func:`preference_item` for the
    item layout and :func:`collate_preference_batch` for batching (used by BasicSR's loaders through
    ``dataset.collate_fn``).

    Args:
        opt (dict): The dataset block: :attr:`option_schema` (the table is in ``docs/options.md``).
    """

    reader_class = PreferenceLMDB
    #: every option this dataset reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = LOADER_OPTIONS.extend(
        Option('dataroot', 'path', REQUIRED, 'the preference set (the NAME.lmdb folder)'),
        Option('scale', 'int', None, "SR scale; must be the set's (~: the set's)", ge=1),
        Option('gt_size', 'int', None, 'SR crop size in training (~: whole images)', ge=1, check=multiple_of_scale),
        Option('use_hflip', 'bool', False, 'random horizontal flips in training'),
        Option('use_rot', 'bool', False, 'random 90-degree rotations and vertical flips in training'),
        Option('max_instances', 'int', None, 'keep at most this many instances per sample (~: all)', ge=1),
        Option('use_candidate_latents', 'bool', True, "read the set's precomputed candidate latents when it has "
               'them, so training does not encode the candidates'),
    )
    collate_fn = staticmethod(collate_preference_batch)

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.store = self.reader_class(opt['dataroot'])
        self.sids = self.store.ids()
        set_scale = self.store.header['scale']
        option = self.option_schema.value  # the value in the block, checked, or the declared default
        self.scale = option(opt, 'scale') or set_scale
        if self.scale != set_scale:
            raise ValueError(f"option scale {self.scale} differs from the scale {set_scale} of preference set "
                             f"'{opt['dataroot']}'; remove the option or use the matching set.")
        self.train = opt.get('phase', 'train') == 'train'
        self.gt_size = option(opt, 'gt_size') if self.train else None
        if self.gt_size is not None and self.gt_size % self.scale:
            raise ValueError(f'gt_size {self.gt_size} must be a multiple of scale {self.scale} so that the LQ crop '
                             'is aligned with the SR crop.')
        self.use_hflip = option(opt, 'use_hflip') and self.train
        self.use_rot = option(opt, 'use_rot') and self.train
        self.max_instances = option(opt, 'max_instances')
        self.use_candidate_latents = option(opt, 'use_candidate_latents')

    def __len__(self):
        return len(self.sids)

    def __getitem__(self, index):
        sid = self.sids[index]
        item = preference_item(self.store[sid], self.scale, self.gt_size, self.use_hflip, self.use_rot,
                               self.max_instances, use_candidate_latents=self.use_candidate_latents,
                               source=self.store.path)
        # BasicSR's validation names its saved images after os.path.basename(lq_path).
        item['lq_path'] = os.path.join(self.store.path, sid)
        return item


__all__ = ['PreferenceLMDBDataset', 'preference_item', 'collate_preference_batch', 'relabel_instances',
           'random_aligned_crop', 'stored_candidate_latents']
