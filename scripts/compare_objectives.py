"""Compare preference-alignment objectives (SFT, Diffusion-DPO, DSPO, Diffusion-DRO) on one setup.

    python scripts/compare_objectives.py --preset demo [--iters 100]            # tiny CPU default
    python scripts/compare_objectives.py --preset sd21                         # real SD2.1 weights (GPU)
    python scripts/compare_objectives.py --options a.yml b.yml ... [--out DIR]
    python scripts/compare_objectives.py --options options/demo/compare_dspo.yml \
        --sweep train.preference_opt.beta=500,2000,8000,32000 [--iters 100]   # one run per value

With --sweep (one option file) every value trains one run on the same set; table.md, table.csv and sweep.png
(metric against value, the paper's Fig. 7) go to --out.

Trains each option file through `basicsr train`, evaluates every checkpoint and the pretrained model on the
same validation sets with the same metrics and seeds, and writes table.md, table.csv and radar.png to --out.
"""
import argparse
import sys

from dspo_basicsr.comparison import PRESETS, ComparisonError, run_comparison, run_sweep


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
    parser.add_argument('--sweep', default=None, metavar='KEY=V1,V2,...',
                        help='train one run per value of an option key (needs exactly one option file)')
    args = parser.parse_args(argv)
    if args.sweep:
        return _sweep(args)
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


def _sweep(args):
    files = [f for f in PRESETS[args.preset] if 'compare_dspo' in f][:1] if args.preset else args.options  # its DSPO
    if len(files) != 1:
        print('compare_objectives: error: --sweep takes exactly one option file (--options FILE).', file=sys.stderr)
        return 2
    note = args.note if args.note is not None else \
        f"Sweep of {args.sweep.split('=')[0]} on {files[0]}; {args.iters or 'train.total_iter'} iterations each."
    try:
        result = run_sweep(files[0], args.sweep, args.out, iters=args.iters, workdir=args.workdir,
                           include_base=not args.no_base, prefix=args.prefix or 'sweep', note=note)
    except ComparisonError as err:
        print(f'compare_objectives: error: {err}', file=sys.stderr)
        return 2
    print(result['table'])
    print(f"tables: {result['table_md']}, {result['table_csv']}; plot: {result['plot']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
