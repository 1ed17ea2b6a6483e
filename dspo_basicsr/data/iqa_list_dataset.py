"""IQA lists for rank calibration: MOS lists ("path, score") and 2AFC pair lists.

* :class:`IQAListDataset` reads a CSV/TSV of images and mean opinion scores. ``mode: single`` yields one
  image with its score (validation: SRCC / PLCC); ``mode: pair`` yields two images with the label
  g = P(first is better) from their MOS (the MOS pairs of the l_p term).
* :class:`TwoAFCPairDataset` reads a 2AFC list in the RealSR-1K style: pair name, group, the two image
  names and the share of subjects who preferred each image.

Images are RGB float tensors in [0, 1], optionally centre-cropped. Crops are deterministic on purpose:
the frozen backbone's outputs are cached per image key, which a random crop would invalidate.
"""
import csv
import os
import random

from torch.utils import data

from dspo_basicsr.utils.image_io import read_rgb

from basicsr.utils.registry import DATASET_REGISTRY

__all__ = ['read_rgb', 'image_key', 'read_table', 'check_option_keys', 'IQAListDataset', 'TWO_AFC_FORMATS',
           'TwoAFCPairDataset']


def image_key(path, crop_size=None):
    """Identity of a backbone input: the absolute path plus the crop (the feature-cache key)."""
    return f'{os.path.abspath(path)}#crop={crop_size or "full"}'


def read_table(path, delimiter=None):
    """Read a CSV/TSV with a header row into a list of dicts (keys and values stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'list file {path!r} does not exist.')
    if delimiter is None:
        delimiter = '\t' if os.path.splitext(path)[1].lower() in ('.tsv', '.txt') else ','
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [{k.strip(): (v or '').strip() for k, v in row.items() if k is not None} for row in reader]
    return rows, [h.strip() for h in (reader.fieldnames or [])]


def _require_columns(path, header, columns):
    missing = [c for c in columns if c not in header]
    if missing:
        raise KeyError(f'list {path!r} has no column(s) {missing}; its header is {header}. Set the column '
                       'options of the dataset to your header names.')


# keys BasicSR itself puts in or reads from every dataset block
LOADER_KEYS = frozenset({'name', 'type', 'phase', 'scale', 'use_shuffle', 'num_worker_per_gpu', 'batch_size_per_gpu',
                         'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory', 'persistent_workers', 'io_backend'})


def check_option_keys(opt, known, where):
    """Refuse option keys a dataset does not read (a typo would otherwise be silently ignored)."""
    unknown = sorted(set(opt) - set(known) - LOADER_KEYS)
    if unknown:
        raise KeyError(f"{where} {opt.get('name', '')!r}: unknown option(s) {unknown}; known options are "
                       f'{sorted(known)}.')


def pair_label(score_a, score_b):
    """Hard label from two scores (higher better): 1, 0, or 0.5 for equal scores."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


@DATASET_REGISTRY.register()
class IQAListDataset(data.Dataset):
    """Images with mean opinion scores.

    Options (``opt``):
        meta_file (str): CSV/TSV with a header row.
        dataroot (str): Folder the image paths are relative to ('' for paths as written).
        path_column (str): Header of the image path column (default 'path').
        score_column (str): Header of the score column (default 'score').
        lower_is_better (bool): The score is a distortion (DMOS); it is negated so higher is better.
        mode (str): 'single' (image + score) or 'pair' (two random images + label).
        crop_size (int, optional): Centre crop side.
        pairs_per_epoch (int, optional): Length in 'pair' mode (default: number of images).
        delimiter (str, optional): Field separator (default from the extension).

    Items:
        single: ``img`` (3, H, W), ``score`` (float), ``key`` (str), ``path`` (str).
        pair: ``img_a``, ``img_b`` (3, H, W), ``label`` (float, P(a better)), ``key_a``, ``key_b``.
    """

    def __init__(self, opt):
        super().__init__()
        check_option_keys(opt, ('meta_file', 'dataroot', 'path_column', 'score_column', 'lower_is_better', 'mode',
                                'crop_size', 'pairs_per_epoch', 'delimiter'), 'IQAListDataset')
        self.opt = opt
        self.meta_file = opt['meta_file']
        self.mode = opt.get('mode', 'single')
        if self.mode not in ('single', 'pair'):
            raise ValueError(f"IQAListDataset {opt.get('name', '')!r}: mode must be 'single' or 'pair', got "
                             f'{self.mode!r}.')
        self.crop_size = opt.get('crop_size')
        path_column, score_column = opt.get('path_column', 'path'), opt.get('score_column', 'score')
        rows, header = read_table(self.meta_file, opt.get('delimiter'))
        _require_columns(self.meta_file, header, (path_column, score_column))
        root = opt.get('dataroot', '') or ''
        sign = -1.0 if opt.get('lower_is_better', False) else 1.0
        self.paths, self.scores = [], []
        for line, row in enumerate(rows, start=2):
            try:
                score = float(row[score_column])
            except ValueError:
                raise ValueError(f'list {self.meta_file!r}, line {line}: score {row[score_column]!r} is not a '
                                 'number.') from None
            self.paths.append(os.path.join(root, row[path_column]))
            self.scores.append(sign * score)
        if len(self.paths) < (2 if self.mode == 'pair' else 1):
            raise ValueError(f'list {self.meta_file!r} holds too few images for mode {self.mode!r}.')
        self.pairs_per_epoch = int(opt.get('pairs_per_epoch') or len(self.paths))

    def __len__(self):
        return len(self.paths) if self.mode == 'single' else self.pairs_per_epoch

    def sample_pair(self, rng=random):
        """Two distinct random images with their label (used by :class:`SRMethodGroupDataset` as well)."""
        i, j = rng.sample(range(len(self.paths)), 2)
        return {'img_a': read_rgb(self.paths[i], self.crop_size), 'img_b': read_rgb(self.paths[j], self.crop_size),
                'label': pair_label(self.scores[i], self.scores[j]),
                'key_a': image_key(self.paths[i], self.crop_size), 'key_b': image_key(self.paths[j], self.crop_size)}

    def __getitem__(self, index):
        if self.mode == 'pair':
            return self.sample_pair()
        path = self.paths[index]
        return {'img': read_rgb(path, self.crop_size), 'score': self.scores[index],
                'key': image_key(path, self.crop_size), 'path': path}


# column presets of 2AFC lists; realsr1k: cschenjunlin/SR-IQA-SMC25, sr_subjective_results.csv
TWO_AFC_FORMATS = {
    'pairs': {'pair': 'pair', 'group': 'group', 'image_a': 'image_a', 'image_b': 'image_b',
              'fraction_a': 'fraction_a', 'fraction_b': 'fraction_b'},
    'realsr1k': {'pair': 'sr_pair_names', 'group': 'group', 'image_a': 'name1_column', 'image_b': 'name2_column',
                 'fraction_a': 'score1_column', 'fraction_b': 'score2_column'},
}


@DATASET_REGISTRY.register()
class TwoAFCPairDataset(data.Dataset):
    """Human 2AFC pairs (RealSR-1K style list) for validating a quality model.

    Options (``opt``):
        meta_file (str): CSV/TSV with a header row.
        dataroot (str): Folder the image names are relative to.
        format (str, optional): Column preset: ``realsr1k`` for the RealSR-1K subjective results as
            released (``sr_pair_names, group, name1_column, name2_column, score1_column, score2_column``).
        columns (dict, optional): Header names for ``pair`` (pair name), ``group`` (e.g. the LR image or
            the method pair), ``image_a``, ``image_b``, ``fraction_a`` (share preferring A) and optionally
            ``fraction_b`` (used to normalise when both are given). Defaults are those words, or those of
            ``format``; given keys override the preset.
        group (str, optional): Keep only rows of this group (RealSR-1K: ``mad`` or ``mid``).
        crop_size (int, optional): Centre crop side.

    Items: ``img_a``, ``img_b`` (3, H, W), ``fraction_a`` (float in [0, 1]), ``key_a``, ``key_b``,
    ``pair``, ``group`` (str).
    """

    def __init__(self, opt):
        super().__init__()
        check_option_keys(opt, ('meta_file', 'dataroot', 'format', 'columns', 'group', 'crop_size', 'delimiter'),
                          'TwoAFCPairDataset')
        self.opt = opt
        self.meta_file = opt['meta_file']
        self.crop_size = opt.get('crop_size')
        preset = TWO_AFC_FORMATS.get(opt.get('format') or 'pairs')
        if preset is None:
            raise ValueError(f"TwoAFCPairDataset {opt.get('name', '')!r}: unknown format {opt.get('format')!r}; "
                             f'choose one of {sorted(TWO_AFC_FORMATS)}.')
        columns = {**preset, **(opt.get('columns') or {})}
        rows, header = read_table(self.meta_file, opt.get('delimiter'))
        _require_columns(self.meta_file, header, [columns[k] for k in ('image_a', 'image_b', 'fraction_a')])
        rows = list(enumerate(rows, start=2))   # (file line, row)
        group = opt.get('group')
        if group is not None:
            groups_found = sorted({row.get(columns['group'], '') for _, row in rows})
            rows = [(line, row) for line, row in rows if row.get(columns['group']) == str(group)]
            if not rows:
                raise ValueError(f'2AFC list {self.meta_file!r} has no row of group {group!r} (column '
                                 f"{columns['group']!r}); its groups are {groups_found[:5]}"
                                 f"{' ...' if len(groups_found) > 5 else ''}.")
        root = opt.get('dataroot', '') or ''
        self.items = []
        for line, row in rows:
            try:
                frac_a = float(row[columns['fraction_a']])
                frac_b = float(row[columns['fraction_b']]) if columns['fraction_b'] in row else 1 - frac_a
            except ValueError:
                raise ValueError(f'2AFC list {self.meta_file!r}, line {line}: vote fractions must be '
                                 'numbers.') from None
            total = frac_a + frac_b
            if total <= 0 or frac_a < 0 or frac_b < 0:
                raise ValueError(f'2AFC list {self.meta_file!r}, line {line}: fractions {frac_a}, {frac_b} are '
                                 'not a valid vote split.')
            self.items.append({
                'pair': row.get(columns['pair'], str(line - 1)), 'group': row.get(columns['group'], ''),
                'path_a': os.path.join(root, row[columns['image_a']]),
                'path_b': os.path.join(root, row[columns['image_b']]), 'fraction_a': frac_a / total})
        if not self.items:
            raise ValueError(f'2AFC list {self.meta_file!r} holds no pairs.')

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        return {'img_a': read_rgb(item['path_a'], self.crop_size), 'img_b': read_rgb(item['path_b'], self.crop_size),
                'fraction_a': item['fraction_a'], 'key_a': image_key(item['path_a'], self.crop_size),
                'key_b': image_key(item['path_b'], self.crop_size), 'pair': item['pair'], 'group': item['group']}
