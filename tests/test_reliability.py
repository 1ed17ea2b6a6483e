"""Training survives kills and races: rank-0 atomic checkpoints, resume fallback, exact resume."""
import glob
import os
import sys

import pytest
import torch
from test_cli import msrresnet_options

from conftest import after_step_script, run_cli, write_options

#: SIGKILL after a step: no cleanup, no flush, as a pre-empted job dies
KILL = 'os.kill(os.getpid(), signal.SIGKILL)'


def torchrun(nproc, port):
    return [os.path.join(os.path.dirname(sys.executable), 'torchrun'), f'--nproc_per_node={nproc}',
            f'--master_port={port}']


def augmenting_options(paired_folders, name, total_iter, save_every):
    """MSRResNet with random crops, flips and a shuffled, enlarged set (6 batches an epoch)."""
    opt = msrresnet_options(*paired_folders, name=name, total_iter=total_iter, save_every=save_every)
    opt['datasets']['train']['dataset_enlarge_ratio'] = 3
    opt.pop('val')
    return opt


@pytest.mark.slow
def test_two_processes_write_every_checkpoint_once_and_completely(tmp_path, paired_folders):
    opt = augmenting_options(paired_folders, 'ddp_ckpt', total_iter=40, save_every=2)
    result = run_cli(['train', '-opt', write_options(tmp_path / 'ddp.yml', opt), '--launcher', 'pytorch'],
                     cwd=tmp_path, launcher=torchrun(2, 29621))
    assert result.returncode == 0, result.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'ddp_ckpt'
    iters = list(range(2, 41, 2))
    assert sorted(os.listdir(exp / 'models')) == sorted([f'net_g_{i}.pth' for i in iters] + ['net_g_latest.pth'])
    assert sorted(os.listdir(exp / 'training_states')) == sorted(f'{i}.state' for i in iters)
    for i in iters:
        assert torch.load(exp / 'models' / f'net_g_{i}.pth', weights_only=True)['params']
        state = torch.load(exp / 'training_states' / f'{i}.state', weights_only=True)
        assert state['iter'] == i and len(state['rng']) == 2
    # every rank's own RNG state is kept (the seeds are manual_seed + rank)
    assert not torch.equal(state['rng'][0]['torch'], state['rng'][1]['torch'])


@pytest.mark.slow
def test_auto_resume_falls_back_past_truncated_state_and_empty_network(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'fallback', 6, 2))
    assert run_cli(['train', '-opt', opt_file], cwd=tmp_path).returncode == 0
    exp = tmp_path / 'experiments' / 'fallback'
    with open(exp / 'training_states' / '6.state', 'r+b') as f:  # killed while writing (old BasicSR)
        f.truncate(os.path.getsize(f.name) // 2)
    open(exp / 'models' / 'net_g_4.pth', 'wb').close()
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'fallback', 8, 2))
    resumed = run_cli(['train', '-opt', opt_file, '--auto_resume'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notice = [line for line in resumed.stdout.splitlines() if line.startswith('auto_resume:')]
    assert len(notice) == 1
    assert '6.state: unreadable' in notice[0] and 'net_g_4.pth: empty' in notice[0] and '2.state' in notice[0]
    log = ''.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log')))
    assert 'Resuming training from epoch: 0, iter: 2.' in log
    assert (exp / 'training_states' / '8.state').is_file()
    assert not glob.glob(str(tmp_path / 'experiments' / '*archived*'))


@pytest.mark.slow
def test_auto_resume_with_no_usable_state_refuses_instead_of_starting_from_zero(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'broken', 2, 2))
    assert run_cli(['train', '-opt', opt_file], cwd=tmp_path).returncode == 0
    exp = tmp_path / 'experiments' / 'broken'
    open(exp / 'training_states' / '2.state', 'wb').close()
    resumed = run_cli(['train', '-opt', opt_file, '--auto_resume'], cwd=tmp_path)
    assert resumed.returncode != 0
    assert 'no training state' in resumed.stderr and '2.state: empty' in resumed.stderr
    assert (exp / 'models' / 'net_g_2.pth').is_file()  # nothing archived, nothing overwritten
    assert not glob.glob(str(tmp_path / 'experiments' / '*archived*'))


@pytest.mark.slow
def test_run_killed_between_checkpoints_resumes_to_the_uninterrupted_weights(tmp_path, paired_folders):
    kill_at, save_every = 9, 4  # 6 batches an epoch: resumed from iteration 8, 2 batches into the second epoch
    whole = write_options(tmp_path / 'whole.yml', augmenting_options(paired_folders, 'whole', 12, save_every))
    assert run_cli(['train', '-opt', whole], cwd=tmp_path).returncode == 0
    killed = write_options(tmp_path / 'killed.yml', augmenting_options(paired_folders, 'killed', 12, save_every))
    script = after_step_script(tmp_path, KILL, kill_at)
    first = run_cli(['train', '-opt', killed], cwd=tmp_path, launcher=[sys.executable, script], module=False)
    assert first.returncode == -9
    second = run_cli(['train', '-opt', killed, '--auto_resume'], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    exp = tmp_path / 'experiments'
    a = torch.load(exp / 'whole' / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    b = torch.load(exp / 'killed' / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_sampler_skips_the_trained_batches_and_restores_rng_before_the_first():
    import random

    from dspo_basicsr.train import ResumableSampler
    from dspo_basicsr.utils.rng import rng_states
    sampler = ResumableSampler(list(range(12)), num_replicas=1, rank=0)
    sampler.set_epoch(1)
    whole = list(sampler)
    random.seed(5)
    saved = rng_states()
    expected = random.random()
    sampler.resume_at(epoch=1, current_iter=12 // 2 + 2, batch_size=2, rng=saved)
    random.seed(0)
    resumed = iter(sampler)
    random.seed(1)  # what the loader draws between iter() and the first batch is overwritten
    assert next(resumed) == whole[4]
    assert random.random() == expected
    assert list(resumed) == whole[5:]
    assert sampler.pending is None and list(sampler) == whole


@pytest.mark.slow
def test_missing_pyiqa_weights_fail_before_the_first_iteration_in_one_report(tmp_path):
    from dspo_fixtures import dspo_options, make_tiny_preference_set
    opt = dspo_options(make_tiny_preference_set(str(tmp_path / 'set')), name='no_weights', total_iter=2)
    opt['val']['metrics'] = {'lpips': {'type': 'calculate_lpips'}, 'musiq': {'type': 'calculate_musiq'},
                             'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}
    empty = {'TORCH_HOME': str(tmp_path / 'torch'), 'HF_HUB_CACHE': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    result = run_cli(['train', '-opt', write_options(tmp_path / 'o.yml', opt)], cwd=tmp_path, env=empty)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    for name in ('val.metrics.lpips (lpips)', 'LPIPS_v0.1_alex', 'val.metrics.musiq (musiq)', 'musiq_koniq'):
        assert name in result.stderr
    exp = tmp_path / 'experiments' / 'no_weights'
    log = ''.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log')))
    assert 'musiq_koniq' in log and 'Start training' not in log
    assert not os.listdir(exp / 'models')


def test_niqe_refuses_small_images_naming_the_size():
    import numpy as np

    from dspo_basicsr.metrics.calculate import calculate_metric
    small = np.random.default_rng(0).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r'at least 192x192 px after crop_border, got 120x152'):
        calculate_metric({'img': small}, {'type': 'calculate_niqe', 'crop_border': 4})


def test_ctrl_c_in_a_data_step_is_one_line(capsys):
    from dspo_basicsr.preference.pipeline import run_interruptible

    def step():
        raise KeyboardInterrupt

    assert run_interruptible(step) == 130
    assert capsys.readouterr().err == 'interrupted: rerun to resume\n'
    scripts = glob.glob(os.path.join(os.path.dirname(__file__), '..', 'scripts', '*.py'))
    data_steps = [s for s in scripts if os.path.basename(s) in ('add_ram_embeddings.py', 'build_preference_set.py',
                                                                'generate_candidates.py', 'score_instances.py',
                                                                'segment_instances.py')]
    assert len(data_steps) == 5 and all('sys.exit(run_interruptible(main))' in open(s).read() for s in data_steps)


def test_broken_explicit_resume_state_is_named(tmp_path):
    from dspo_basicsr.utils.resume import ResumeStateError, load_resume_state
    state = tmp_path / '10.state'
    state.write_bytes(b'PK\x03\x04 cut short')
    opt = {'auto_resume': False, 'name': 'x', 'path': {'resume_state': str(state)}}
    with pytest.raises(ResumeStateError, match=r"path.resume_state '.*10.state' is unreadable"):
        load_resume_state(opt)


def test_candidate_step_with_missing_metric_weights_fails_before_sampling(tmp_path, monkeypatch):
    from dspo_basicsr.metrics.metric_table import MissingWeightsError
    from dspo_basicsr.preference.pipeline import run_candidate_step
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))

    class NeverSampled:
        def sample(self, *args, **kwargs):
            raise AssertionError('sampled before the metrics were checked')

    metrics = {'lpips': {'type': 'calculate_lpips'}, 'dists': {'type': 'calculate_dists'}}
    with pytest.raises(MissingWeightsError) as err:
        run_candidate_step(str(tmp_path / 'work'), [('a', 'a.png', None)], NeverSampled(), [{}], metrics=metrics,
                           progress=False)
    assert 'metrics.lpips (lpips)' in str(err.value) and 'metrics.dists (dists)' in str(err.value)


@pytest.mark.slow
def test_killed_dspo_run_resumes_to_the_same_weights_noise_and_timesteps_included(tmp_path):
    from dspo_fixtures import dspo_options, make_tiny_preference_set
    tiny = make_tiny_preference_set(str(tmp_path / 'set'))
    for name in ('whole', 'killed'):
        write_options(tmp_path / f'{name}.yml', dspo_options(tiny, name=f'dspo_{name}', total_iter=6, save_every=2,
                                                              val=False))
    assert run_cli(['train', '-opt', str(tmp_path / 'whole.yml')], cwd=tmp_path).returncode == 0
    script = after_step_script(tmp_path, KILL, 5, model='DSPOModel')
    first = run_cli(['train', '-opt', str(tmp_path / 'killed.yml')], cwd=tmp_path,
                    launcher=[sys.executable, script],
                    module=False)
    assert first.returncode == -9
    second = run_cli(['train', '-opt', str(tmp_path / 'killed.yml'), '--auto_resume'], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    exp = tmp_path / 'experiments'
    a = torch.load(exp / 'dspo_whole' / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    b = torch.load(exp / 'dspo_killed' / 'models' / 'net_g_latest.pth', weights_only=True)['params']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
