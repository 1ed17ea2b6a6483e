"""Helpers for the BIQA rank-calibration tests: generated data, option dicts and files."""
import os

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_OPTION = os.path.join(REPO, 'options', 'demo', 'biqa_calibration_demo.yml')


def tiny_rank_calibrated_iqa(tmp_path, trained=False):
    """A RankCalibratedIQAArch on a tiny random CLIP, saved as a BIQA scorer's files.

    Args:
        tmp_path (Path): Where ``tiny_clip.pth`` and the rectifier checkpoint ``net_g_10.pth`` go.
        trained (bool): Draw the rectifier far from its initialisation (N(0, 0.5)), so loading it is visible.

    Returns:
        tuple: (network options, checkpoint path, the network).
    """
    import torch

    from dspo_basicsr.archs.clip_quality_arch import CLIPQualityArch
    from dspo_basicsr.archs.rank_calibrated_iqa_arch import RankCalibratedIQAArch
    from dspo_basicsr.demo.tiny_components import TINY_CLIP_CONFIG
    torch.manual_seed(0)
    clip_path = tmp_path / 'tiny_clip.pth'
    torch.save(CLIPQualityArch(**TINY_CLIP_CONFIG).clip.state_dict(), str(clip_path))
    network = {'type': 'RankCalibratedIQAArch', 'hidden_dim': 8,
               'backbone': {'type': 'CLIPQualityArch', 'load_path': str(clip_path)}}
    net = RankCalibratedIQAArch(**{k: v for k, v in network.items() if k != 'type'}).eval()
    if trained:
        with torch.no_grad():
            for parameter in net.rectifier.parameters():
                parameter.normal_(0, 0.5)
    checkpoint = tmp_path / 'net_g_10.pth'
    torch.save({'params': net.rectifier_state_dict()}, str(checkpoint))
    return network, str(checkpoint), net


def make_data(root):
    """A small synthetic BIQA data set (see dspo_basicsr.demo.biqa); returns its paths."""
    from dspo_basicsr.demo.biqa import make_biqa_demo_data
    return make_biqa_demo_data(str(root), num_images=6, size=40, num_mos=8, num_val_pairs=6,
                               bootstrap_samples=20)


def network_options(paths, hidden_dim=16):
    return {'type': 'RankCalibratedIQAArch', 'hidden_dim': hidden_dim,
            'backbone': {'type': 'CLIPQualityArch', 'load_path': paths['clip']}}


def train_dataset_options(paths, group_size=3):
    return {'name': 'groups', 'type': 'SRMethodGroupDataset', 'phase': 'train', 'dataroot': paths['sr'],
            'ranking_json': paths['ranking'], 'group_size': group_size,
            'mos': {'meta_file': paths['mos'], 'dataroot': os.path.dirname(paths['mos'])}}


def model_options(paths, tmp_path, cache=True, backend='memory'):
    """Options of a RankCalibrationModel built directly (not through the CLI)."""
    models = os.path.join(str(tmp_path), 'models')
    os.makedirs(models, exist_ok=True)
    return {
        'name': 'biqa_test', 'model_type': 'RankCalibrationModel', 'num_gpu': 0, 'is_train': True, 'dist': False,
        'network_g': network_options(paths),
        'feature_cache': {'enabled': cache, 'backend': backend,
                          'lmdb_path': os.path.join(str(tmp_path), 'feature_cache.lmdb')},
        'path': {'models': models, 'pretrain_network_g': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [100],
                                                                        'gamma': 0.5},
                  'fidelity_opt': {'type': 'FidelityLoss'}, 'lambda2': 0.5},
        'val': {'save_img': False},
    }


def write_cli_option(paths, out_dir, total_iter=6):
    """The demo option file pointed at generated data, with a few iterations; returns its path."""
    with open(DEMO_OPTION, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    root = os.path.dirname(paths['mos'])
    train = opt['datasets']['train']
    train.update(dataroot=paths['sr'], ranking_json=paths['ranking'], group_size=3, batch_size_per_gpu=2)
    train['mos'].update(meta_file=paths['mos'], dataroot=root)
    opt['datasets']['val_2afc'].update(meta_file=paths['val_2afc'], dataroot=root)
    opt['datasets']['val_mos'].update(meta_file=paths['mos'], dataroot=root)
    opt['network_g']['backbone']['load_path'] = paths['clip']
    opt['train']['total_iter'] = total_iter
    opt['val']['val_freq'] = total_iter
    opt['logger'].update(print_freq=2, save_checkpoint_freq=total_iter)
    path = os.path.join(str(out_dir), 'biqa_calibration_test.yml')
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return path
