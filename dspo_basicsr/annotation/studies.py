"""The three studies of the annotation studio and what each shows for one item.

* :class:`InstanceStudy` (DSPO, section 5.1): per sample of a work folder, the K largest instances; for each
  the LQ and the N candidates cropped to the instance's box with its outline, the VLM description of each
  candidate under it (when ``score_instances.py`` wrote them). Answer: ``{best, worst, hallucinated,
  no_preference}`` in candidate indices.
* :class:`PairStudy` (SR-IQA 2AFC): the pairs of ``mad_select.py``'s CSV, two SR images of the same LR side
  by side with the LR shown. Answer: ``{choice: method}``.
* :class:`WinRateStudy`: two result folders of the same LQ images, over several rounds. Answer:
  ``{choice: 'a' | 'b'}``.

Items are addressed by a key (``sid/instance``, the pair name, the image name); every file is resolved
from the study's own tables and must lie inside the study's roots (:func:`inside_roots`), so no request
names a path. Per annotator and round the item order and the left/right sides are shuffled with a seed made
from the annotator's name, so they are the same after a restart and recorded with each answer.
"""
import csv
import hashlib
import json
import os
import random
from collections import OrderedDict

import cv2
import numpy as np

from dspo_basicsr.preference.instance_scoring import instance_box
from dspo_basicsr.preference.pipeline import IMAGE_EXTENSIONS, WorkFolder, read_image, read_label_map

__all__ = ['StudyError', 'inside_roots', 'InstanceStudy', 'PairStudy', 'WinRateStudy', 'build_study',
           'annotator_rng']


class StudyError(ValueError):
    """A study cannot be built from its inputs; the message names the file and what to do."""


def inside_roots(path, roots):
    """``path`` resolved (symlinks followed) when it lies inside one of ``roots``, else None."""
    real = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if os.path.commonpath([real, root]) == root:
            return real
    return None


def annotator_rng(seed, annotator, round_index, purpose):
    """A ``random.Random`` fixed by the study seed, the annotator's name, the round and what it shuffles."""
    digest = hashlib.sha256(f'{seed}\0{annotator}\0{round_index}\0{purpose}'.encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def _png(image):
    ok, data = cv2.imencode('.png', np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError('PNG encoding failed.')
    return data.tobytes()


class _LRU(OrderedDict):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class Study:
    """Common part: items, per-annotator order, rounds, file safety and a PNG cache."""

    kind = 'study'
    rounds = 1

    def __init__(self, roots, seed=0, cache_size=256):
        self.roots = [os.path.abspath(r) for r in roots]
        self.seed = seed
        self.png_cache = _LRU(cache_size)
        self.image_cache = _LRU(64)

    # subclasses set self.items (list of keys, stable order)
    def options(self):
        """JSON options that rebuild the study (stored in the database)."""
        raise NotImplementedError

    def order(self, annotator, round_index):
        keys = list(self.items)
        annotator_rng(self.seed, annotator, round_index, 'order').shuffle(keys)
        return keys

    def swapped(self, annotator, round_index, key):
        """Whether the two images of a pair item are shown right/left instead of left/right."""
        return annotator_rng(self.seed, annotator, round_index, f'side {key}').random() < 0.5

    def next_item(self, answered, annotator):
        """``(round, key)`` of the annotator's next item, or None when all rounds are done.

        Args:
            answered (set[tuple[int, str]]): ``(round, key)`` already answered by the annotator.
        """
        for round_index in range(self.rounds):
            for key in self.order(annotator, round_index):
                if (round_index, key) not in answered:
                    return round_index, key
        return None

    def total(self):
        return self.rounds * len(self.items)

    def shown(self, key, annotator, round_index):
        """What the annotator saw, recorded with the answer: the item's place in their order."""
        return {'position': self.order(annotator, round_index).index(key)}

    def safe_path(self, path):
        real = inside_roots(path, self.roots)
        if real is None:
            raise PermissionError(f'{path} is outside the study folders {self.roots}; it is not served.')
        return real

    def load(self, path):
        real = self.safe_path(path)
        return self.image_cache.get_or(real, lambda: read_image(real))

    def image_png(self, key, role, annotator=None, round_index=0, full=False):
        """PNG bytes of one image of an item (``role`` as in the item's view); KeyError when unknown."""
        raise NotImplementedError


class InstanceStudy(Study):
    """Instance-level best / worst candidate, as annotated for DSPO.

    Args:
        work (str): Work folder after ``segment_instances.py`` (``candidates/``, ``seg/``; ``instances/``
            for the VLM descriptions when ``score_instances.py`` wrote them).
        top_k (int): Instances per sample, the largest first. Default: 5.
        min_crop (int): Crops grow to at least this size (SR pixels). Default: 64.
        margin (float): Crops grow by this share of the box on each side, for context. Default: 0.25.
    """

    kind = 'instances'

    def __init__(self, work, top_k=5, min_crop=64, margin=0.25, seed=0):
        self.work = WorkFolder(work)
        super().__init__([self.work.root], seed)
        self.top_k, self.min_crop, self.margin = int(top_k), int(min_crop), float(margin)
        self.samples = self.work.sids('seg')
        if not self.samples:
            raise StudyError(f'{self.work.root} has no segmented sample: run generate_candidates.py and '
                             'segment_instances.py on it first.')
        self.items, self.records = [], {}
        for sid in self.samples:
            with open(self.work.seg_json(sid), encoding='utf-8') as handle:
                areas = json.load(handle)['areas']
            with open(self.work.candidates_json(sid), encoding='utf-8') as handle:
                record = json.load(handle)
            largest = sorted((i for i, a in enumerate(areas) if a > 0), key=lambda i: (-areas[i], i))[:self.top_k]
            self.records[sid] = {'num_candidates': int(record['num_candidates']), 'prompt': record.get('prompt', ''),
                                 'instances': largest}
            self.items += [f'{sid}/{i}' for i in largest]

    def options(self):
        return {'kind': self.kind, 'work': self.work.root, 'top_k': self.top_k, 'min_crop': self.min_crop,
                'margin': self.margin, 'seed': self.seed}

    def order(self, annotator, round_index):
        # samples are shuffled, the instances of one sample stay together (largest first)
        samples = list(self.samples)
        annotator_rng(self.seed, annotator, round_index, 'order').shuffle(samples)
        return [f'{sid}/{i}' for sid in samples for i in self.records[sid]['instances']]

    def split(self, key):
        sid, _, instance = key.rpartition('/')
        if sid not in self.records or not instance.isdigit() or int(instance) not in self.records[sid]['instances']:
            raise KeyError(key)
        return sid, int(instance)

    def descriptions(self, sid, instance):
        """The VLM description of each candidate's crop, from ``instances/<sid>.json``; None when absent."""
        path = self.work.instances_json(sid)
        if not os.path.isfile(path):
            return None
        with open(path, encoding='utf-8') as handle:
            table = json.load(handle).get('instances', [])
        for entry in table:
            if entry.get('id') == instance:
                found = (entry.get('feedback') or {}).get('descriptions')
                return [str(t) for t in found] if found else None
        return None

    def view(self, key, annotator=None, round_index=0):
        sid, instance = self.split(key)
        record = self.records[sid]
        n = record['num_candidates']
        descriptions = self.descriptions(sid, instance) or [''] * n
        return {'kind': self.kind, 'key': key, 'sid': sid, 'instance': instance, 'prompt': record['prompt'],
                'candidates': [{'index': c, 'role': f'c{c}', 'description': descriptions[c] if c < len(descriptions)
                                else ''} for c in range(n)],
                'has_descriptions': any(descriptions)}

    def validate(self, key, answer):
        """The stored form of an answer; ValueError when it does not fit the item."""
        sid, _ = self.split(key)
        n = self.records[sid]['num_candidates']
        hallucinated = sorted({int(c) for c in answer.get('hallucinated') or []})
        if any(not 0 <= c < n for c in hallucinated):
            raise ValueError(f'hallucinated candidates must be 0..{n - 1}.')
        if answer.get('no_preference'):
            return {'no_preference': True, 'best': None, 'worst': None, 'hallucinated': hallucinated}
        best, worst = answer.get('best'), answer.get('worst')
        for name, value in (('best', best), ('worst', worst)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                raise ValueError(f'{name} must be a candidate index 0..{n - 1}, or mark "no clear preference".')
        if best == worst:
            raise ValueError('best and worst must be two different candidates.')
        return {'no_preference': False, 'best': best, 'worst': worst, 'hallucinated': hallucinated}

    def _crop(self, sid, instance):
        seg = self.image_cache.get_or(('seg', sid), lambda: read_label_map(self.safe_path(self.work.seg_png(sid))))
        mask = seg == instance
        y0, y1, x0, x1 = instance_box(mask)
        grow_y, grow_x = int((y1 - y0) * self.margin), int((x1 - x0) * self.margin)
        box_mask = np.zeros_like(mask)
        box_mask[max(y0 - grow_y, 0):y1 + grow_y, max(x0 - grow_x, 0):x1 + grow_x] = True
        return mask, instance_box(box_mask, self.min_crop)

    def _outlined(self, image, mask):
        # the outline is drawn at the image's own size: the LQ's mask is the SR mask resized (nearest)
        if mask.shape != image.shape[:2]:
            mask = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]),
                              interpolation=cv2.INTER_NEAREST).astype(bool)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out = image.copy()
        cv2.drawContours(out, contours, -1, (255, 0, 255), 1)
        return out

    def image_png(self, key, role, annotator=None, round_index=0, full=False):
        sid, instance = self.split(key)
        n = self.records[sid]['num_candidates']
        if role == 'lq':
            path = self.work.lq_png(sid)
        elif role.startswith('c') and role[1:].isdigit() and int(role[1:]) < n:
            path = self.work.candidate_png(sid, int(role[1:]))
        else:
            raise KeyError(role)

        def render():
            image = self.load(path)
            mask, (y0, y1, x0, x1) = self._crop(sid, instance)
            scale = mask.shape[0] / image.shape[0]
            outlined = self._outlined(image, mask)
            if full:
                return _png(outlined)
            # LQ pixels of the SR box: floor of the start, ceiling of the end
            ly0, lx0 = int(y0 / scale), int(x0 / scale)
            ly1, lx1 = max(int(np.ceil(y1 / scale)), ly0 + 1), max(int(np.ceil(x1 / scale)), lx0 + 1)
            return _png(outlined[ly0:ly1, lx0:lx1])

        return self.png_cache.get_or((key, role, full), render)


def _find_image(folder, name):
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(folder, name + ext)
        if os.path.isfile(path):
            return path
    return None


class _PairwiseStudy(Study):
    """Two images of the same LR/LQ side by side (with it shown); the answer names the chosen one."""

    question = 'Which image has the better quality?'

    def view(self, key, annotator=None, round_index=0):
        pair = self.pairs[key]
        left, right = ('b', 'a') if self.swapped(annotator, round_index, key) else ('a', 'b')
        return {'kind': self.kind, 'key': key, 'question': self.question, 'image': pair['image'],
                'left': {'role': left, 'method': pair[f'method_{left}']},
                'right': {'role': right, 'method': pair[f'method_{right}']}}

    def shown(self, key, annotator, round_index):
        view = self.view(key, annotator, round_index)
        return {'left': view['left']['method'], 'right': view['right']['method'],
                'position': self.order(annotator, round_index).index(key)}

    def validate(self, key, answer):
        pair = self.pairs[key]
        choice = answer.get('choice')
        if choice not in ('a', 'b'):
            raise ValueError("choice must be 'a' or 'b'.")
        return {'choice': choice, 'method': pair[f'method_{choice}']}

    def image_png(self, key, role, annotator=None, round_index=0, full=False):
        pair = self.pairs[key]
        path = {'a': pair['path_a'], 'b': pair['path_b'], 'lq': pair['path_lq']}[role]
        return self.png_cache.get_or((key, role), lambda: _png(self.load(path)))


class PairStudy(_PairwiseStudy):
    """2AFC pairs of ``mad_select.py`` (``pair, group, image, method_a, method_b, image_a, image_b``).

    Args:
        pairs_csv (str): The pairs CSV.
        sr_root (str): ``SR_ROOT/<method>/<image>.png`` (used when ``image_a``/``image_b`` are empty, and the
            folder the SR files must lie in).
        lr_root (str): ``LR_ROOT/<image>.png``, the LR inputs shown with each pair.
    """

    kind = 'pairs'

    def __init__(self, pairs_csv, sr_root, lr_root, seed=0):
        super().__init__([sr_root, lr_root], seed)
        self.pairs_csv, self.sr_root, self.lr_root = (os.path.abspath(p) for p in (pairs_csv, sr_root, lr_root))
        try:
            with open(self.pairs_csv, newline='', encoding='utf-8') as handle:
                rows = list(csv.DictReader(handle))
        except OSError as err:
            raise StudyError(f'Cannot read the pairs CSV {pairs_csv}: {err}') from err
        missing = [c for c in ('pair', 'image', 'method_a', 'method_b') if rows and c not in rows[0]]
        if not rows or missing:
            raise StudyError(f'{pairs_csv} is not a pairs CSV of mad_select.py (missing {missing or "rows"}).')
        self.pairs = {}
        for line, row in enumerate(rows, start=2):
            pair = {k: (row.get(k) or '').strip() for k in ('pair', 'group', 'image', 'method_a', 'method_b')}
            for side in ('a', 'b'):
                path = (row.get(f'image_{side}') or '').strip()
                path = path or _find_image(os.path.join(self.sr_root, pair[f'method_{side}']), pair['image'])
                if not path or inside_roots(path, [self.sr_root]) is None or not os.path.isfile(path):
                    raise StudyError(f'{pairs_csv}, line {line}: the image of method {pair[f"method_{side}"]!r} '
                                     f'({path or "not found"}) is not a file inside {self.sr_root}.')
                pair[f'path_{side}'] = path
            pair['path_lq'] = _find_image(self.lr_root, pair['image'])
            if pair['path_lq'] is None:
                raise StudyError(f'{pairs_csv}, line {line}: no LR image {pair["image"]!r} in {self.lr_root}.')
            if pair['pair'] in self.pairs:
                raise StudyError(f'{pairs_csv}, line {line}: pair name {pair["pair"]!r} is used twice.')
            self.pairs[pair['pair']] = pair
        self.items = list(self.pairs)

    def options(self):
        return {'kind': self.kind, 'pairs_csv': self.pairs_csv, 'sr_root': self.sr_root, 'lr_root': self.lr_root,
                'seed': self.seed}


class WinRateStudy(_PairwiseStudy):
    """Which of two methods' results is preferred given the LQ, over several rounds.

    Args:
        folder_a, folder_b (str): Result folders with the same image names.
        lq_root (str): The LQ inputs.
        names (tuple[str], optional): Method names (default: the folder names).
        rounds (int): Annotation rounds (the paper reports three). Default: 3.
    """

    kind = 'winrate'
    question = 'Which image do you prefer given the LQ?'

    def __init__(self, folder_a, folder_b, lq_root, names=None, rounds=3, seed=0):
        super().__init__([folder_a, folder_b, lq_root], seed)
        self.folder_a, self.folder_b, self.lq_root = (os.path.abspath(p) for p in (folder_a, folder_b, lq_root))
        self.names = list(names or (os.path.basename(self.folder_a), os.path.basename(self.folder_b)))
        if len(self.names) != 2 or self.names[0] == self.names[1]:
            raise StudyError(f'The two methods need two different names, got {self.names}; pass --names A B.')
        self.rounds = int(rounds)
        listing = {}
        for folder in (self.folder_a, self.folder_b, self.lq_root):
            if not os.path.isdir(folder):
                raise StudyError(f'Folder not found: {folder}.')
            listing[folder] = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
                               if f.lower().endswith(IMAGE_EXTENSIONS)}
        common = sorted(set.intersection(*(set(v) for v in listing.values())))
        if not common:
            raise StudyError(f'No image name is shared by {self.folder_a}, {self.folder_b} and {self.lq_root}.')
        self.pairs = {name: {'pair': name, 'group': f'{self.names[0]}_vs_{self.names[1]}', 'image': name,
                             'method_a': self.names[0], 'method_b': self.names[1],
                             'path_a': listing[self.folder_a][name], 'path_b': listing[self.folder_b][name],
                             'path_lq': listing[self.lq_root][name]} for name in common}
        self.items = common

    def options(self):
        return {'kind': self.kind, 'folder_a': self.folder_a, 'folder_b': self.folder_b, 'lq_root': self.lq_root,
                'names': self.names, 'rounds': self.rounds, 'seed': self.seed}


def build_study(options):
    """A study from its :meth:`options` (as stored in the database)."""
    options = dict(options)
    kind = options.pop('kind', None)
    classes = {'instances': InstanceStudy, 'pairs': PairStudy, 'winrate': WinRateStudy}
    if kind not in classes:
        raise StudyError(f"Unknown study kind {kind!r}; use 'instances', 'pairs' or 'winrate'.")
    return classes[kind](**options)
