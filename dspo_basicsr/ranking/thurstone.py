"""Thurstone Case V scaling of SR methods from pairwise votes.

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment" ranks SR methods
globally from 2AFC votes with Thurstone's Case V model (Thurstone, "A law of comparative judgment", 1927):

    P(i beats j) = Phi(mu_i - mu_j)

with Phi the standard normal CDF. The scale values ``mu`` are the maximum-likelihood solution of

    max_mu  sum_{i != j} C_ij log Phi(mu_i - mu_j),    subject to  sum_i mu_i = 0,

where ``C_ij`` counts the votes for method i over method j. The likelihood only sees differences, so the
constraint fixes the gauge. One unit of ``mu`` is one standard deviation of the perceptual difference
(the "JOD-like" unit of Case V with variance 1/2 per stimulus).

The maximum exists and is unique when the directed "i beat j at least once" graph is strongly connected.
Two cases need care and are never returned as silent garbage:

* **Zero cells / unanimous methods**: a method that never lost pushes its ``mu`` to infinity. A small
  ``prior`` (virtual votes added to both directions of every *compared* pair) keeps the estimate finite;
  without it the function raises :class:`ThurstoneError` naming the method.
* **Disconnected comparison graphs**: methods in different components have no common scale. The default
  is an error listing the components; ``link_prior > 0`` instead adds that many virtual tie votes to every
  *uncompared* pair, which ties the components together under the documented assumption "uncompared
  methods are equal until shown otherwise" (the estimate then shrinks the gap between components).
"""
import os

import numpy as np
from scipy import optimize
from scipy.special import log_ndtr

__all__ = ['ThurstoneError', 'comparison_components', 'disconnected_message', 'thurstone_scores', 'thurstone_nll',
           'bootstrap_intervals']


class ThurstoneError(ValueError):
    """A vote matrix from which Thurstone scores cannot be estimated; the message says why and what to do."""


def _as_counts(counts):
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ThurstoneError(f'the vote-count matrix must be square (N, N), got shape {counts.shape}.')
    if counts.shape[0] < 2:
        raise ThurstoneError('at least two methods are needed to rank them.')
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ThurstoneError('vote counts must be finite and non-negative.')
    counts = counts.copy()
    np.fill_diagonal(counts, 0.0)
    return counts


def comparison_components(counts):
    """Connected components of the undirected comparison graph (edge i-j if C_ij + C_ji > 0).

    Args:
        counts (array): (N, N) vote counts.

    Returns:
        list[list[int]]: Components as sorted method indices, largest first.
    """
    counts = np.asarray(counts, dtype=np.float64)
    compared = (counts + counts.T) > 0
    n = counts.shape[0]
    seen = np.zeros(n, dtype=bool)
    components = []
    for start in range(n):
        if seen[start]:
            continue
        stack, component = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            component.append(i)
            for j in np.flatnonzero(compared[i] & ~seen):
                seen[j] = True
                stack.append(j)
        components.append(sorted(component))
    return sorted(components, key=len, reverse=True)


def disconnected_message(components, names, shown=3, per_group=6):
    """A short error for a disconnected comparison graph: a few groups named, then counts.

    Names with an image extension, or many groups, mean the name columns do not hold method names (e.g.
    every file became its own "method"), so the hint is then about the columns, not about linking groups.
    """
    def describe(comp):
        listed = ', '.join(names[i] for i in comp[:per_group])
        return '{' + listed + (f', ... {len(comp) - per_group} more' if len(comp) > per_group else '') + '}'

    listed = '; '.join(describe(c) for c in components[:shown])
    if len(components) > shown:
        rest = components[shown:]
        listed += f'; and {len(rest)} more groups ({sum(len(c) for c in rest)} methods)'
    message = (f'the comparison graph is disconnected: {len(components)} groups of methods never compared with '
               f'each other ({listed}), so their scores have no common scale. ')
    file_like = any(os.path.splitext(str(n))[1].lower() in ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.webp')
                    for n in names)
    if file_like or len(components) > 4:
        return message + ('The name columns probably hold image or file names, not methods. Check --columns, '
                          'or pass --format realsr1k (methods from the pair-name column or the '
                          '<image>_<method>.png suffix).')
    return message + ('Collect votes between the groups, rank each group separately (--group), or pass '
                      '--link-prior 1 to scripts/rank_methods.py (link_prior in Python) to assume uncompared '
                      'methods are equal.')


def _strongly_connected(wins):
    """True when every method reaches every other along 'beat at least once' edges (wins: (N, N) bool)."""
    n = wins.shape[0]

    def reach(adj):
        seen = np.zeros(n, dtype=bool)
        seen[0] = True
        stack = [0]
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(adj[i] & ~seen):
                seen[j] = True
                stack.append(j)
        return seen.all()

    return reach(wins) and reach(wins.T)


def thurstone_nll(mu, counts):
    """Negative log-likelihood of Case V and its analytic gradient.

    Args:
        mu (array): (N,) scale values.
        counts (array): (N, N) vote counts, ``counts[i, j]`` = votes for i over j.

    Returns:
        tuple: (nll (float), grad (N,)).
    """
    diff = mu[:, None] - mu[None, :]                      # (N, N): mu_i - mu_j
    log_cdf = log_ndtr(diff)
    nll = -np.sum(counts * log_cdf)
    # d/dd log Phi(d) = phi(d) / Phi(d) (inverse Mills ratio), computed in log space for stability
    mills = np.exp(-0.5 * diff ** 2 - 0.5 * np.log(2 * np.pi) - log_cdf)
    weighted = counts * mills                             # (N, N): dNLL/d(diff) = -weighted
    grad = -weighted.sum(axis=1) + weighted.sum(axis=0)   # diff_ij depends on +mu_i and -mu_j
    return nll, grad


def thurstone_scores(counts, prior=0.0, link_prior=0.0, names=None, tol=1e-10):
    """Thurstone Case V scale values by maximum likelihood (L-BFGS with the analytic gradient).

    Args:
        counts (array): (N, N) vote counts, ``counts[i, j]`` = number of votes for method i over method j.
            The diagonal is ignored.
        prior (float): Virtual votes added to both directions of every compared pair (C_ij + C_ji > 0).
            Use a small value (e.g. 0.5) when some method never lost or never won a comparison.
        link_prior (float): Virtual votes added to both directions of every *uncompared* pair. 0 (default)
            makes a disconnected comparison graph an error; > 0 links the components (see module docstring).
        names (list[str], optional): Method names, used in error messages.
        tol (float): Gradient tolerance of L-BFGS.

    Returns:
        np.ndarray: (N,) scale values ``mu`` with ``sum(mu) == 0``; larger is better.

    Raises:
        ThurstoneError: Malformed counts, a disconnected comparison graph (with ``link_prior == 0``), or an
            unbounded maximum (a method that never lost or never won, with ``prior == 0``).
    """
    counts = _as_counts(counts)
    n = counts.shape[0]
    names = list(names) if names is not None else [f'method {i}' for i in range(n)]
    compared = (counts + counts.T) > 0
    off_diagonal = ~np.eye(n, dtype=bool)

    components = comparison_components(counts)
    if len(components) > 1 and link_prior <= 0:
        raise ThurstoneError(disconnected_message(components, names))

    fitted = counts + prior * compared + link_prior * (off_diagonal & ~compared)
    if not _strongly_connected(fitted > 0):
        never_lost = [names[i] for i in range(n) if fitted[:, i].sum() == 0]
        never_won = [names[i] for i in range(n) if fitted[i, :].sum() == 0]
        detail = []
        if never_lost:
            detail.append(f'never lost: {", ".join(never_lost)}')
        if never_won:
            detail.append(f'never won: {", ".join(never_won)}')
        detail = f' ({"; ".join(detail)})' if detail else ''
        raise ThurstoneError(
            f'the maximum-likelihood scores are unbounded because some methods are separated by unanimous '
            f'votes{detail}. Pass a small prior to keep the scores finite: --prior 0.5 in '
            'scripts/rank_methods.py (prior=0.5 in Python: virtual votes per compared pair).')

    def objective(free):
        # gauge: mu_0 = 0 during the fit, centred afterwards (the likelihood sees only differences)
        mu = np.concatenate([[0.0], free])
        nll, grad = thurstone_nll(mu, fitted)
        return nll, grad[1:]

    result = optimize.minimize(objective, np.zeros(n - 1), jac=True, method='L-BFGS-B',
                               options={'gtol': tol, 'ftol': 1e-15, 'maxiter': 10000})
    mu = np.concatenate([[0.0], result.x])
    if not np.all(np.isfinite(mu)):
        raise ThurstoneError(f'the Thurstone fit did not converge ({result.message}).')
    return mu - mu.mean()


def _counts_from_records(records, n):
    counts = np.zeros((n, n))
    for i, j, wins_i, wins_j in records:
        counts[i, j] += wins_i
        counts[j, i] += wins_j
    return counts


def bootstrap_intervals(records, num_methods, num_samples=1000, confidence=0.95, seed=0, prior=0.0,
                        link_prior=0.0, names=None):
    """Percentile bootstrap confidence intervals of Thurstone scores, resampling images within pairs.

    For every method pair, its compared images (one record each) are drawn with replacement, as many as
    it had; the votes of the drawn images are summed into a new count matrix and refitted. Resampling
    images rather than single votes keeps the per-image correlation of votes in the interval.

    Args:
        records (list[tuple]): ``(i, j, wins_i, wins_j)`` per compared image: method indices and the votes
            each got on that image.
        num_methods (int): N.
        num_samples (int): Bootstrap replicates.
        confidence (float): Two-sided coverage, e.g. 0.95.
        seed (int): Seed of the resampling generator (results are reproducible).
        prior, link_prior, names: As in :func:`thurstone_scores`.

    Returns:
        tuple: ``(mu, lower, upper)``, each (N,): the estimate on all data and the interval bounds.
    """
    records = [(int(i), int(j), float(a), float(b)) for i, j, a, b in records]
    if not records:
        raise ThurstoneError('no vote records to bootstrap.')
    mu = thurstone_scores(_counts_from_records(records, num_methods), prior=prior, link_prior=link_prior,
                          names=names)
    by_pair = {}
    for record in records:
        by_pair.setdefault((min(record[0], record[1]), max(record[0], record[1])), []).append(record)
    groups = [np.asarray([(i, j, a, b) for i, j, a, b in group]) for group in by_pair.values()]
    rng = np.random.default_rng(seed)
    replicates = []
    for _ in range(num_samples):
        counts = np.zeros((num_methods, num_methods))
        for group in groups:
            drawn = group[rng.integers(0, len(group), len(group))]
            np.add.at(counts, (drawn[:, 0].astype(int), drawn[:, 1].astype(int)), drawn[:, 2])
            np.add.at(counts, (drawn[:, 1].astype(int), drawn[:, 0].astype(int)), drawn[:, 3])
        try:
            replicates.append(thurstone_scores(counts, prior=prior, link_prior=link_prior, names=names))
        except ThurstoneError:
            # a replicate can draw only unanimous images for some pair; it carries no finite estimate
            continue
    if len(replicates) < 0.9 * num_samples:
        raise ThurstoneError(
            f'{num_samples - len(replicates)} of {num_samples} bootstrap replicates had unbounded scores '
            '(unanimous votes); pass a small prior: --prior 0.5 in scripts/rank_methods.py (prior=0.5 in Python).')
    replicates = np.stack(replicates)
    tail = 100 * (1 - confidence) / 2
    lower, upper = np.percentile(replicates, [tail, 100 - tail], axis=0)
    return mu, lower, upper
