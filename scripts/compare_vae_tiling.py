#!/usr/bin/env python
"""How far ``vae_tile: true`` (diffusers' tiles above the official scripts' thresholds) is from the untiled VAE.

    python scripts/compare_vae_tiling.py [--image 1152] [--latent 256] [--seed 0]

Builds a tiny SD-like VAE (random weights, latent factor 8), encodes a smooth image of ``--image`` px (above
the 1088 px encoder threshold) and decodes a ``--latent`` latent (above the 244 latent-pixel decoder
threshold), tiled and untiled, and prints the relative latent difference and the PSNR of the decoded images.
"""
import argparse

import torch
import torch.nn.functional as F

from dspo_basicsr.demo.tiny_arch import TinyControlSD2Arch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--image', type=int, default=1152)
    parser.add_argument('--latent', type=int, default=256)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    arch = TinyControlSD2Arch(vae_config={'block_out_channels': (16, 32, 32, 32)}).eval()
    generator = torch.Generator().manual_seed(args.seed)
    image = F.interpolate(torch.rand(1, 3, 18, 18, generator=generator), size=(args.image, args.image),
                          mode='bicubic', align_corners=False).clamp(0, 1)
    latents = arch.encode_images(image)
    with arch.vae_tiling(True):
        tiled_latents = arch.encode_images(image)
    relative = ((latents - tiled_latents).norm() / latents.norm()).item()
    print(f'encoder, {args.image} px: tiled vs untiled latents differ by {100 * relative:.1f} % (relative norm)')
    latent = F.interpolate(latents, size=(args.latent, args.latent), mode='bilinear', align_corners=False)
    decoded = arch.decode_latents(latent)
    with arch.vae_tiling(True):
        tiled = arch.decode_latents(latent)
    psnr = (10 * torch.log10(1 / F.mse_loss(decoded, tiled))).item()
    print(f'decoder, {args.latent} latent px: tiled vs untiled {psnr:.1f} dB PSNR, '
          f'largest difference {(decoded - tiled).abs().max().item():.2f}')


if __name__ == '__main__':
    main()
