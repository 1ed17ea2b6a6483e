"""Groups of SR outputs of two methods, labelled from the methods' global ranking.

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment": the model-ranking
term l_t compares two SR methods through the average calibrated quality of B images each method produced;
the label is which method ranks higher globally (Thurstone scores from human votes).

Layout::

    dataroot/<method>/<image>.png       SR outputs; the same image names under every method folder
    ranking_json                         {"scores": {"<method>": mu, ...}, ...} (scripts/rank_methods.py)

Each item is one method pair with the same B images (content matched) from both methods. An optional
``mos`` sub-option adds one MOS pair per item for the l_p term (BasicSR has a single training set).
"""
import itertools
import json
import math
import os
import random

import torch
from scipy.stats import norm
from torch.utils import data
from torch.utils.data import default_collate

from dspo_basicsr.data.iqa_list_dataset import IQAListDataset, check_option_keys, image_key, pair_label, read_rgb
from dspo_basicsr.utils.option_schema import LOADER_OPTIONS, REQUIRED, Option

from basicsr.utils.registry import DATASET_REGISTRY

__all__ = ['read_ranking_json', 'collate_method_groups', 'SRMethodGroupDataset']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def read_ranking_json(path):
    """Global method scores from a ranking JSON (``{"scores": {method: mu}}``; higher is better)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'ranking JSON {path!r} does not exist; write it with scripts/rank_methods.py.')
    with open(path, encoding='utf-8') as f:
        content = json.load(f)
    scores = content.get('scores') if isinstance(content, dict) else None
    if not isinstance(scores, dict) or not scores:
        raise ValueError(f'ranking JSON {path!r} must hold a non-empty "scores" mapping of method -> score.')
    return {str(k): float(v) for k, v in scores.items()}


def collate_method_groups(batch):
    """Stack tensors, keep per-item lists of keys (default_collate would transpose them)."""
    keep = ('keys_a', 'keys_b')
    out = default_collate([{k: v for k, v in item.items() if k not in keep} for item in batch])
    for key in keep:
        if key in batch[0]:
            out[key] = [item[key] for item in batch]
    return out


@DATASET_REGISTRY.register()
class SRMethodGroupDataset(data.Dataset):
    """Method-pair groups for the model-ranking term.

    Options: :attr:`option_schema` (the table is in ``docs/options.md``).

    Items: ``group_a``, ``group_b`` (B, 3, H, W); ``label`` (float, P(a better)); ``keys_a``, ``keys_b``
    (list of B cache keys); ``method_a``, ``method_b`` (str); with ``mos``: ``mos_a``, ``mos_b``
    (3, H, W), ``mos_label``, ``mos_key_a``, ``mos_key_b``.
    """

    #: every option this dataset reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = LOADER_OPTIONS.extend(
        Option('dataroot', 'path', REQUIRED, 'folder with one sub-folder of SR outputs per method'),
        Option('ranking_json', 'path', REQUIRED, 'global scores of the methods'),
        Option('methods', 'list', None, 'methods to use (~: those in both the folder and the JSON)'),
        Option('group_size', 'int', 4, 'B: images per method in a group', ge=1),
        Option('crop_size', 'int', None, 'centre crop side (deterministic, so backbone features can be cached)',
               ge=1),
        Option('label', 'str', 'hard', 'hard: 1 / 0 / 0.5 from the score order; thurstone: Phi(mu_a - mu_b)',
               choices=('hard', 'thurstone')),
        Option('groups_per_epoch', 'int', None, 'length (~: pairs x ceil(images / B))', ge=1),
        Option('mos', 'dict', None, "IQAListDataset options (mode forced to 'pair'): adds one MOS pair per item"),
    )

    def __init__(self, opt):
        super().__init__()
        check_option_keys(opt, self.option_schema, 'SRMethodGroupDataset')
        option = self.option_schema.value  # the value in the block, checked, or the declared default
        self.opt = opt
        root = opt['dataroot']
        if not os.path.isdir(root):
            raise FileNotFoundError(f"SRMethodGroupDataset: dataroot {root!r} is not a folder of method folders.")
        scores = read_ranking_json(opt['ranking_json'])
        folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        methods = option(opt, 'methods') or [m for m in folders if m in scores]
        unknown = [m for m in methods if m not in scores or m not in folders]
        if unknown:
            raise KeyError(f'SRMethodGroupDataset: methods {unknown} need both a folder in {root!r} and a score in '
                           f"{opt['ranking_json']!r}.")
        if len(methods) < 2:
            raise ValueError(f'SRMethodGroupDataset: need at least two ranked methods in {root!r}, found {methods}.')
        self.methods = list(methods)
        self.scores = {m: scores[m] for m in self.methods}
        stems = None
        self.files = {}
        for method in self.methods:
            names = {os.path.splitext(f)[0]: f for f in os.listdir(os.path.join(root, method))
                     if f.lower().endswith(IMAGE_EXTENSIONS)}
            self.files[method] = names
            stems = set(names) if stems is None else stems & set(names)
        self.images = sorted(stems)
        self.group_size = option(opt, 'group_size')
        if len(self.images) < self.group_size:
            raise ValueError(f'SRMethodGroupDataset: only {len(self.images)} images are shared by all methods in '
                             f'{root!r}, fewer than group_size {self.group_size}.')
        self.root = root
        self.crop_size = option(opt, 'crop_size')
        self.label_mode = option(opt, 'label')
        self.pairs = list(itertools.combinations(self.methods, 2))
        self.length = int(option(opt, 'groups_per_epoch')
                          or len(self.pairs) * math.ceil(len(self.images) / self.group_size))
        self.mos = None
        if option(opt, 'mos'):
            self.mos = IQAListDataset({**opt['mos'], 'mode': 'pair'})

    def __len__(self):
        return self.length

    def label(self, method_a, method_b):
        """P(method_a better than method_b) from the global scores."""
        if self.label_mode == 'thurstone':
            return float(norm.cdf(self.scores[method_a] - self.scores[method_b]))
        return pair_label(self.scores[method_a], self.scores[method_b])

    def _group(self, method, images):
        paths = [os.path.join(self.root, method, self.files[method][name]) for name in images]
        return torch.stack([read_rgb(p, self.crop_size) for p in paths]), [image_key(p, self.crop_size) for p in paths]

    def __getitem__(self, index):
        method_a, method_b = self.pairs[index % len(self.pairs)]
        if random.random() < 0.5:  # balance the labels: the better method is not always first
            method_a, method_b = method_b, method_a
        images = random.sample(self.images, self.group_size)
        group_a, keys_a = self._group(method_a, images)       # (B, 3, H, W)
        group_b, keys_b = self._group(method_b, images)
        item = {'group_a': group_a, 'group_b': group_b, 'label': self.label(method_a, method_b),
                'keys_a': keys_a, 'keys_b': keys_b, 'method_a': method_a, 'method_b': method_b}
        if self.mos is not None:
            pair = self.mos.sample_pair()
            item.update({'mos_a': pair['img_a'], 'mos_b': pair['img_b'], 'mos_label': pair['label'],
                         'mos_key_a': pair['key_a'], 'mos_key_b': pair['key_b']})
        return item

    collate_fn = staticmethod(collate_method_groups)
