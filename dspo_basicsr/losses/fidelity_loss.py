"""Fidelity loss between a predicted pairwise preference and its label.

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment" (and UNIQUE /
LIQE before it, Zhang et al.) train a quality model Q on pairs with the fidelity loss (Tsai et al. 2007):

    p = Phi((Q(x_a) - Q(x_b)) / scale)                                        (predicted P(a better than b))
    l = 1 - sqrt(p * g + eps) - sqrt((1 - p) * (1 - g) + eps)                 (g = label P(a better than b))

``scale`` defaults to 1.0 as in the authors' code; the paper writes sqrt(2) (Thurstone Case V with unit
variance per image). ``eps`` sits inside the roots so the gradient stays finite at p in {0, 1}.
"""
import math

import torch
from torch import nn

from basicsr.utils.registry import LOSS_REGISTRY

__all__ = ['fidelity_loss', 'FidelityLoss']

_REDUCTIONS = ('none', 'mean', 'sum')


def fidelity_loss(score_a, score_b, label, scale=1.0, eps=1e-8, reduction='mean'):
    """Fidelity loss of the pairwise preference implied by two quality scores.

    Args:
        score_a (Tensor): (N,) quality of the first item of each pair (an image or a group average).
        score_b (Tensor): (N,) quality of the second item.
        label (Tensor): (N,) probability in [0, 1] that the first item is better (1: a better, 0: b better).
        scale (float): Divides the score difference inside Phi; 1.0 (authors' code) or sqrt(2) (paper).
        eps (float): Added inside both square roots.
        reduction (str): 'none' | 'mean' | 'sum'.

    Returns:
        Tensor: The loss, (N,) for 'none', a scalar otherwise.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f'unknown reduction {reduction!r}; use one of {_REDUCTIONS}.')
    label = label.to(score_a.dtype)
    # Phi(z) = (1 + erf(z / sqrt 2)) / 2
    p = 0.5 * (1 + torch.erf((score_a - score_b) / (scale * math.sqrt(2))))
    loss = 1 - torch.sqrt(p * label + eps) - torch.sqrt((1 - p) * (1 - label) + eps)
    if reduction == 'mean':
        return loss.mean()
    if reduction == 'sum':
        return loss.sum()
    return loss


@LOSS_REGISTRY.register()
class FidelityLoss(nn.Module):
    """Registered fidelity loss (see :func:`fidelity_loss`).

    Args:
        loss_weight (float): Multiplies the loss.
        reduction (str): 'none' | 'mean' | 'sum'.
        scale (float): Divides the score difference inside Phi (default 1.0; the paper's sqrt(2) also works).
        eps (float): Added inside the square roots.
    """

    def __init__(self, loss_weight=1.0, reduction='mean', scale=1.0, eps=1e-8):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f'FidelityLoss: unknown reduction {reduction!r}; use one of {_REDUCTIONS}.')
        if scale <= 0:
            raise ValueError(f'FidelityLoss: scale must be positive, got {scale}.')
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.scale = scale
        self.eps = eps

    def forward(self, score_a, score_b, label):
        """
        Args:
            score_a (Tensor): (N,) scores of the first items.
            score_b (Tensor): (N,) scores of the second items.
            label (Tensor): (N,) probability that the first item is better.
        """
        return self.loss_weight * fidelity_loss(score_a, score_b, label, self.scale, self.eps, self.reduction)
