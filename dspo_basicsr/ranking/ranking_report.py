"""Global ranking of SR methods from votes: scores with intervals, a JSON and a bar plot.

The JSON (``{"scores": {method: mu}, "intervals": {method: [lower, upper]}, ...}``) is what
``SRMethodGroupDataset`` reads as ``ranking_json``.
"""
import os

import numpy as np

from dspo_basicsr.ranking.thurstone import bootstrap_intervals
from dspo_basicsr.ranking.votes import read_votes
from dspo_basicsr.utils.atomic_write import atomic_json_dump

__all__ = ['rank_methods', 'format_ranking', 'write_ranking_json', 'plot_ranking']


def rank_methods(votes_path, votes_per_pair=None, columns=None, prior=0.0, link_prior=0.0, num_samples=1000,
                 confidence=0.95, seed=0, format=None, group=None, method_from='auto'):
    """Thurstone scores with bootstrap intervals from a vote file (pair list or count matrix).

    ``columns``, ``format``, ``group`` and ``method_from`` are those of
    :func:`dspo_basicsr.ranking.votes.read_votes`.

    Returns:
        dict: ``methods`` (names, best first), ``scores``, ``intervals`` (method -> [lower, upper]),
        ``confidence``, ``num_votes``, ``source``.
    """
    votes = read_votes(votes_path, votes_per_pair, columns, format=format, group=group, method_from=method_from)
    mu, lower, upper = bootstrap_intervals(votes.records, len(votes.names), num_samples, confidence, seed,
                                           prior=prior, link_prior=link_prior, names=votes.names)
    order = np.argsort(-mu)
    return {
        'methods': [votes.names[i] for i in order],
        'scores': {votes.names[i]: float(mu[i]) for i in order},
        'intervals': {votes.names[i]: [float(lower[i]), float(upper[i])] for i in order},
        'confidence': confidence, 'num_votes': float(votes.counts().sum()), 'source': os.path.abspath(votes_path),
        'group': group, 'num_pairs': len(votes.records),
        'model': 'Thurstone Case V, P(i beats j) = Phi(mu_i - mu_j), sum(mu) = 0',
    }


def format_ranking(ranking):
    """The ranking as an aligned text table, best first."""
    width = max(len(m) for m in ranking['methods'])
    pct = int(round(100 * ranking['confidence']))
    lines = [f'{"rank":>4}  {"method":<{width}}  {"score":>7}  {pct}% interval']
    for rank, method in enumerate(ranking['methods'], start=1):
        lo, hi = ranking['intervals'][method]
        lines.append(f'{rank:>4}  {method:<{width}}  {ranking["scores"][method]:>7.3f}  [{lo:.3f}, {hi:.3f}]')
    return '\n'.join(lines)


def write_ranking_json(ranking, path):
    """Write the ranking dict as JSON (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_json_dump(ranking, path, indent=2)


def plot_ranking(ranking, path):
    """Bar plot of the scores with their intervals as error bars, best first, saved as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    methods = ranking['methods']
    scores = np.array([ranking['scores'][m] for m in methods])
    bounds = np.array([ranking['intervals'][m] for m in methods])
    errors = np.stack([scores - bounds[:, 0], bounds[:, 1] - scores])
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(methods) + 2), 3.5))
    ax.bar(range(len(methods)), scores, yerr=errors, capsize=4, color='tab:blue')
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha='right')
    ax.axhline(0, color='black', linewidth=0.5)
    ax.set_ylabel('Thurstone score (Case V)')
    ax.set_title(f'{int(round(100 * ranking["confidence"]))}% bootstrap intervals')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
