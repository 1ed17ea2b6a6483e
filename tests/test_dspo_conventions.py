"""DSPO's conventions the paper leaves open, as DSPOLoss options (issue 23, item 6; docs/objectives.md)."""
import math

import pytest
import torch

from dspo_basicsr.bench.dspo_conventions import convention_figures
from dspo_basicsr.losses import dspo_logits, dspo_loss, instance_coverage, instance_error
from dspo_basicsr.losses.preference_loss import DSPOLoss, PreferenceBatch


def _problem(seed=0, b=2, k=3, m=4, h=8, w=8, factor=2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, m, (b, h * factor, w * factor), generator=g)
    coverage = instance_coverage(labels, m, factor)
    err_theta = torch.rand(b, k, h, w, generator=g, dtype=torch.float64)
    err_ref = torch.rand(b, k, h, w, generator=g, dtype=torch.float64)
    win = torch.zeros(b, m, dtype=torch.long)
    lose = torch.ones(b, m, dtype=torch.long)
    return err_theta, err_ref, coverage.double(), win, lose


def test_instance_error_sum_is_the_masked_sum_and_scales_logits_by_area():
    err_theta, err_ref, coverage, win, lose = _problem()
    area = coverage.sum(dim=(2, 3))  # (B, M) latent pixels
    by_hand = (err_theta[:, :, None] * coverage[:, None]).sum(dim=(3, 4))  # (B, K, M) sum over the mask
    torch.testing.assert_close(instance_error(err_theta, coverage, 'sum'), by_hand)
    mean_logits, _, _ = dspo_logits(err_theta, err_ref, coverage, win, lose, 8000.0)
    sum_logits, _, _ = dspo_logits(err_theta, err_ref, coverage, win, lose, 8000.0, instance_reduction='sum')
    torch.testing.assert_close(sum_logits, mean_logits * area)


def test_area_weights_all_normalise_over_all_instances_as_eq_3():
    err_theta, err_ref, coverage, win, lose = _problem()
    win[:, 1:] = -1  # only instance 0 of each sample is paired
    area = coverage.sum(dim=(2, 3))
    _, paired_weights, _ = dspo_logits(err_theta, err_ref, coverage, win, lose)
    _, all_weights, _ = dspo_logits(err_theta, err_ref, coverage, win, lose, area_normalisation='all')
    torch.testing.assert_close(paired_weights[:, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(all_weights[:, 0], area[:, 0] / area.sum(dim=1))  # its share of the image
    assert (all_weights[:, 1:] == 0).all()
    # every instance paired: the two normalisations agree (the instances partition the image)
    _, a, _ = dspo_logits(err_theta, err_ref, coverage, torch.zeros_like(lose), lose)
    _, b, _ = dspo_logits(err_theta, err_ref, coverage, torch.zeros_like(lose), lose, area_normalisation='all')
    torch.testing.assert_close(a, b)


def test_defaults_are_the_mean_and_paired_conventions_bit_for_bit():
    err_theta, err_ref, coverage, win, lose = _problem(seed=1)
    win[0, 2] = -1
    batch = PreferenceBatch(coverage=coverage, win=win, lose=lose, pair=torch.zeros(2, 2, dtype=torch.long),
                            num_candidates=3)
    default = DSPOLoss()(err_theta, err_ref, batch).loss
    assert torch.equal(default, DSPOLoss(instance_error='mean', area_weights='paired')(err_theta, err_ref, batch).loss)
    assert torch.equal(default, dspo_loss(err_theta, err_ref, coverage, win, lose))
    summed = DSPOLoss(instance_error='sum')(err_theta, err_ref, batch)
    assert torch.equal(summed.loss, dspo_loss(err_theta, err_ref, coverage, win, lose, instance_reduction='sum'))
    assert not torch.equal(summed.loss, default)
    overall = DSPOLoss(area_weights='all')(err_theta, err_ref, batch).loss
    assert torch.equal(overall, dspo_loss(err_theta, err_ref, coverage, win, lose, area_normalisation='all'))
    assert overall < default  # sample 0 has an unpaired instance: its paired weights sum to less than 1


def test_unknown_conventions_are_refused():
    with pytest.raises(ValueError, match="DSPOLoss instance_error 'median' is unknown; choose mean or sum"):
        DSPOLoss(instance_error='median')
    with pytest.raises(ValueError, match="DSPOLoss area_weights 'some' is unknown; choose paired or all"):
        DSPOLoss(area_weights='some')


def test_the_figures_of_docs_objectives():
    """The numbers docs/objectives.md quotes (scripts/dspo_conventions.py) at beta 8000, delta 1e-4."""
    rows = {(r['instance_error'], r['area_weights']): r for r in convention_figures(8000.0, 1e-4)}
    sigmoid = 1 / (1 + math.exp(0.8))
    for normalisation in ('paired', 'all'):
        mean, total = rows['mean', normalisation], rows['sum', normalisation]
        assert mean['logit'] == pytest.approx(0.8) and total['logit'] == pytest.approx(12.8)  # 16 latent pixels
        assert total['background_logit'] == pytest.approx(0.8 * 3824)
        # mean: every paired pixel is pushed alike; sum: the background saturates and gets no gradient
        assert mean['pixel_gradient'] == pytest.approx(8000 * sigmoid / 4096)
        assert mean['pixel_gradient'] == pytest.approx(mean['background_pixel_gradient'])
        assert total['pixel_gradient'] == pytest.approx(8000 * 16 / 4096 / (1 + math.exp(12.8)))
        assert total['background_pixel_gradient'] == 0
    only_small = {(r['instance_error'], r['area_weights']): r
                  for r in convention_figures(8000.0, 1e-4, paired=(True, False, False))}
    assert only_small['mean', 'paired']['weight'] == 1
    assert only_small['mean', 'paired']['pixel_gradient'] == pytest.approx(8000 * sigmoid / 16)  # 256 x
    assert only_small['mean', 'all']['pixel_gradient'] == pytest.approx(rows['mean', 'all']['pixel_gradient'])
