"""Compare preference-alignment objectives (SFT, Diffusion-DPO, DSPO, Diffusion-DRO) on one setup.

    python scripts/compare_objectives.py --preset demo [--iters 100]            # tiny CPU default
    python scripts/compare_objectives.py --preset sd21                         # real SD2.1 weights (GPU)
    python scripts/compare_objectives.py --options a.yml b.yml ... [--out DIR]

Trains each option file through `basicsr train`, evaluates every checkpoint and the pretrained model on the
same validation sets with the same metrics and seeds, and writes table.md, table.csv and radar.png to --out.
"""
import argparse
import sys

from dspo_basicsr.comparison import PRESETS, ComparisonError, run_comparison


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--preset', choices=sorted(PRESETS), help='the four option files of a preset')
    source.add_argument('--options', nargs='+', metavar='FILE', help='one option file per objective')
    parser.add_argument('--iters', type=int, default=None, help='training iterations per objective '
                        "(default: each file's train.total_iter)")
    parser.add_argument('--out', default='results/compare_objectives', help='output folder')
    parser.add_argument('--workdir', default='.', help='where experiments/ goes; relative data paths start here')
    parser.add_argument('--prefix', default=None, help='experiment name prefix (default: compare_<preset>)')
    parser.add_argument('--no-base', action='store_true', help='skip evaluating the pretrained model')
    parser.add_argument('--note', default=None, help='a line written above the Markdown table')
    args = parser.parse_args(argv)
    files = PRESETS[args.preset] if args.preset else args.options
    prefix = args.prefix or f"compare_{args.preset or 'custom'}"
    note = args.note
    if note is None:
        note = (f"Objectives compared on the same framework and preference set ({', '.join(files)}); "
                f"{args.iters or 'train.total_iter'} iterations each.")
    try:
        result = run_comparison(files, args.out, iters=args.iters, workdir=args.workdir,
                                include_base=not args.no_base, prefix=prefix, note=note)
    except ComparisonError as err:
        print(f'compare_objectives: error: {err}', file=sys.stderr)
        return 2
    print(result['table'])
    print(f"tables: {result['table_md']}, {result['table_csv']}; radar plot: {result['radar']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
