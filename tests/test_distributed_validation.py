"""Validation under DDP: split over ranks, reduced on rank 0, same numbers as one process; deterministic."""
import glob
import os
import re
import sys

import pytest
import torch

from conftest import make_paired_folders, run_cli, write_options
from dspo_fixtures import dspo_options, make_tiny_preference_set

pytestmark = pytest.mark.slow  # two processes under torchrun


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def metric_lines(log_text):
    """[(dataset, metric, value)] of every validation logged, in order."""
    found, dataset = [], None
    for line in log_text.splitlines():
        head = re.search(r'Validation (\S+)', line)
        if head:
            dataset = head.group(1)
        value = re.search(r'# (\w+): ([-0-9.e+]+)', line)
        if value and dataset:
            found.append((dataset, value.group(1), float(value.group(2))))
    return found


def test_two_process_validation_matches_one_process_test_of_the_same_weights(tiny_set, tmp_path):
    gt_dir, lq_dir = make_paired_folders(str(tmp_path / 'paired'), num=3, size=32)
    opt = dspo_options(tiny_set, name='ddp_val', total_iter=2, save_every=1)
    opt['datasets']['val_2'] = {'name': 'paired', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir,
                                'dataroot_lq': lq_dir, 'io_backend': {'type': 'disk'}}
    opt['val'].update(val_freq=1, sample={'steps': 2, 'guidance_scale': 2.0, 'seed': 0, 'sampler': 'ddim'},
                      metrics={'psnr': {'type': 'calculate_psnr', 'crop_border': 0}})
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port=29631']
    trained = run_cli(['train', '-opt', write_options(tmp_path / 'ddp.yml', opt), '--launcher', 'pytorch'],
                      cwd=tmp_path, launcher=torchrun)
    assert trained.returncode == 0, trained.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'ddp_val'
    logged = metric_lines(''.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log'))))
    # iterations 1 and 2, then the end: two datasets each, psnr / implicit_acc + logit_mean
    assert [m for _, m, _ in logged].count('implicit_acc') == 3 and [m for _, m, _ in logged].count('psnr') == 3
    at_2, at_end = logged[3:6], logged[6:9]
    assert at_2 == at_end  # same weights (iteration 2 = latest), same numbers

    test_opt = dspo_options(tiny_set, name='ddp_val_test', val=False)
    del test_opt['train']
    test_opt['datasets'] = {'test_1': {**opt['datasets']['val_1']}, 'test_2': {**opt['datasets']['val_2']}}
    test_opt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_latest.pth')
    test_opt['val'] = {k: v for k, v in opt['val'].items() if k != 'val_freq'}
    test_opt['val']['preference_beta'] = opt['train']['preference_opt']['beta']
    tested = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', test_opt)], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    one_process = metric_lines(''.join(open(f).read() for f in glob.glob(str(tmp_path / 'results' / 'ddp_val_test'
                                                                                  / 'test_*.log'))))
    assert sorted(one_process) == sorted(at_end)
    # DSPOModel's own save_network under 2 processes: each checkpoint once, complete, no temporary left
    assert sorted(os.listdir(exp / 'models')) == ['net_g_1.pth', 'net_g_2.pth', 'net_g_latest.pth']
    assert sorted(os.listdir(exp / 'training_states')) == ['1.state', '2.state', 'train_set.json']
    for name in ('net_g_1.pth', 'net_g_2.pth'):
        assert torch.load(exp / 'models' / name, weights_only=True)['params']
