"""DiffusionDROModel: experts and negatives, online negatives of a lagged copy, replay buffer, resume."""
import math

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)

from basicsr.models import build_model

from dspo_fixtures import in_process_options, make_tiny_preference_set, preference_batch


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def _dro_opt(tiny_set, tmp_path, margin=1e-3, instance_level=False, **dro):
    opt = in_process_options(tiny_set, tmp_path)
    opt['model_type'] = 'DiffusionDROModel'
    opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': margin, 'instance_level': instance_level}
    opt['train']['dro'] = {'sampler_steps': 4, 'sampler': 'ddim', 'buffer_size': 8, **dro}
    return opt


def _trainable(model):
    return {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}


def _equal_states(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('instance_level,expert,online_ratio', [
    (False, 'preferred', 0.0), (False, 'gt', 1.0), (True, 'preferred', 0.5), (True, 'gt', 1.0)])
def test_dro_steps_train_the_policy(tiny_set, tmp_path, instance_level, expert, online_ratio):
    model = build_model(_dro_opt(tiny_set, tmp_path, instance_level=instance_level, expert=expert,
                                 online_ratio=online_ratio, guidance_scale=None if instance_level else 2.0))
    data = preference_batch(tiny_set)
    before = _trainable(model)
    for step in range(2):
        model.feed_data(data)
        model.optimize_parameters(step + 1)
    log = model.get_current_log()
    assert {'l_dro', 'implicit_acc', 'logit_mean', 'err_theta_w', 'err_ref_l', 'online_share'} <= set(log)
    assert math.isfinite(log['l_dro'])
    assert not _equal_states(before, model.bare.trainable_state_dict())
    if online_ratio == 0:
        assert model.lagged.state is None and len(model.negative_buffer) == 0


@pytest.mark.parametrize('instance_level', [False, True])
def test_online_negative_target_is_the_lagged_copys_own_prediction(tiny_set, tmp_path, instance_level):
    # At initialisation policy = reference = lagged copy, so on the copy's own trajectory the policy and the
    # reference predict exactly the recorded target: the negative's errors vanish and the loss is the margin.
    model = build_model(_dro_opt(tiny_set, tmp_path, margin=0.01, instance_level=instance_level, online_ratio=1.0,
                                 guidance_scale=3.0))
    model.feed_data(preference_batch(tiny_set))
    model.refresh_lagged_policy(1)
    result = model.preference_loss()
    loss, stats = result.loss, model.training_statistics(result)
    assert stats['online_share'].item() == 1.0
    assert stats['err_theta_l'].item() == pytest.approx(0.0, abs=1e-10)
    assert stats['err_ref_l'].item() == pytest.approx(0.0, abs=1e-10)
    assert stats['err_theta_w'].item() > 0
    assert loss.item() == pytest.approx(0.01, abs=1e-6)


def test_replay_buffer_refreshes_on_schedule_with_detached_samples(tiny_set, tmp_path):
    model = build_model(_dro_opt(tiny_set, tmp_path, online_ratio=1.0, refresh_every=2))
    data = preference_batch(tiny_set)
    history = []
    for step in range(1, 6):
        weights_before_step = _trainable(model)
        model.feed_data(data)
        model.optimize_parameters(step)
        buffer = model.negative_buffer
        history.append((model.lagged.version, model.lagged.synced_iter, buffer.generated, len(buffer)))
        if model.lagged.synced_iter == step:  # synced at this step: the copy holds the weights before its update
            assert _equal_states(model.lagged.state, weights_before_step)
        for entry in buffer.entries.values():
            assert entry.version == model.lagged.version
            for tensor in (entry.latents, entry.predictions, entry.final):
                assert not tensor.requires_grad and tensor.grad_fn is None
    # Synced at iterations 1, 3, 5; the same two LQ inputs are sampled once per version and reused in between.
    assert history == [(1, 1, 2, 2), (1, 1, 2, 2), (2, 3, 4, 2), (2, 3, 4, 2), (3, 5, 6, 2)]
    assert model.negative_buffer.reused == 4  # two inputs at iterations 2 and 4
    # The lagged copy lags: after the update of iteration 5 the policy has moved away from it.
    assert not _equal_states(model.lagged.state, model.bare.trainable_state_dict())


def test_buffer_capacity_drops_the_oldest(tiny_set, tmp_path):
    model = build_model(_dro_opt(tiny_set, tmp_path, online_ratio=1.0, buffer_size=1))
    model.feed_data(preference_batch(tiny_set))
    model.optimize_parameters(1)
    assert len(model.negative_buffer) == 1 and model.negative_buffer.generated == 2


def test_resume_rebuilds_the_lagged_copy_from_the_resumed_policy(tiny_set, tmp_path):
    model = build_model(_dro_opt(tiny_set, tmp_path, online_ratio=1.0, refresh_every=100))
    data = preference_batch(tiny_set)
    initial = _trainable(model)
    for step in range(1, 4):
        model.feed_data(data)
        model.optimize_parameters(step)
    assert _equal_states(model.lagged.state, initial)  # synced at iteration 1 only
    trained = _trainable(model)
    model.save(0, 3)
    saved = torch.load(tmp_path / 'models' / 'net_g_3.pth', weights_only=True)['params']
    assert set(saved) == set(trained)  # the policy's trainable weights only: no lagged copy, no reference
    state = torch.load(tmp_path / 'states' / '3.state', weights_only=True)
    # BasicSR's keys and the exact-resume bookkeeping (docs/reliability.md); no lagged copy, no buffer
    assert set(state) == {'epoch', 'iter', 'optimizers', 'schedulers', 'rng', 'world_size', 'batch_size_per_gpu'}

    opt = _dro_opt(tiny_set, tmp_path, online_ratio=1.0, refresh_every=100)
    opt['path']['pretrain_network_g'] = str(tmp_path / 'models' / 'net_g_3.pth')
    resumed = build_model(opt)
    assert resumed.lagged.state is None and len(resumed.negative_buffer) == 0
    resumed.feed_data(data)
    resumed.optimize_parameters(4)
    assert resumed.lagged.synced_iter == 4 and resumed.lagged.version == 1
    assert _equal_states(resumed.lagged.state, trained)
    assert not _equal_states(resumed.lagged.state, model.lagged.state)


def test_option_errors_are_actionable(tiny_set, tmp_path):
    opt = _dro_opt(tiny_set, tmp_path)
    opt['model_type'] = 'DSPOModel'
    with pytest.raises(ValueError, match='use DiffusionDROModel'):
        build_model(opt)
    with pytest.raises(ValueError, match=r"unknown option 'train.dro.buffer'"):
        build_model(_dro_opt(tiny_set, tmp_path, buffer=3))
    opt = _dro_opt(tiny_set, tmp_path, online_ratio=1.0, sampler_steps=2)
    opt['train']['timestep_range'] = [600, 700]
    with pytest.raises(ValueError, match='none inside train.timestep_range'):
        build_model(opt)


def test_same_lq_twice_in_a_batch_is_sampled_once(tiny_set, tmp_path):
    from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
    dataset = PreferenceLMDBDataset({'name': 't', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb'],
                                     'phase': 'train', 'gt_size': 32, 'use_hflip': False, 'use_rot': False})
    model = build_model(_dro_opt(tiny_set, tmp_path, online_ratio=1.0))
    model.feed_data(dataset.collate_fn([dataset[0], dataset[0]]))
    model.optimize_parameters(1)
    assert model.negative_buffer.generated == 1 and len(model.negative_buffer) == 1


def test_upstream_sampler_dpm_solver_with_perturbed_timesteps(tiny_set, tmp_path):
    # Diffusion-DRO as its authors sample online negatives (basiclab/DiffusionDRO train.py): DPM-Solver++ on
    # evenly spaced timesteps shifted per trajectory by an offset in [0, T // S).
    from dspo_basicsr.models.online_negatives import perturbed_timesteps
    ts = perturbed_timesteps(1000, 4, torch.Generator().manual_seed(0))
    assert ts.tolist() == [750 + ts[-1].item(), 500 + ts[-1].item(), 250 + ts[-1].item(), ts[-1].item()]
    assert 0 <= ts[-1] < 250
    model = build_model(_dro_opt(tiny_set, tmp_path, margin=0.01, online_ratio=1.0, sampler='dpmsolver++',
                                 perturb_timesteps=True, guidance_scale=1.0))
    model.feed_data(preference_batch(tiny_set))
    model.refresh_lagged_policy(1)
    result = model.preference_loss()
    stats = model.training_statistics(result)
    entries = list(model.negative_buffer.entries.values())
    assert len(entries) >= 2 and len({tuple(e.timesteps.tolist()) for e in entries}) > 1  # own timesteps each
    # On its own perturbed trajectory the lagged copy (= policy = reference at start) has zero error.
    assert stats['err_theta_l'].item() == pytest.approx(0.0, abs=1e-10)
    assert result.loss.item() == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(ValueError, match='perturb_timesteps needs'):
        from dspo_basicsr.models.online_negatives import sample_trajectory
        sample_trajectory(model.bare, {}, (1, 4, 8, 8), 4, 'ddim', perturb_timesteps=True)
