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
* ``human``: an annotation JSON file (format in :mod:`.scorers.human`).

The scorers live in :mod:`dspo_basicsr.preference.scorers`, one module each, beside what they share
(:mod:`.scorers.base`); this module builds one from options, scores the instances of a sample, and re-exports
their names.
"""
from dspo_basicsr.preference.scorers.base import (
    InstanceContext,
    InstanceScorer,
    ScorerItemError,
    instance_areas,
    instance_box,
    largest_instances,
    pick_pair,
)
from dspo_basicsr.preference.scorers.biqa import BIQAInstanceScorer, load_biqa_quality
from dspo_basicsr.preference.scorers.human import HumanInstanceScorer
from dspo_basicsr.preference.scorers.metric import METRIC_PRESETS, MetricInstanceScorer
from dspo_basicsr.preference.scorers.vlm import VLMInstanceScorer

__all__ = [
    'InstanceContext', 'ScorerItemError', 'InstanceScorer', 'MetricInstanceScorer', 'BIQAInstanceScorer',
    'VLMInstanceScorer', 'HumanInstanceScorer', 'METRIC_PRESETS', 'load_biqa_quality', 'build_instance_scorer',
    'instance_areas', 'largest_instances', 'instance_box', 'pick_pair', 'score_sample_instances'
]


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
