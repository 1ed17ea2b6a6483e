"""The preference-data chain's work folder: its layout, image and JSON files, and the inputs it starts from.

One item per LQ image; each step writes its JSON record last (atomically), so a finished-marker is a complete
record::

    WORK/candidates/<sid>/lq.png            the LQ input (copied)
    WORK/candidates/<sid>/gt.png            the GT, when there is one
    WORK/candidates/<sid>/c{n}.png          kept candidates n = 0..N-1, best mean normalised score first
    WORK/candidates/<sid>/candidates.json   prompt, settings, scores of each candidate, default_candidate
    WORK/seg/<sid>.png                      uint16 partition label map at SR size (16-bit PNG)
    WORK/seg/<sid>.json                     number of instances, areas, which image was segmented, segmenter
    WORK/instances/<sid>.json               instance table {id, area, win, lose, scores?, feedback?}, negative prompt
    WORK/errors/<step>.json                 the items that failed in the last run of a step, with the reason
    WORK/errors/<step>.rank<r>.json         the same, of rank r of a sharded run (merged into <step>.json)
"""
import json
import os
import re

import cv2
import numpy as np

from dspo_basicsr.preference.redaction import redact, redact_value
from dspo_basicsr.utils.atomic_write import atomic_write_bytes

__all__ = ['IMAGE_EXTENSIONS', 'WorkFolder', 'discover_inputs', 'read_image', 'write_image', 'read_label_map',
           'read_json', 'write_json']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
_SID_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]+$')


def read_image(path):
    """(H, W, 3) uint8 RGB from an image file; clear error when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'Cannot read image {path}.')
    return np.ascontiguousarray(image[..., ::-1])


def write_image(path, image):
    """Write (H, W, 3) uint8 RGB or (H, W) uint16 as PNG, atomically."""
    image = np.asarray(image)
    array = image[..., ::-1] if image.ndim == 3 else image
    ok, png = cv2.imencode('.png', np.ascontiguousarray(array))
    if not ok:
        raise ValueError(f'Cannot encode {path} as PNG.')
    atomic_write_bytes(path, png.tobytes())


def read_label_map(path):
    """(H, W) uint16 label map from a 16-bit PNG."""
    seg = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if seg is None or seg.ndim != 2:
        raise ValueError(f'Cannot read the label map {path} as a single-channel PNG.')
    return seg.astype(np.uint16)


def write_json(path, value):
    """Write a JSON record of the work folder atomically, secrets redacted (a reason or reply may quote a key)."""
    text = redact(json.dumps(redact_value(value), indent=1, sort_keys=False))
    atomic_write_bytes(path, text.encode('utf-8'))


def read_json(path):
    """A JSON record of the work folder."""
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)


class WorkFolder:
    """Paths of the work folder (layout in the module docstring)."""

    def __init__(self, root):
        self.root = os.path.abspath(str(root))

    def candidate_dir(self, sid):
        return os.path.join(self.root, 'candidates', sid)

    def candidates_json(self, sid):
        return os.path.join(self.candidate_dir(sid), 'candidates.json')

    def candidate_png(self, sid, n):
        return os.path.join(self.candidate_dir(sid), f'c{n}.png')

    def lq_png(self, sid):
        return os.path.join(self.candidate_dir(sid), 'lq.png')

    def gt_png(self, sid):
        return os.path.join(self.candidate_dir(sid), 'gt.png')

    def seg_png(self, sid):
        return os.path.join(self.root, 'seg', f'{sid}.png')

    def seg_json(self, sid):
        return os.path.join(self.root, 'seg', f'{sid}.json')

    def instances_json(self, sid):
        return os.path.join(self.root, 'instances', f'{sid}.json')

    def errors_json(self, step):
        return os.path.join(self.root, 'errors', f'{step}.json')

    def rank_errors_json(self, step, rank):
        return os.path.join(self.root, 'errors', f'{step}.rank{rank}.json')

    def sids(self, stage='candidates'):
        """Sample ids finished at ``stage`` (``candidates``, ``seg`` or ``instances``), sorted."""
        marker = {'candidates': self.candidates_json, 'seg': self.seg_json, 'instances': self.instances_json}[stage]
        folder = os.path.join(self.root, 'candidates')
        if not os.path.isdir(folder):
            return []
        return sorted(sid for sid in os.listdir(folder) if os.path.isfile(marker(sid)))

    def load_candidates(self, sid):
        """``(record, lq, gt or None, [candidates])`` of a finished candidate item."""
        record = read_json(self.candidates_json(sid))
        lq = read_image(self.lq_png(sid))
        gt = read_image(self.gt_png(sid)) if record.get('has_gt') else None
        candidates = [read_image(self.candidate_png(sid, n)) for n in range(record['num_candidates'])]
        return record, lq, gt, candidates

    def load_sample(self, sid):
        """The :class:`PreferenceSample` of a finished item (after the scoring step)."""
        from dspo_basicsr.data.preference_sample import PreferenceSample

        record, lq, gt, candidates = self.load_candidates(sid)
        seg = read_label_map(self.seg_png(sid))
        scored = read_json(self.instances_json(sid))
        meta = {
            'candidates': record['settings'],
            'default_candidate': record['default_candidate'],
            'candidate_scores': record['scores'],
            'candidate_mean_score': record['mean_score'],
            'segmenter': read_json(self.seg_json(sid)).get('segmenter'),
            'scorer': scored.get('scorer'),
        }
        if record.get('source'):
            meta['source'] = record['source']
        return PreferenceSample(sid=sid, lq=lq, candidates=candidates, seg=seg, instances=scored['instances'],
                                prompt=record.get('prompt', ''), negative_prompt=scored.get('negative_prompt', ''),
                                gt=gt, meta=meta)

    def write_errors(self, report):
        os.makedirs(os.path.dirname(self.errors_json(report.step)), exist_ok=True)
        write_json(self.errors_json(report.step), report.failed)


def discover_inputs(lq_dir, gt_dir=None):
    """``[(sid, lq_path, gt_path or None)]`` for the images of ``lq_dir``, GT matched by file stem.

    Raises:
        ValueError: A file stem is not a valid sample id, or two files share one.
    """
    if not os.path.isdir(lq_dir):
        raise FileNotFoundError(f'LQ folder not found: {lq_dir}.')
    gt_paths = {}
    if gt_dir:
        if not os.path.isdir(gt_dir):
            raise FileNotFoundError(f'GT folder not found: {gt_dir}.')
        for name in sorted(os.listdir(gt_dir)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                gt_paths[os.path.splitext(name)[0]] = os.path.join(gt_dir, name)
    inputs, seen = [], set()
    for name in sorted(os.listdir(lq_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        sid = os.path.splitext(name)[0]
        if not _SID_PATTERN.match(sid):
            raise ValueError(f'{os.path.join(lq_dir, name)}: the file stem {sid!r} is used as the sample id and may '
                             'hold only letters, digits, "_", "-" and "."; rename the file.')
        if sid in seen:
            raise ValueError(f'{lq_dir}: two images share the stem {sid!r}; sample ids must be unique.')
        seen.add(sid)
        inputs.append((sid, os.path.join(lq_dir, name), gt_paths.get(sid)))
    if not inputs:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {lq_dir}.')
    return inputs
