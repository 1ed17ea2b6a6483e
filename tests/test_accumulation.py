"""Gradient accumulation in DSPOModel / DiffusionDROModel: k micro-batches of b equal one batch of k*b."""
import glob
import os
import sys

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset

from basicsr.models import build_model

from conftest import run_cli, write_options
from dspo_fixtures import dspo_options, in_process_options, make_tiny_preference_set


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set4')), num_samples=4)


def _batch(tiny_set, rows, broken=()):
    dataset = PreferenceLMDBDataset({'name': 't', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb'],
                                     'phase': 'train', 'gt_size': 32, 'use_hflip': False, 'use_rot': False})
    items = [dataset[i] for i in rows]
    for item, row in zip(items, rows):
        if row in broken:
            item['candidates'] = item['candidates'] * float('nan')
    return dataset.collate_fn(items)


class FixedNoise:
    """Per-sample timesteps and noise that do not depend on how samples are grouped into micro-batches."""

    def __init__(self, model, num_samples=4):
        bare = model.bare
        generator = torch.Generator().manual_seed(7)
        self.timesteps = torch.randint(0, 1000, (num_samples,), generator=generator)
        self.noise = torch.randn((num_samples, bare.vae.config.latent_channels, 8, 8), generator=generator)
        self.rows = None
        real_inputs, real_encode = bare.diffusion_inputs, bare.encode_images

        def diffusion_inputs(latents, noise, t, cond):
            repeats = latents.shape[0] // len(self.rows)
            return real_inputs(latents, self.noise[self.rows].repeat_interleave(repeats, 0), t, cond)

        bare.diffusion_inputs = diffusion_inputs
        bare.training_timesteps = lambda batch, low, high, generator=None: self.timesteps[self.rows]
        bare.encode_images = lambda images, sample_posterior=False, generator=None: real_encode(images)

    def feed(self, model, tiny_set, rows, broken=()):
        self.rows = list(rows)
        model.feed_data(_batch(tiny_set, rows, broken))


def _options(tiny_set, tmp_path, k, dro=False, total_iter=4):
    tmp_path.mkdir(parents=True, exist_ok=True)
    opt = in_process_options(tiny_set, tmp_path)
    opt['train'].update(accumulate_grad_batches=k, total_iter=total_iter, grad_clip=2.5,
                        optim_g={'type': 'SGD', 'lr': 0.5})
    if dro:
        opt['model_type'] = 'DiffusionDROModel'
        opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': 1e-3, 'instance_level': True}
        opt['train']['dro'] = {'online_ratio': 0.0}
    return opt


def _run(tiny_set, tmp_path, k, windows, dro=False):
    """Train on ``windows`` (lists of rows of one optimizer update) as micro-batches of 4 // k samples."""
    model = build_model(_options(tiny_set, tmp_path, k, dro))
    noise = FixedNoise(model)
    current_iter = 0
    for rows, broken in windows:
        for start in range(0, 4, 4 // k):
            current_iter += 1
            model.update_learning_rate(current_iter)
            noise.feed(model, tiny_set, rows[start:start + 4 // k], broken)
            model.optimize_parameters(current_iter)
    return model


@pytest.mark.parametrize('dro', [False, True])
def test_two_micro_batches_of_two_equal_one_batch_of_four(tiny_set, tmp_path, dro):
    windows = [([0, 1, 2, 3], ()), ([3, 2, 1, 0], ())]
    whole = _run(tiny_set, tmp_path / 'whole', 1, windows, dro)
    micro = _run(tiny_set, tmp_path / 'micro', 2, windows, dro)
    initial = build_model(_options(tiny_set, tmp_path / 'init', 1, dro)).bare.trainable_state_dict()
    whole_state, micro_state = whole.bare.trainable_state_dict(), micro.bare.trainable_state_dict()
    assert any(not torch.equal(whole_state[key], initial[key]) for key in initial)
    for key in whole_state:
        torch.testing.assert_close(micro_state[key], whole_state[key], rtol=1e-4, atol=1e-5)
    log_whole, log_micro = whole.get_current_log(), micro.get_current_log()
    assert set(log_whole) == set(log_micro)
    for key in log_whole:  # the logs average the micro-batches (every sample has the same instance count)
        assert log_micro[key] == pytest.approx(log_whole[key], rel=1e-4, abs=1e-6), key


def test_nonfinite_micro_batch_skips_its_whole_window(tiny_set, tmp_path):
    # Sample 1 is broken in the first window: batch 4 skips the update; so must the window of 2 + 2, even though
    # its second micro-batch is finite. The second window trains both the same way.
    windows = [([0, 1, 2, 3], (1,)), ([3, 2, 1, 0], ())]
    whole = _run(tiny_set, tmp_path / 'whole', 1, windows)
    micro = _run(tiny_set, tmp_path / 'micro', 2, windows)
    assert whole.nonfinite_total == micro.nonfinite_total == 1
    assert whole.nonfinite_in_row == micro.nonfinite_in_row == 0
    whole_state, micro_state = whole.bare.trainable_state_dict(), micro.bare.trainable_state_dict()
    for key in whole_state:
        torch.testing.assert_close(micro_state[key], whole_state[key], rtol=1e-4, atol=1e-5)


def test_scheduler_steps_once_per_update(tiny_set, tmp_path):
    opt = _options(tiny_set, tmp_path, 2, total_iter=8)
    opt['train']['scheduler'] = {'type': 'MultiStepLR', 'milestones': [2], 'gamma': 0.1}
    model = build_model(opt)
    lrs = []
    for current_iter in range(1, 9):
        model.update_learning_rate(current_iter)
        lrs.append(model.get_current_learning_rate()[0])
    assert lrs == pytest.approx([0.5] * 4 + [0.05] * 4)  # updates 1, 2 at lr; updates 3, 4 after milestone 2


def test_resume_inside_a_window_continues_it(tiny_set, tmp_path):
    windows = [([0, 1, 2, 3], ()), ([3, 2, 1, 0], ())]
    straight = _run(tiny_set, tmp_path / 'straight', 2, windows)

    # Stop after micro-batch 3 (half of the second window), save, and resume in a fresh model.
    first_dir = tmp_path / 'first'
    first = build_model(_options(tiny_set, first_dir, 2))
    noise = FixedNoise(first)
    micro_batches = [[0, 1], [2, 3], [3, 2], [1, 0]]
    for current_iter, rows in enumerate(micro_batches[:3], 1):
        first.update_learning_rate(current_iter)
        noise.feed(first, tiny_set, rows)
        first.optimize_parameters(current_iter)
    first.save(0, 3)
    assert os.path.isfile(first_dir / 'states' / '3.window_rank0.pth')

    opt = _options(tiny_set, first_dir, 2)
    opt['path']['pretrain_network_g'] = str(first_dir / 'models' / 'net_g_3.pth')
    opt['path']['resume_state'] = str(first_dir / 'states' / '3.state')
    resumed = build_model(opt)
    resumed.resume_training(torch.load(first_dir / 'states' / '3.state', weights_only=True))
    noise = FixedNoise(resumed)
    resumed.update_learning_rate(4)
    noise.feed(resumed, tiny_set, micro_batches[3])
    resumed.optimize_parameters(4)
    expected, got = straight.bare.trainable_state_dict(), resumed.bare.trainable_state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    assert resumed.get_current_log()['l_dspo'] == pytest.approx(straight.get_current_log()['l_dspo'], rel=1e-5)


def test_total_iter_must_hold_whole_windows(tiny_set, tmp_path):
    with pytest.raises(ValueError, match='multiple of train.accumulate_grad_batches'):
        build_model(_options(tiny_set, tmp_path, 2, total_iter=3))


@pytest.mark.slow
def test_two_process_gloo_run_accumulates_trains_and_saves_once(tiny_set, tmp_path):
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port=29623']
    opt = dspo_options(tiny_set, name='dspo_accum_ddp', total_iter=2, save_every=2, val=False)
    opt['datasets']['train']['batch_size_per_gpu'] = 1
    opt['train']['accumulate_grad_batches'] = 2
    result = run_cli(['train', '-opt', write_options(tmp_path / 'ddp.yml', opt), '--launcher', 'pytorch'],
                     cwd=tmp_path, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'dspo_accum_ddp'
    log = ''.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log')))
    assert 'l_dspo' in log and 'End of training' in log
    assert sorted(os.listdir(exp / 'models')) == ['net_g_2.pth', 'net_g_latest.pth']
    assert sorted(os.listdir(exp / 'training_states')) == ['2.state', 'train_set.json']
