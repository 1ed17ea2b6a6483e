"""A tiny SD2 + ControlNet folder and a tiny preference set, for DSPO tests."""
import os

import numpy as np

from dspo_basicsr.demo.tiny_components import build_tiny_control_sd2_folder
from dspo_basicsr.preference import PreferenceSample, write_preference_lmdb


def write_tiny_preference_set(path, num_samples=3, num_candidates=3, sr_size=32, scale=4, seed=0, ram_embeds=None):
    """Random candidates with a 2x2 block label map (3 paired instances + 1 unpaired), negative prompts.

    Args:
        ram_embeds (tuple | None): (L, D) to store random ``ram_embeds`` extras of that shape.

    Returns:
        str: ``path``.
    """
    rng = np.random.default_rng(seed)
    half = sr_size // 2
    seg = np.zeros((sr_size, sr_size), np.uint16)
    seg[:half, half:], seg[half:, :half], seg[half:, half:] = 1, 2, 3
    samples = []
    for i in range(num_samples):
        candidates = [rng.integers(0, 256, (sr_size, sr_size, 3), dtype=np.uint8) for _ in range(num_candidates)]
        instances = [{'id': m, 'win': int(m % num_candidates), 'lose': int((m + 1) % num_candidates)} for m in range(3)]
        instances.append({'id': 3, 'win': -1, 'lose': -1})
        extras = {'ram_embeds': rng.standard_normal(ram_embeds).astype(np.float32)} if ram_embeds else {}
        samples.append(PreferenceSample(
            sid=f's{i:02d}', lq=rng.integers(0, 256, (sr_size // scale, sr_size // scale, 3), dtype=np.uint8),
            candidates=candidates, seg=seg.copy(), instances=instances, prompt='a photo',
            negative_prompt=f'oversmoothed grass {i}', gt=candidates[0], meta={'pair': [0, 1]},
            extras=extras))
    write_preference_lmdb(path, samples, scale=scale, progress=False)
    return path


def make_tiny_preference_set(root, num_samples=3, num_candidates=3, sr_size=32, scale=4, seed=0):
    """A tiny SD2 + ControlNet folder and a tiny preference set under ``root``.

    Returns:
        dict: ``lmdb``, ``model``, ``controlnet`` paths.
    """
    model, controlnet = build_tiny_control_sd2_folder(os.path.join(root, 'tiny_sd2'), seed=seed)
    lmdb_path = write_tiny_preference_set(os.path.join(root, 'tiny_pref.lmdb'), num_samples, num_candidates, sr_size,
                                          scale, seed)
    return {'lmdb': lmdb_path, 'model': model, 'controlnet': controlnet}


def in_process_options(tiny_set, tmp_path, **kwargs):
    """:func:`dspo_options` completed as BasicSR's option parser would, for models built in the test process."""
    return complete_for_in_process(dspo_options(tiny_set, val=False, **kwargs), tmp_path)


def complete_for_in_process(opt, tmp_path):
    """Add what BasicSR's option parser adds (train mode, no distribution, output folders) to ``opt``."""
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False)
    (tmp_path / 'models').mkdir(exist_ok=True)
    (tmp_path / 'states').mkdir(exist_ok=True)
    opt['path'].update(models=str(tmp_path / 'models'), training_states=str(tmp_path / 'states'))
    return opt


def preference_batch(tiny_set, batch=2):
    """The first ``batch`` training items of the tiny set, collated."""
    from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
    dataset = PreferenceLMDBDataset({'name': 't', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb'],
                                     'phase': 'train', 'gt_size': 32, 'use_hflip': False, 'use_rot': False})
    return dataset.collate_fn([dataset[i] for i in range(batch)])


def dspo_options(paths, name='dspo_tiny', total_iter=2, preference='DSPOLoss', trainable='controlnet',
                 save_every=2, feedback=None, val=True):
    """A DSPOModel option dict on the tiny set (CPU, batch 2, 4 timesteps of sampling in validation)."""
    loss = {'type': preference, 'loss_weight': 1.0}
    if preference != 'DiffusionSFTLoss':
        loss['beta'] = 500.0
    opt = {
        'name': name, 'model_type': 'DSPOModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'tiny', 'type': 'PreferenceLMDBDataset', 'dataroot': paths['lmdb'],
                               'gt_size': 32, 'use_hflip': True, 'use_rot': False, 'num_worker_per_gpu': 0,
                               'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1}},
        'network_g': {'type': 'ControlSD2Arch', 'pretrained_model_path': paths['model'],
                      'controlnet_path': paths['controlnet'], 'scale': 4, 'trainable': trainable, 'sampler': 'ddim'},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 0.0},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
                  'total_iter': total_iter, 'warmup_iter': -1, 'preference_opt': loss},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': save_every, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }
    if feedback:
        opt['train']['feedback_guidance_scale'] = feedback
    if val:
        opt['datasets']['val_1'] = {'name': 'tiny_pairs', 'type': 'PreferenceLMDBDataset', 'dataroot': paths['lmdb']}
        opt['val'] = {'val_freq': save_every, 'save_img': False, 'preference_timesteps': [500]}
    return opt
