"""Tiny SeeSR / AddSR / OSEDiff checkpoints in their released layouts, a tiny preference set, option dicts."""
import copy
import os

from conftest import make_paired_folders
from dspo_fixtures import dspo_options, write_tiny_preference_set

TINY_RAM = {'embed_dim': 24}  # the tiny SeeSR's image cross-attention width (tiny_components.TINY_IMAGE_DIM)


def build_framework_checkpoints(root, framework, seed=0):
    """Save a tiny random framework in its released layout under ``root``; returns the paths."""
    if framework in ('seesr', 'addsr'):
        from dspo_basicsr.demo.tiny_seesr import build_tiny_seesr_folders
        return build_tiny_seesr_folders(os.path.join(root, 'seesr_weights'), seed=seed)
    from dspo_basicsr.archs.control_sd2_arch import load_sd_components
    from dspo_basicsr.archs.osediff_arch import save_osediff_lora
    from dspo_basicsr.demo.tiny_components import build_tiny_control_sd2_folder, tiny_ram_embedder
    sd_path, _ = build_tiny_control_sd2_folder(os.path.join(root, 'sd21'), seed=seed)
    components = load_sd_components(sd_path)
    lora = save_osediff_lora(components['unet'], components['vae'], os.path.join(root, 'osediff.pkl'), seed=seed)
    from dspo_basicsr.archs.ram_arch import save_dape_checkpoint, save_ram_checkpoint
    tagger = tiny_ram_embedder(tagging=True)  # OSEDiff's test prompts are DAPE tags
    ram = save_ram_checkpoint(tagger, os.path.join(root, 'ram', 'ram_tiny.pth'))
    dape = save_dape_checkpoint(tagger, os.path.join(root, 'ram', 'DAPE_tiny.pth'), seed=seed)
    return {'pretrained_model_path': sd_path, 'osediff_path': lora, 'ram_path': ram, 'dape_path': dape}


def network_options(framework, paths, **overrides):
    """The ``network_g`` option of a tiny framework built from the released-layout folders in ``paths``."""
    if framework == 'seesr':
        net = {'type': 'TinySeeSRArch', 'pretrained_model_path': paths['pretrained_model_path'],
               'seesr_model_path': paths['seesr_model_path'], 'ram_path': paths['ram_path'],
               'scale': 4, 'trainable': 'controlnet', 'sampler': 'ddim'}
    elif framework == 'addsr':
        net = {'type': 'TinyAddSRArch', 'pretrained_model_path': paths['pretrained_model_path'],
               'addsr_model_path': paths['seesr_model_path'], 'ram_path': paths['ram_path'],
               'scale': 4, 'trainable': 'controlnet'}
    else:
        net = {'type': 'OSEDiffArch', 'pretrained_model_path': paths['pretrained_model_path'],
               'osediff_path': paths['osediff_path'], 'scale': 4, 'trainable': 'unet_lora'}
    if framework != 'osediff':
        # The tiny tokenizer keeps 16 characters: a short default leaves room for the samples' feedback.
        net['default_negative_prompt'] = 'noise'
    net.update(overrides)
    return net


def framework_options(framework, paths, lmdb, name=None, total_iter=2, feedback=None, val=True, **net_overrides):
    """A DSPOModel training option dict for a tiny framework (CPU, batch 2)."""
    opt = dspo_options({'lmdb': lmdb, 'model': None, 'controlnet': None}, name=name or f'dspo_{framework}_tiny',
                       total_iter=total_iter, feedback=feedback, val=val)
    opt['network_g'] = network_options(framework, paths, **net_overrides)
    if val:
        opt['val']['preference_timesteps'] = [999] if framework == 'osediff' else [500]
    return opt


def sr_test_options(framework, paths, checkpoint, root, name=None):
    """A ``basicsr test`` option dict: SR of a small paired folder with PSNR, images saved."""
    gt_dir, lq_dir = make_paired_folders(os.path.join(root, 'paired'), num=2)
    return {
        'name': name or f'test_{framework}_tiny', 'model_type': 'DSPOModel', 'scale': 4, 'num_gpu': 0,
        'manual_seed': 0,
        'datasets': {'test_1': {'name': 'tiny_pairs', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir,
                                'dataroot_lq': lq_dir, 'io_backend': {'type': 'disk'}}},
        'network_g': copy.deepcopy(network_options(framework, paths)),
        'path': {'pretrain_network_g': checkpoint, 'strict_load_g': True, 'param_key_g': 'params'},
        'val': {'save_img': True, 'suffix': framework,
                'sample': {'steps': 2, 'guidance_scale': 1.0 if framework != 'seesr' else 2.0, 'seed': 0, 'prompt': ''},
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False}}},
    }


def framework_setup(root, framework):
    """Tiny checkpoints of ``framework`` in the released layout plus a tiny preference set, under ``root``."""
    paths = build_framework_checkpoints(str(root), framework)
    paths['lmdb'] = write_tiny_preference_set(str(root / 'pref.lmdb'))
    return paths
