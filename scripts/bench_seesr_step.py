#!/usr/bin/env python
"""Time one real-size DSPO step of SeeSR (random weights) at 512 x 512 in bf16 and report peak GPU memory.

    python scripts/bench_seesr_step.py                         # real size, CUDA, bf16, 4 candidates, feedback on
    python scripts/bench_seesr_step.py --candidates 2 --feedback 0 --steps 5
    python scripts/bench_seesr_step.py --tiny --device cpu     # the same code path on a tiny model (a check)

What runs: random SD2-base components (VAE, OpenCLIP-H-sized text encoder) and a SeeSR UNet + ControlNet
built from ``dspo_basicsr/archs/configs/sd2_base_unet.json`` are saved in the released layouts in ``--work``
and loaded back through ``SeeSRArch`` (the real loading code); a synthetic preference set at ``--size`` with
precomputed RAM embeddings (145, 512) feeds ``DSPOModel.optimize_parameters`` (trainable: ControlNet in fp32
with AdamW; frozen UNet, VAE and text encoder in bf16 and every network under bf16 autocast through
``network_g.mixed_precision: bf16``; the frozen reference ControlNet is an fp32 copy run under the same
autocast, so policy and reference compute identically at initialisation (loss ln 2)).
One warm-up step, then ``--steps`` timed steps. Prints one JSON line: median / min step time (s), peak
allocated / reserved GPU memory (GiB) on CUDA, and peak resident memory (GiB) of the build-and-load phase
and of the steps (on CPU the model's weights and optimizer state live there).

    python scripts/bench_seesr_step.py --device cpu --size 128 --candidates 2 --feedback 0 --steps 1
    #  the real-size smoke step on a CPU (about 16 GiB of RAM; docs/frameworks.md has its figures)
"""
import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.bench.resident_memory import peak_rss_bytes, reset_peak_rss
from dspo_basicsr.bench.timer import time_call, timed
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA


def sd2_vae_config():
    """Stable Diffusion 2 VAE (AutoencoderKL, latent factor 8, 4 channels)."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=32, sample_size=768, scaling_factor=0.18215)


def sd2_text_config(vocab_size):
    """SD2's OpenCLIP ViT-H/14 text transformer (23 layers used by SD2, width 1024)."""
    return dict(vocab_size=max(vocab_size, 49408), hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act='gelu', projection_dim=512,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_real_size_folders(work, device):
    """Random real-size SD2-base + SeeSR folders in the released layouts. Returns (sd_path, seesr_path)."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dspo_basicsr.archs.control_sd2_arch import save_sd_components
    from dspo_basicsr.archs.seesr_arch import (
        SD2_BASE_UNET_CONFIG,
        add_image_cross_attention,
        save_seesr_networks,
        strip_seesr_config,
    )
    from dspo_basicsr.demo.tiny_components import byte_level_vocab, tiny_noise_scheduler
    vocab = byte_level_vocab()
    with open(SD2_BASE_UNET_CONFIG, encoding='utf-8') as f:
        unet_config = strip_seesr_config(json.load(f))
    sd_path, seesr_path = os.path.join(work, 'sd2'), os.path.join(work, 'seesr')
    # One network at a time, saved and freed before the next: on a CPU the peak resident memory of this
    # build stays at about one UNet plus one ControlNet (fp32) instead of all five components together.
    with torch.device(device):  # random init on the GPU is fast
        unet = UNet2DConditionModel.from_config(unet_config)
        controlnet = add_image_cross_attention(ControlNetModel.from_unet(unet))
        add_image_cross_attention(unet)
    save_seesr_networks(seesr_path, unet.to('cpu'), controlnet.to('cpu'))
    del unet, controlnet
    builders = dict(unet=lambda: UNet2DConditionModel.from_config(unet_config),
                    vae=lambda: AutoencoderKL(**sd2_vae_config()),
                    text_encoder=lambda: CLIPTextModel(CLIPTextConfig(**sd2_text_config(len(vocab)))))
    for name, build in builders.items():
        with torch.device(device):
            component = build()
        save_sd_components(sd_path, {name: component.to('cpu')})
        del component
    save_sd_components(sd_path, dict(tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
                                     noise_scheduler=tiny_noise_scheduler()))
    return sd_path, seesr_path


def write_synthetic_set(path, size, scale, candidates, embeds_shape, samples=2, seed=0):
    """Random candidates, an 8-instance label map, precomputed RAM embeddings."""
    from dspo_basicsr.preference import PreferenceSample, write_preference_lmdb
    rng = np.random.default_rng(seed)
    seg = (np.arange(size)[:, None] // (size // 2) * 4 + np.arange(size)[None, :] // (size // 4)).astype(np.uint16)
    items = []
    for i in range(samples):
        instances = [{'id': m, 'win': m % candidates, 'lose': (m + 1) % candidates} for m in range(8)]
        items.append(PreferenceSample(
            sid=f'b{i}', lq=rng.integers(0, 256, (size // scale, size // scale, 3), dtype=np.uint8),
            candidates=[rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(candidates)],
            seg=seg, instances=instances, prompt='a photo of a street, building, tree',
            negative_prompt='oversmoothed texture', extras={'ram_embeds': rng.standard_normal(embeds_shape).astype(
                np.float32)}))
    write_preference_lmdb(path, items, scale=scale, progress=False)
    return path


def options(sd_path, seesr_path, lmdb, size, feedback, device, tiny_ram):
    opt = {
        'name': 'bench_seesr', 'model_type': 'DSPOModel', 'scale': 4, 'num_gpu': 1 if device == 'cuda' else 0,
        'manual_seed': 0, 'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1, 'auto_resume': False,
        'network_g': {'type': 'TinySeeSRArch' if tiny_ram else 'SeeSRArch', 'pretrained_model_path': sd_path,
                      'seesr_model_path': seesr_path, 'scale': 4, 'trainable': 'controlnet',
                      'mixed_precision': 'bf16'},
        'path': {'pretrain_network_g': None, 'strict_load_g': True},
        'train': {'optim_g': {'type': 'AdamW', 'lr': 5e-6, 'weight_decay': 1e-2},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100000], 'gamma': 0.5},
                  'total_iter': 10, 'warmup_iter': -1, 'grad_clip': 1.0,
                  'preference_opt': {'type': 'DSPOLoss', 'beta': DEFAULT_BETA, 'loss_weight': 1.0}},
        'datasets': {'train': {'name': 'bench', 'type': 'PreferenceLMDBDataset', 'dataroot': lmdb, 'gt_size': size}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 1000, 'use_tb_logger': False},
    }
    if feedback:
        opt['train']['feedback_guidance_scale'] = feedback
    return opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=512, help='SR crop size (candidates are size x size)')
    parser.add_argument('--candidates', type=int, default=4)
    parser.add_argument('--batch', type=int, default=1, help='LQ images per step')
    parser.add_argument('--feedback', type=float, default=5.5, help='feedback guidance scale; 0 = off (M1)')
    parser.add_argument('--steps', type=int, default=3, help='timed steps after one warm-up step')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='tiny model (a CPU check of this script)')
    parser.add_argument('--work', default=None, help='folder for the random weights (default: a temporary one)')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print(json.dumps({'error': 'no GPU available: the real-size SeeSR step needs CUDA (or pass --tiny '
                          '--device cpu to check the script)'}))
        return 1

    from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset

    from basicsr.models import build_model
    work = args.work or tempfile.mkdtemp(prefix='bench_seesr_')
    os.makedirs(work, exist_ok=True)
    try:
        if args.tiny:
            from dspo_basicsr.demo.tiny_components import TINY_IMAGE_DIM
            from dspo_basicsr.demo.tiny_seesr import build_tiny_seesr_folders
            paths = build_tiny_seesr_folders(os.path.join(work, 'tiny'), ram=False)
            sd_path, seesr_path = paths['pretrained_model_path'], paths['seesr_model_path']
            embeds = (17, TINY_IMAGE_DIM)
            size = min(args.size, 64)
        else:
            sd_path, seesr_path = build_real_size_folders(work, args.device)
            embeds, size = (145, 512), args.size
        lmdb = write_synthetic_set(os.path.join(work, 'bench.lmdb'), size, 4, args.candidates, embeds,
                                   samples=max(2, args.batch))
        opt = options(sd_path, seesr_path, lmdb, size, args.feedback, args.device, args.tiny)
        opt['path'].update(models=os.path.join(work, 'models'), training_states=os.path.join(work, 'states'))
        model = build_model(opt)
        arch = model.bare
        cuda = args.device == 'cuda'
        dataset = PreferenceLMDBDataset(dict(opt['datasets']['train'], phase='train', use_hflip=False, use_rot=False))
        batch = dataset.collate_fn([dataset[i % len(dataset)] for i in range(args.batch)])
        iterations = itertools.count(1)

        def step():
            model.feed_data(batch)
            model.optimize_parameters(next(iterations))

        build_rss = peak_rss_bytes()
        reset_peak_rss()
        warmup_s = time_call(step, args.device)  # warm-up, outside the peak-GPU-memory window
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        timing = timed(step, args.steps, args.device, warmup=0)
        result = {
            'framework': 'SeeSRArch', 'tiny': args.tiny, 'device': torch.cuda.get_device_name() if cuda else 'cpu',
            'size': size, 'candidates': args.candidates, 'batch': args.batch, 'feedback_guidance': args.feedback,
            'trainable': 'controlnet', 'dtype': 'bf16 (mixed_precision)',
            'unet_params_M': round(sum(p.numel() for p in arch.unet.parameters()) / 1e6, 1),
            'controlnet_params_M': round(sum(p.numel() for p in arch.controlnet.parameters()) / 1e6, 1),
            'step_time_s_median': round(timing.median, 3), 'step_time_s_min': round(timing.min, 3),
            'warmup_step_s': round(warmup_s, 3), 'threads': torch.get_num_threads(),
            'peak_rss_build_GiB': round(build_rss / 2**30, 2),
            'peak_rss_steps_GiB': round(peak_rss_bytes() / 2**30, 2),
            'loss': float(model.get_current_log().get('l_dspo', float('nan'))),
        }
        if cuda:
            result['peak_allocated_GiB'] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            result['peak_reserved_GiB'] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        print(json.dumps(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
