"""Preference objectives for diffusion SR: DSPO, Diffusion-DPO, SFT and Diffusion-DRO, as pure tensor functions.

References:
    * DSPO: Cai et al., "DSPO: Direct Semantic Preference Optimization for Real-World Image
      Super-Resolution", arXiv:2504.15176, 2025. Instance-level Diffusion-DPO: one DPO term per SAM
      instance, weighted by instance area. The paper's Eqs. (3)-(8) run from the DPO and Diffusion-DPO
      objectives it starts from to the instance weights ``w_m`` and the instance-level objective; the
      contract as implemented here, symbol by symbol, is ``docs/objectives.md``.
    * Diffusion-DPO: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
      CVPR 2024, Eq. 14. We use the diffusers convention (no 0.5 factor in front of beta): the authors' code
      (SalesforceAIResearch/DiffusionDPO ``train.py``, ``scale_term = -0.5 * args.beta_dpo``) halves its
      ``beta_dpo``, so their ``beta_dpo`` is twice our ``beta`` (their 5000 is our 2500).
    * Diffusion-DRO: Wu et al., "Ranking-based Preference Optimization for Diffusion Models from Implicit
      User Feedback", arXiv:2510.18353, 2025: a hinge ranking of denoising errors (expert vs negative).

Every function takes denoising errors already computed by the model:
``err = mean over latent channels of (target - prediction)^2`` per latent pixel, for the policy
(``err_theta``) and the frozen reference (``err_ref``), with one timestep and one noise per LQ image
shared by all its candidates and by both networks (the contract in ``docs/objectives.md``).

The registered ``nn.Module`` wrappers add ``loss_weight`` and the hyper-parameters, say which candidates
the model runs through the networks (``columns``) and return a :class:`PreferenceResult`: the loss
together with the logits, validity mask, weights and picked errors it was computed from, which the model
logs as they are.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY

#: KL-regularisation strength of DSPO and Diffusion-DPO: the DSPO paper's 8000 (it absorbs T).
DEFAULT_BETA = 8000.0

#: how an instance's per-pixel errors become its error (``docs/objectives.md``, "Conventions the paper leaves open"):
#: ``mean`` inside the mask (ours, the default) or ``sum``, the masked squared norm of the paper's Eqs. (6)-(7)
INSTANCE_ERRORS = ('mean', 'sum')
#: over which instances the area weights are normalised: ``paired`` (ours, the default) or ``all`` M (Eq. (3))
AREA_WEIGHTS = ('paired', 'all')


def instance_coverage(labels, num_instances, factor):
    """Area fraction of every latent pixel's footprint that lies inside each instance.

    Args:
        labels (Tensor): (B, H, W) long label map at SR resolution, values in [0, num_instances);
            any other value (e.g. -1 for padding) is ignored.
        num_instances (int): M, the number of instance channels to return.
        factor (int): Latent downsampling factor f (8 for SD's VAE); H and W must be multiples of f.

    Returns:
        Tensor: (B, M, H/f, W/f) float coverage c_m(p). Where every pixel is labelled, the M channels
        sum to exactly 1 at every latent pixel (a partition).
    """
    b, h, w = labels.shape
    if h % factor or w % factor:
        raise ValueError(f'label map size {h}x{w} is not a multiple of the latent factor {factor}.')
    lh, lw = h // factor, w // factor
    rows = torch.arange(h, device=labels.device) // factor
    cols = torch.arange(w, device=labels.device) // factor
    latent_index = (rows[:, None] * lw + cols[None, :]).expand(b, h, w)
    valid = (labels >= 0) & (labels < num_instances)
    # One flat bin per (instance, latent pixel): bin = m * (h/f * w/f) + latent pixel index.
    bins = torch.where(valid, labels * (lh * lw) + latent_index, torch.zeros_like(labels))
    counts = torch.zeros(b, num_instances * lh * lw, device=labels.device, dtype=torch.float32)
    counts.scatter_add_(1, bins.reshape(b, -1), valid.reshape(b, -1).float())
    return counts.view(b, num_instances, lh, lw) / float(factor * factor)


def instance_error(err, coverage, reduction='mean'):
    """Coverage-weighted mean (or sum) of per-pixel errors inside each instance.

    Args:
        err (Tensor): (B, K, h, w) per-pixel errors of K candidates.
        coverage (Tensor): (B, M, h, w) instance coverage from :func:`instance_coverage`.
        reduction (str): ``mean`` (default) or ``sum`` (the masked squared norm of the DSPO paper's
            Eqs. (6)-(7), in latent pixels; :data:`INSTANCE_ERRORS`).

    Returns:
        Tensor: (B, K, M) ``e[k, m] = sum_p c_m(p) err[k](p) / sum_p c_m(p)`` (0 for an empty instance), or
        without the division for ``sum``.
    """
    if reduction not in INSTANCE_ERRORS:
        raise ValueError(f"instance error reduction '{reduction}' is unknown; choose one of {INSTANCE_ERRORS}.")
    weighted = torch.einsum('bkhw,bmhw->bkm', err, coverage.to(err.dtype))
    if reduction == 'sum':
        return weighted
    return weighted / coverage.sum(dim=(2, 3)).clamp_min(1e-12).unsqueeze(1).to(err.dtype)


def pick_candidates(values, index):
    """The value of each instance's chosen candidate(s).

    Args:
        values (Tensor): (B, K, M) per-candidate, per-instance values (e.g. :func:`instance_error`).
        index (Tensor): (B, M) or (B, M, P) long candidate ids >= 0.

    Returns:
        Tensor: shaped like ``index``, ``values[b, index[b, m, p], m]``.
    """
    by_instance = values.transpose(1, 2)  # (B, K, M) -> (B, M, K)
    if index.dim() == 2:
        return by_instance.gather(2, index.unsqueeze(2)).squeeze(2)
    return by_instance.gather(2, index)


def dspo_pair_logits(err_theta, err_ref, coverage, win, lose, beta=DEFAULT_BETA, instance_reduction='mean'):
    """DSPO logits of every (instance, pair) entry of a padded pair table.

    Args:
        err_theta (Tensor): (B, K, h, w) policy per-pixel errors.
        err_ref (Tensor): (B, K, h, w) reference per-pixel errors (no gradient needed).
        coverage (Tensor): (B, M, h, w) instance coverage.
        win (Tensor): (B, M) or (B, M, P) long preferred candidates, -1 where there is no pair.
        lose (Tensor): dispreferred candidates, shaped like ``win``, -1 where there is no pair.
        beta (float): KL-regularisation strength (:data:`DEFAULT_BETA`, the paper's 8000, which absorbs T).
        instance_reduction (str): ``mean`` or ``sum`` of the errors inside an instance (:func:`instance_error`).

    Returns:
        Tensor: logits shaped like ``win`` (meaningless where ``win`` or ``lose`` is -1).
    """
    # Instance reduction is linear, so reduce the policy-minus-reference difference once.
    delta = instance_error(err_theta - err_ref, coverage, instance_reduction)  # (B, K, M)
    return -beta * (pick_candidates(delta, win.clamp_min(0)) - pick_candidates(delta, lose.clamp_min(0)))


def _area_weights(coverage, paired, normalisation='paired'):
    """DSPO's area weights (B, M), zero for unpaired instances (:data:`AREA_WEIGHTS`).

    ``paired``: ``w_m = |s_m| / sum_{paired} |s_m|`` (each row with a pair sums to 1); ``all``: the paper's
    Eq. (3), ``w_m = |s_m| / sum_{all M} |s_m|`` (a row sums to the share of its image's area that is paired).
    """
    if normalisation not in AREA_WEIGHTS:
        raise ValueError(f"area weight normalisation '{normalisation}' is unknown; choose one of {AREA_WEIGHTS}.")
    all_area = coverage.sum(dim=(2, 3))
    area = all_area * paired
    total = area if normalisation == 'paired' else all_area
    return area / total.sum(dim=1, keepdim=True).clamp_min(1e-12)


def dspo_logits(err_theta, err_ref, coverage, win, lose, beta=DEFAULT_BETA, instance_reduction='mean',
                area_normalisation='paired'):
    """Per-instance DSPO logits and area weights (one best/worst pair per instance).

    Args:
        err_theta (Tensor): (B, K, h, w) policy per-pixel errors.
        err_ref (Tensor): (B, K, h, w) reference per-pixel errors (no gradient needed).
        coverage (Tensor): (B, M, h, w) instance coverage.
        win (Tensor): (B, M) long, preferred candidate of each instance, -1 when unpaired.
        lose (Tensor): (B, M) long, dispreferred candidate of each instance, -1 when unpaired.
        beta (float): KL-regularisation strength (:data:`DEFAULT_BETA`, the paper's 8000, which absorbs T).
        instance_reduction (str): ``mean`` or ``sum`` (:data:`INSTANCE_ERRORS`).
        area_normalisation (str): ``paired`` or ``all`` (:data:`AREA_WEIGHTS`).

    Returns:
        tuple[Tensor, Tensor, Tensor]: logits (B, M), weights (B, M) (zero for unpaired instances;
        with ``paired`` each row sums to 1 when it has a pair, else 0), paired (B, M) bool.
    """
    logits = dspo_pair_logits(err_theta, err_ref, coverage, win, lose, beta, instance_reduction)
    paired = (win >= 0) & (lose >= 0)
    return logits, _area_weights(coverage, paired, area_normalisation).to(logits.dtype), paired


def dspo_loss(err_theta, err_ref, coverage, win, lose, beta=DEFAULT_BETA, instance_reduction='mean',
              area_normalisation='paired'):
    """DSPO: area-weighted Diffusion-DPO over semantic instances (``docs/objectives.md``).

    ``L = mean_b -sum_m w_m log sigmoid(-beta ((e_theta[w] - e_ref[w]) - (e_theta[l] - e_ref[l])))``
    with ``w_m = |s_m| / sum_{paired} |s_m|`` (the instance-level objective at the end of the DSPO paper's
    Eqs. (3)-(8), in the Diffusion-DPO form; ``docs/objectives.md``). The mean runs over samples
    with at least one paired instance; a sample without any contributes nothing (and a batch without any
    gives 0 with a graph).

    Args:
        err_theta (Tensor): (B, K, h, w) policy per-pixel errors.
        err_ref (Tensor): (B, K, h, w) reference per-pixel errors.
        coverage (Tensor): (B, M, h, w) instance coverage.
        win (Tensor): (B, M) long preferred candidate per instance, -1 when unpaired.
        lose (Tensor): (B, M) long dispreferred candidate per instance, -1 when unpaired.
        beta (float): KL-regularisation strength.
        instance_reduction (str): ``mean`` (default) or ``sum`` (:data:`INSTANCE_ERRORS`).
        area_normalisation (str): ``paired`` (default) or ``all`` (:data:`AREA_WEIGHTS`).

    Returns:
        Tensor: scalar loss.
    """
    return dspo_pair_loss(err_theta, err_ref, coverage, win.unsqueeze(2), lose.unsqueeze(2), beta=beta,
                          instance_reduction=instance_reduction, area_normalisation=area_normalisation)[0]


def dspo_pair_loss(err_theta, err_ref, coverage, win, lose, pair_weights=None, instance_weights=None,
                   beta=DEFAULT_BETA, instance_reduction='mean', area_normalisation='paired'):
    """DSPO over several pairs per instance: a padded pair table, reduced in one batched operation.

    ``L = mean_b -sum_m w_m g_m sum_p (v_mp / sum_q v_mq) log sigmoid(logit_mp)``: DSPO's area weights
    ``w_m`` over the instances with at least one pair, a weighted mean over each instance's pairs
    (``v`` = ``pair_weights``, 1 by default) and an optional per-instance factor ``g_m``
    (``instance_weights``, 1 by default). With one pair per instance (P = 1) and no weights this is
    :func:`dspo_loss` exactly, bit for bit.

    Args:
        err_theta, err_ref, coverage: as :func:`dspo_loss`.
        win (Tensor): (B, M, P) long preferred candidate of each pair, -1 for padding.
        lose (Tensor): (B, M, P) long dispreferred candidate of each pair, -1 for padding.
        pair_weights (Tensor, optional): (B, M, P) non-negative relative weights of the pairs of an instance.
        instance_weights (Tensor, optional): (B, M) non-negative factors of the instances.
        beta (float): KL-regularisation strength.
        instance_reduction (str): ``mean`` (default) or ``sum`` (:data:`INSTANCE_ERRORS`).
        area_normalisation (str): ``paired`` (default) or ``all`` (:data:`AREA_WEIGHTS`).

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: scalar loss; logits (B, M, P); weights (B, M, P), the
        weight of each pair in its sample's term; valid (B, M, P) bool (a real pair).
    """
    logits = dspo_pair_logits(err_theta, err_ref, coverage, win, lose, beta, instance_reduction)
    valid = (win >= 0) & (lose >= 0)
    within = valid.to(logits.dtype) if pair_weights is None else pair_weights.to(logits.dtype) * valid
    within = within / within.sum(dim=2, keepdim=True).clamp_min(1e-12)  # weighted mean over an instance's pairs
    paired = within.sum(dim=2) > 0
    area = _area_weights(coverage, paired, area_normalisation).to(logits.dtype)
    if instance_weights is not None:
        area = area * instance_weights.to(logits.dtype)
    per_instance = (within * F.logsigmoid(logits)).sum(dim=2)  # (B, M); padded pairs weigh 0
    per_sample = -(area * per_instance).sum(dim=1)  # unpaired instances weigh 0
    has_pair = paired.any(dim=1)
    loss = (per_sample * has_pair).sum() / has_pair.sum().clamp_min(1)
    return loss, logits, area.unsqueeze(2) * within, valid


def top_bottom_pairs(scores, top_n):
    """Pair every one of the ``top_n`` best candidates of an instance with every one of its ``top_n`` worst.

    DP2O-SR's multiple preference pairs (Wu et al., "DP2O-SR", NeurIPS 2025; cswry/DP2O-SR README.md,
    "Multiple Preference Pairs Learning"): rank the candidates, keep the top-n and bottom-n, skip the
    uncertain middle. An instance with ``c`` scored candidates gets ``n = min(top_n, c // 2)``, so the two
    sets never overlap; pairs whose scores are equal are dropped (no preference). Ties in the ranking go to
    the smaller candidate index, as :func:`~dspo_basicsr.preference.instance_scoring.pick_pair` breaks them,
    so ``top_n = 1`` gives the stored best/worst pair of a set scored that way.

    Args:
        scores (Tensor): (B, M, K) per-candidate scores of each instance, higher is better; NaN = unscored.
        top_n (int): n, the size of the top and bottom sets.

    Returns:
        tuple[Tensor, Tensor]: win, lose (B, M, P) long with P = min(top_n, K)^2, -1 for padding.
    """
    b, m, k = scores.shape
    scored = torch.isfinite(scores)
    n = (scored.sum(dim=2) // 2).clamp_max(top_n)  # (B, M)
    width = min(int(top_n), k)
    best_first = torch.where(scored, scores, -torch.inf).argsort(dim=2, descending=True, stable=True)[..., :width]
    worst_first = torch.where(scored, scores, torch.inf).argsort(dim=2, stable=True)[..., :width]
    win = best_first.unsqueeze(3).expand(b, m, width, width).reshape(b, m, width * width)
    lose = worst_first.unsqueeze(2).expand(b, m, width, width).reshape(b, m, width * width)
    rank = torch.arange(width, device=scores.device)
    inside = (rank[:, None] < n[..., None, None]) & (rank[None, :] < n[..., None, None])  # (B, M, w, w)
    valid = inside.reshape(b, m, -1) & (scores.gather(2, win) > scores.gather(2, lose))
    return torch.where(valid, win, -1), torch.where(valid, lose, -1)


def hierarchical_weights(scores, win, lose):
    """DP2O-SR's hierarchical pair weights, intra-group by score gap and inter-group by score spread.

    DP2O-SR (cswry/DP2O-SR README.md, "Hierarchical Preference Optimization") weighs a pair more when its
    reward gap is larger (intra-group) and a group more when its candidates are more diverse (inter-group);
    its training code is not released, so the normalisation here is ours. A group is one instance's
    candidates. Intra: ``v_mp = s[win] - s[lose]`` (the loss takes the weighted mean over an instance's
    pairs, so only ratios matter). Inter: ``g_m`` = the standard deviation of the instance's scored
    candidates divided by its mean over the batch's paired instances, so ``g`` averages 1 and the loss
    keeps its scale (all 1 when every spread is 0).

    Args:
        scores (Tensor): (B, M, K) per-candidate scores, higher is better; NaN = unscored.
        win, lose (Tensor): (B, M, P) pair table (:func:`top_bottom_pairs`), -1 for padding.

    Returns:
        tuple[Tensor, Tensor]: pair_weights (B, M, P), instance_weights (B, M).
    """
    scored = torch.isfinite(scores)
    filled = torch.where(scored, scores, 0.0)
    valid = (win >= 0) & (lose >= 0)
    gap = (filled.gather(2, win.clamp_min(0)) - filled.gather(2, lose.clamp_min(0))).clamp_min(0) * valid
    count = scored.sum(dim=2).clamp_min(1)
    mean = filled.sum(dim=2, keepdim=True) / count.unsqueeze(2)
    spread = ((torch.where(scored, filled - mean, 0.0) ** 2).sum(dim=2) / count).sqrt()  # (B, M)
    paired = valid.any(dim=2)
    batch_mean = (spread * paired).sum() / paired.sum().clamp_min(1)
    inter = torch.where(batch_mean > 0, spread / batch_mean.clamp_min(1e-12), torch.ones_like(spread))
    return gap, inter * paired


def diffusion_dpo_logits(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta=DEFAULT_BETA):
    """Image-level Diffusion-DPO logits ``-beta ((e_theta_w - e_ref_w) - (e_theta_l - e_ref_l))``.

    Args:
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor): (B,) mean errors of the policy and
            the reference on the preferred (w) and dispreferred (l) images.
        beta (float): KL-regularisation strength.

    Returns:
        Tensor: (B,) logits.
    """
    return -beta * ((err_theta_w - err_ref_w) - (err_theta_l - err_ref_l))


def diffusion_dpo_loss(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta=DEFAULT_BETA):
    """Diffusion-DPO (Wallace et al. 2024, Eq. 14; restated among the DSPO paper's Eqs. (3)-(8)).

    ``L = mean_b -log sigmoid(logit_b)``, logits from :func:`diffusion_dpo_logits`.

    Args:
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor): (B,) per-sample mean errors.
        beta (float): KL-regularisation strength.

    Returns:
        Tensor: scalar loss.
    """
    return -F.logsigmoid(diffusion_dpo_logits(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta)).mean()


def diffusion_sft_loss(err_theta_w):
    """Supervised fine-tuning on preferred images: the plain diffusion (noise-prediction) loss.

    Args:
        err_theta_w (Tensor): policy errors on the preferred images, any shape ((B,), (B, h, w), ...).

    Returns:
        Tensor: scalar mean error.
    """
    return err_theta_w.mean()


def implicit_accuracy(logits, valid=None):
    """Share of preference logits above 0; ties count 0.5.

    Args:
        logits (Tensor): any shape.
        valid (Tensor, optional): bool mask of the same shape; only those entries count.

    Returns:
        Tensor: scalar in [0, 1] (0.5 when nothing is valid).
    """
    score = (logits > 0).float() + 0.5 * (logits == 0).float()
    if valid is None:
        return score.mean()
    count = valid.sum()
    return torch.where(count > 0, (score * valid).sum() / count.clamp_min(1), score.new_tensor(0.5))


def logit_statistics(logits, valid=None):
    """How far preference logits favour the preferred images: what preference validation reports.

    Args:
        logits (Tensor): preference logits, any shape (positive = the policy prefers the preferred image
            more than the reference does).
        valid (Tensor, optional): bool mask of the logits that belong to a real pair; None: all of them.

    Returns:
        dict[str, Tensor]: detached scalars ``implicit_acc`` (:func:`implicit_accuracy`; 0.5 when nothing is
        valid) and ``logit_mean`` (the mean valid logit; 0 when nothing is valid).
    """
    logits = logits.detach()
    valid = torch.ones_like(logits, dtype=torch.bool) if valid is None else valid.bool()
    return {
        'implicit_acc': implicit_accuracy(logits, valid),
        'logit_mean': (logits * valid).sum() / valid.sum().clamp_min(1),
    }


def preference_statistics(logits, valid, err_theta_w, err_theta_l, err_ref_w, err_ref_l):
    """The statistics logged each step next to the loss (``docs/objectives.md``).

    Args:
        logits (Tensor): preference logits, any shape ((B,), (B, M), (B, M, P)).
        valid (Tensor): bool mask of the logits that belong to a real pair.
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor): errors on preferred / dispreferred,
            shaped like ``logits`` (only the valid entries count) or already restricted to them.

    Returns:
        dict[str, Tensor]: detached scalars ``implicit_acc``, ``logit_mean`` (:func:`logit_statistics`),
        ``err_theta_w``, ``err_theta_l``, ``err_ref_w``, ``err_ref_l``.
    """
    stats = logit_statistics(logits, valid)
    for name, value in (('err_theta_w', err_theta_w), ('err_theta_l', err_theta_l),
                        ('err_ref_w', err_ref_w), ('err_ref_l', err_ref_l)):
        value = value.detach().float()
        # a masked mean without boolean indexing (data-dependent shapes do not run on the GPU planner's meta tensors)
        stats[name] = torch.where(valid, value, 0).sum() / valid.sum() if value.shape == valid.shape else value.mean()
    return stats


@dataclass
class PreferenceBatch:
    """What an objective reads of a training batch besides the denoising errors.

    Attributes:
        coverage (Tensor): (B, M, h, w) instance coverage at latent resolution (:func:`instance_coverage`).
        win (Tensor): (B, M) long stored preferred candidate per instance, -1 when unpaired.
        lose (Tensor): (B, M) long stored dispreferred candidate per instance, -1 when unpaired.
        pair (Tensor): (B, 2) long image-level [preferred, dispreferred] pair, -1 when there is none.
        num_candidates (int): K, the candidates per LQ image.
        scores (Tensor | None): (B, M, K) per-candidate instance scores, higher is better, NaN = unscored.
        expert (Tensor | None): Diffusion-DRO: long index, into the J images the model scored, of each term's
            expert image: (B, M) per instance, (B,) per image; -1 where there is none. Set by
            ``DiffusionDROModel``, which chooses the images (candidates, GT, online samples).
        negative (Tensor | None): Diffusion-DRO: the negative image of each term, shaped like ``expert``.
    """

    coverage: torch.Tensor
    win: torch.Tensor
    lose: torch.Tensor
    pair: torch.Tensor
    num_candidates: int
    scores: Optional[torch.Tensor] = None
    expert: Optional[torch.Tensor] = None
    negative: Optional[torch.Tensor] = None


@dataclass
class PreferenceResult:
    """What an objective returns: the loss and the tensors it was computed from (like diffusers' outputs).

    Every per-term field has the shape of ``logits`` ((B,) per image, (B, M) per instance, (B, M, P) per
    instance pair); the model logs :meth:`statistics` and never recomputes any of it.

    Attributes:
        loss (Tensor): scalar, ``loss_weight`` applied, with a graph.
        valid (Tensor): bool mask of the terms that exist (a real pair, an image with a preferred candidate).
        logits (Tensor | None): preference logits (positive = the policy prefers the preferred image more
            than the reference does); None for objectives without a preference (SFT).
        weights (Tensor | None): the weight of each term in its sample's loss.
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor | None): the policy's / reference's errors
            on the preferred (w) and dispreferred (l) image of each term.
    """

    loss: torch.Tensor
    valid: torch.Tensor
    logits: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    err_theta_w: Optional[torch.Tensor] = None
    err_theta_l: Optional[torch.Tensor] = None
    err_ref_w: Optional[torch.Tensor] = None
    err_ref_l: Optional[torch.Tensor] = None

    def statistics(self):
        """Detached scalars for the training log: ``implicit_acc``, ``logit_mean`` and the mean errors."""
        if self.logits is None:
            valid = self.valid.bool()
            return {'err_theta_w': self.err_theta_w.detach().float()[valid].mean()}
        return preference_statistics(self.logits, self.valid, self.err_theta_w, self.err_theta_l, self.err_ref_w,
                                     self.err_ref_l)

    def scaled(self, factor):
        """The same result with the loss multiplied by ``factor`` (the wrappers' ``loss_weight``)."""
        return replace(self, loss=factor * self.loss)


class _PreferenceLoss(nn.Module):
    """Common part of the registered wrappers: ``loss_weight`` and what the model must compute."""

    #: whether the model must run the frozen reference network.
    needs_reference = True
    #: the model class (or a base of it) that can drive this objective.
    model_type = 'DSPOModel'
    #: key of the loss in the training log.
    log_key = 'l_pref'

    def __init__(self, loss_weight=1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def columns(self, batch):
        """(B, J) long: the candidates of each LQ image the model runs through the networks, in order."""
        raise NotImplementedError


def _image_errors(err, valid):
    """err (B, J, h, w) -> (B, J) per-image mean errors, 0 on rows that are not ``valid``."""
    return err.mean(dim=(2, 3)) * valid.unsqueeze(1)


@LOSS_REGISTRY.register()
class DSPOLoss(_PreferenceLoss):
    """DSPO loss (instance-level, area-weighted Diffusion-DPO). See :func:`dspo_loss`.

    Beyond the paper, several pairs per instance (DP2O-SR's multiple preference pairs and hierarchical
    weighting, :func:`top_bottom_pairs`, :func:`hierarchical_weights`) when the set stores per-candidate
    instance scores; ``pairs: best_worst`` without weighting is the paper's loss.

    Args:
        beta (float): KL-regularisation strength. Default: :data:`DEFAULT_BETA` (8000).
        pairs (str): ``best_worst`` (the stored pair of each instance) or ``top_bottom`` (every one of the
            ``top_n`` best candidates against every one of the ``top_n`` worst, from the scores).
            Default: best_worst.
        top_n (int): n of ``top_bottom``. Default: 1.
        weighting (str): ``none`` or ``hierarchical`` (pairs by score gap, instances by score spread).
            Default: none.
        instance_error (str): ``mean`` of the per-pixel errors inside an instance, or ``sum`` (the masked
            squared norm of the paper's Eqs. (6)-(7); logits grow with the instance's area). Default: mean.
        area_weights (str): area weights normalised over the ``paired`` instances, or over ``all`` M
            instances (the paper's Eq. (3)). Default: paired. ``docs/objectives.md`` compares the choices.
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    log_key = 'l_dspo'

    def __init__(self, beta=DEFAULT_BETA, pairs='best_worst', top_n=1, weighting='none', instance_error='mean',
                 area_weights='paired', loss_weight=1.0):
        super().__init__(loss_weight)
        if instance_error not in INSTANCE_ERRORS:
            raise ValueError(f"DSPOLoss instance_error '{instance_error}' is unknown; choose mean or sum.")
        if area_weights not in AREA_WEIGHTS:
            raise ValueError(f"DSPOLoss area_weights '{area_weights}' is unknown; choose paired or all.")
        self.instance_error, self.area_weights = instance_error, area_weights
        if pairs not in ('best_worst', 'top_bottom'):
            raise ValueError(f"DSPOLoss pairs '{pairs}' is unknown; choose best_worst or top_bottom.")
        if weighting not in ('none', 'hierarchical'):
            raise ValueError(f"DSPOLoss weighting '{weighting}' is unknown; choose none or hierarchical.")
        if int(top_n) < 1 or (pairs == 'best_worst' and int(top_n) != 1):
            raise ValueError(f'DSPOLoss top_n = {top_n}: it must be at least 1, and more than 1 needs '
                             'pairs: top_bottom.')
        self.beta = beta
        self.pairs, self.top_n, self.weighting = pairs, int(top_n), weighting

    @property
    def needs_scores(self):
        """Whether the objective reads the per-candidate instance scores."""
        return self.pairs == 'top_bottom' or self.weighting == 'hierarchical'

    def columns(self, batch):
        b = batch.win.shape[0]
        return torch.arange(batch.num_candidates, device=batch.win.device).expand(b, batch.num_candidates)

    def pair_table(self, batch):
        """(B, M, P) win, lose and the optional pair / instance weights of :func:`dspo_pair_loss`."""
        if self.needs_scores and batch.scores is None:
            raise ValueError(f'DSPOLoss pairs: {self.pairs}, weighting: {self.weighting} needs per-candidate instance '
                             'scores, but the batch has none; use a set written by a scorer that stores them '
                             "(instance rows' candidate_scores, see docs/preference_lmdb.md) or the defaults "
                             'pairs: best_worst, weighting: none.')
        if self.pairs == 'top_bottom':
            win, lose = top_bottom_pairs(batch.scores, self.top_n)
        else:
            win, lose = batch.win.unsqueeze(2), batch.lose.unsqueeze(2)
        if self.weighting == 'hierarchical':
            return (win, lose, *hierarchical_weights(batch.scores, win, lose))
        return win, lose, None, None

    def forward(self, err_theta, err_ref, batch):
        """err_theta, err_ref (B, K, h, w) for all candidates; ``batch`` a :class:`PreferenceBatch`.

        Returns:
            PreferenceResult: per-pair terms (B, M, P); P = 1 for ``best_worst``.
        """
        win, lose, pair_weights, instance_weights = self.pair_table(batch)
        loss, logits, weights, valid = dspo_pair_loss(err_theta, err_ref, batch.coverage, win, lose, pair_weights,
                                                      instance_weights, self.beta, self.instance_error,
                                                      self.area_weights)
        with torch.no_grad():
            theta = instance_error(err_theta.detach(), batch.coverage, self.instance_error)  # (B, K, M)
            ref = instance_error(err_ref, batch.coverage, self.instance_error)
            picked = [pick_candidates(values, index.clamp_min(0)) for values in (theta, ref) for index in (win, lose)]
        return PreferenceResult(loss, valid, logits, weights, *picked).scaled(self.loss_weight)


@LOSS_REGISTRY.register()
class DiffusionDPOLoss(_PreferenceLoss):
    """Image-level Diffusion-DPO loss. See :func:`diffusion_dpo_loss`.

    Args:
        beta (float): KL-regularisation strength. Default: :data:`DEFAULT_BETA` (8000).
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    log_key = 'l_dpo'

    def __init__(self, beta=DEFAULT_BETA, loss_weight=1.0):
        super().__init__(loss_weight)
        self.beta = beta

    def columns(self, batch):
        return batch.pair.clamp_min(0)

    def forward(self, err_theta, err_ref, batch):
        """err_theta, err_ref (B, 2, h, w) of the [preferred, dispreferred] images.

        Returns:
            PreferenceResult: per-image terms (B,); samples without an image pair are not valid.
        """
        valid = (batch.pair >= 0).all(dim=1)
        theta, ref = _image_errors(err_theta, valid), _image_errors(err_ref, valid)  # (B, 2) each
        logits = diffusion_dpo_logits(theta[:, 0], theta[:, 1], ref[:, 0], ref[:, 1], self.beta)
        loss = (-F.logsigmoid(logits) * valid).sum() / valid.sum().clamp_min(1)
        return PreferenceResult(loss, valid, logits, valid.to(logits.dtype), theta[:, 0].detach(),
                                theta[:, 1].detach(), ref[:, 0], ref[:, 1]).scaled(self.loss_weight)


@LOSS_REGISTRY.register()
class DiffusionSFTLoss(_PreferenceLoss):
    """Supervised fine-tuning on the preferred images. See :func:`diffusion_sft_loss`.

    Args:
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    needs_reference = False
    log_key = 'l_sft'

    def columns(self, batch):
        return batch.pair[:, :1].clamp_min(0)

    def forward(self, err_theta, err_ref, batch):
        """err_theta (B, 1, h, w) of the preferred images; ``err_ref`` is not used (None).

        Returns:
            PreferenceResult: per-image terms (B,), without logits.
        """
        valid = batch.pair[:, 0] >= 0
        theta = _image_errors(err_theta, valid)[:, 0]  # (B,)
        loss = diffusion_sft_loss(theta[valid]) if bool(valid.all()) else \
            theta.sum() / valid.sum().clamp_min(1)
        return PreferenceResult(loss, valid, err_theta_w=theta.detach()).scaled(self.loss_weight)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-DRO: Wu et al., "Ranking-based Preference Optimization for Diffusion Models from Implicit User
# Feedback" (Diffusion Denoising Ranking Optimization), arXiv:2510.18353, 2025. A max-margin ranking of
# denoising errors between an expert image and a negative image, instead of DPO's log-sigmoid; here in the
# reference-relative form of docs/objectives.md, optionally per semantic instance with DSPO's area weights.


def _term_values(values, coverage):
    """Per-image (B, J, h, w) or (B, J) values -> (B, J, M) per instance with ``coverage``, else (B, J, 1)."""
    if coverage is None:
        return (values.flatten(2).mean(dim=2) if values.dim() > 2 else values).unsqueeze(2)
    return instance_error(values, coverage)


def _term_indices(index, coverage):
    """Expert / negative indices as (B, M): unchanged per instance, (B,) -> (B, 1) per image."""
    return index if coverage is not None else index.reshape(-1, 1)


def diffusion_dro_differences(err_theta, err_ref, expert, negative, coverage=None):
    """Reference-relative ranking differences of Diffusion-DRO, per image or per instance.

    ``d = (e_theta[expert] - e_ref[expert]) - (e_theta[negative] - e_ref[negative])``: negative when the
    policy improved on the expert more than on the negative (the ranking Diffusion-DRO asks for).

    Args:
        err_theta (Tensor): (B, J, h, w) policy per-pixel errors of J images per LQ (candidates, GT,
            online negatives; any stack), or (B, J) per-image mean errors when ``coverage`` is None.
        err_ref (Tensor): reference errors, same shape as ``err_theta``.
        expert (Tensor): long indices into J of the expert image: (B, M) per instance with ``coverage``,
            (B,) per image without; -1 where there is none.
        negative (Tensor): long indices into J of the negative image, same shape as ``expert``; -1 = none.
        coverage (Tensor, optional): (B, M, h, w) instance coverage (:func:`instance_coverage`). None
            compares whole images (the mean over every latent pixel, i.e. one instance covering the image).

    Returns:
        tuple[Tensor, Tensor, Tensor]: differences (B, M) ((B, 1) without coverage), weights (B, M)
        (DSPO's area weights over the valid instances; each row sums to 1 when it has one, else 0),
        valid (B, M) bool (expert and negative both defined).
    """
    # The instance (or image) reduction is linear, so reduce the policy-minus-reference difference once.
    delta = _term_values(err_theta - err_ref, coverage)  # (B, J, M) or (B, J, 1)
    expert, negative = _term_indices(expert, coverage), _term_indices(negative, coverage)
    valid = (expert >= 0) & (negative >= 0)
    differences = pick_candidates(delta, expert.clamp_min(0)) - pick_candidates(delta, negative.clamp_min(0))
    if coverage is None:
        weights = valid.to(delta.dtype)
    else:
        weights = _area_weights(coverage, valid).to(delta.dtype)
    return differences, weights, valid


def diffusion_dro_loss(err_theta, err_ref, expert, negative, coverage=None, margin=1e-3):
    """Diffusion-DRO ranking hinge (``docs/objectives.md``), optionally per semantic instance.

    ``L = mean_b sum_m w_m relu((e_theta[exp] - e_ref[exp]) - (e_theta[neg] - e_ref[neg]) + margin)``.
    Without ``coverage`` there is one term per image (``w = 1``): ``L = mean_b relu(d_b + margin)``. With
    ``coverage`` the errors are reduced per instance and weighted by area exactly as in :func:`dspo_loss`,
    so a single instance covering the image gives the image-level loss. The loss is zero for a sample
    whose expert is already better than its negative (relative to the reference) by more than ``margin``.
    There is no beta: the hinge works on the errors themselves. The mean runs over samples with at least
    one valid term; a batch without any gives 0 with a graph.

    Args:
        err_theta, err_ref, expert, negative, coverage: see :func:`diffusion_dro_differences`.
        margin (float): Ranking margin on the error differences. Default: 1e-3.

    Returns:
        Tensor: scalar loss.
    """
    return _dro_terms(err_theta, err_ref, expert, negative, coverage, margin)[0]


def _dro_terms(err_theta, err_ref, expert, negative, coverage, margin):
    """:func:`diffusion_dro_loss` and the differences, weights and valid mask it was computed from."""
    differences, weights, valid = diffusion_dro_differences(err_theta, err_ref, expert, negative, coverage)
    per_sample = (weights * F.relu(differences + margin)).sum(dim=1)  # invalid weights are 0
    has_term = valid.any(dim=1)
    return (per_sample * has_term).sum() / has_term.sum().clamp_min(1), differences, weights, valid


@LOSS_REGISTRY.register()
class DiffusionDROLoss(_PreferenceLoss):
    """Diffusion-DRO ranking loss on expert / negative images. See :func:`diffusion_dro_loss`.

    Needs ``model_type: DiffusionDROModel``, which chooses the expert (preferred candidate or GT) and the
    negative (offline dispreferred candidate or an online sample of a lagged copy of the policy), runs those
    images through the networks and puts their indices into the batch (``expert``, ``negative``).

    Args:
        margin (float): Ranking margin. Default: 1e-3.
        instance_level (bool): Reduce per semantic instance with DSPO's coverage and area weights
            (expert = each instance's preferred candidate) instead of per image. Default: False.
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    model_type = 'DiffusionDROModel'
    log_key = 'l_dro'

    def __init__(self, margin=1e-3, instance_level=False, loss_weight=1.0):
        super().__init__(loss_weight)
        self.margin = margin
        self.instance_level = bool(instance_level)

    def forward(self, err_theta, err_ref, batch):
        """err_theta, err_ref (B, J, h, w) of the J images the model scored; ``batch`` a :class:`PreferenceBatch`
        with ``expert`` and ``negative`` indices into J ((B, M) with ``instance_level``, else (B,)); the instance
        level reads ``batch.coverage``.

        Returns:
            PreferenceResult: per-instance (B, M) or per-image (B, 1) terms; the logits are ``-d`` (positive
            when the policy ranks the expert above the negative, relative to the reference).
        """
        if batch.expert is None or batch.negative is None:
            raise ValueError('DiffusionDROLoss needs the expert and negative image of every term in the batch, '
                             'which DiffusionDROModel sets; use model_type: DiffusionDROModel.')
        expert, negative = batch.expert, batch.negative
        coverage = batch.coverage if self.instance_level else None
        loss, differences, weights, valid = _dro_terms(err_theta, err_ref, expert, negative, coverage, self.margin)
        with torch.no_grad():
            picked = [pick_candidates(_term_values(err, coverage), _term_indices(index, coverage).clamp_min(0))
                      for err in (err_theta.detach(), err_ref) for index in (expert, negative)]
        return PreferenceResult(loss, valid, -differences, weights, *picked).scaled(self.loss_weight)
