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
from dspo_basicsr.utils.option_schema import LOADER_OPTIONS, REQUIRED, Option

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


def check_option_keys(opt, schema, where):
    """Refuse option keys a dataset does not declare in ``schema`` (a typo would otherwise be silently ignored)."""
    known = schema.children('')
    unknown = sorted(set(opt) - set(known))
    if unknown:
        raise KeyError(f"{where} {opt.get('name', '')!r}: unknown option(s) {unknown}; known options are "
                       f'{sorted(known)}.')


def pair_label(score_a, score_b):
    """Hard label from two scores (higher better): 1, 0, or 0.5 for equal scores."""
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


@DATASET_REGISTRY.register()
class IQAListDataset(data.Dataset):
    """Images with mean opinion scores.

    Options: :attr:`option_schema` (the table is in ``docs/options.md``).

    Items:
        single: ``img`` (3, H, W), ``score`` (float), ``key`` (str), ``path`` (str).
        pair: ``img_a``, ``img_b`` (3, H, W), ``label`` (float, P(a better)), ``key_a``, ``key_b``.
    """

    #: every option this dataset reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = LOADER_OPTIONS.extend(
        Option('meta_file', 'path', REQUIRED, 'CSV/TSV list with a header row'),
        Option('dataroot', 'path', '', "folder the image paths are relative to ('': paths as written)"),
        Option('path_column', 'str', 'path', 'header of the image path column'),
        Option('score_column', 'str', 'score', 'header of the score column'),
        Option('lower_is_better', 'bool', False, 'the score is a distortion (DMOS); it is negated'),
        Option('mode', 'str', 'single', 'single: image + score; pair: two random images + label',
               choices=('single', 'pair')),
        Option('crop_size', 'int', None, 'centre crop side (~: whole images)', ge=1),
        Option('pairs_per_epoch', 'int', None, "length in mode 'pair' (~: the number of images)", ge=1),
        Option('delimiter', 'str', None, 'field separator (~: from the extension)'),
    )

    def __init__(self, opt):
        super().__init__()
        check_option_keys(opt, self.option_schema, 'IQAListDataset')
        option = self.option_schema.value  # the value in the block, checked, or the declared default
        self.opt = opt
        self.meta_file = opt['meta_file']
        self.mode = option(opt, 'mode')
        self.crop_size = option(opt, 'crop_size')
        path_column, score_column = option(opt, 'path_column'), option(opt, 'score_column')
        rows, header = read_table(self.meta_file, option(opt, 'delimiter'))
        _require_columns(self.meta_file, header, (path_column, score_column))
        root = option(opt, 'dataroot') or ''
        sign = -1.0 if option(opt, 'lower_is_better') else 1.0
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
        self.pairs_per_epoch = int(option(opt, 'pairs_per_epoch') or len(self.paths))

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

    Options: :attr:`option_schema` (the table is in ``docs/options.md``). ``columns`` names the headers of
    ``pair`` (pair name), ``group`` (e.g. the LR image or the method pair), ``image_a``, ``image_b``,
    ``fraction_a`` (share preferring A) and optionally ``fraction_b`` (used to normalise when both are
    given); defaults are those words, or those of ``format``; given keys override the preset.

    Items: ``img_a``, ``img_b`` (3, H, W), ``fraction_a`` (float in [0, 1]), ``key_a``, ``key_b``,
    ``pair``, ``group`` (str).
    """

    #: every option this dataset reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = LOADER_OPTIONS.extend(
        Option('meta_file', 'path', REQUIRED, 'CSV/TSV list of the pairs with a header row'),
        Option('dataroot', 'path', '', 'folder the image names are relative to'),
        Option('format', 'str', 'pairs', 'column preset (realsr1k: the RealSR-1K subjective results as released)',
               choices=tuple(TWO_AFC_FORMATS)),
        Option('columns', 'dict', None, 'header names overriding the preset (pair, group, image_a, image_b, '
               'fraction_a, fraction_b)'),
        Option('group', 'any', None, 'keep only rows of this group (RealSR-1K: mad or mid)'),
        Option('crop_size', 'int', None, 'centre crop side (~: whole images)', ge=1),
        Option('delimiter', 'str', None, 'field separator (~: from the extension)'),
    )

    def __init__(self, opt):
        super().__init__()
        check_option_keys(opt, self.option_schema, 'TwoAFCPairDataset')
        option = self.option_schema.value  # the value in the block, checked, or the declared default
        self.opt = opt
        self.meta_file = opt['meta_file']
        self.crop_size = option(opt, 'crop_size')
        preset = TWO_AFC_FORMATS[option(opt, 'format') or 'pairs']
        columns = {**preset, **(option(opt, 'columns') or {})}
        rows, header = read_table(self.meta_file, option(opt, 'delimiter'))
        _require_columns(self.meta_file, header, [columns[k] for k in ('image_a', 'image_b', 'fraction_a')])
        rows = list(enumerate(rows, start=2))   # (file line, row)
        group = option(opt, 'group')
        if group is not None:
            groups_found = sorted({row.get(columns['group'], '') for _, row in rows})
            rows = [(line, row) for line, row in rows if row.get(columns['group']) == str(group)]
            if not rows:
                raise ValueError(f'2AFC list {self.meta_file!r} has no row of group {group!r} (column '
                                 f"{columns['group']!r}); its groups are {groups_found[:5]}"
                                 f"{' ...' if len(groups_found) > 5 else ''}.")
        root = option(opt, 'dataroot') or ''
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
