"""Preference objectives for diffusion SR: DSPO, Diffusion-DPO, SFT and Diffusion-DRO, as pure tensor functions.

References:
    * DSPO: "DSPO: Direct Semantic Preference Optimization for Real-World Image Super-Resolution".
      Instance-level Diffusion-DPO: one DPO term per SAM instance, weighted by instance area.
    * Diffusion-DPO: Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization",
      CVPR 2024, Eq. 14. We use the diffusers convention (no 0.5 factor in front of beta): the authors' code
      (SalesforceAIResearch/DiffusionDPO ``train.py``, ``scale_term = -0.5 * args.beta_dpo``) halves its
      ``beta_dpo``, so their ``beta_dpo`` is twice our ``beta`` (their 5000 is our 2500).
    * Diffusion-DRO: Wu et al., "Ranking-based Preference Optimization for Diffusion Models from Implicit
      User Feedback", arXiv:2510.18353, 2025: a hinge ranking of denoising errors (expert vs negative).

Every function takes denoising errors already computed by the model:
``err = mean over latent channels of (target - prediction)^2`` per latent pixel, for the policy
(``err_theta``) and the frozen reference (``err_ref``), with one timestep and one noise per LQ image
shared by all its candidates and by both networks (DESIGN.md section 5).

The registered ``nn.Module`` wrappers only add ``loss_weight`` and the hyper-parameters.
"""
import torch
import torch.nn.functional as F
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY


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


def instance_error(err, coverage):
    """Coverage-weighted mean of per-pixel errors inside each instance.

    Args:
        err (Tensor): (B, K, h, w) per-pixel errors of K candidates.
        coverage (Tensor): (B, M, h, w) instance coverage from :func:`instance_coverage`.

    Returns:
        Tensor: (B, K, M) ``e[k, m] = sum_p c_m(p) err[k](p) / sum_p c_m(p)`` (0 for an empty instance).
    """
    weighted = torch.einsum('bkhw,bmhw->bkm', err, coverage.to(err.dtype))
    return weighted / coverage.sum(dim=(2, 3)).clamp_min(1e-12).unsqueeze(1).to(err.dtype)


def _gather_candidates(values, index):
    """values (B, K, M), index (B, M) candidate ids >= 0 -> (B, M) values[b, index[b, m], m]."""
    return values.gather(1, index.unsqueeze(1)).squeeze(1)


def dspo_logits(err_theta, err_ref, coverage, win, lose, beta=8000.0):
    """Per-instance DSPO logits and area weights.

    Args:
        err_theta (Tensor): (B, K, h, w) policy per-pixel errors.
        err_ref (Tensor): (B, K, h, w) reference per-pixel errors (no gradient needed).
        coverage (Tensor): (B, M, h, w) instance coverage.
        win (Tensor): (B, M) long, preferred candidate of each instance, -1 when unpaired.
        lose (Tensor): (B, M) long, dispreferred candidate of each instance, -1 when unpaired.
        beta (float): KL-regularisation strength (the paper's 8000, which absorbs T).

    Returns:
        tuple[Tensor, Tensor, Tensor]: logits (B, M), weights (B, M) (zero for unpaired instances;
        each row sums to 1 when it has a pair, else 0), paired (B, M) bool.
    """
    # Instance reduction is linear, so reduce the policy-minus-reference difference once.
    delta = instance_error(err_theta - err_ref, coverage)  # (B, K, M)
    paired = (win >= 0) & (lose >= 0)
    delta_win = _gather_candidates(delta, win.clamp_min(0))
    delta_lose = _gather_candidates(delta, lose.clamp_min(0))
    logits = -beta * (delta_win - delta_lose)
    area = coverage.sum(dim=(2, 3)) * paired
    weights = area / area.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return logits, weights.to(logits.dtype), paired


def dspo_loss(err_theta, err_ref, coverage, win, lose, beta=8000.0):
    """DSPO: area-weighted Diffusion-DPO over semantic instances (DESIGN.md section 5).

    ``L = mean_b -sum_m w_m log sigmoid(-beta ((e_theta[w] - e_ref[w]) - (e_theta[l] - e_ref[l])))``
    with ``w_m = |s_m| / sum_{paired} |s_m|``. The mean runs over samples with at least one paired
    instance; a sample without any contributes nothing (and a batch without any gives 0 with a graph).

    Args:
        err_theta (Tensor): (B, K, h, w) policy per-pixel errors.
        err_ref (Tensor): (B, K, h, w) reference per-pixel errors.
        coverage (Tensor): (B, M, h, w) instance coverage.
        win (Tensor): (B, M) long preferred candidate per instance, -1 when unpaired.
        lose (Tensor): (B, M) long dispreferred candidate per instance, -1 when unpaired.
        beta (float): KL-regularisation strength.

    Returns:
        Tensor: scalar loss.
    """
    logits, weights, paired = dspo_logits(err_theta, err_ref, coverage, win, lose, beta)
    per_sample = -(weights * F.logsigmoid(logits)).sum(dim=1)  # unpaired weights are 0
    has_pair = paired.any(dim=1)
    return (per_sample * has_pair).sum() / has_pair.sum().clamp_min(1)


def diffusion_dpo_logits(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta=8000.0):
    """Image-level Diffusion-DPO logits ``-beta ((e_theta_w - e_ref_w) - (e_theta_l - e_ref_l))``.

    Args:
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor): (B,) mean errors of the policy and
            the reference on the preferred (w) and dispreferred (l) images.
        beta (float): KL-regularisation strength.

    Returns:
        Tensor: (B,) logits.
    """
    return -beta * ((err_theta_w - err_ref_w) - (err_theta_l - err_ref_l))


def diffusion_dpo_loss(err_theta_w, err_theta_l, err_ref_w, err_ref_l, beta=8000.0):
    """Diffusion-DPO (Wallace et al. 2024, Eq. 14): ``mean_b -log sigmoid(logit_b)``.

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


def preference_statistics(logits, valid, err_theta_w, err_theta_l, err_ref_w, err_ref_l):
    """The statistics logged each step next to the loss (DESIGN.md section 5).

    Args:
        logits (Tensor): preference logits (B,) or (B, M).
        valid (Tensor): bool mask of the logits that belong to a real pair.
        err_theta_w, err_theta_l, err_ref_w, err_ref_l (Tensor): errors on preferred / dispreferred.

    Returns:
        dict[str, Tensor]: detached scalars ``implicit_acc``, ``logit_mean``, ``err_theta_w``,
        ``err_theta_l``, ``err_ref_w``, ``err_ref_l``.
    """
    logits, valid = logits.detach(), valid.bool()
    stats = {
        'implicit_acc': implicit_accuracy(logits, valid),
        'logit_mean': (logits * valid).sum() / valid.sum().clamp_min(1),
    }
    for name, value in (('err_theta_w', err_theta_w), ('err_theta_l', err_theta_l),
                        ('err_ref_w', err_ref_w), ('err_ref_l', err_ref_l)):
        stats[name] = value.detach().float().mean()
    return stats


class _PreferenceLoss(nn.Module):
    """Common part of the registered wrappers: ``loss_weight`` and what the model must compute."""

    #: whether the model must run the frozen reference network.
    needs_reference = True
    #: 'instance' (per-instance tables and coverage), 'image' (one pair per sample) or 'preferred'.
    level = 'image'
    #: key of the loss in the training log.
    log_key = 'l_pref'

    def __init__(self, loss_weight=1.0):
        super().__init__()
        self.loss_weight = loss_weight


@LOSS_REGISTRY.register()
class DSPOLoss(_PreferenceLoss):
    """DSPO loss (instance-level, area-weighted Diffusion-DPO). See :func:`dspo_loss`.

    Args:
        beta (float): KL-regularisation strength. Default: 8000.
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    level = 'instance'
    log_key = 'l_dspo'

    def __init__(self, beta=8000.0, loss_weight=1.0):
        super().__init__(loss_weight)
        self.beta = beta

    def forward(self, err_theta, err_ref, coverage, win, lose):
        """Shapes as :func:`dspo_loss`. Returns the weighted scalar loss."""
        return self.loss_weight * dspo_loss(err_theta, err_ref, coverage, win, lose, self.beta)


@LOSS_REGISTRY.register()
class DiffusionDPOLoss(_PreferenceLoss):
    """Image-level Diffusion-DPO loss. See :func:`diffusion_dpo_loss`.

    Args:
        beta (float): KL-regularisation strength. Default: 8000.
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    log_key = 'l_dpo'

    def __init__(self, beta=8000.0, loss_weight=1.0):
        super().__init__(loss_weight)
        self.beta = beta

    def forward(self, err_theta_w, err_theta_l, err_ref_w, err_ref_l):
        """(B,) mean errors. Returns the weighted scalar loss."""
        return self.loss_weight * diffusion_dpo_loss(err_theta_w, err_theta_l, err_ref_w, err_ref_l, self.beta)


@LOSS_REGISTRY.register()
class DiffusionSFTLoss(_PreferenceLoss):
    """Supervised fine-tuning on the preferred images. See :func:`diffusion_sft_loss`.

    Args:
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    needs_reference = False
    level = 'preferred'
    log_key = 'l_sft'

    def forward(self, err_theta_w):
        """Errors on the preferred images. Returns the weighted scalar loss."""
        return self.loss_weight * diffusion_sft_loss(err_theta_w)


# ---------------------------------------------------------------------------------------------------------------
# Diffusion-DRO: Wu et al., "Ranking-based Preference Optimization for Diffusion Models from Implicit User
# Feedback" (Diffusion Denoising Ranking Optimization), arXiv:2510.18353, 2025. A max-margin ranking of
# denoising errors between an expert image and a negative image, instead of DPO's log-sigmoid; here in the
# reference-relative form of DESIGN.md section 5, optionally per semantic instance with DSPO's area weights.


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
    delta = err_theta - err_ref
    if coverage is None:
        delta = (delta.flatten(2).mean(dim=2) if delta.dim() > 2 else delta).unsqueeze(2)  # (B, J) -> (B, J, 1)
        expert, negative = expert.reshape(-1, 1), negative.reshape(-1, 1)
        area = torch.ones_like(expert, dtype=delta.dtype)
    else:
        delta = instance_error(delta, coverage)  # (B, J, M); the instance reduction is linear
        area = coverage.sum(dim=(2, 3)).to(delta.dtype)
    valid = (expert >= 0) & (negative >= 0)
    differences = _gather_candidates(delta, expert.clamp_min(0)) - _gather_candidates(delta, negative.clamp_min(0))
    area = area * valid
    weights = area / area.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return differences, weights, valid


def diffusion_dro_loss(err_theta, err_ref, expert, negative, coverage=None, margin=1e-3):
    """Diffusion-DRO ranking hinge (DESIGN.md section 5), optionally per semantic instance.

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
    differences, weights, valid = diffusion_dro_differences(err_theta, err_ref, expert, negative, coverage)
    per_sample = (weights * F.relu(differences + margin)).sum(dim=1)  # invalid weights are 0
    has_term = valid.any(dim=1)
    return (per_sample * has_term).sum() / has_term.sum().clamp_min(1)


@LOSS_REGISTRY.register()
class DiffusionDROLoss(_PreferenceLoss):
    """Diffusion-DRO ranking loss on expert / negative images. See :func:`diffusion_dro_loss`.

    Needs ``model_type: DiffusionDROModel``, which chooses the expert (preferred candidate or GT) and the
    negative (offline dispreferred candidate or an online sample of a lagged copy of the policy).

    Args:
        margin (float): Ranking margin. Default: 1e-3.
        instance_level (bool): Reduce per semantic instance with DSPO's coverage and area weights
            (expert = each instance's preferred candidate) instead of per image. Default: False.
        loss_weight (float): Multiplier of the loss. Default: 1.
    """

    level = 'ranking'
    log_key = 'l_dro'

    def __init__(self, margin=1e-3, instance_level=False, loss_weight=1.0):
        super().__init__(loss_weight)
        self.margin = margin
        self.instance_level = bool(instance_level)

    def forward(self, err_theta, err_ref, expert, negative, coverage=None):
        """Shapes as :func:`diffusion_dro_differences`. Returns the weighted scalar loss."""
        return self.loss_weight * diffusion_dro_loss(err_theta, err_ref, expert, negative, coverage, self.margin)
