#!/usr/bin/env python
"""Add precomputed RAM / DAPE image embeddings (and tag prompts) to a preference set, for SeeSR / AddSR.

    python scripts/add_ram_embeddings.py datasets/pref.lmdb datasets/pref_ram.lmdb \
        --ram-path weights/ram_swin_large_14m.pth --dape-path weights/DAPE.pth [--tags] [--prompts tags.json] \
        [--device cuda]

Every sample of SRC is read, ``extras['ram_embeds']`` (145, 512) is computed from its LQ image and, when
``--tags`` is given, the prompt becomes RAM's (DAPE's) tags of the LQ followed by the sample's own prompt, as
SeeSR / AddSR prompt at test time; a JSON object {sample id: prompt} given with ``--prompts`` (e.g. from
``scripts/tag_images.py``) replaces the prompt of the samples it names. The new set DST is written
atomically (a temporary folder renamed at the end; an interrupted run resumes), so SRC is never modified.
Training then reads the embeddings instead of running RAM every step (``SeeSRArch.condition`` uses them).
The embeddings are of the whole LQ image; with random crops in training they describe the whole image.
"""
import argparse
import json
import sys

import torch

import dspo_basicsr  # noqa: F401
from dspo_basicsr.archs.ram_arch import RAMImageEmbedder, samples_with_ram_embeddings
from dspo_basicsr.data.preference_set import PreferenceLMDB, write_preference_lmdb
from dspo_basicsr.preference.pipeline import run_interruptible


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='source preference set NAME.lmdb')
    parser.add_argument('dst', help='destination set (must not exist unless --overwrite)')
    parser.add_argument('--ram-path', required=True, help='RAM checkpoint ram_swin_large_14m.pth')
    parser.add_argument('--dape-path', default=None, help="SeeSR's DAPE.pth (applied on top of RAM)")
    parser.add_argument('--prompts', default=None, help='JSON file {sample id: tag prompt}')
    parser.add_argument('--tags', action='store_true', help="prompts become RAM / DAPE tags of the LQ + own prompt")
    parser.add_argument('--tiny', action='store_true', help='the RAM checkpoint is a tiny one (tests, demos)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--overwrite', action='store_true')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)

    prompts = None
    if args.prompts:
        with open(args.prompts, encoding='utf-8') as f:
            prompts = json.load(f)
        if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
            parser.error(f"--prompts '{args.prompts}' must hold a JSON object mapping sample ids to prompt strings.")
    if args.tiny:
        from dspo_basicsr.demo.tiny_components import tiny_ram_embedder
        embedder = tiny_ram_embedder(ram_path=args.ram_path, dape_path=args.dape_path, tagging=args.tags)
    else:
        embedder = RAMImageEmbedder(ram_path=args.ram_path, dape_path=args.dape_path, tagging=args.tags)
    embedder = embedder.to(args.device)
    source = PreferenceLMDB(args.src)
    unknown = sorted(set(prompts or {}) - set(source.ids()))
    if unknown:
        parser.error(f'--prompts names sample ids that are not in {args.src}: {unknown[:5]}')
    write_preference_lmdb(args.dst, samples_with_ram_embeddings(source, embedder, prompts, args.device,
                                                                   tags=args.tags),
                          scale=source.header['scale'], overwrite=args.overwrite, total=len(source),
                          png_compression=source.header.get('png_compression', 0), progress=not args.no_progress)
    print(f'wrote {args.dst}: {len(source)} samples with ram_embeds')
    return 0


if __name__ == '__main__':
    sys.exit(run_interruptible(main))
