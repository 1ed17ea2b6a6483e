#!/usr/bin/env python
"""RAM / DAPE tags of every image of a folder, as a JSON object {image stem: "tag, tag, ..."}.

    python scripts/tag_images.py datasets/RealSR/test_LR tags.json \
        --ram-path pretrained/ram/ram_swin_large_14m.pth --dape-path pretrained/ram/DAPE.pth [--upscale 4]

The tags are RAM's ``generate_tag`` with DAPE's LoRA merged (see ``dspo_basicsr.archs.ram_arch``), computed as
SeeSR's ``test_seesr.py`` does (the LQ image, bilinear 384 x 384). ``--upscale 4`` tags the bicubic x4 image
instead, as OSEDiff's ``test_osediff.py`` does. The JSON feeds ``scripts/generate_candidates.py --prompts`` and
``scripts/add_ram_embeddings.py --prompts``. Rerunning skips the images already in OUT (written after each image).
"""
import argparse
import sys

import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help='folder of (LQ) images')
    parser.add_argument('out', help='JSON file to write')
    parser.add_argument('--ram-path', required=True, help='RAM checkpoint ram_swin_large_14m.pth')
    parser.add_argument('--dape-path', default=None, help="SeeSR's DAPE.pth (LoRA on top of RAM)")
    parser.add_argument('--upscale', type=int, default=1, help='tag the bicubic x N image (OSEDiff: 4)')
    parser.add_argument('--tiny', action='store_true', help='the RAM checkpoint is a tiny one (tests, demos)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)

    from dspo_basicsr.archs.ram_arch import RAMImageEmbedder, tag_image_folder
    if args.tiny:
        from dspo_basicsr.demo.tiny_components import tiny_ram_embedder
        embedder = tiny_ram_embedder(ram_path=args.ram_path, dape_path=args.dape_path, tagging=True)
    else:
        embedder = RAMImageEmbedder(ram_path=args.ram_path, dape_path=args.dape_path, tagging=True)
    tags = tag_image_folder(args.folder, args.out, embedder.to(args.device), args.upscale, args.device,
                      progress=not args.no_progress)
    print(f'wrote {args.out}: tags of {len(tags)} images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
