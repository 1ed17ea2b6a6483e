"""Candidate SR outputs for preference data (DSPO paper, section 5.1 "Dataset Preparation").

For each LQ image a diffusion SR framework samples under a grid of settings (steps, guidance_scale, seed, ...), the
framework's default setting being always one of them. Every output is scored with IQA metrics through
BasicSR's metric registry (``dspo_basicsr.metrics.calculate.calculate_metric``), each metric is normalised
across the candidates of that image (direction aware: for NIQE lower is better), and the top N by mean normalised
score are kept; if the default output is not among them it replaces the lowest kept one.

The framework is anything with ``sample(lq, prompt, negative_prompt=None, steps=..., guidance_scale=...,
generator=None) -> (B, 3, H, W)`` in [0, 1] (``ControlSD2Arch`` and the other framework archs).
"""
import copy
import itertools
import math

import numpy as np
import torch

from dspo_basicsr.metrics.metric_table import metric_info

__all__ = [
    'DEFAULT_METRICS', 'METRIC_DIRECTIONS', 'FULL_REFERENCE_METRICS', 'expand_settings_grid', 'sample_candidates',
    'generate_candidates', 'score_candidates', 'normalise_scores', 'select_candidates', 'metric_is_higher_better',
    'image_to_tensor', 'tensor_to_image', 'seed_groups', 'metric_call_options'
]

# The defaults: PSNR and SSIM against GT when present, NIQE, CLIP-IQA (pyiqa adapter).
DEFAULT_METRICS = {
    'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
    'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': True},
    'niqe': {'type': 'calculate_niqe', 'crop_border': 0},
    'clipiqa': {'type': 'calculate_clipiqa'},
}
# Direction of each metric by its registered type or its pyiqa name; a metric option may set
# ``better: higher|lower`` to override. Unknown metrics default to higher-is-better.
METRIC_DIRECTIONS = {
    'calculate_psnr': 'higher', 'calculate_ssim': 'higher', 'calculate_psnr_pt': 'higher',
    'calculate_ssim_pt': 'higher', 'calculate_niqe': 'lower', 'niqe': 'lower', 'lpips': 'lower', 'dists': 'lower',
    'brisque': 'lower', 'pi': 'lower', 'nrqm': 'higher', 'musiq': 'higher', 'maniqa': 'higher', 'clipiqa': 'higher',
    'liqe': 'higher', 'topiq_nr': 'higher', 'psnr': 'higher', 'ssim': 'higher', 'calculate_lpips': 'lower',
    'calculate_dists': 'lower', 'calculate_brisque': 'lower',
}
# Metrics that need the GT (``img2``); a metric option may set ``full_reference: true|false`` to override.
FULL_REFERENCE_METRICS = {
    'calculate_psnr', 'calculate_ssim', 'calculate_psnr_pt', 'calculate_ssim_pt', 'calculate_lpips',
    'calculate_dists', 'psnr', 'ssim', 'lpips', 'dists', 'ms_ssim', 'fsim', 'vif', 'pieapp', 'ahiq', 'ckdn'
}
# Keys of a metric option that are ours (direction, GT use), not arguments of the metric.
_OUR_KEYS = ('better', 'full_reference')


def metric_call_options(opt):
    """The arguments of BasicSR's ``calculate_metric`` from a metric option: our keys (``better``,
    ``full_reference``) left out, ``crop_border`` 0 where BasicSR's own metrics require it."""
    call_opt = {k: copy.deepcopy(v) for k, v in opt.items() if k not in _OUR_KEYS}
    if call_opt['type'] in ('calculate_psnr', 'calculate_ssim', 'calculate_niqe'):
        call_opt.setdefault('crop_border', 0)  # a required argument of BasicSR's own metrics
    return call_opt


def _metric_key(opt):
    """Names by which a metric's facts are looked up: its pyiqa name (``metric``/``metric_name``) and type."""
    keys = [str(opt.get(k)).lower() for k in ('metric', 'metric_name', 'name') if opt.get(k)]
    return keys + [str(opt.get('type', '')).lower()]


def _table_row(opt):
    """The row of ``dspo_basicsr.metrics.metric_table`` for this metric type, or None."""
    try:
        return metric_info(str(opt.get('type')))
    except KeyError:
        return None


def metric_is_higher_better(opt):
    """Whether a larger value of the metric in ``opt`` means better quality.

    Order: the option's own ``better`` key, the project's metric table, :data:`METRIC_DIRECTIONS`
    (by pyiqa name, then type); unknown metrics count as higher-is-better.
    """
    if 'better' in opt:
        if opt['better'] not in ('higher', 'lower'):
            raise ValueError(f"Metric option 'better' must be 'higher' or 'lower', got {opt['better']!r}.")
        return opt['better'] == 'higher'
    row = _table_row(opt)
    if row is not None:
        return not row.lower_better
    for key in _metric_key(opt):
        if key in METRIC_DIRECTIONS:
            return METRIC_DIRECTIONS[key] == 'higher'
    return True


def metric_is_full_reference(opt):
    """Whether the metric in ``opt`` compares against the GT (option ``full_reference``, table, known names)."""
    if 'full_reference' in opt:
        return bool(opt['full_reference'])
    row = _table_row(opt)
    if row is not None:
        return row.reference == 'FR'
    return any(key in FULL_REFERENCE_METRICS for key in _metric_key(opt))


def expand_settings_grid(grid, default):
    """All sampling settings of a grid, with the framework's default setting kept as index 0.

    Args:
        grid (dict | list[dict]): Either ``{key: [values, ...]}`` (Cartesian product; a scalar is one
            value) or an explicit list of setting dicts. Each setting is completed from ``default``.
        default (dict): The framework's default sampling setting, e.g. ``{steps: 50, guidance_scale: 5.5, seed: 0}``.

    Returns:
        list[dict]: Distinct settings; ``[0]`` is ``default``.
    """
    default = dict(default or {})
    if isinstance(grid, dict):
        keys = list(grid)
        values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
        raw = [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    elif isinstance(grid, (list, tuple)):
        raw = [dict(s) for s in grid]
    elif grid is None:
        raw = []
    else:
        raise ValueError(f'The settings grid must be a dict of lists or a list of dicts, got {type(grid).__name__}.')
    settings = [default]
    for setting in raw:
        full = {**default, **setting}
        if full not in settings:
            settings.append(full)
    return settings


def image_to_tensor(image):
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def tensor_to_image(tensor):
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB (rounded, clipped)."""
    array = tensor.detach().float().clamp(0, 1).mul(255).round().byte().cpu().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(array)


def seed_groups(settings, batch_size=8):
    """Group the settings that differ only in ``seed`` into batches of at most ``batch_size``.

    Returns:
        list[list[int]]: Indices into ``settings``; every index once, the groups in order of first use.
    """
    import json

    groups = {}
    for index, setting in enumerate(settings):
        key = json.dumps({k: v for k, v in setting.items() if k != 'seed'}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(index)
    size = max(1, int(batch_size))
    return [members[i:i + size] for members in groups.values() for i in range(0, len(members), size)]


def _generator(seed, device):
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def sample_candidates(framework, lq, settings, prompt='', negative_prompt=None, device=None, batch_size=8):
    """Sample one SR output of one LQ image per setting.

    A setting's ``seed`` becomes a ``torch.Generator`` seeded with it; every other key is passed to
    ``framework.sample`` (``steps``, ``guidance_scale``, ``negative_prompt``, ...). When the framework takes one
    generator per image (``accepts_generator_list``, as the diffusion framework archs do), settings that differ only in
    seed are sampled as one batch, each image drawing its noise from its own generator, so each output equals
    its one-by-one sample.

    Args:
        framework: Object with ``sample(lq, prompt, negative_prompt=None, ..., generator=None)``.
        lq (np.ndarray): (h, w, 3) uint8 RGB low-quality image.
        settings (list[dict]): Sampling settings (see :func:`expand_settings_grid`).
        prompt (str): Text prompt for this image.
        negative_prompt (str, optional): Negative prompt unless a setting gives its own.
        device (str | torch.device, optional): Device of the LQ tensor and generator; default the
            framework's parameters' device (CPU when it has none).
        batch_size (int): Most settings sampled in one batch. Default: 8; 1 samples one by one.

    Returns:
        list[np.ndarray]: (H, W, 3) uint8 RGB outputs, one per setting.
    """
    if device is None:
        params = getattr(framework, 'parameters', None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else torch.device('cpu')
    lq_tensor = image_to_tensor(lq).to(device)
    batched = getattr(framework, 'accepts_generator_list', False)
    outputs = [None] * len(settings)
    for group in seed_groups(settings, batch_size if batched else 1):
        kwargs = dict(settings[group[0]])
        seeds = [settings[i].get('seed') for i in group]
        kwargs.pop('seed', None)
        generators = [_generator(seed, device) for seed in seeds]
        negative = kwargs.pop('negative_prompt', negative_prompt)
        n = len(group)
        with torch.no_grad():
            sr = framework.sample(lq_tensor.expand(n, -1, -1, -1), [prompt] * n,
                                  negative_prompt=None if negative is None else [negative] * n,
                                  generator=generators if n > 1 else generators[0], **kwargs)
        if sr.ndim != 4 or sr.shape[0] != n or sr.shape[1] != 3:
            raise ValueError(f'framework.sample returned shape {tuple(sr.shape)} for setting {settings[group[0]]}; '
                             f'expected ({n}, 3, H, W).')
        for row, index in enumerate(group):
            outputs[index] = tensor_to_image(sr[row])
    return outputs


def _bgr(image):
    return np.ascontiguousarray(image[..., ::-1])


def score_candidates(candidates, gt=None, metrics=None):
    """Score each candidate with IQA metrics through ``dspo_basicsr.metrics.calculate.calculate_metric``.

    Full-reference metrics are computed against ``gt`` and skipped when there is none. Images are
    passed to the metric functions as BasicSR passes them in validation: HWC BGR uint8 (``img``, ``img2``).

    Args:
        candidates (list[np.ndarray]): (H, W, 3) uint8 RGB images.
        gt (np.ndarray, optional): (H, W, 3) uint8 RGB ground truth.
        metrics (dict): ``{name: BasicSR metric option}``; keys ``better`` (higher|lower) and
            ``full_reference`` (bool) are ours and removed before the call. Default :data:`DEFAULT_METRICS`.

    Returns:
        dict[str, list[float]]: Per metric, one value per candidate (only metrics that apply).
    """
    from dspo_basicsr.metrics.calculate import calculate_metric

    from basicsr.utils.registry import METRIC_REGISTRY

    metrics = DEFAULT_METRICS if metrics is None else metrics
    gt_bgr = None if gt is None else _bgr(gt)
    scores = {}
    for name, opt in metrics.items():
        opt = dict(opt)
        if 'type' not in opt:
            raise ValueError(f"Metric {name!r} has no 'type'; give a registered BasicSR metric name.")
        full_reference = metric_is_full_reference(opt)
        if full_reference and gt is None:
            continue
        call_opt = metric_call_options(opt)
        if call_opt['type'] not in METRIC_REGISTRY:
            raise KeyError(f"Metric {name!r}: type {call_opt['type']!r} is not registered in BasicSR's METRIC_REGISTRY "
                           f'(registered: {sorted(METRIC_REGISTRY._obj_map)}); import dspo_basicsr first or fix '
                           'the metric options.')
        values = []
        for index, image in enumerate(candidates):
            data = {'img': _bgr(image)}
            if full_reference:
                data['img2'] = gt_bgr
            try:
                value = calculate_metric(data, call_opt)
            except Exception as err:  # noqa: BLE001  (reported with the metric and candidate)
                raise RuntimeError(f'Metric {name!r} failed on candidate {index}: {err}') from err
            values.append(float(value))
        scores[name] = values
    return scores


def normalise_scores(scores, metrics=None, num_candidates=None):
    """Normalise each metric across the candidates of one image to [0, 1], 1 = best.

    Args:
        scores (dict[str, list[float]]): Per metric, one value per candidate.
        metrics (dict, optional): Metric options (for the direction); default :data:`DEFAULT_METRICS`.
        num_candidates (int, optional): Number of candidates, for the mean when ``scores`` is empty
            (no metric applies): every candidate then scores 0.

    Returns:
        tuple[dict[str, list[float]], list[float]]: Normalised scores per metric and their mean per
        candidate. A metric equal for all candidates gives 0.5 each; NaN gives 0; +inf/-inf rank
        beyond the finite values (an exact match's PSNR is +inf).
    """
    metrics = DEFAULT_METRICS if metrics is None else metrics
    normalised = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=np.float64).copy()
        higher = metric_is_higher_better(metrics.get(name, {'type': name}))
        # +/-inf keep their order (PSNR of an exact match is +inf): just beyond the finite values
        finite = np.isfinite(values)
        lo, hi = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
        margin = max(hi - lo, 1.0)
        values[np.isposinf(values)] = hi + margin
        values[np.isneginf(values)] = lo - margin
        valid = ~np.isnan(values)
        out = np.zeros_like(values)
        if valid.any():
            lo, hi = values[valid].min(), values[valid].max()
            if hi - lo <= 1e-12 * max(1.0, abs(hi)):
                out[valid] = 0.5
            else:
                out[valid] = (values[valid] - lo) / (hi - lo)
                if not higher:
                    out[valid] = 1.0 - out[valid]
        normalised[name] = out.tolist()
    count = len(next(iter(scores.values()))) if scores else (num_candidates or 0)
    mean = np.mean([normalised[n] for n in normalised], axis=0).tolist() if normalised else [0.0] * count
    return normalised, mean


def select_candidates(mean_scores, num_keep, default_index=0):
    """Indices of the top ``num_keep`` candidates by mean normalised score, the default always kept.

    Args:
        mean_scores (list[float]): Mean normalised score per candidate.
        num_keep (int): N, the number of candidates kept.
        default_index (int): Index of the default setting's output.

    Returns:
        list[int]: Kept indices, best first; the default replaces the lowest if it was not in the top N.
    """
    if num_keep < 1:
        raise ValueError(f'num_keep must be at least 1, got {num_keep}.')
    order = sorted(range(len(mean_scores)), key=lambda i: (-mean_scores[i], i))
    kept = order[:num_keep]
    if default_index not in kept:
        kept[-1] = default_index
    return kept


def generate_candidates(framework, lq, settings, num_keep=4, gt=None, prompt='', negative_prompt=None, metrics=None,
                        device=None, batch_size=8):
    """Sample, score and select the candidates of one LQ image.

    Args:
        framework: Diffusion SR framework with ``sample(...)`` (see module docstring).
        lq (np.ndarray): (h, w, 3) uint8 RGB.
        settings (list[dict]): Settings, ``settings[0]`` the framework default (:func:`expand_settings_grid`).
        num_keep (int): N candidates kept. Default: 4.
        gt (np.ndarray, optional): (H, W, 3) uint8 RGB ground truth for full-reference metrics.
        prompt (str): Prompt. negative_prompt (str, optional): Negative prompt.
        metrics (dict, optional): Metric options (default :data:`DEFAULT_METRICS`).
        device, batch_size: See :func:`sample_candidates`.

    Returns:
        dict: ``images`` (kept outputs, best first), ``settings`` (their settings), ``scores`` and
        ``normalised`` (per kept candidate: ``{metric: value}``), ``mean_score``, ``grid_index`` (index
        of each kept one in ``settings``), ``default_candidate`` (position of the default among kept),
        and ``all_scores`` (every grid output's raw scores, per metric).
    """
    outputs = sample_candidates(framework, lq, settings, prompt=prompt, negative_prompt=negative_prompt, device=device,
                                batch_size=batch_size)
    shapes = {o.shape for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f'Candidates of one image differ in size: {sorted(shapes)}.')
    if gt is not None and gt.shape != outputs[0].shape:
        raise ValueError(f'GT size {gt.shape} differs from the SR output size {outputs[0].shape}; '
                         'check the framework scale and the GT/LQ pairing.')
    metrics = DEFAULT_METRICS if metrics is None else metrics
    scores = score_candidates(outputs, gt=gt, metrics=metrics)
    normalised, mean = normalise_scores(scores, metrics, num_candidates=len(outputs))
    kept = select_candidates(mean, num_keep, default_index=0) if len(outputs) > num_keep else \
        sorted(range(len(outputs)), key=lambda i: (-mean[i], i))

    def per_candidate(table, i):
        return {name: _finite_or_none(values[i]) for name, values in table.items()}

    return {
        'images': [outputs[i] for i in kept],
        'settings': [settings[i] for i in kept],
        'scores': [per_candidate(scores, i) for i in kept],
        'normalised': [per_candidate(normalised, i) for i in kept],
        'mean_score': [mean[i] for i in kept],
        'grid_index': kept,
        'default_candidate': kept.index(0),
        'all_scores': {name: [_finite_or_none(v) for v in values] for name, values in scores.items()},
    }


def _finite_or_none(value):
    """JSON has no NaN: a non-finite score is recorded as null."""
    value = float(value)
    return value if math.isfinite(value) else None
