"""Global ranking of SR methods (Thurstone Case V) from pairwise votes, with bootstrap intervals.

    python scripts/rank_methods.py VOTES.csv [--votes-per-pair 10] [--out results/ranking]
                                   [--columns name1 name2 score1 score2] [--prior 0.5] [--bootstrap 1000]

VOTES.csv is a pair list (one row per compared image: method names and vote fractions or counts) or a
vote-count matrix (header of method names, one row of counts per method). Prints the ranking and writes
OUT/ranking.json (read by SRMethodGroupDataset as ranking_json) and OUT/ranking.png (bar plot with error bars).
"""
import argparse
import os

from dspo_basicsr.ranking.ranking_report import format_ranking, plot_ranking, rank_methods, write_ranking_json


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('votes', help='pair list or vote-count matrix (CSV/TSV)')
    parser.add_argument('--votes-per-pair', type=int, default=None,
                        help='subjects per pair, to turn vote fractions into counts')
    parser.add_argument('--columns', nargs=4, default=['name1', 'name2', 'score1', 'score2'],
                        metavar=('NAME1', 'NAME2', 'SCORE1', 'SCORE2'), help='pair-list header names')
    parser.add_argument('--prior', type=float, default=0.0,
                        help='virtual votes per direction of every compared pair (keeps unanimous methods finite)')
    parser.add_argument('--link-prior', type=float, default=0.0,
                        help='virtual tie votes for uncompared pairs (links a disconnected comparison graph)')
    parser.add_argument('--bootstrap', type=int, default=1000, help='bootstrap replicates')
    parser.add_argument('--confidence', type=float, default=0.95)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='results/ranking', help='output folder')
    args = parser.parse_args()
    ranking = rank_methods(args.votes, args.votes_per_pair, tuple(args.columns), args.prior, args.link_prior,
                           args.bootstrap, args.confidence, args.seed)
    print(format_ranking(ranking))
    write_ranking_json(ranking, os.path.join(args.out, 'ranking.json'))
    plot_ranking(ranking, os.path.join(args.out, 'ranking.png'))
    print(f'wrote {os.path.join(args.out, "ranking.json")} and {os.path.join(args.out, "ranking.png")}')


if __name__ == '__main__':
    main()
