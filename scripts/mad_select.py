"""MAD-competition selection of 2AFC test pairs between SR methods.

    python scripts/mad_select.py --sr SR_ROOT --lr LR_ROOT --out results/mad [--k 5] [--lam 1.0]
                                 [--methods A B C] [--device cuda]

SR_ROOT/<method>/<image>.png are the methods' outputs, LR_ROOT/<image>.png their inputs. D1 is DISTS
(pyiqa weights DISTS_weights-f5e65c96.pth in $TORCH_HOME/hub/pyiqa and torchvision's vgg16-397923af.pth in
$TORCH_HOME/hub/checkpoints), D2 is VGG16 feature similarity of the LR inputs. Writes OUT/mad_pairs.csv and
OUT/contact_sheets/<a>_vs_<b>.png.
"""
import argparse

from dspo_basicsr.ranking.mad import run_mad_selection


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sr', required=True, help='folder of method folders')
    parser.add_argument('--lr', required=True, help='folder of LR inputs')
    parser.add_argument('--out', default='results/mad')
    parser.add_argument('--k', type=int, default=5, help='images selected per method pair')
    parser.add_argument('--lam', type=float, default=1.0, help='weight of the diversity term D2')
    parser.add_argument('--methods', nargs='+', default=None, help='methods to compare (default: all folders)')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    result = run_mad_selection(args.sr, args.lr, args.out, k=args.k, lam=args.lam, methods=args.methods,
                               device=args.device)
    print(f'{len(result.selections)} method pairs x {args.k} images selected from {len(result.images)} images '
          f'({result.passes["d1"]} D1 and {result.passes["d2"]} D2 backbone passes, {result.seconds:.1f} s); '
          f'wrote {args.out}/mad_pairs.csv and {args.out}/contact_sheets/')


if __name__ == '__main__':
    main()
