"""OnlineGroupModel: groups sampled from the policy (or its frozen copy), scored per instance, trained with DSPO."""
import math
import os
import sys

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registers the model)
from dspo_basicsr.models.online_group_model import group_labels, instance_psnr

from basicsr.models import build_model

from biqa_fixtures import tiny_rank_calibrated_iqa
from conftest import run_cli, write_options
from dspo_fixtures import (
    complete_for_in_process,
    dspo_options,
    in_process_options,
    make_tiny_preference_set,
    preference_batch,
)


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def test_instance_psnr_and_group_labels():
    gt = torch.full((1, 3, 2, 2), 0.5)
    seg = torch.tensor([[[0, 0], [1, 1]]])
    candidates = gt[:, None].repeat(1, 3, 1, 1, 1)
    candidates[0, 0, :, 0] += 0.1  # candidate 0: error 0.1 in instance 0 only
    candidates[0, 1, :, 1] += 0.2  # candidate 1: error 0.2 in instance 1 only
    candidates[0, 2] += 0.05       # candidate 2: error 0.05 everywhere
    scores = instance_psnr(candidates, gt, seg, num_instances=3)
    assert scores.shape == (1, 3, 3)
    assert scores[0, 0, 0].item() == pytest.approx(-10 * math.log10(0.01), rel=1e-4)
    assert torch.isnan(scores[0, 2]).all()  # no pixel: padding
    win, lose = group_labels(scores)
    assert win.tolist() == [[1, 0, -1]] and lose.tolist() == [[0, 1, -1]]


def _options(tiny_set, tmp_path, **online):
    opt = in_process_options(tiny_set, tmp_path)
    opt['model_type'] = 'OnlineGroupModel'
    opt['train']['online'] = dict(dict(group_size=3, steps=2), **online)
    opt['path']['visualization'] = str(tmp_path / 'visualization')
    return opt


def test_online_step_trains_dspo_on_a_policy_group(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path, sheet_freq=1))
    data = preference_batch(tiny_set)
    model.feed_data(data)
    before = [p.detach().clone() for p in model.trainable_params]
    model.optimize_parameters(1)
    assert model.candidates.shape == (2, 3, 3, 32, 32)  # G policy samples replaced the 3 stored candidates
    assert not torch.equal(model.candidates[0, 0], data['candidates'][0, 0])
    scores = torch.nan_to_num(model.group_rewards, nan=-1.0)
    paired = model.win >= 0
    assert paired.any()
    assert torch.equal(model.win[paired], scores.argmax(-1)[paired])
    assert math.isfinite(model.log_dict['online_reward']) and 'l_dspo' in model.log_dict
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_params))
    assert (tmp_path / 'visualization' / 'online_groups' / 'group_000001.png').is_file()


def test_groups_depend_only_on_the_iteration_so_a_resume_samples_the_same(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    first, _ = model.sample_group(7)
    model.feed_data(preference_batch(tiny_set))
    again, _ = model.sample_group(7)
    other, _ = model.sample_group(8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0, 0], first[0, 1])  # the group is diverse


def test_share_mixes_online_and_stored_steps_and_bad_options_fail(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path, share=0.25))
    assert sum(model.is_online_step(i) for i in range(1, 101)) == 25
    with pytest.raises(ValueError, match='group_size'):
        build_model(_options(tiny_set, tmp_path, group_size=1))
    with pytest.raises(ValueError, match="unknown option 'train.online.sample_every'"):
        build_model(_options(tiny_set, tmp_path, sample_every=2))


# ---------------------------------------------------------------------- the reward without a GT
def _set_without_gt(source, path):
    import dataclasses

    from dspo_basicsr.data.preference_set import PreferenceLMDB, write_preference_lmdb
    store = PreferenceLMDB(source)
    samples = [dataclasses.replace(store[sid], gt=None) for sid in store.ids()]
    write_preference_lmdb(path, samples, scale=4, progress=False)
    return path


def test_biqa_reward_ranks_the_group_on_a_set_without_gt_and_psnr_is_refused_there(tiny_set, tmp_path):
    from dspo_basicsr.preference.instance_scoring import BIQAInstanceScorer, load_biqa_quality
    no_gt = dict(tiny_set, lmdb=_set_without_gt(tiny_set['lmdb'], str(tmp_path / 'no_gt.lmdb')))
    with pytest.raises(ValueError, match=r'reward psnr scores against the GT, but 0 of the 3 samples of .*no_gt.lmdb'):
        build_model(_options(no_gt, tmp_path))
    network, checkpoint, _ = tiny_rank_calibrated_iqa(tmp_path)
    reward = {'type': 'biqa', 'network': network, 'checkpoint': checkpoint, 'min_crop': 16}
    model = build_model(_options(no_gt, tmp_path, reward=reward, sheet_freq=1))
    model.feed_data(preference_batch(no_gt))
    assert getattr(model, 'gt', None) is None
    model.optimize_parameters(1)
    scores = model.group_rewards
    assert scores.shape == (2, 4, 3) and torch.isfinite(scores).all()
    # the same numbers as the data steps' BIQA scorer on the same samples
    scorer = BIQAInstanceScorer(load_biqa_quality(network, checkpoint), min_crop=16)
    from dspo_basicsr.models.online_group_model import scorer_rewards
    again = scorer_rewards(scorer, model.candidates, model.seg, 4, model.lq)
    assert torch.allclose(scores, again)
    paired = model.win >= 0
    assert paired.any() and torch.equal(model.win[paired], scores.argmax(-1)[paired])
    assert math.isfinite(model.log_dict['online_reward']) and 'l_dspo' in model.log_dict
    assert (tmp_path / 'visualization' / 'online_groups' / 'group_000001.png').is_file()
    with pytest.raises(ValueError, match="train.online.reward.*type one of psnr, metric, biqa"):
        build_model(_options(tiny_set, tmp_path, reward={'type': 'vlm'}))


# ---------------------------------------------------------------------- the sampling copy
def test_refresh_counts_optimizer_updates():
    from dspo_basicsr.models.lagged_policy import LaggedPolicy, refresh_due
    copy = LaggedPolicy()
    assert refresh_due(copy, 5, 3)
    copy.synced_iter, copy.state = 1, {}
    assert [refresh_due(copy, i, 3) for i in (2, 3, 4)] == [False, False, True]
    # accumulation 2: iterations 1-2 are update 1, 3-4 update 2, ...; a copy synced at 1 is due at iteration 7
    assert [refresh_due(copy, i, 3, accumulate=2) for i in (2, 6, 7)] == [False, False, True]


def test_groups_come_from_the_frozen_copy_until_it_is_refreshed_and_resume_restores_it(tiny_set, tmp_path, caplog):
    model = build_model(_options(tiny_set, tmp_path, refresh_every=2))
    model.feed_data(preference_batch(tiny_set))
    initial = {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}
    model.optimize_parameters(1)  # syncs the copy to the initial weights, then updates the policy
    copy = model.sampling_copy
    assert copy.version == 1 and copy.synced_iter == 1
    assert all(torch.equal(copy.state[k], initial[k]) for k in initial)
    model.feed_data(preference_batch(tiny_set))
    from_copy, _ = model.sample_group(2)  # not due: the copy (the initial weights) samples
    assert copy.version == 1
    fresh = build_model(_options(tiny_set, tmp_path))  # refresh_every 0: its own (initial) weights sample
    fresh.feed_data(preference_batch(tiny_set))
    assert torch.equal(from_copy, fresh.sample_group(2)[0])
    policy_model = build_model(_options(tiny_set, tmp_path))
    policy_model.bare.load_trainable_state_dict(model.bare.trainable_state_dict())
    policy_model.feed_data(preference_batch(tiny_set))
    assert not torch.equal(from_copy, policy_model.sample_group(2)[0])  # the updated policy samples otherwise

    model.save(0, 2)
    resume_state = torch.load(str(tmp_path / 'states' / '2.state'), weights_only=True)
    resumed = build_model(_options(tiny_set, tmp_path, refresh_every=2))
    resumed.resume_training(resume_state)
    restored = resumed.sampling_copy
    assert restored.version == 1 and restored.synced_iter == 1
    assert all(torch.equal(restored.state[k], copy.state[k]) for k in copy.state)
    assert not resumed.refresh_sampling_copy(2) and resumed.refresh_sampling_copy(3)  # due at the next update

    from dspo_basicsr.models.lagged_policy import LaggedPolicy, restore_lagged_policy
    with pytest.raises(ValueError, match="other.pth: the saved sampling copy does not match network_g's trainable"):
        restore_lagged_policy(LaggedPolicy(), {'state': {'x': torch.zeros(1)}, 'version': 1, 'synced_iter': 1},
                              resumed.bare, 'other.pth')
    (tmp_path / 'states' / '2.sampling_copy.pth').unlink()
    without = build_model(_options(tiny_set, tmp_path, refresh_every=2))
    with caplog.at_level('WARNING', logger='basicsr'):
        without.resume_training(resume_state)
    assert without.sampling_copy.state is None and 'sampling copy is rebuilt' in caplog.text


# ---------------------------------------------------------------------- group-normalised advantages
def test_group_advantages_follow_gdpo_sr_and_reduce_to_dspo_for_two_samples():
    from dspo_basicsr.losses.group_advantages import group_advantage_loss, group_advantages
    from dspo_basicsr.losses.preference_loss import dspo_logits
    scores = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [1.0, float('nan'), 0.0]]])
    advantages, valid = group_advantages(scores)
    assert valid.tolist() == [[True, False, False]]  # no spread / an unscored sample: no preference
    assert torch.allclose(advantages[0, 0], torch.tensor([-1.0, 0.0, 1.0]))  # (r - mean) / unbiased std
    assert (advantages[0, 1:] == 0).all()
    torch.manual_seed(0)
    err_theta, err_ref = torch.rand(2, 2, 4, 4), torch.rand(2, 2, 4, 4)
    coverage = torch.zeros(2, 2, 4, 4)
    coverage[:, 0, :2], coverage[:, 1, 2:] = 1, 1
    two = torch.tensor([[[0.3, 0.1], [0.0, 0.2]]] * 2)  # instance 0: sample 0 better; instance 1: sample 1
    loss, logits, weights, valid = group_advantage_loss(err_theta, err_ref, coverage, two, beta=100.0)
    win, lose = two.argmax(-1), two.argmin(-1)
    reference, _, _ = dspo_logits(err_theta, err_ref, coverage, win, lose, beta=100.0)
    # A = +-1/sqrt(2) for two samples, so the logit is DSPO's scaled by 1 / (2 sqrt(2))
    assert torch.allclose(logits, reference / (2 * math.sqrt(2)), atol=1e-6)
    assert valid.all() and torch.allclose(weights.sum(1), torch.ones(2))
    assert torch.isclose(loss, -(weights * torch.nn.functional.logsigmoid(logits)).sum(1).mean())


def test_advantages_objective_trains_on_every_group_sample(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path, objective='advantages'))
    model.feed_data(preference_batch(tiny_set))
    before = [p.detach().clone() for p in model.trainable_params]
    model.optimize_parameters(1)
    assert 'l_dspo' in model.log_dict and math.isfinite(model.log_dict['l_dspo'])
    assert 0 <= model.log_dict['implicit_acc'] <= 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_params))
    with pytest.raises(ValueError, match="train.online.objective"):
        build_model(_options(tiny_set, tmp_path, objective='grpo'))


# ---------------------------------------------------------------------- one-step OSEDiff: noise at the start latent
@pytest.fixture(scope='module')
def osediff(tmp_path_factory):
    from framework_fixtures import framework_setup
    return framework_setup(tmp_path_factory.mktemp('osediff'), 'osediff')


def test_osediff_group_is_diverse_with_start_noise_and_zero_noise_is_the_framework_sample(osediff, tmp_path, tiny_set):
    from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
    from dspo_basicsr.demo.dspo import set_posterior_std

    from framework_fixtures import framework_options
    opt = complete_for_in_process(framework_options('osediff', osediff, osediff['lmdb'], val=False), tmp_path)
    opt['model_type'] = 'OnlineGroupModel'
    opt['train']['online'] = {'group_size': 3, 'noise_timestep': 250}
    model = build_model(opt)
    bare = model.bare.eval()
    set_posterior_std(bare.lq_vae, 1e-3)  # nearly deterministic, as SD's VAE (the tiny random one's std is about 1)
    lq = preference_batch({'lmdb': osediff['lmdb']})['lq'][:1].expand(3, -1, -1, -1)
    options = {'prompt': '', 'guidance_scale': 1.0}
    plain = sample_with_options(bare, lq, options, torch.Generator().manual_seed(3), noise_timestep=0)
    assert torch.equal(plain, sample_with_options(bare, lq, options, torch.Generator().manual_seed(3)))
    noisy = sample_with_options(bare, lq, options, torch.Generator().manual_seed(3), noise_timestep=250)
    assert not torch.equal(noisy[0], noisy[1])
    assert noisy.std(0).mean() > 10 * plain.std(0).mean()  # the noise, not the posterior sample, spreads the group
    model.feed_data(preference_batch({'lmdb': osediff['lmdb']}))
    model.optimize_parameters(1)
    assert model.candidates.shape[1] == 3 and 'l_dspo' in model.log_dict
    with pytest.raises(ValueError, match='noise_timestep = 250 noises the start latent of a one-step framework'):
        build_model(_options(tiny_set, tmp_path, noise_timestep=250))


@pytest.mark.slow
def test_two_ranks_train_online_groups_and_a_resumed_run_ends_with_the_same_weights(tiny_set, tmp_path):
    """Under torchrun: each rank samples the groups of its own LQs, rank 0 writes the sheet and the sampling
    copy, and a run stopped at iteration 2 and resumed ends with the weights of the uninterrupted run."""
    def options(name, total_iter):
        opt = dspo_options(tiny_set, name=name, total_iter=total_iter, save_every=2, val=False)
        opt['model_type'] = 'OnlineGroupModel'
        opt['train']['online'] = {'group_size': 2, 'steps': 2, 'refresh_every': 3, 'sheet_freq': 2}
        return write_options(tmp_path / f'{name}_{total_iter}.yml', opt)

    def train(option_file, port, *extra):
        torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                    f'--master_port={port}']
        result = run_cli(['train', '-opt', option_file, '--launcher', 'pytorch', *extra], cwd=tmp_path,
                         launcher=torchrun)
        assert result.returncode == 0, result.stderr[-3000:]

    train(options('straight', 4), 29661)
    train(options('resumed', 2), 29662)
    train(options('resumed', 4), 29663, '--auto_resume')
    straight, resumed = tmp_path / 'experiments' / 'straight', tmp_path / 'experiments' / 'resumed'
    assert (resumed / 'training_states' / '2.sampling_copy.pth').is_file()
    assert (straight / 'visualization' / 'online_groups' / 'group_000004.png').is_file()
    a = torch.load(straight / 'models' / 'net_g_4.pth', weights_only=True)['params']
    b = torch.load(resumed / 'models' / 'net_g_4.pth', weights_only=True)['params']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
