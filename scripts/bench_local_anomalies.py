"""Local-anomalies benchmark: do instance-level preferences help where image-level labels are wrong locally?

    python scripts/make_demo_data.py --overwrite                      # the demo set it starts from (149 s)
    python scripts/bench_local_anomalies.py [--seeds 0 1 2 3 4] [--iters 50] [--out results/local_anomalies]

Pastes colour blotches into instances of each demo sample's image-level winner (so that image-level and instance
labels disagree there, by construction), trains SFT, Diffusion-DPO, DSPO and Diffusion-DRO on it per seed with the
runner of scripts/compare_objectives.py, and writes runs.csv, table.md (means with 95 % intervals) and
local_anomalies.png to --out: instance win rate against the pretrained base, share of blotched instances, PSNR and
SSIM on the held-out crops. See docs/comparison.md.
"""
import argparse
import sys

from dspo_basicsr.bench.local_anomalies import OBJECTIVE_FILES, run_local_anomalies
from dspo_basicsr.comparison import ComparisonError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source', default='datasets/demo/demo_pref.lmdb', help='the demo preference set')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4], help='training seeds')
    parser.add_argument('--iters', type=int, default=50, help='training iterations per run')
    parser.add_argument('--objectives', nargs='+', default=['sft', 'dpo', 'dspo', 'dro'],
                        choices=list(OBJECTIVE_FILES),
                        help='online, online_advantages: OnlineGroupModel (options/demo/online_group*.yml)')
    parser.add_argument('--share', type=float, default=0.4,
                        help="share of the winner's instances to blotch (0: the clean demo set, a control)")
    parser.add_argument('--out', default='results/local_anomalies', help='output folder')
    parser.add_argument('--workdir', default='.', help='where experiments/ goes')
    args = parser.parse_args(argv)
    try:
        table, plot, _ = run_local_anomalies(args.out, args.source, tuple(args.seeds), args.iters,
                                             tuple(args.objectives), args.workdir, args.share)
    except (ComparisonError, FileNotFoundError) as err:
        print(f'bench_local_anomalies: error: {err}', file=sys.stderr)
        return 2
    print(table)
    print(f'plot: {plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
