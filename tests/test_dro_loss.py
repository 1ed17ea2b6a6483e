"""Diffusion-DRO ranking loss: values by hand, margin, instance masks, registration."""
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.losses import diffusion_dro_differences, diffusion_dro_loss, dspo_logits, instance_coverage
from dspo_basicsr.losses.preference_loss import PreferenceBatch

from basicsr.losses import build_loss


def _image_errors(values):
    """(B, J) per-image errors -> (B, J, 2, 2) constant per-pixel maps."""
    return torch.tensor(values, dtype=torch.float64)[:, :, None, None].expand(-1, -1, 2, 2).clone()


def test_image_level_by_hand():
    # Sample 0: d = (0.30 - 0.20) - (0.50 - 0.60) = 0.2 -> relu(0.2 + 0.001) = 0.201.
    # Sample 1: d = (0.10 - 0.20) - (0.40 - 0.30) = -0.2 -> expert better by more than the margin -> 0.
    err_theta = _image_errors([[0.30, 0.50], [0.10, 0.40]])
    err_ref = _image_errors([[0.20, 0.60], [0.20, 0.30]])
    expert, negative = torch.tensor([0, 0]), torch.tensor([1, 1])
    loss = diffusion_dro_loss(err_theta, err_ref, expert, negative, margin=1e-3)
    assert loss.item() == pytest.approx((0.201 + 0.0) / 2, abs=1e-12)
    differences, weights, valid = diffusion_dro_differences(err_theta, err_ref, expert, negative)
    torch.testing.assert_close(differences, torch.tensor([[0.2], [-0.2]], dtype=torch.float64))
    assert weights.tolist() == [[1.0], [1.0]] and valid.all()
    # The same errors given as (B, J) image means.
    assert diffusion_dro_loss(err_theta.mean(dim=(2, 3)), err_ref.mean(dim=(2, 3)), expert, negative).item() == \
        pytest.approx(loss.item(), abs=1e-12)


def test_zero_when_expert_better_by_more_than_margin_and_positive_inside_it():
    err_ref = _image_errors([[0.5, 0.5]])
    better = _image_errors([[0.5 - 2e-3, 0.5]])  # d = -2e-3 < -margin
    inside = _image_errors([[0.5 - 5e-4, 0.5]])  # d = -5e-4 > -margin
    one, zero = torch.tensor([1]), torch.tensor([0])
    assert diffusion_dro_loss(better, err_ref, zero, one).item() == 0.0
    assert diffusion_dro_loss(inside, err_ref, zero, one).item() == pytest.approx(5e-4, abs=1e-12)
    # Policy equal to reference: the loss is the margin itself, and the gradient pushes the ranking.
    err_theta = err_ref.clone().requires_grad_(True)
    loss = diffusion_dro_loss(err_theta, err_ref, zero, one, margin=0.01)
    assert loss.item() == pytest.approx(0.01)
    loss.backward()
    grad = err_theta.grad.sum(dim=(2, 3))[0]
    assert grad[0] > 0 and grad[1] < 0  # lower the expert's error, raise the negative's


def test_single_full_instance_equals_unmasked_loss():
    torch.manual_seed(0)
    b, j, h, w, f = 3, 4, 4, 4, 8
    err_theta, err_ref = torch.rand(b, j, h, w, dtype=torch.float64), torch.rand(b, j, h, w, dtype=torch.float64)
    expert, negative = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 3])
    coverage = instance_coverage(torch.zeros(b, h * f, w * f, dtype=torch.long), 1, f).double()
    masked = diffusion_dro_loss(err_theta, err_ref, expert[:, None], negative[:, None], coverage, margin=0.05)
    unmasked = diffusion_dro_loss(err_theta, err_ref, expert, negative, margin=0.05)
    assert masked.item() == pytest.approx(unmasked.item(), rel=1e-12)
    assert unmasked.item() > 0


def test_instances_use_dspo_area_weights_and_skip_unpaired():
    # Two instances: the left column (area 1/4 of the latent pixels) and the rest; a third unpaired.
    b, j, f = 1, 2, 8
    labels = torch.ones(b, 4 * f, 4 * f, dtype=torch.long)
    labels[:, :, :f] = 0
    coverage = instance_coverage(labels, 3, f).double()
    err_ref = torch.zeros(b, j, 4, 4, dtype=torch.float64)
    err_theta = torch.zeros(b, j, 4, 4, dtype=torch.float64)
    err_theta[0, 0, :, 0] = 0.2   # expert worse inside instance 0 -> d_0 = 0.2
    err_theta[0, 1, :, 1:] = 0.1  # negative worse inside instance 1 -> d_1 = -0.1 -> 0
    expert, negative = torch.tensor([[0, 0, -1]]), torch.tensor([[1, 1, -1]])
    loss = diffusion_dro_loss(err_theta, err_ref, expert, negative, coverage, margin=0.0)
    assert loss.item() == pytest.approx(0.25 * 0.2, abs=1e-12)
    _, weights, valid = diffusion_dro_differences(err_theta, err_ref, expert, negative, coverage)
    torch.testing.assert_close(weights, torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64))
    assert valid.tolist() == [[True, True, False]]
    # Same weights as DSPO (unpaired instances excluded from the normaliser).
    _, dspo_weights, _ = dspo_logits(err_theta, err_ref, coverage, expert, negative)
    torch.testing.assert_close(weights, dspo_weights)


def test_no_valid_pair_gives_zero_with_graph():
    err_theta = torch.rand(2, 2, 2, 2, requires_grad=True)
    loss = diffusion_dro_loss(err_theta, torch.rand(2, 2, 2, 2), torch.tensor([-1, -1]), torch.tensor([1, 1]))
    assert loss.item() == 0.0 and loss.requires_grad


def _dro_batch(coverage, expert=None, negative=None):
    """A :class:`PreferenceBatch` carrying Diffusion-DRO's expert / negative indices (no stored pairs)."""
    b, m = coverage.shape[:2]
    none = torch.full((b, m), -1)
    return PreferenceBatch(coverage=coverage, win=none, lose=none, pair=torch.full((b, 2), -1), num_candidates=2,
                           expert=expert, negative=negative)


def test_registered_wrapper():
    cri = build_loss({'type': 'DiffusionDROLoss', 'margin': 0.0, 'instance_level': True, 'loss_weight': 2.0})
    assert cri.log_key == 'l_dro' and cri.needs_reference and cri.model_type == 'DiffusionDROModel'
    assert cri.instance_level
    err_theta = _image_errors([[0.3, 0.5]])
    err_ref = _image_errors([[0.2, 0.6]])
    # One instance covering the image: the instance-level loss equals the image-level one.
    batch = _dro_batch(torch.ones(1, 1, 2, 2, dtype=torch.float64), expert=torch.tensor([[0]]),
                       negative=torch.tensor([[1]]))
    result = cri(err_theta, err_ref, batch)
    assert result.loss.item() == pytest.approx(2 * 0.2)
    # The result carries what the loss used: d = (0.3 - 0.2) - (0.5 - 0.6) = 0.2, logit = -d.
    assert result.logits.shape == (1, 1) and result.logits.item() == pytest.approx(-0.2)
    assert result.valid.all() and result.weights.item() == 1.0
    stats = result.statistics()
    assert stats['implicit_acc'].item() == 0.0 and stats['logit_mean'].item() == pytest.approx(-0.2)
    assert [stats[k].item() for k in ('err_theta_w', 'err_theta_l', 'err_ref_w', 'err_ref_l')] == \
        pytest.approx([0.3, 0.5, 0.2, 0.6])
    assert build_loss({'type': 'DiffusionDROLoss'}).margin == 1e-3


def test_wrapper_reads_the_batch_and_refuses_one_without_experts():
    err_theta = _image_errors([[0.30, 0.50], [0.10, 0.40]])
    err_ref = _image_errors([[0.20, 0.60], [0.20, 0.30]])
    # Two instances of different areas: image level ignores the coverage, instance level weighs by area.
    coverage = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    coverage[:, 0, 0], coverage[:, 1, 1] = 1, 1
    image = build_loss({'type': 'DiffusionDROLoss', 'margin': 1e-3})
    result = image(err_theta, err_ref, _dro_batch(coverage, torch.tensor([0, 0]), torch.tensor([1, 1])))
    assert result.loss.item() == pytest.approx((0.201 + 0.0) / 2, abs=1e-12) and result.logits.shape == (2, 1)
    instance = build_loss({'type': 'DiffusionDROLoss', 'margin': 1e-3, 'instance_level': True})
    per_instance = instance(err_theta, err_ref, _dro_batch(coverage, torch.tensor([[0, 0], [0, -1]]),
                                                           torch.tensor([[1, 1], [1, 1]])))
    assert per_instance.logits.shape == (2, 2)
    assert per_instance.valid.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError, match='model_type: DiffusionDROModel'):
        image(err_theta, err_ref, _dro_batch(coverage))
