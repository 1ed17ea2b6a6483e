"""Several preference pairs per instance (DSPOLoss pairs: top_bottom, weighting: hierarchical)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dspo_basicsr.losses import (
    DEFAULT_BETA,
    PreferenceBatch,
    dspo_loss,
    hierarchical_weights,
    instance_coverage,
    instance_error,
    top_bottom_pairs,
)

from basicsr.losses import build_loss


def _todays_dspo_loss(err_theta, err_ref, coverage, win, lose, beta):
    """The single-pair DSPO loss as it was written before pair tables (kept here as the reference)."""
    delta = instance_error(err_theta - err_ref, coverage)
    paired = (win >= 0) & (lose >= 0)
    delta_win = delta.gather(1, win.clamp_min(0).unsqueeze(1)).squeeze(1)
    delta_lose = delta.gather(1, lose.clamp_min(0).unsqueeze(1)).squeeze(1)
    logits = -beta * (delta_win - delta_lose)
    area = coverage.sum(dim=(2, 3)) * paired
    weights = (area / area.sum(dim=1, keepdim=True).clamp_min(1e-12)).to(logits.dtype)
    per_sample = -(weights * F.logsigmoid(logits)).sum(dim=1)
    has_pair = paired.any(dim=1)
    return (per_sample * has_pair).sum() / has_pair.sum().clamp_min(1)


def _problem(b=3, k=5, m=6, h=8, w=8, factor=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m, (b, h * factor, w * factor), generator=g)
    coverage = instance_coverage(labels, m, factor)
    err_theta = torch.rand(b, k, h, w, generator=g, requires_grad=True)
    err_ref = torch.rand(b, k, h, w, generator=g)
    scores = torch.rand(b, m, k, generator=g)
    scores[0, 1] = float('nan')  # an unscored (unpaired) instance
    win, lose = scores.argmax(dim=2), scores.argmin(dim=2)
    win[0, 1] = lose[0, 1] = -1
    return err_theta, err_ref, coverage, win, lose, scores


def _batch(coverage, win, lose, scores):
    b, k = win.shape[0], scores.shape[2]
    return PreferenceBatch(coverage=coverage, win=win, lose=lose, pair=torch.zeros(b, 2, dtype=torch.long),
                           num_candidates=k, scores=scores)


@pytest.mark.parametrize('pairs', ['best_worst', 'top_bottom'])
def test_one_pair_per_instance_is_todays_loss_bit_for_bit(pairs):
    err_theta, err_ref, coverage, win, lose, scores = _problem()
    cri = build_loss({'type': 'DSPOLoss', 'beta': DEFAULT_BETA, 'pairs': pairs, 'top_n': 1})
    result = cri(err_theta, err_ref, _batch(coverage, win, lose, scores))
    expected = _todays_dspo_loss(err_theta, err_ref, coverage, win, lose, DEFAULT_BETA)
    assert torch.equal(result.loss, expected)
    assert torch.equal(dspo_loss(err_theta, err_ref, coverage, win, lose), expected)
    grad, = torch.autograd.grad(result.loss, err_theta)
    expected_grad, = torch.autograd.grad(expected, err_theta)
    assert torch.equal(grad, expected_grad)
    assert result.logits.shape == (3, 6, 1) and not result.valid[0, 1].any() and result.valid.sum() == 17


def test_top_bottom_pairs_skip_the_middle_and_ties():
    scores = torch.tensor([[[4.0, 3.0, 1.0, 0.0, 2.0],            # 2 best {0, 1} x 2 worst {3, 2}
                            [1.0, 1.0, 2.0, 0.0, float('nan')],   # ties: (0, 0) is dropped
                            [5.0, float('nan'), float('nan'), 1.0, float('nan')],  # 2 scored: n = 1
                            [float('nan')] * 5]])                  # unscored: no pair
    win, lose = top_bottom_pairs(scores, top_n=2)
    assert win.shape == (1, 4, 4)
    pairs = [sorted((int(w), int(v)) for w, v in zip(win[0, m], lose[0, m]) if w >= 0) for m in range(4)]
    assert pairs == [[(0, 2), (0, 3), (1, 2), (1, 3)], [(0, 3), (2, 0), (2, 3)], [(0, 3)], []]
    assert ((win >= 0) == (lose >= 0)).all()
    # top_n = 1 is the best/worst pair, ties to the smaller index (as the scorers' pick_pair)
    win1, lose1 = top_bottom_pairs(scores, top_n=1)
    assert win1[0, :, 0].tolist() == [0, 2, 0, -1] and lose1[0, :, 0].tolist() == [3, 3, 3, -1]


def test_hand_computed_hierarchical_example():
    # Two instances, one latent pixel each (equal areas, w_m = 1/2), reference errors 0, beta 1.
    labels = torch.tensor([[[0, 1]]])
    coverage = instance_coverage(labels, 2, 1)
    a, b = [0.1, -0.2, 0.3, 0.5], [0.2, 0.0, -0.1, 0.4]  # policy error of candidate k in instance 0 / 1
    err_theta = torch.tensor([[[[a[k], b[k]]] for k in range(4)]])  # (1, 4, 1, 2)
    err_ref = torch.zeros_like(err_theta)
    scores = torch.tensor([[[4.0, 3.0, 1.0, 0.0], [1.0, 1.0, 2.0, 0.0]]])
    batch = _batch(coverage, torch.tensor([[0, 2]]), torch.tensor([[3, 3]]), scores)

    def ls(d, w, v):  # log sigmoid of the pair (w preferred over v): -beta (d_w - d_v)
        return math.log(1 / (1 + math.exp(d[w] - d[v])))

    # instance 0: pairs (0,3) (0,2) (1,3) (1,2), score gaps 4 3 3 2; instance 1: (2,3) (2,0) (0,3), gaps 2 1 1
    pairs0, gaps0 = [(0, 3), (0, 2), (1, 3), (1, 2)], [4, 3, 3, 2]
    pairs1, gaps1 = [(2, 3), (2, 0), (0, 3)], [2, 1, 1]
    std0, std1 = math.sqrt(2.5), math.sqrt(0.5)  # population std of [4, 3, 1, 0] and [1, 1, 2, 0]
    g0, g1 = std0 / ((std0 + std1) / 2), std1 / ((std0 + std1) / 2)
    intra0 = sum(g * ls(a, *p) for g, p in zip(gaps0, pairs0)) / sum(gaps0)
    intra1 = sum(g * ls(b, *p) for g, p in zip(gaps1, pairs1)) / sum(gaps1)
    expected = -(0.5 * g0 * intra0 + 0.5 * g1 * intra1)
    cri = build_loss({'type': 'DSPOLoss', 'beta': 1.0, 'pairs': 'top_bottom', 'top_n': 2, 'weighting': 'hierarchical'})
    result = cri(err_theta, err_ref, batch)
    assert result.loss.item() == pytest.approx(expected, rel=1e-6)
    plain = -(0.5 * sum(ls(a, *p) for p in pairs0) / 4 + 0.5 * sum(ls(b, *p) for p in pairs1) / 3)
    unweighted = build_loss({'type': 'DSPOLoss', 'beta': 1.0, 'pairs': 'top_bottom', 'top_n': 2})
    assert unweighted(err_theta, err_ref, batch).loss.item() == pytest.approx(plain, rel=1e-6)
    # The result's weights are each pair's share of its sample's loss; the logits are the loss's own.
    assert result.weights.sum().item() == pytest.approx(0.5 * g0 + 0.5 * g1, rel=1e-6)
    assert result.valid.sum() == 7
    assert result.logits[0, 0][result.valid[0, 0]].sort().values.tolist() == pytest.approx(
        sorted(-(a[w] - a[v]) for w, v in pairs0))
    pair_weights, instance_weights = hierarchical_weights(scores, *top_bottom_pairs(scores, 2))
    assert instance_weights[0].tolist() == pytest.approx([g0, g1]) and instance_weights.mean() == pytest.approx(1)
    assert sorted(pair_weights[0, 1].tolist()) == [0.0, 1.0, 1.0, 2.0]


def test_multi_pair_options_and_missing_scores_are_explained():
    with pytest.raises(ValueError, match='top_bottom'):
        build_loss({'type': 'DSPOLoss', 'top_n': 2})
    with pytest.raises(ValueError, match="pairs 'all'"):
        build_loss({'type': 'DSPOLoss', 'pairs': 'all'})
    err_theta, err_ref, coverage, win, lose, _ = _problem()
    cri = build_loss({'type': 'DSPOLoss', 'pairs': 'top_bottom', 'top_n': 2})
    no_scores = PreferenceBatch(coverage=coverage, win=win, lose=lose, pair=torch.zeros(3, 2, dtype=torch.long),
                                num_candidates=5)
    with pytest.raises(ValueError, match='candidate_scores'):
        cri(err_theta, err_ref, no_scores)
