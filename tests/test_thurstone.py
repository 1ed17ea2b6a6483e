"""Thurstone Case V scaling, vote readers and bootstrap intervals."""
import os

import numpy as np
import pytest
from scipy.stats import norm

from dspo_basicsr.ranking import (
    ThurstoneError,
    bootstrap_intervals,
    read_count_matrix,
    read_pair_votes,
    thurstone_nll,
    thurstone_scores,
)

TRUE_MU = np.array([-1.0, -0.3, 0.2, 1.1])


def synthetic_counts(mu, votes_per_pair, seed=0):
    rng = np.random.default_rng(seed)
    n = len(mu)
    counts = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            wins = rng.binomial(votes_per_pair, norm.cdf(mu[i] - mu[j]))
            counts[i, j], counts[j, i] = wins, votes_per_pair - wins
    return counts


def test_recovers_known_scores():
    votes = 2000
    mu = thurstone_scores(synthetic_counts(TRUE_MU, votes))
    assert abs(mu.sum()) < 1e-9
    # Tolerance from the vote count: one pair's fraction has sd sqrt(p(1-p)/n) <= sqrt(0.25/2000) = 0.011,
    # i.e. sd 0.011 / phi(d) <= 0.011 / 0.22 = 0.05 on mu_i - mu_j for the widest gap here (d = 2.1);
    # each mu pools three pairs, so its sd is about 0.03. 0.1 is > 3 sd: fails only for a wrong estimator.
    np.testing.assert_allclose(mu, TRUE_MU - TRUE_MU.mean(), atol=0.1)
    # and the estimate must beat a deliberately wrong answer by far (the test can fail)
    assert np.abs(mu - TRUE_MU).max() < 0.1 < np.abs(mu[::-1] - TRUE_MU).max()


def test_gradient_matches_finite_differences():
    counts = synthetic_counts(TRUE_MU, 30, seed=1)
    mu = np.array([0.3, -0.2, 0.5, -0.6])
    _, grad = thurstone_nll(mu, counts)
    step = 1e-6
    numeric = [(thurstone_nll(mu + step * e, counts)[0] - thurstone_nll(mu - step * e, counts)[0]) / (2 * step)
               for e in np.eye(4)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_zero_cell_is_finite():
    counts = synthetic_counts(TRUE_MU, 50, seed=2)
    counts[0, 3] = 0  # method 0 never beat method 3; still strongly connected through the other pairs
    mu = thurstone_scores(counts)
    assert np.all(np.isfinite(mu)) and np.argmax(mu) == 3 and np.argmin(mu) == 0


def test_unanimous_method_needs_prior():
    counts = synthetic_counts(TRUE_MU, 50, seed=3)
    counts[:, 3] = 0  # method 3 never lost: the MLE is unbounded
    with pytest.raises(ThurstoneError, match='never lost: m3'):
        thurstone_scores(counts, names=['m0', 'm1', 'm2', 'm3'])
    mu = thurstone_scores(counts, prior=0.5)
    assert np.all(np.isfinite(mu)) and np.argmax(mu) == 3 and mu[3] < 10


def test_disconnected_graph_is_reported():
    counts = np.zeros((4, 4))
    counts[0, 1], counts[1, 0] = 7, 3
    counts[2, 3], counts[3, 2] = 4, 6
    with pytest.raises(ThurstoneError, match=r'disconnected.*\{a, b\}.*\{c, d\}'):
        thurstone_scores(counts, names=['a', 'b', 'c', 'd'])
    mu = thurstone_scores(counts, link_prior=1.0)
    assert mu[0] > mu[1] and mu[3] > mu[2]


def test_readers_and_bootstrap(tmp_path):
    matrix = tmp_path / 'counts.csv'
    matrix.write_text('method,a,b,c\na,0,8,9\nb,2,0,6\nc,1,4,0\n')
    votes = read_count_matrix(str(matrix))
    assert votes.names == ['a', 'b', 'c']
    np.testing.assert_array_equal(votes.counts(), [[0, 8, 9], [2, 0, 6], [1, 4, 0]])

    rng = np.random.default_rng(0)
    lines = ['image,name1,name2,score1,score2']
    for k in range(40):
        for i, j in ((0, 1), (0, 2), (1, 2)):
            p = rng.binomial(10, norm.cdf(TRUE_MU[i + 1] - TRUE_MU[j + 1])) / 10
            lines.append(f'img{k},m{i},m{j},{p},{1 - p:.1f}')
    pairs = tmp_path / 'pairs.csv'
    pairs.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match='votes_per_pair'):
        read_pair_votes(str(pairs))
    votes = read_pair_votes(str(pairs), votes_per_pair=10)
    assert votes.names == ['m0', 'm1', 'm2'] and len(votes.records) == 120
    mu, lower, upper = bootstrap_intervals(votes.records, 3, num_samples=100, seed=0, prior=0.5)
    assert np.all(lower <= mu) and np.all(mu <= upper) and np.all(upper - lower > 0)
    again = bootstrap_intervals(votes.records, 3, num_samples=100, seed=0, prior=0.5)
    np.testing.assert_array_equal(lower, again[1])  # seeded
    assert list(np.argsort(mu)) == [0, 1, 2]


@pytest.mark.slow
def test_rank_methods_report(tmp_path):
    import json
    import subprocess
    import sys

    from dspo_basicsr.ranking.ranking_report import format_ranking, rank_methods
    matrix = tmp_path / 'counts.csv'
    matrix.write_text('method,a,b,c\na,0,30,35\nb,20,0,28\nc,15,22,0\n')
    ranking = rank_methods(str(matrix), num_samples=50)
    assert ranking['methods'] == ['a', 'b', 'c']
    assert all(hi - lo > 0.05 for lo, hi in ranking['intervals'].values())  # votes are resampled
    assert format_ranking(ranking).splitlines()[1].split()[:2] == ['1', 'a']
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'rank_methods.py')
    out = tmp_path / 'out'
    result = subprocess.run([sys.executable, script, str(matrix), '--bootstrap', '50', '--out', str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / 'ranking.json').read_text())['methods'] == ['a', 'b', 'c']
    assert (out / 'ranking.png').stat().st_size > 1000
