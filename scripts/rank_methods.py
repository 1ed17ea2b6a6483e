"""Global ranking of SR methods (Thurstone Case V) from pairwise votes, with bootstrap intervals.

    python scripts/rank_methods.py VOTES.csv [--votes-per-pair 10] [--out results/ranking]
                                   [--format pairs|realsr1k] [--group mad] [--columns N1 N2 S1 S2]
                                   [--prior 0.5] [--link-prior 1] [--bootstrap 1000]

VOTES.csv is a pair list (one row per compared image: method names or files <image>_<method>.png, and vote
fractions or counts) or a vote-count matrix (header of method names, one row of counts per method). The
RealSR-1K subjective results of the SR-IQA paper (sr_subjective_results.csv, 23 subjects per pair) are read
as they are:

    python scripts/rank_methods.py sr_subjective_results.csv --format realsr1k --votes-per-pair 23 --prior 0.5

Prints the ranking and writes OUT/ranking.json (read by SRMethodGroupDataset as ranking_json) and
OUT/ranking.png (bar plot with error bars).
"""
import argparse
import os
import sys

from dspo_basicsr.ranking.ranking_report import format_ranking, plot_ranking, rank_methods, write_ranking_json
from dspo_basicsr.ranking.votes import PAIR_FORMATS


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('votes', help='pair list or vote-count matrix (CSV/TSV)')
    parser.add_argument('--votes-per-pair', type=int, default=None,
                        help='subjects per pair, to turn vote fractions into counts')
    parser.add_argument('--format', choices=sorted(PAIR_FORMATS), default=None,
                        help='pair-list column preset (default: found from the header)')
    parser.add_argument('--columns', nargs=4, default=None, metavar=('NAME1', 'NAME2', 'SCORE1', 'SCORE2'),
                        help='pair-list header names (default: those of --format)')
    parser.add_argument('--group', default=None, help="rank only rows of this group (RealSR-1K: 'mad' or 'mid')")
    parser.add_argument('--method-from', choices=('auto', 'column', 'pair_name', 'suffix'), default='auto',
                        help='where a side\'s method comes from when the name columns hold file names')
    parser.add_argument('--prior', type=float, default=0.0,
                        help='virtual votes per direction of every compared pair (keeps unanimous methods finite)')
    parser.add_argument('--link-prior', type=float, default=0.0,
                        help='virtual tie votes for uncompared pairs (links a disconnected comparison graph)')
    parser.add_argument('--bootstrap', type=int, default=1000, help='bootstrap replicates')
    parser.add_argument('--confidence', type=float, default=0.95)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='results/ranking', help='output folder')
    args = parser.parse_args()
    try:
        ranking = rank_methods(args.votes, args.votes_per_pair, tuple(args.columns) if args.columns else None,
                               args.prior, args.link_prior, args.bootstrap, args.confidence, args.seed,
                               format=args.format, group=args.group, method_from=args.method_from)
    except (ValueError, FileNotFoundError) as error:   # VoteFileError, ThurstoneError: messages say what to do
        sys.exit(f'rank_methods.py: {error}')
    group = f', group {args.group}' if args.group else ''
    print(f'{len(ranking["methods"])} methods, {ranking["num_pairs"]} compared pairs, '
          f'{ranking["num_votes"]:.0f} votes{group}')
    print(format_ranking(ranking))
    write_ranking_json(ranking, os.path.join(args.out, 'ranking.json'))
    plot_ranking(ranking, os.path.join(args.out, 'ranking.png'))
    print(f'wrote {os.path.join(args.out, "ranking.json")} and {os.path.join(args.out, "ranking.png")}')


if __name__ == '__main__':
    main()
