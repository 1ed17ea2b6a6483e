"""Instance-level preference: the preferred and dispreferred candidate inside each semantic instance.

DSPO (section 5.1 of the paper) annotates the K largest instances of each image (K = 5): for each one a
preferred (``win``) and a dispreferred (``lose``) candidate. Smaller instances get ``win = lose = -1``
(no pair; the loss ignores them). Four scorers share one interface, ``scorer.score_instance(context,
instance_id) -> {'win', 'lose', 'scores'?, 'candidate_scores'?}``; ``candidate_scores`` holds one number per
candidate, higher is better, the values the pair was picked by (DSPOLoss ``pairs: top_bottom`` ranks them):

* ``metric``: full-reference metrics inside the instance mask against the GT, or no-reference metrics on
  the instance's bounding-box crop, through BasicSR's metric registry; presets ``fidelity`` and
  ``perception`` (:data:`METRIC_PRESETS`, the DSPO paper's fidelity- and perception-oriented scoring of its
  Appendix A);
* ``biqa``: a quality model ``quality(crops) -> scores`` on the bounding-box crops (the calibrated BIQA
  model, :func:`load_biqa_quality`);
* ``vlm``: a vision-language model behind an OpenAI-compatible API (:mod:`.vlm_client`);
* ``human``: an annotation JSON file, format below.

Human annotation JSON (``--scorer human --annotations FILE``)::

    {
      "format": "dspo-human-annotation",
      "version": 1,
      "samples": {
        "<sid>": {
          "instances": {
            "<instance id>": {"win": 2, "lose": 0, "negative": ["smeared fur", "plastic skin"],
                              "scores": [0.1, 0.4, 0.9, 0.3]}
          },
          "negative_prompt": "optional text appended to the sample's negative prompt"
        }
      }
    }

``win``/``lose`` are candidate indices ``0..N-1`` as in ``work/candidates/<sid>/c{n}.png`` (the contact
sheets of ``scripts/show_preference_set.py --work`` show them with the instance ids); an instance left
out has no pair; ``negative`` (optional) lists descriptions of the dispreferred result that become
negative-prompt feedback; ``scores`` (optional) rates every candidate, higher is better (e.g. a ranking
turned into numbers), and becomes the instance's ``candidate_scores``. A sample missing from the file is
reported as an error and not marked done.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dspo_basicsr.preference.candidates import _OUR_KEYS, DEFAULT_METRICS, metric_is_full_reference

__all__ = [
    'InstanceContext', 'ScorerItemError', 'InstanceScorer', 'MetricInstanceScorer', 'BIQAInstanceScorer',
    'VLMInstanceScorer', 'HumanInstanceScorer', 'METRIC_PRESETS', 'load_biqa_quality', 'build_instance_scorer',
    'instance_areas', 'largest_instances', 'instance_box', 'pick_pair', 'score_sample_instances'
]


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


def _bgr(image):
    return np.ascontiguousarray(image[..., ::-1])


#: Metric-scorer presets (``{type: metric, preset: NAME}``). ``fidelity``: PSNR and SSIM against the GT (the
#: distortion metrics of the DSPO paper's tables). ``perception``: the perceptual ones, LPIPS and DISTS against
#: the GT and NIQE, MUSIQ, MANIQA and CLIP-IQA without it (pyiqa metrics need their weight files locally, see
#: docs/metrics.md). Each metric is normalised across the candidates and the mean decides.
METRIC_PRESETS = {
    'fidelity': {k: DEFAULT_METRICS[k] for k in ('psnr', 'ssim')},
    'perception': {
        'lpips': {'type': 'calculate_lpips'}, 'dists': {'type': 'calculate_dists'}, 'niqe': DEFAULT_METRICS['niqe'],
        'musiq': {'type': 'calculate_musiq'}, 'maniqa': {'type': 'calculate_maniqa'},
        'clipiqa': {'type': 'calculate_clipiqa'},
    },
}


class MetricInstanceScorer(InstanceScorer):
    """Metrics inside each instance, through BasicSR's ``calculate_metric``.

    Full-reference metrics compare the instance against the GT: on the instance's bounding box, pixels
    outside the mask are replaced by the GT in the candidate, so only the instance differs (for PSNR this
    ranks exactly as the MSE inside the mask). No-reference metrics score the bounding-box crop. Each
    metric is normalised across candidates (direction aware) and the mean decides.

    Args:
        metrics (dict): ``{name: BasicSR metric option}`` (``better``/``full_reference`` as in
            :mod:`.candidates`). Default: PSNR and SSIM against the GT, NIQE when there is none.
        min_crop (int): Bounding boxes are grown to at least this size (SSIM and NIQE need room).
        preset (str | None): ``fidelity`` or ``perception`` (:data:`METRIC_PRESETS`) instead of ``metrics``.
    """

    name = 'metric'

    def __init__(self, metrics=None, min_crop=32, preset=None):
        if preset is not None:
            if preset not in METRIC_PRESETS:
                raise ValueError(f"Unknown metric scorer preset {preset!r}; choose one of {sorted(METRIC_PRESETS)}.")
            if metrics is not None:
                raise ValueError('Give the metric scorer either a preset or metrics, not both.')
            metrics = METRIC_PRESETS[preset]
        self.preset = preset
        if metrics is None:
            metrics = {k: DEFAULT_METRICS[k] for k in ('psnr', 'ssim', 'niqe')}
        self.metrics = {name: dict(opt) for name, opt in metrics.items()}
        self.min_crop = int(min_crop)

    def score_instance(self, context, instance_id):
        from dspo_basicsr.preference.candidates import normalise_scores

        from basicsr.metrics import calculate_metric

        mask = context.seg == instance_id
        y0, y1, x0, x1 = instance_box(mask, self.min_crop)
        inside = mask[y0:y1, x0:x1, None]
        gt_crop = None if context.gt is None else context.gt[y0:y1, x0:x1]
        scores, used = {}, {}
        for name, opt in self.metrics.items():
            full_reference = metric_is_full_reference(opt)
            if full_reference and gt_crop is None:
                continue
            call_opt = {k: v for k, v in opt.items() if k not in _OUR_KEYS}
            if call_opt['type'] in ('calculate_psnr', 'calculate_ssim', 'calculate_niqe'):
                call_opt.setdefault('crop_border', 0)
            values = []
            for index, candidate in enumerate(context.candidates):
                crop = candidate[y0:y1, x0:x1]
                data = {'img': _bgr(crop)}
                if full_reference:
                    data['img'] = _bgr(np.where(inside, crop, gt_crop))
                    data['img2'] = _bgr(gt_crop)
                try:
                    values.append(float(calculate_metric(data, call_opt)))
                except Exception as err:  # noqa: BLE001
                    raise ScorerItemError(f'Sample {context.sid!r}, instance {instance_id}: metric {name!r} failed '
                                          f'on candidate {index} (crop {y1 - y0}x{x1 - x0}): {err}') from err
            scores[name], used[name] = values, opt
        if not scores:
            raise ScorerItemError(f'Sample {context.sid!r} has no GT and no no-reference metric is configured; '
                                  'add one (e.g. niqe) to the metric scorer options.')
        _, mean = normalise_scores(scores, used)
        win, lose = pick_pair(mean)
        per_candidate = [{name: _json_float(values[i]) for name, values in scores.items()}
                         for i in range(len(context.candidates))]
        return {'win': win, 'lose': lose, 'scores': per_candidate, 'candidate_scores': [_json_float(v) for v in mean]}

    def describe(self):
        return {'type': self.name, 'preset': self.preset, 'metrics': self.metrics, 'min_crop': self.min_crop}


def _json_float(value):
    value = float(value)
    return value if np.isfinite(value) else None


def _stack_crops(context, instance_id, min_crop):
    """(K, 3, h, w) float [0, 1] bounding-box crops of instance ``instance_id`` in every candidate."""
    import torch
    y0, y1, x0, x1 = instance_box(context.seg == instance_id, min_crop)
    crops = np.stack([c[y0:y1, x0:x1] for c in context.candidates])  # (K, h, w, 3)
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0  # (K, h, w, 3) -> (K, 3, h, w)


class BIQAInstanceScorer(InstanceScorer):
    """A blind quality model on each candidate's bounding-box crop of the instance; higher is better.

    Args:
        quality (callable): ``quality(crops)`` with crops (K, 3, h, w) float in [0, 1] -> (K,) scores
            (:func:`load_biqa_quality` builds one from the calibrated BIQA network).
        min_crop (int): Bounding boxes grow to at least this size. Default: 64.
    """

    name = 'biqa'

    def __init__(self, quality, min_crop=64):
        self.quality = quality
        self.min_crop = int(min_crop)

    def score_instance(self, context, instance_id):
        import torch
        crops = _stack_crops(context, instance_id, self.min_crop)
        with torch.no_grad():
            scores = torch.as_tensor(self.quality(crops)).detach().float().reshape(-1).cpu().numpy()
        if scores.shape[0] != len(context.candidates):
            raise ScorerItemError(f'Sample {context.sid!r}, instance {instance_id}: the quality model returned '
                                  f'{scores.shape[0]} scores for {len(context.candidates)} crops.')
        win, lose = pick_pair(scores)
        return {'win': win, 'lose': lose, 'scores': [{'biqa': _json_float(s)} for s in scores],
                'candidate_scores': [_json_float(s) for s in scores]}


def load_biqa_quality(network_opt, checkpoint=None, device='cpu', param_key='params', strict=True):
    """Build a quality callable from a BasicSR network option and a checkpoint.

    Args:
        network_opt (dict | str | None): A ``network_g``-style dict (``type: RankCalibratedIQAArch, ...``),
            or the path of a YAML file holding one (at the top level or under ``network_g``), read with
            the one option reader (:func:`dspo_basicsr.utils.options.read_option_file`). None: a
            ``RankCalibratedIQAArch`` whose options are in the JSON written beside its checkpoint.
        checkpoint (str, optional): For ``RankCalibratedIQAArch``, the ``net_g_<iter>.pth`` of
            ``RankCalibrationModel`` (rectifier weights; the frozen backbone comes from its
            ``backbone.load_path``), loaded by ``load_rank_calibrated_iqa``. For any other arch, a state dict
            saved by BasicSR (``{'params': ...}``) or a plain one, read by
            :func:`dspo_basicsr.utils.checkpoint.read_checkpoint` (weights only). None keeps
            the weights the network builds with.
        device (str): Torch device.
        param_key (str): Key of the state dict inside a BasicSR checkpoint. Default: ``'params'``.
        strict (bool): ``load_state_dict`` strictness.

    Returns:
        callable: ``quality(crops (K, 3, h, w) in [0, 1]) -> (K,)`` tensor. The network's output may be
        a tensor of K scores (or (K, 1)), a tuple whose first item is that, or a dict with ``'score'``.
    """
    import copy

    import torch

    from dspo_basicsr.utils.checkpoint import read_checkpoint
    from dspo_basicsr.utils.options import read_option_file

    from basicsr.archs import build_network

    if isinstance(network_opt, (str, os.PathLike)):
        loaded = read_option_file(str(network_opt), require=())
        network_opt = loaded.get('network_g', loaded)
    if network_opt is None and checkpoint is not None:
        network_opt = {'type': 'RankCalibratedIQAArch'}  # options from the JSON beside the checkpoint
    if not isinstance(network_opt, dict) or 'type' not in network_opt:
        raise ValueError(f'The BIQA network option must be a dict with a type, got {network_opt!r}.')
    if network_opt['type'] == 'RankCalibratedIQAArch' and checkpoint is not None:
        # RankCalibrationModel saves only the rectifier; its loader rebuilds the frozen backbone
        from dspo_basicsr.archs.rank_calibrated_iqa_arch import load_rank_calibrated_iqa
        net = load_rank_calibrated_iqa(checkpoint, {k: v for k, v in network_opt.items() if k != 'type'} or None)
        checkpoint = None
    else:
        net = build_network(copy.deepcopy(dict(network_opt)))
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'BIQA checkpoint not found: {checkpoint}; train it with the rank-calibration '
                                    'option or point --biqa-checkpoint at the saved net_g_*.pth.')
        state = read_checkpoint(checkpoint, what='BIQA checkpoint', unwrap=(param_key,))
        net.load_state_dict(state, strict=strict)
    net = net.to(device).eval()

    def quality(crops):
        with torch.no_grad():
            out = net(crops.to(device))
        if isinstance(out, dict):
            out = out['score']
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(crops.shape[0], -1)[:, 0]

    quality.network = net
    return quality


class VLMInstanceScorer(InstanceScorer):
    """A vision-language model picks the best and worst candidate crop of each instance.

    Args:
        client (VLMClient): :class:`dspo_basicsr.preference.vlm_client.VLMClient` (or anything with
            ``compare(lq_crop, candidate_crops, context='') -> {'best', 'worst', ...}``).
        min_crop (int): Bounding boxes grow to at least this size (SR pixels). Default: 64.
    """

    name = 'vlm'

    def __init__(self, client, min_crop=64):
        self.client = client
        self.min_crop = int(min_crop)

    @property
    def max_concurrency(self):
        """Items the scoring step scores at once: the client's ``max_concurrency`` (1 without one)."""
        return int(getattr(self.client, 'max_concurrency', 1))

    def score_instance(self, context, instance_id):
        from dspo_basicsr.preference.vlm_client import VLMError

        y0, y1, x0, x1 = instance_box(context.seg == instance_id, self.min_crop)
        scale = context.scale
        ly0, ly1 = int(y0 / scale), max(int(np.ceil(y1 / scale)), int(y0 / scale) + 1)
        lx0, lx1 = int(x0 / scale), max(int(np.ceil(x1 / scale)), int(x0 / scale) + 1)
        lq_crop = context.lq[ly0:ly1, lx0:lx1]
        crops = [c[y0:y1, x0:x1] for c in context.candidates]
        try:
            reply = self.client.compare(lq_crop, crops, context=context.prompt)
        except VLMError as err:
            raise ScorerItemError(f'Sample {context.sid!r}, instance {instance_id}: {err}') from err
        result = {'win': int(reply['best']), 'lose': int(reply['worst']),
                  'scores': {'vlm_reason': reply.get('reason', '')}}
        ratings = reply.get('scores')  # a client that also rates every crop
        if isinstance(ratings, (list, tuple)) and len(ratings) == len(crops):
            result['candidate_scores'] = [_json_float(v) for v in ratings]
        return result


class HumanInstanceScorer(InstanceScorer):
    """Preferences imported from a human annotation JSON file (format in the module docstring).

    Args:
        annotations (str | dict): Path of the JSON file, or its parsed content.
    """

    name = 'human'
    uses_top_k = False

    def __init__(self, annotations):
        self.path = annotations if isinstance(annotations, (str, os.PathLike)) else '<annotations>'
        if isinstance(annotations, (str, os.PathLike)):
            try:
                with open(annotations, encoding='utf-8') as handle:
                    annotations = json.load(handle)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f'Cannot read the human annotation file {self.path}: {err}') from err
        if not isinstance(annotations, dict) or annotations.get('format') != 'dspo-human-annotation' \
                or not isinstance(annotations.get('samples'), dict):
            raise ValueError(f'{self.path} is not a human annotation file: it needs "format": '
                             '"dspo-human-annotation" and a "samples" object (see dspo_basicsr.preference.'
                             'instance_scoring).')
        self.samples = annotations['samples']

    def _sample(self, context):
        if context.sid not in self.samples:
            raise ScorerItemError(f'Sample {context.sid!r} has no annotation in {self.path}.')
        return self.samples[context.sid]

    def annotated_instances(self, context):
        """Instance ids annotated for this sample, validated against the label map."""
        entry = self._sample(context)
        present = set(np.unique(context.seg).tolist())
        ids = []
        for key in entry.get('instances', {}):
            try:
                instance_id = int(key)
            except ValueError as err:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance key {key!r} is not an '
                                      'integer id.') from err
            if instance_id not in present:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id} is not in its '
                                      f'label map (ids 0..{max(present)}).')
            ids.append(instance_id)
        return ids

    def score_instance(self, context, instance_id):
        record = self._sample(context).get('instances', {}).get(str(instance_id))
        if record is None:
            return {'win': -1, 'lose': -1}
        n = len(context.candidates)
        for key in ('win', 'lose'):
            value = record.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}, key {key!r} = '
                                      f'{value!r} is not a candidate index 0..{n - 1}.')
        if record['win'] == record['lose']:
            raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}: win and lose are '
                                  f'the same candidate ({record["win"]}).')
        result = {'win': record['win'], 'lose': record['lose']}
        scores = record.get('scores')
        if scores is not None:
            if not isinstance(scores, list) or len(scores) != n or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
                raise ScorerItemError(f'{self.path}: sample {context.sid!r}, instance {instance_id}: scores must list '
                                      f'one number per candidate ({n}), higher is better; got {scores!r:.100}.')
            result['candidate_scores'] = [_json_float(v) for v in scores]
        negative = record.get('negative')
        if negative:
            negative = [negative] if isinstance(negative, str) else [str(t) for t in negative]
            result['feedback'] = {'negative': negative, 'source': 'human'}
        return result

    def sample_extras(self, context):
        text = self._sample(context).get('negative_prompt')
        return {'negative_prompt': str(text)} if text else {}


def build_instance_scorer(opt, vlm_client=None, quality=None):
    """Build a scorer from ``{type: metric|biqa|vlm|human, ...}`` (``metric`` takes ``preset``).

    ``biqa`` takes ``network`` (dict or YAML path) and ``checkpoint`` unless ``quality`` is given; ``vlm``
    takes the client options (:class:`.vlm_client.VLMClient`) unless ``vlm_client`` is given; ``human``
    takes ``annotations`` (path).
    """
    opt = dict(opt)
    kind = opt.pop('type', 'metric')
    if kind == 'metric':
        return MetricInstanceScorer(**opt)
    if kind == 'biqa':
        min_crop = opt.pop('min_crop', 64)
        if quality is None:
            quality = load_biqa_quality(opt.pop('network', None), opt.pop('checkpoint', None), **opt)
        return BIQAInstanceScorer(quality, min_crop=min_crop)
    if kind == 'vlm':
        min_crop = opt.pop('min_crop', 64)
        if vlm_client is None:
            from dspo_basicsr.preference.vlm_client import VLMClient
            vlm_client = VLMClient(**opt)
        return VLMInstanceScorer(vlm_client, min_crop=min_crop)
    if kind == 'human':
        return HumanInstanceScorer(opt['annotations'])
    raise ValueError(f"Unknown instance scorer {kind!r}; use 'metric', 'biqa', 'vlm' or 'human'.")


def score_sample_instances(scorer, context, top_k=5):
    """The instance table of one sample: every instance id with its area and pair.

    Args:
        scorer (InstanceScorer): The scorer.
        context (InstanceContext): The sample.
        top_k (int): Only the ``top_k`` largest instances get a pair (unless the scorer chooses its own,
            as the human scorer does).

    Returns:
        tuple[list[dict], list[str]]: Instances ``{id, area, win, lose, scores?, feedback?}`` for ids
        0..M-1, and per-instance error messages (those instances keep ``win = lose = -1``).
    """
    areas = instance_areas(context.seg)
    if getattr(scorer, 'uses_top_k', True):
        chosen = largest_instances(context.seg, top_k)
    else:
        chosen = scorer.annotated_instances(context)
    instances = [{'id': i, 'area': int(areas[i]), 'win': -1, 'lose': -1} for i in range(len(areas))]
    errors = []
    for instance_id in chosen:
        try:
            result = scorer.score_instance(context, instance_id)
        except ScorerItemError as err:
            errors.append(str(err))
            continue
        instances[instance_id].update(result)
    return instances, errors
