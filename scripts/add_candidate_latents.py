#!/usr/bin/env python
"""Add precomputed candidate latents (each candidate's VAE posterior) to a preference set.

    python scripts/add_candidate_latents.py datasets/pref.lmdb datasets/pref_latents.lmdb \
        -opt options/dspo_seesr.yml [--device cuda] [--chunk 4]

The framework of the option file's ``network_g`` is built (its VAE, at its ``mixed_precision``, is the one
training uses) and every candidate of SRC is encoded once; ``extras['candidate_latents']`` (N, 2, C, H/f, W/f)
holds the posterior mean and std, and the sample's meta the VAE's digest. The new set DST is written atomically
(a temporary folder renamed at the end; an interrupted run resumes), so SRC is never modified. Training on DST
then draws each candidate's latent from the stored posterior instead of running the VAE encoder; latents written
by another VAE are refused at the first batch (docs/preference_lmdb.md).
"""
import argparse
import sys

import torch

import dspo_basicsr  # noqa: F401
from dspo_basicsr.data.preference_set import PreferenceLMDB, resumable_ids, write_preference_lmdb
from dspo_basicsr.preference.candidate_latents import samples_with_candidate_latents
from dspo_basicsr.preference.pipeline import run_interruptible
from dspo_basicsr.utils.options import read_option_file

from basicsr.archs import build_network


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='source preference set NAME.lmdb')
    parser.add_argument('dst', help='destination set (must not exist unless --overwrite)')
    parser.add_argument('-opt', required=True, help='the training option file (its network_g is built)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--chunk', type=int, default=4, help='candidates per VAE call')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)

    options = read_option_file(args.opt)
    if 'network_g' not in options:
        parser.error(f"option file '{args.opt}' has no network_g section.")
    framework = build_network(dict(options['network_g'])).to(args.device).eval()
    if not hasattr(framework, 'encode_posterior'):
        parser.error(f"network_g of '{args.opt}' ({options['network_g'].get('type')}) is not a diffusion SR framework.")
    source = PreferenceLMDB(args.src)
    samples = samples_with_candidate_latents(source, framework, args.device, args.chunk, done=resumable_ids(args.dst))
    write_preference_lmdb(args.dst, samples,
                          scale=source.header['scale'], overwrite=args.overwrite, total=len(source),
                          png_compression=source.header.get('png_compression', 0), progress=not args.no_progress)
    print(f'wrote {args.dst}: {len(source)} samples with candidate_latents')
    return 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
