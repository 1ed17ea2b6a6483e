"""MAD-competition selection of 2AFC test pairs between SR methods.

    python scripts/mad_select.py --sr SR_ROOT --lr LR_ROOT --out results/mad [--k 5] [--lam 1.0]
                                 [--methods A B C] [--d1 dists|vgg|l1] [--d2 vgg|thumbnail]
                                 [--dists-weights PATH] [--vgg16-weights PATH] [--device cuda]

SR_ROOT/<method>/<image>.png are the methods' outputs (scripts/run_sr_methods.py writes them), LR_ROOT/<image>.png
their inputs. D1 is DISTS by default (pyiqa's DISTS_weights-f5e65c96.pth, default in $TORCH_HOME/hub/pyiqa, and
torchvision's vgg16-397923af.pth, default in $TORCH_HOME/hub/checkpoints), D2 the VGG16 feature similarity of
the LR inputs; --d1 l1 --d2 thumbnail need no weights. Every missing weight file is named in one error. Writes
OUT/mad_pairs.csv and OUT/contact_sheets/<a>_vs_<b>.png (rows captioned with image name, D1 and D2).
"""
import argparse
import sys

from dspo_basicsr.ranking.mad import D1_CHOICES, D2_CHOICES, run_mad_selection
from dspo_basicsr.utils.distributed import add_launcher_argument, data_shard


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sr', required=True, help='folder of method folders')
    parser.add_argument('--lr', required=True, help='folder of LR inputs')
    parser.add_argument('--out', default='results/mad')
    parser.add_argument('--k', type=int, default=5, help='images selected per method pair')
    parser.add_argument('--lam', type=float, default=1.0, help='weight of the diversity term D2')
    parser.add_argument('--methods', nargs='+', default=None, help='methods to compare (default: all folders)')
    parser.add_argument('--d1', choices=D1_CHOICES, default='dists', help='perceptual distance of two SR outputs')
    parser.add_argument('--d2', choices=D2_CHOICES, default='vgg', help='semantic distance of two LR inputs')
    parser.add_argument('--dists-weights', default=None, help='DISTS weight file (default in $TORCH_HOME/hub/pyiqa)')
    parser.add_argument('--vgg16-weights', default=None,
                        help='torchvision VGG16 file (default in $TORCH_HOME/hub/checkpoints)')
    parser.add_argument('--device', default='cpu')
    add_launcher_argument(parser)
    args = parser.parse_args(argv)
    shard = data_shard(args.launcher)
    try:
        result = run_mad_selection(args.sr, args.lr, args.out, k=args.k, lam=args.lam, methods=args.methods,
                                   d1=args.d1, d2=args.d2, device=args.device, dists_weights=args.dists_weights,
                                   vgg16_weights=args.vgg16_weights, shard=shard)
    except (FileNotFoundError, ValueError) as error:
        print(f'mad_select.py: {error}', file=sys.stderr)
        return 1
    if not shard.is_main:
        return 0
    print(f'{len(result.selections)} method pairs x {args.k} images selected from {len(result.images)} images '
          f'({result.passes["d1"]} D1 and {result.passes["d2"]} D2 backbone passes, {result.seconds:.1f} s); '
          f'wrote {args.out}/mad_pairs.csv and {args.out}/contact_sheets/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
