"""The parts DSPOModel delegates to: gradient accumulation and its files, preference validation, input overrides."""
import types

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
from dspo_basicsr.losses.preference_loss import logit_statistics
from dspo_basicsr.models.accumulation import GradientAccumulation
from dspo_basicsr.models.candidate_images import gather_images
from dspo_basicsr.models.dspo_model import DiffusionInputOverrides
from dspo_basicsr.models.preference_validation import PreferenceValidationSettings, validate_preferences

from basicsr.models import build_model

from dspo_fixtures import in_process_options, make_tiny_preference_set, preference_batch


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def test_update_counting_of_three_micro_batches():
    acc = GradientAccumulation(3)
    assert [acc.update_index(i) for i in range(1, 8)] == [0, 0, 0, 1, 1, 1, 2]
    assert [acc.starts_update(i) for i in range(1, 5)] == [True, False, False, True]
    assert [acc.ends_update(i) for i in range(1, 5)] == [False, False, True, False]
    window, fresh = acc.open(1)
    assert fresh and acc.open(2) == (window, False)
    assert acc.close() is window and acc.window is None
    assert acc.open(3)[1]  # no window open (a resume without its file): a new one


def test_window_save_and_resume_round_trip(tmp_path):
    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    net(torch.ones(1, 3)).sum().backward()
    acc = GradientAccumulation(4)
    window, _ = acc.open(5)
    window.add({'l_dspo': torch.tensor(0.5), 'implicit_acc': torch.tensor(1.0)})
    window.add({'l_dspo': torch.tensor(1.5), 'implicit_acc': torch.tensor(0.0)})
    window.finite = False
    path = GradientAccumulation.window_path(str(tmp_path), 6, 1)
    assert path == str(tmp_path / '6.window_rank1.pth')
    acc.save(path, dict(net.named_parameters()))

    fresh = torch.nn.Linear(3, 2)
    resumed = GradientAccumulation(4)
    assert resumed.resume(6, path, dict(fresh.named_parameters()), torch.device('cpu'))
    assert torch.equal(fresh.weight.grad, net.weight.grad) and fresh.bias.grad is None  # frozen: not saved
    assert resumed.window.count == 2 and resumed.window.finite is False
    assert {k: v.item() for k, v in resumed.window.mean().items()} == {'l_dspo': 1.0, 'implicit_acc': 0.5}
    # The resumed window is the one iteration 7 adds to (not a new one).
    assert resumed.open(7) == (resumed.window, False)


def test_resume_at_an_update_boundary_or_without_the_file(tmp_path, caplog):
    net = torch.nn.Linear(3, 2)
    acc = GradientAccumulation(2)
    assert not acc.resume(4, str(tmp_path / 'none.pth'), dict(net.named_parameters()), torch.device('cpu'))
    assert not acc.resume(5, str(tmp_path / 'missing.pth'), dict(net.named_parameters()), torch.device('cpu'))
    assert acc.window is None and net.weight.grad is None
    acc.save(str(tmp_path / 'nothing.pth'), dict(net.named_parameters()))  # no window open: nothing written
    assert not (tmp_path / 'nothing.pth').exists()


def test_gather_images_picks_per_lq_input():
    images = torch.arange(2 * 3 * 2 * 2 * 2).view(2, 3, 2, 2, 2)
    index = torch.tensor([[2, 0], [1, 1]])
    picked = gather_images(images, index)
    assert picked.shape == (2, 2, 2, 2, 2)
    assert torch.equal(picked[0, 0], images[0, 2]) and torch.equal(picked[1, 1], images[1, 1])


def test_logit_statistics_by_hand():
    stats = logit_statistics(torch.tensor([2.0, -1.0, 0.0, 4.0]))
    assert stats['implicit_acc'].item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert stats['logit_mean'].item() == pytest.approx(1.25)
    masked = logit_statistics(torch.tensor([2.0, -1.0, 0.0, 4.0]), torch.tensor([False, True, True, False]))
    assert masked['implicit_acc'].item() == pytest.approx(0.25) and masked['logit_mean'].item() == -0.5
    assert logit_statistics(torch.zeros(0))['implicit_acc'].item() == 0.5


def _perturbed_model(tiny_set, tmp_path, **options):
    """A DSPOModel whose trainable weights moved off the reference by a fixed pattern (so logits are not 0)."""
    model = build_model(in_process_options(tiny_set, tmp_path, **options))
    with torch.no_grad():
        for p in model.bare.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    return model


def _validation_loader(tiny_set):
    dataset = PreferenceLMDBDataset({'name': 'val', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb'],
                                     'phase': 'val'})
    return types.SimpleNamespace(dataset=dataset, collate_fn=dataset.collate_fn)


@pytest.mark.parametrize('feedback', [None, 2.0])
def test_preference_validation_gives_the_numbers_of_before_the_split(tiny_set, tmp_path, feedback):
    # Expected: DSPOModel.preference_validation of main at commit 3354736 (before it moved to
    # models/preference_validation.py), on this tiny set and perturbation, timesteps [100, 500, 900], seed 3,
    # beta 500 of the training loss; the same with train.feedback_guidance_scale 2.0, which validation leaves out.
    model = _perturbed_model(tiny_set, tmp_path, feedback=feedback)
    settings = PreferenceValidationSettings.for_objective(model.cri_pref, timesteps=[100, 500, 900], seed=3)
    assert (settings.beta, settings.instance_reduction) == (500.0, 'mean')
    results = validate_preferences(model, _validation_loader(tiny_set), settings)
    assert results['implicit_acc'] == pytest.approx(0.5925925970077515, rel=1e-6)
    assert results['logit_mean'] == pytest.approx(1.9818038940429688, rel=1e-4)
    assert model.feedback_scale == feedback and model.bare.training
    # What the model logs is the same, and the best values are kept per set.
    model.opt['val'] = {'preference_timesteps': [100, 500, 900], 'preference_seed': 3}
    model.preference_validation(_validation_loader(tiny_set), 7, None)
    assert model.metric_results == results
    assert model.best_metric_results['val']['implicit_acc'] == dict(better='higher', val=results['implicit_acc'],
                                                                      iter=7)


def test_validation_beta_follows_the_objective_unless_set():
    sft = types.SimpleNamespace()  # an objective without beta or instance error (SFT, DRO)
    assert PreferenceValidationSettings.for_objective(sft, [500], 0).beta == 8000.0
    dspo = types.SimpleNamespace(beta=250.0, instance_error='sum')
    assert PreferenceValidationSettings.for_objective(dspo, [500], 0) == PreferenceValidationSettings([500], 0, 250.0,
                                                                                                      'sum')
    assert PreferenceValidationSettings.for_objective(None, [500], 0, beta=100).beta == 100.0


def test_input_overrides_replace_only_their_rows(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    index = model.all_candidates()  # (2, 3)
    latents = model.encode_candidates(index, torch.Generator().manual_seed(0)).unflatten(0, index.shape)
    t = torch.tensor([300, 600])

    def errors(overrides=None):
        with torch.no_grad():
            return model.denoising_errors(latents=latents, generator=torch.Generator().manual_seed(1), timesteps=t,
                                          overrides=overrides)

    plain_theta, plain_ref = errors()
    row = 1 * 3 + 2  # LQ 1, column 2 of the flattened (B*J) stack
    target = torch.zeros((1, *latents.shape[2:]))
    theta, ref = errors(DiffusionInputOverrides(torch.tensor([row]), latents[1, 2:3] * 0 + 0.5, target))
    changed = torch.zeros(2, 3, dtype=torch.bool)
    changed[1, 2] = True
    # (the other rows go through the same batched networks: equal up to float reordering)
    torch.testing.assert_close(theta[~changed], plain_theta[~changed], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref[~changed], plain_ref[~changed], rtol=1e-5, atol=1e-6)
    assert (theta[1, 2] - plain_theta[1, 2]).abs().max() > 1e-2
    with pytest.raises(ValueError, match='index'):
        model.denoising_errors()  # neither candidates nor latents


@pytest.mark.parametrize('model_type', ['DSPOModel', 'DiffusionDROModel'])
def test_every_attribute_exists_from_init(tiny_set, tmp_path, model_type):
    opt = in_process_options(tiny_set, tmp_path)
    if model_type == 'DiffusionDROModel':
        opt.update(model_type=model_type)
        opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': 1e-3}
        opt['train']['dro'] = {'sampler_steps': 2, 'online_ratio': 1.0}
    opt['val'] = {'preference_timesteps': [500]}
    model = build_model(opt)
    attributes = set(vars(model))
    data = preference_batch(tiny_set)
    model.feed_data(data)
    model.optimize_parameters(1)
    model.save(0, 1)
    model.nondist_validation(_validation_loader(tiny_set), 1, None, False)
    assert set(vars(model)) == attributes
    without_gt = {k: v for k, v in data.items() if k != 'gt'}
    model.feed_data(without_gt)
    assert model.gt is None  # not the previous batch's
