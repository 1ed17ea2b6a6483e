"""The DSPO / Diffusion-DPO / SFT contract of docs/objectives.md."""
import math

import pytest
import torch

from dspo_basicsr.losses import (
    diffusion_dpo_loss,
    dspo_logits,
    dspo_loss,
    implicit_accuracy,
    instance_coverage,
    instance_error,
)


def _random_problem(b=3, k=4, m=5, h=8, w=8, factor=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m, (b, h * factor, w * factor), generator=g)
    coverage = instance_coverage(labels, m, factor)
    err_theta = torch.rand(b, k, h, w, generator=g, requires_grad=True)
    err_ref = torch.rand(b, k, h, w, generator=g)
    win = torch.randint(0, k, (b, m), generator=g)
    lose = (win + 1 + torch.randint(0, k - 1, (b, m), generator=g)) % k
    return err_theta, err_ref, coverage, win, lose, labels


def test_coverage_is_partition_with_exact_fractions():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 2, 2], [2, 2, 2, 0]]])
    cov = instance_coverage(labels, 3, 2)
    assert cov.shape == (1, 3, 2, 2)
    torch.testing.assert_close(cov.sum(1), torch.ones(1, 2, 2))
    torch.testing.assert_close(cov[0, :, 0, 0], torch.tensor([0.75, 0.0, 0.25]))
    torch.testing.assert_close(cov[0, :, 1, 1], torch.tensor([0.25, 0.0, 0.75]))
    # Pixel counts at SR size are recovered exactly.
    torch.testing.assert_close(cov.sum((2, 3))[0] * 4, torch.tensor([4.0, 4.0, 8.0]))


def test_coverage_ignores_padding_labels():
    labels = torch.full((1, 4, 4), -1)
    labels[0, :2] = 1
    cov = instance_coverage(labels, 2, 2)
    torch.testing.assert_close(cov.sum(1)[0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_ln2_at_initialisation_with_nonzero_gradient():
    err_theta, _, coverage, win, lose, _ = _random_problem()
    err_ref = err_theta.detach().clone()
    loss = dspo_loss(err_theta, err_ref, coverage, win, lose)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert err_theta.grad.abs().sum() > 0


def test_single_full_instance_equals_image_level_dpo():
    err_theta, err_ref, _, _, _, _ = _random_problem(b=4, k=2, m=1)
    labels = torch.zeros(4, 32, 32, dtype=torch.long)
    coverage = instance_coverage(labels, 1, 4)
    win = torch.zeros(4, 1, dtype=torch.long)
    lose = torch.ones(4, 1, dtype=torch.long)
    beta = 50.0
    ours = dspo_loss(err_theta, err_ref, coverage, win, lose, beta)
    ref = diffusion_dpo_loss(err_theta[:, 0].mean((1, 2)), err_theta[:, 1].mean((1, 2)), err_ref[:, 0].mean((1, 2)),
                             err_ref[:, 1].mean((1, 2)), beta)
    torch.testing.assert_close(ours, ref)


def test_swapping_win_and_lose_negates_logits():
    err_theta, err_ref, coverage, win, lose, _ = _random_problem()
    logits, _, _ = dspo_logits(err_theta, err_ref, coverage, win, lose)
    swapped, _, _ = dspo_logits(err_theta, err_ref, coverage, lose, win)
    torch.testing.assert_close(swapped, -logits)


def test_unpaired_instances_change_nothing():
    err_theta, err_ref, coverage, win, lose, _ = _random_problem(m=5)
    win[:, 3:] = -1
    lose[:, 3:] = -1
    loss = dspo_loss(err_theta, err_ref, coverage, win, lose, beta=100.0)
    # Dropping the unpaired instances entirely, and renormalising weights over the paired ones, is the same.
    loss_paired_only = dspo_loss(err_theta, err_ref, coverage[:, :3], win[:, :3], lose[:, :3], beta=100.0)
    torch.testing.assert_close(loss, loss_paired_only)
    # Changing the errors inside unpaired instances does not move the loss.
    mask = coverage[:, 3:].sum(1, keepdim=True) > 0.999
    perturbed = torch.where(mask, err_theta + 5.0, err_theta)
    torch.testing.assert_close(dspo_loss(perturbed, err_ref, coverage, win, lose, beta=100.0), loss)


def test_formula_by_hand_with_area_weights():
    # Two instances: left quarter (area 4) and the rest (area 12) of a 4x4 image, latent factor 1.
    labels = torch.ones(1, 4, 4, dtype=torch.long)
    labels[0, :, 0] = 0
    coverage = instance_coverage(labels, 2, 1)
    err_theta = torch.zeros(1, 2, 4, 4)
    err_theta[0, 0, :, 0] = 0.2  # candidate 0 worse on instance 0
    err_theta[0, 1, :, 1:] = 0.1  # candidate 1 worse on instance 1
    err_ref = torch.zeros(1, 2, 4, 4)
    win, lose = torch.tensor([[1, 0]]), torch.tensor([[0, 1]])
    beta = 10.0
    l0 = -beta * (0.0 - 0.2)
    l1 = -beta * (0.0 - 0.1)
    expected = -(0.25 * math.log(torch.sigmoid(torch.tensor(l0))) + 0.75 * math.log(torch.sigmoid(torch.tensor(l1))))
    assert dspo_loss(err_theta, err_ref, coverage, win, lose, beta).item() == pytest.approx(expected, rel=1e-5)
    e = instance_error(err_theta, coverage)
    torch.testing.assert_close(e[0], torch.tensor([[0.2, 0.0], [0.0, 0.1]]))


def test_sample_without_pairs_contributes_nothing_and_no_nan():
    err_theta, err_ref, coverage, win, lose, _ = _random_problem(b=2)
    win[1], lose[1] = -1, -1
    both = dspo_loss(err_theta, err_ref, coverage, win, lose, beta=100.0)
    first = dspo_loss(err_theta[:1], err_ref[:1], coverage[:1], win[:1], lose[:1], beta=100.0)
    torch.testing.assert_close(both, first)
    win[:], lose[:] = -1, -1
    none = dspo_loss(err_theta, err_ref, coverage, win, lose)
    assert torch.isfinite(none) and none.item() == 0.0
    none.backward()
    assert torch.isfinite(err_theta.grad).all()


def test_cost_does_not_loop_over_instances():
    # Many instances go through the same batched einsum: results match a per-instance loop.
    err_theta, err_ref, coverage, win, lose, _ = _random_problem(m=17)
    batched = instance_error(err_theta - err_ref, coverage)
    looped = torch.stack([((err_theta - err_ref) * coverage[:, m:m + 1]).sum((2, 3)) /
                          coverage[:, m:m + 1].sum((2, 3)) for m in range(17)], dim=2)
    torch.testing.assert_close(batched, looped)


def test_implicit_accuracy_counts_ties_half():
    logits = torch.tensor([1.0, -1.0, 0.0, 2.0])
    assert implicit_accuracy(logits).item() == pytest.approx(0.625)
    valid = torch.tensor([True, True, True, False])
    assert implicit_accuracy(logits, valid).item() == pytest.approx(0.5)
