"""A standard BasicSR SRModel option file with the calibrated metric in val, trained by `basicsr train`."""
import os
import re

import pytest
import torch
import yaml

from dspo_basicsr.archs.clip_quality_arch import CLIPQualityArch
from dspo_basicsr.demo.tiny_components import TINY_CLIP_CONFIG
from dspo_basicsr.models.rank_calibration_model import RankCalibrationModel

from biqa_fixtures import REPO, model_options
from conftest import make_paired_folders, run_cli

pytestmark = pytest.mark.slow  # trains through the CLI in a subprocess

OPTION = os.path.join(REPO, 'options', 'train_msrresnet_calibrated_iqa.yml')


def write_rectifier(root):
    """A (tiny, untrained) calibrated IQA model saved by RankCalibrationModel's own writer."""
    clip = os.path.join(root, 'tiny_clip.pth')
    torch.manual_seed(0)
    torch.save(CLIPQualityArch(**TINY_CLIP_CONFIG).clip.state_dict(), clip)
    model = RankCalibrationModel(model_options({'clip': clip}, root))
    model.save_rectifier(-1)
    return os.path.join(root, 'models', 'net_g_latest.pth')


def test_srmodel_trains_and_validates_with_calibrated_iqa(tmp_path):
    model_path = write_rectifier(str(tmp_path))
    gt_dir, lq_dir = make_paired_folders(str(tmp_path / 'paired'), num=3, size=32, scale=4)
    with open(OPTION, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['model_type'] == 'SRModel' and opt['network_g']['type'] == 'MSRResNet'
    opt['num_gpu'] = 0
    train, val = opt['datasets']['train'], opt['datasets']['val']
    train.update(dataroot_gt=gt_dir, dataroot_lq=lq_dir, gt_size=32, num_worker_per_gpu=0, batch_size_per_gpu=2,
                 dataset_enlarge_ratio=1)
    val.update(dataroot_gt=gt_dir, dataroot_lq=lq_dir)
    opt['network_g'].update(num_feat=8, num_block=1)
    opt['train'].update(total_iter=2, scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [2],
                                                 'restart_weights': [1], 'eta_min': 1e-7})
    opt['val']['val_freq'] = 2
    opt['val']['metrics']['calibrated_iqa']['model_path'] = model_path
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    path = tmp_path / 'train_msrresnet_calibrated_iqa.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))

    result = run_cli(['train', '-opt', str(path)], cwd=str(tmp_path))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    value = re.search(r'# calibrated_iqa: (-?[0-9.]+)', log)
    assert value, log[-3000:]
    assert float(value.group(1)) != 0.0
    assert re.search(r'# psnr: [0-9.]+', log)
    assert (tmp_path / 'experiments' / opt['name'] / 'models' / 'net_g_2.pth').is_file()
