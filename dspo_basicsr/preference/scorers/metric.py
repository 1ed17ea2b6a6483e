"""The metric scorer: BasicSR metrics inside each instance (the DSPO paper's fidelity / perception scoring)."""
import numpy as np

from dspo_basicsr.preference.candidates import DEFAULT_METRICS, metric_call_options, metric_is_full_reference
from dspo_basicsr.preference.scorers.base import InstanceScorer, ScorerItemError, instance_box, json_float, pick_pair

__all__ = ['METRIC_PRESETS', 'MetricInstanceScorer']


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
    """Metrics inside each instance, through ``dspo_basicsr.metrics.calculate.calculate_metric``.

    Full-reference metrics compare the instance against the GT: on the instance's bounding box, pixels
    outside the mask are replaced by the GT in the candidate, so only the instance differs (for PSNR this
    ranks exactly as the MSE inside the mask). No-reference metrics score the bounding-box crop. Each
    metric is normalised across candidates (direction aware) and the mean decides.

    Args:
        metrics (dict): ``{name: BasicSR metric option}`` (``better``/``full_reference`` as in
            :mod:`dspo_basicsr.preference.candidates`). Default: PSNR and SSIM against the GT, NIQE when there is none.
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
        from dspo_basicsr.metrics.calculate import calculate_metric
        from dspo_basicsr.preference.candidates import normalise_scores

        mask = context.seg == instance_id
        y0, y1, x0, x1 = instance_box(mask, self.min_crop)
        inside = mask[y0:y1, x0:x1, None]
        gt_crop = None if context.gt is None else context.gt[y0:y1, x0:x1]
        scores, used = {}, {}
        for name, opt in self.metrics.items():
            full_reference = metric_is_full_reference(opt)
            if full_reference and gt_crop is None:
                continue
            call_opt = metric_call_options(opt)
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
        per_candidate = [{name: json_float(values[i]) for name, values in scores.items()}
                         for i in range(len(context.candidates))]
        return {'win': win, 'lose': lose, 'scores': per_candidate, 'candidate_scores': [json_float(v) for v in mean]}

    def describe(self):
        return {'type': self.name, 'preset': self.preset, 'metrics': self.metrics, 'min_crop': self.min_crop}
