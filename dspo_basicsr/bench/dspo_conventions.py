"""What DSPO's open conventions do to a small instance's logit and gradient (``docs/objectives.md``).

A synthetic 512 x 512 image (a 64 x 64 latent, SD's factor 8) split into three instances: a small one of
32 x 32 pixels (16 latent pixels), a medium one of 128 x 128 (256) and the background (the other 3824).
The policy has lowered its error on every preferred candidate by ``delta`` per latent pixel against the
reference; the dispreferred candidates are unchanged. For each convention the figures are the logit, the
area weight and the gradient of the loss on one latent pixel (of the preferred candidate's error) of the
small instance and of the background: how hard a pixel of each is pushed.
"""
import torch

from dspo_basicsr.losses.preference_loss import AREA_WEIGHTS, DEFAULT_BETA, INSTANCE_ERRORS, dspo_pair_loss

#: (top, left, size) of the small and medium instances in latent pixels; the rest is background
SMALL, MEDIUM, LATENT = (4, 4, 4), (32, 32, 16), 64


def synthetic_instances():
    """(1, 3, 64, 64) coverage of the small, medium and background instances (an exact partition)."""
    labels = torch.full((LATENT, LATENT), 2, dtype=torch.long)
    for m, (top, left, size) in enumerate((SMALL, MEDIUM)):
        labels[top:top + size, left:left + size] = m
    return torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float().unsqueeze(0)


def convention_figures(beta=DEFAULT_BETA, delta=1e-4, paired=(True, True, True)):
    """The logit, weight and pixel gradient of the small instance and the background under each convention.

    Args:
        beta (float): KL-regularisation strength.
        delta (float): How much the policy lowered its per-pixel error on the preferred candidates.
        paired (tuple[bool, bool, bool]): Which of (small, medium, background) have a preference pair.

    Returns:
        list[dict]: one row per (instance_error, area_weights): ``instance_error``, ``area_weights``, and
        ``logit``, ``weight``, ``pixel_gradient`` (|dL/d err| at one latent pixel) of the small instance, and
        the same three with the prefix ``background_`` (logit None when the background is unpaired).
    """
    coverage = synthetic_instances()
    err_ref = torch.full((1, 2, LATENT, LATENT), 0.1, dtype=torch.float64)
    win = torch.tensor([[[0] if p else [-1] for p in paired]])  # (1, 3, 1)
    lose = torch.where(win >= 0, 1, -1)
    rows = []
    for reduction in INSTANCE_ERRORS:
        for normalisation in AREA_WEIGHTS:
            err_theta = (err_ref - delta * torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1))
            err_theta.requires_grad_(True)
            loss, logits, weights, _ = dspo_pair_loss(err_theta, err_ref, coverage.double(), win, lose, beta=beta,
                                                      instance_reduction=reduction,
                                                      area_normalisation=normalisation)
            loss.backward()
            grad = err_theta.grad[0, 0].abs()
            logits, weights = logits.detach()[0, :, 0], weights.detach()[0, :, 0]
            rows.append({'instance_error': reduction, 'area_weights': normalisation,
                         'logit': float(logits[0]), 'weight': float(weights[0]),
                         'pixel_gradient': float(grad[SMALL[0], SMALL[1]]),
                         'background_logit': float(logits[2]) if paired[2] else None,
                         'background_weight': float(weights[2]),
                         'background_pixel_gradient': float(grad[LATENT - 1, LATENT - 1])})
    return rows
