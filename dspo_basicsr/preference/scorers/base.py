"""What every instance scorer shares: the sample it sees, its interface, instance geometry, the pair pick."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ['InstanceContext', 'ScorerItemError', 'InstanceScorer', 'instance_areas', 'largest_instances',
           'instance_box', 'pick_pair', 'json_float']


class ScorerItemError(RuntimeError):
    """One instance (or sample) could not be scored; the others go on. The message names the sample."""


@dataclass
class InstanceContext:
    """What a scorer sees of one LQ sample.

    Attributes:
        sid (str): Sample id.
        lq (np.ndarray): (h, w, 3) uint8 RGB.
        candidates (list[np.ndarray]): N (H, W, 3) uint8 RGB candidates.
        seg (np.ndarray): (H, W) uint16 partition label map.
        gt (np.ndarray, optional): (H, W, 3) uint8 RGB.
        prompt (str): The sample's prompt.
    """
    sid: str
    lq: np.ndarray
    candidates: list
    seg: np.ndarray
    gt: Optional[np.ndarray] = None
    prompt: str = ''
    extras: dict = field(default_factory=dict)

    @property
    def scale(self):
        return self.seg.shape[0] / self.lq.shape[0]


def instance_areas(seg):
    """(M,) pixel count of each instance id 0..M-1 of a partition label map."""
    return np.bincount(np.asarray(seg).ravel().astype(np.int64))


def largest_instances(seg, k=5):
    """Ids of the ``k`` largest instances (ties broken by the smaller id)."""
    areas = instance_areas(seg)
    order = sorted(np.nonzero(areas)[0].tolist(), key=lambda i: (-areas[i], i))
    return order[:k]


def instance_box(mask, min_size=0):
    """Bounding box ``(y0, y1, x0, x1)`` of a mask, grown symmetrically to at least ``min_size`` per side.

    The box stays inside the image; an image smaller than ``min_size`` gives the whole image.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError('The instance mask is empty.')
    height, width = mask.shape
    box = []
    for lo, hi, size in ((ys.min(), ys.max() + 1, height), (xs.min(), xs.max() + 1, width)):
        target = min(max(min_size, hi - lo), size)
        if hi - lo < target:
            lo = int(round((lo + hi - target) / 2))
            lo = min(max(lo, 0), size - target)
            hi = lo + target
        box += [int(lo), int(hi)]
    return tuple(box)


def pick_pair(values, higher_better=True):
    """(win, lose) candidate indices from one score per candidate; (-1, -1) when all are equal.

    Ties go to the smaller index. Non-finite values: NaN counts as worst; +inf/-inf as their sign says.
    """
    values = np.asarray(values, dtype=np.float64)
    if not higher_better:
        values = -values
    values = np.where(np.isnan(values), -np.inf, values)
    if values.size < 2 or np.all(values == values[0]):
        return -1, -1
    win = int(np.argmax(values))
    lose = int(np.argmin(values))
    return win, lose


class InstanceScorer:
    """Base class: subclasses implement :meth:`score_instance`."""

    name = 'scorer'
    uses_top_k = True  # the human scorer chooses its own instances

    def score_instance(self, context, instance_id):
        """Return ``{'win': int, 'lose': int, 'scores': {...}}`` for one instance of ``context``."""
        raise NotImplementedError

    def sample_extras(self, context):
        """Sample-level fields a scorer adds (e.g. the human ``negative_prompt``)."""
        return {}

    def describe(self):
        return {'type': self.name}


def json_float(value):
    value = float(value)
    return value if np.isfinite(value) else None
