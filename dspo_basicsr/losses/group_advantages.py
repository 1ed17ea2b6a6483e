"""Group-normalised advantages in DSPO's implicit-reward form: GDPO-SR's objective, per semantic instance.

GDPO-SR (Joyies/GDPO, ``GDPOSR/losses/grpo.py`` and ``GDPOSR/train/train_GDPOSR.py``) samples a group of G outputs
per LQ, standardises their rewards within the group, ``A_g = (r_g - mean(r)) / (std(r) + 1e-8)`` (unbiased std),
and trains ``-log sigmoid(-0.5 beta sum_g A_g (e_theta(x_g) - e_ref(x_g)))`` with one noise per sample shared by
the policy and the frozen reference. Here the rewards, advantages and errors are per instance (the errors are
DSPO's instance errors), and the instances are weighted by area as DSPO weighs them (``docs/objectives.md``).
"""
import torch
import torch.nn.functional as F

from dspo_basicsr.losses.preference_loss import DEFAULT_BETA, instance_error

__all__ = ['group_advantages', 'group_advantage_loss']


def group_advantages(scores, eps=1e-8):
    """Rewards standardised within each instance's group (GDPO-SR ``AdaptiveReward.forward``).

    Args:
        scores (Tensor): (B, M, G) reward of each group sample inside each instance, higher is better; NaN where
            an instance was not scored.
        eps (float): Added to the standard deviation (GDPO-SR: 1e-8).

    Returns:
        tuple[Tensor, Tensor]: advantages (B, M, G), 0 where not valid; valid (B, M) bool: every sample scored
        and not all rewards equal (an instance without a spread carries no preference).
    """
    scored = torch.isfinite(scores).all(dim=2)
    filled = torch.where(torch.isfinite(scores), scores, 0.0)
    spread = filled.std(dim=2, unbiased=True)
    valid = scored & (spread > 0)
    advantages = (filled - filled.mean(dim=2, keepdim=True)) / (spread.unsqueeze(2) + eps)
    return advantages * valid.unsqueeze(2), valid


def group_advantage_loss(err_theta, err_ref, coverage, scores, beta=DEFAULT_BETA, instance_reduction='mean'):
    """``L = mean_b -sum_m w_m log sigmoid(-beta / 2 sum_g A_mg ((e_theta - e_ref)[g, m]))``.

    Args:
        err_theta (Tensor): (B, G, h, w) policy per-pixel errors of the G group samples.
        err_ref (Tensor): (B, G, h, w) reference per-pixel errors.
        coverage (Tensor): (B, M, h, w) instance coverage (:func:`instance_coverage`).
        scores (Tensor): (B, M, G) rewards, NaN = unscored.
        beta (float): KL-regularisation strength (GDPO-SR's ``scale_term = -0.5 * 5000``: beta 5000).
        instance_reduction (str): ``mean`` or ``sum`` (:func:`instance_error`).

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: scalar loss; logits (B, M); weights (B, M) (DSPO's area weights
        over the valid instances); valid (B, M) bool.
    """
    advantages, valid = group_advantages(scores)
    delta = instance_error(err_theta - err_ref, coverage, instance_reduction)  # (B, G, M)
    logits = -0.5 * beta * torch.einsum('bmg,bgm->bm', advantages.to(delta.dtype), delta)
    area = coverage.sum(dim=(2, 3)).to(logits.dtype) * valid  # DSPO's area weights over the valid instances
    weights = area / area.sum(dim=1, keepdim=True).clamp_min(1e-12)
    per_sample = -(weights * F.logsigmoid(logits)).sum(dim=1)
    has_valid = valid.any(dim=1)
    loss = (per_sample * has_valid).sum() / has_valid.sum().clamp_min(1)
    return loss, logits, weights, valid
