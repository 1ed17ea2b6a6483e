"""Seed consistency of one or more checkpoints: Best@M, Mean@M and Worst@M for M = 1, 2, 4, ..., S.

    python scripts/seed_consistency.py -opt options/test_dspo_sd21.yml --seeds 64 --metrics psnr lpips \\
        --checkpoint pretrained=none --checkpoint dspo=experiments/dspo_sd21/models/net_g_latest.pth

For every image of the option file's test sets, S samples with different seeds (``--batch`` seeds per sampler
call) are scored by the chosen metrics of ``val.metrics`` (any BasicSR / pyiqa / calibrated metric); writes
seed_consistency.csv, one seed_consistency_<metric>.png per metric and the raw scores (scores_<label>.npz).
"""
import argparse
import sys

from dspo_basicsr.cli import read_option_file
from dspo_basicsr.seed_consistency import run_seed_consistency


def _checkpoint(text):
    label, sep, path = text.partition('=')
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"--checkpoint {text!r}: write LABEL=PATH (PATH 'none' = pretrained).")
    return label, None if path.lower() in ('none', '~', '') else path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-opt', required=True, help='a test option file (network_g, test sets, val.metrics)')
    parser.add_argument('--seeds', type=int, default=64, help='samples per image (S)')
    parser.add_argument('--metrics', nargs='+', default=None, help='names in val.metrics (default: all)')
    parser.add_argument('--checkpoint', type=_checkpoint, action='append', default=None, metavar='LABEL=PATH',
                        help="a checkpoint to compare (repeatable); default: the file's path.pretrain_network_g")
    parser.add_argument('--batch', type=int, default=8, help='seeds per sampler call')
    parser.add_argument('--max-images', type=int, default=None, help='use only the first images')
    parser.add_argument('--seed', type=int, default=0, help='base seed (the same for every checkpoint)')
    parser.add_argument('--out', default='results/seed_consistency', help='output folder')
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.batch < 1:
        parser.error('--seeds and --batch must be at least 1.')
    opt = read_option_file(args.opt)
    checkpoints = dict(args.checkpoint) if args.checkpoint else \
        {'model': (opt.get('path') or {}).get('pretrain_network_g')}
    try:
        result = run_seed_consistency(opt, checkpoints, args.out, args.seeds, args.metrics, args.batch,
                                      args.max_images, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f'seed_consistency: error: {err}', file=sys.stderr)
        return 2
    for row in result['rows']:
        print(f"{row['checkpoint']:>12} {row['metric']:>8} M={row['M']:<3} best {row['best']:.4f} "
              f"mean {row['mean']:.4f} worst {row['worst']:.4f}")
    print(f"table: {result['csv']}; plots: {', '.join(result['plots'])}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
