"""Our train pipeline: experiment lock, --force_yml before seeding, graceful stops, all-skipped runs."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_reliability import augmenting_options, torchrun

from conftest import after_step_script, run_cli, write_options

pytestmark = pytest.mark.slow  # every test runs the CLI in a subprocess


def hooked(tmp_path, action, at, model='SRModel'):
    return [sys.executable, after_step_script(tmp_path, action, at, model)]


def cli_env():
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')


def test_second_run_of_a_running_experiment_is_refused_before_anything_is_written(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'locked', 4, 2))
    go = tmp_path / 'go'
    # run A waits after its first update until the test lets it go
    wait = f"open({str(tmp_path / 'training')!r}, 'w').close()\n        " \
           f"while not os.path.exists({str(go)!r}): time.sleep(0.1)"
    a = subprocess.Popen(hooked(tmp_path, wait, at=1) + ['train', '-opt', opt_file], cwd=tmp_path, env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'training').exists():
            assert a.poll() is None and time.time() < deadline, a.communicate()[1][-3000:]
            time.sleep(0.2)
        exp = tmp_path / 'experiments'
        before = sorted(os.listdir(exp)), sorted(os.listdir(exp / 'locked'))
        for extra in ([], ['--auto_resume']):
            b = run_cli(['train', '-opt', opt_file, *extra], cwd=tmp_path)
            assert b.returncode == 2
            lines = b.stderr.strip().splitlines()
            assert len(lines) == 1 and "experiment 'locked' is in use by" in lines[0]
            assert f'pid {a.pid} on ' in lines[0] and 'started ' in lines[0]
            assert (sorted(os.listdir(exp)), sorted(os.listdir(exp / 'locked'))) == before
        go.touch()
        assert a.wait(timeout=300) == 0, a.communicate()[1][-3000:]
    finally:
        go.touch()
        if a.poll() is None:
            a.kill()
    assert not glob.glob(str(exp / '*archived*'))
    assert sorted(os.listdir(exp / 'locked' / 'training_states')) == ['2.state', '4.state']
    # a finished (or killed) holder leaves the lock free: the next run of the name starts
    again = run_cli(['train', '-opt', opt_file, '--auto_resume'], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]


def test_force_yml_manual_seed_takes_effect(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'seeded', 2, 2))
    weights = []
    for seed in (0, 1):
        run = run_cli(['train', '-opt', opt_file, '--force_yml', f'manual_seed={seed}'], cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        latest = tmp_path / 'experiments' / 'seeded' / 'models' / 'net_g_latest.pth'
        weights.append(torch.load(latest, weights_only=True)['params'])
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    opt_file = write_options(tmp_path / 'one.yml', dict(augmenting_options(paired_folders, 'seeded', 2, 2),
                                                        manual_seed=1))
    assert run_cli(['train', '-opt', opt_file], cwd=tmp_path).returncode == 0
    seed1 = torch.load(latest, weights_only=True)['params']
    assert all(torch.equal(weights[1][k], seed1[k]) for k in seed1)


def test_run_with_every_update_skipped_is_not_a_success(tmp_path):
    from dspo_fixtures import dspo_options, make_tiny_preference_set
    tiny = make_tiny_preference_set(str(tmp_path / 'set'))
    opt_file = write_options(tmp_path / 'dspo.yml', dspo_options(tiny, name='skipped', total_iter=2, val=False))
    nan_loss = '''
import dataclasses, sys
import dspo_basicsr  # noqa: F401
from dspo_basicsr.models.dspo_model import DSPOModel
from dspo_basicsr.cli import main
loss = DSPOModel.preference_loss
def nan_loss(self):
    result = loss(self)
    return dataclasses.replace(result, loss=result.loss * float('nan'))
DSPOModel.preference_loss = nan_loss
sys.exit(main(sys.argv[1:]))
'''
    script = tmp_path / 'nan_loss.py'
    script.write_text(nan_loss)
    run = run_cli(['train', '-opt', opt_file], cwd=tmp_path, launcher=[sys.executable, str(script)], module=False)
    assert run.returncode == 1, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith('basicsr train: error:')]
    assert len(errors) == 1 and 'all 2 optimizer updates of this run were skipped' in errors[0]
    assert 'Traceback' not in run.stderr


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_iteration_and_exits_128_plus_signal(tmp_path, paired_folders, signum):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'stopped', 1000, 100))
    run = run_cli(['train', '-opt', opt_file], cwd=tmp_path, module=False,
                  launcher=hooked(tmp_path, f'os.kill(os.getpid(), {int(signum)})', at=3))
    assert run.returncode == 128 + signum, run.stderr[-3000:]
    assert 'Traceback' not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith('basicsr train:')]
    assert len(lines) == 1 and f'{signum.name}: saved iteration 3' in lines[0]
    exp = tmp_path / 'experiments' / 'stopped'
    assert os.listdir(exp / 'training_states') == ['3.state']
    assert sorted(os.listdir(exp / 'models')) == ['net_g_3.pth']
    assert torch.load(exp / 'training_states' / '3.state', weights_only=True)['iter'] == 3


def test_second_signal_exits_at_once(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', augmenting_options(paired_folders, 'twice', 1000, 100))
    twice = 'os.kill(os.getpid(), signal.SIGINT); time.sleep(0.5); os.kill(os.getpid(), signal.SIGINT); time.sleep(30)'
    run = run_cli(['train', '-opt', opt_file], cwd=tmp_path, module=False, launcher=hooked(tmp_path, twice, at=2))
    assert run.returncode == 128 + signal.SIGINT
    assert 'second SIGINT, exiting now' in run.stderr and 'Traceback' not in run.stderr
    assert os.listdir(tmp_path / 'experiments' / 'twice' / 'training_states') == []


def test_signal_inside_an_accumulation_window_finishes_the_update(tmp_path):
    from dspo_fixtures import dspo_options, make_tiny_preference_set
    tiny = make_tiny_preference_set(str(tmp_path / 'set'))
    opt = dspo_options(tiny, name='window', total_iter=100, save_every=100, val=False)
    opt['train']['accumulate_grad_batches'] = 2
    opt_file = write_options(tmp_path / 'dspo.yml', opt)
    run = run_cli(['train', '-opt', opt_file], cwd=tmp_path, module=False,
                  launcher=hooked(tmp_path, 'os.kill(os.getpid(), signal.SIGTERM)', at=3, model='DSPOModel'))
    assert run.returncode == 128 + signal.SIGTERM, run.stderr[-3000:]
    states = tmp_path / 'experiments' / 'window' / 'training_states'
    assert sorted(os.listdir(states)) == ['4.state', 'train_set.json']  # iteration 3 was inside the window 3-4


def test_torchrun_workers_exit_when_the_launcher_is_killed(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'ddp.yml', augmenting_options(paired_folders, 'orphans', 100000, 100000))
    marker = f"open({str(tmp_path / 'training')!r} + str(os.getpid()), 'w').close()"
    cmd = torchrun(2, 29637) + [AFTER_STEP_PATH(tmp_path, marker), 'train', '-opt', opt_file, '--launcher', 'pytorch']
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while len(glob.glob(str(tmp_path / 'training*'))) < 2:
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.5)
        workers = [int(p[len(str(tmp_path / 'training')):]) for p in glob.glob(str(tmp_path / 'training*'))]
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 60
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in workers)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def AFTER_STEP_PATH(tmp_path, action):  # noqa: N802  (torchrun takes a script path, not a command)
    return hooked(tmp_path, action, at=1)[1]


def _alive(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


#: BasicSR's own ``basicsr.train`` on the option file in argv[1], with or without ``import dspo_basicsr``
BASICSR_TRAIN = '''
import os, sys
if sys.argv[2] == 'plugin':
    import dspo_basicsr  # noqa: F401
else:  # the one shim basicsr 1.4.2 needs to import on today's torchvision, as compat applies it
    from torchvision.transforms import _functional_tensor
    sys.modules['torchvision.transforms.functional_tensor'] = _functional_tensor
from basicsr.train import train_pipeline
sys.argv = ['basicsr', '-opt', sys.argv[1]]
train_pipeline(os.getcwd())
'''


def test_import_dspo_basicsr_leaves_a_basicsr_srmodel_run_as_it_was(tmp_path, paired_folders):
    script = tmp_path / 'basicsr_train.py'
    script.write_text(BASICSR_TRAIN)
    trees = {}
    for mode in ('bare', 'plugin'):
        cwd = tmp_path / mode
        cwd.mkdir()
        opt_file = write_options(cwd / 'msr.yml', augmenting_options(paired_folders, 'srmodel', 4, 2))
        run = subprocess.run([sys.executable, str(script), opt_file, mode], cwd=cwd, env=cli_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        exp = cwd / 'experiments' / 'srmodel'
        trees[mode] = {str(p.relative_to(exp)): p.read_bytes() for p in exp.rglob('*')
                       if p.is_file() and p.suffix in ('.pth', '.state')}
        trees[mode]['files'] = sorted(str(p.relative_to(exp)) for p in exp.rglob('*') if p.suffix != '.log')
    assert trees['bare'].keys() == trees['plugin'].keys()
    assert trees['bare']['files'] == ['models', 'models/net_g_2.pth', 'models/net_g_4.pth',
                                      'models/net_g_latest.pth', 'msr.yml', 'training_states',
                                      'training_states/2.state', 'training_states/4.state', 'visualization']
    for name in trees['bare']:
        assert trees['bare'][name] == trees['plugin'][name], f'{name} differs with import dspo_basicsr'


def test_resume_on_a_rebuilt_preference_set_is_refused(tmp_path):
    import json
    import shutil

    from dspo_fixtures import dspo_options, make_tiny_preference_set, write_tiny_preference_set
    paths = make_tiny_preference_set(str(tmp_path / 'set'))
    opt = dspo_options(paths, name='digest', total_iter=2, save_every=2, val=False)
    first = run_cli(['train', '-opt', write_options(tmp_path / 'digest.yml', opt)], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    record = tmp_path / 'experiments' / 'digest' / 'training_states' / 'train_set.json'
    with open(record, encoding='utf-8') as f:
        assert json.load(f)['dataroot'] == paths['lmdb']
    shutil.rmtree(paths['lmdb'])  # rebuilt in place with other candidates
    write_tiny_preference_set(paths['lmdb'], 3, 3, 32, 4, seed=1)
    opt['train']['total_iter'] = 4
    resumed = run_cli(['train', '-opt', write_options(tmp_path / 'digest.yml', opt), '--auto_resume'], cwd=tmp_path)
    assert resumed.returncode == 2
    assert 'train_set.json' in resumed.stderr and 'was rebuilt or replaced' in resumed.stderr
    assert sorted(os.listdir(tmp_path / 'experiments' / 'digest' / 'models')) == ['net_g_2.pth', 'net_g_latest.pth']
