"""The ``basicsr`` command: safe option files, BasicSR's own models on CPU, resume, two processes."""
import glob
import os
import shutil
import sys

import pytest

from conftest import REPO, run_cli, run_cli_refusal, write_options


def msrresnet_options(gt_dir, lq_dir, name='msrresnet_cli', total_iter=4, save_every=2):
    return {
        'name': name, 'model_type': 'SRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'toy', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir, 'dataroot_lq': lq_dir,
                      'io_backend': {'type': 'disk'}, 'gt_size': 16, 'use_hflip': True, 'use_rot': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1},
            'val': {'name': 'toy_val', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir, 'dataroot_lq': lq_dir,
                    'io_backend': {'type': 'disk'}}},
        'network_g': {'type': 'MSRResNet', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_block': 1,
                      'upscale': 4},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'total_iter': total_iter, 'warmup_iter': -1,
                  'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}},
        'val': {'val_freq': save_every, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': False}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_every, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }


def test_help_prints_usage():
    result = run_cli_refusal(['--help'], cwd=REPO)
    assert result.returncode == 0
    assert 'basicsr train -opt' in result.stdout
    train_help = run_cli_refusal(['train', '--help'], cwd=REPO)
    assert train_help.returncode == 0 and '--auto_resume' in train_help.stdout and '--launcher' in train_help.stdout


def test_unsafe_yaml_tag_is_rejected_and_nothing_runs(tmp_path):
    marker = tmp_path / 'pwned'
    opt_file = tmp_path / 'evil.yml'
    opt_file.write_text(f'name: evil\nmodel_type: SRModel\nboom: !!python/object/apply:os.system ["touch {marker}"]\n')
    result = run_cli_refusal(['train', '-opt', str(opt_file)], cwd=tmp_path)
    assert result.returncode == 2
    assert 'evil.yml' in result.stderr and 'safe YAML loader' in result.stderr
    assert not marker.exists()
    assert not (tmp_path / 'experiments').exists()


@pytest.mark.slow
def test_unknown_type_names_registry_and_closest(tmp_path, paired_folders):
    opt = msrresnet_options(*paired_folders, name='typo')
    opt['network_g']['type'] = 'MSRResNt'
    result = run_cli(['train', '-opt', write_options(tmp_path / 'typo.yml', opt)], cwd=tmp_path)
    assert result.returncode != 0
    assert "'arch' registry" in result.stderr and 'MSRResNet' in result.stderr


@pytest.mark.slow
def test_train_then_auto_resume_on_cpu(tmp_path, paired_folders):
    opt_file = write_options(tmp_path / 'msr.yml', msrresnet_options(*paired_folders, total_iter=4))
    first = run_cli(['train', '-opt', opt_file], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'msrresnet_cli'
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    assert sorted(os.listdir(exp / 'training_states')) == ['2.state', '4.state']
    # Pretend the run stopped after iteration 2, then continue it with --auto_resume to 6 iterations.
    os.remove(exp / 'training_states' / '4.state')
    opt_file = write_options(tmp_path / 'msr.yml', msrresnet_options(*paired_folders, total_iter=6))
    second = run_cli(['train', '-opt', opt_file, '--auto_resume'], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    log = ''.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log')))
    assert 'Resuming training from epoch' in log and 'iter: 2' in log
    assert (exp / 'models' / 'net_g_6.pth').is_file()
    assert not glob.glob(str(tmp_path / 'experiments' / '*archived*'))


@pytest.mark.slow
def test_two_process_gloo_run_with_torchrun(tmp_path, paired_folders):
    local_torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    if shutil.which('torchrun') is None and not os.path.exists(local_torchrun):
        pytest.fail('torchrun is not installed next to the interpreter')
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port=29611']
    opt = msrresnet_options(*paired_folders, name='msr_ddp', total_iter=2)
    opt_file = write_options(tmp_path / 'ddp.yml', opt)
    result = run_cli(['train', '-opt', opt_file, '--launcher', 'pytorch'], cwd=tmp_path, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    log = ''.join(open(f).read() for f in glob.glob(str(tmp_path / 'experiments' / 'msr_ddp' / 'train_*.log')))
    assert 'world_size: 2' in log or "world_size': 2" in log or 'world_size: 2' in result.stdout
    assert 'End of training' in log
