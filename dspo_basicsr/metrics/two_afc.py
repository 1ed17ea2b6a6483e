"""2AFC agreement between a quality model and human pairwise votes, and the human ceiling.

For a pair with human preference fraction ``p`` for image A and a model choice ``q`` (1 if the model
scores A higher, 0 if B, 0.5 on an exact tie), the 2AFC score is ``p q + (1 - p)(1 - q)`` (Zhang et al.,
"The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", 2018), averaged over pairs.
"""
import numpy as np

__all__ = ['model_choice', 'two_afc_score', 'human_ceiling', 'oracle_ceiling', 'pairs_csv_ceilings']


def model_choice(score_a, score_b):
    """q per pair from two quality scores (higher is better): 1, 0, or 0.5 on a tie. Arrays (P,) -> (P,)."""
    score_a, score_b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    return np.where(score_a > score_b, 1.0, np.where(score_a < score_b, 0.0, 0.5))


def two_afc_score(pref_fraction, choice):
    """Mean 2AFC score ``p q + (1 - p)(1 - q)``.

    Args:
        pref_fraction (array): (P,) share of subjects preferring image A of each pair, in [0, 1].
        choice (array): (P,) model choice q: 1 (A), 0 (B), 0.5 (tie).

    Returns:
        float: In [0, 1]; 0.5 is chance, :func:`oracle_ceiling` the best any model can reach.
    """
    p = np.asarray(pref_fraction, dtype=np.float64)
    q = np.asarray(choice, dtype=np.float64)
    if p.shape != q.shape or p.size == 0:
        raise ValueError(f'two_afc_score needs equally long non-empty arrays, got {p.shape} and {q.shape}.')
    if np.any((p < 0) | (p > 1)):
        raise ValueError('preference fractions must lie in [0, 1].')
    return float(np.mean(p * q + (1 - p) * (1 - q)))


def human_ceiling(pref_fraction):
    """Expected 2AFC score of one human against the others: mean of ``p^2 + (1 - p)^2`` (LPIPS' "human")."""
    p = np.asarray(pref_fraction, dtype=np.float64)
    return float(np.mean(p ** 2 + (1 - p) ** 2))


def oracle_ceiling(pref_fraction):
    """Best 2AFC score of any deterministic model (always choosing the majority): mean of ``max(p, 1 - p)``."""
    p = np.asarray(pref_fraction, dtype=np.float64)
    return float(np.mean(np.maximum(p, 1 - p)))


def pairs_csv_ceilings(path, fraction_a='fraction_a', fraction_b='fraction_b', delimiter=None):
    """Human and oracle ceilings of a 2AFC pairs list (RealSR-1K style CSV/TSV with a header row).

    Args:
        path (str): The list.
        fraction_a (str): Column of the share of subjects preferring image A.
        fraction_b (str): Column of the share preferring B (optional; used to normalise when present).

    Returns:
        dict: ``pairs``, ``human_ceiling``, ``oracle_ceiling``.
    """
    from dspo_basicsr.data.iqa_list_dataset import read_table
    rows, header = read_table(path, delimiter)
    if fraction_a not in header:
        raise KeyError(f'2AFC list {path!r} has no column {fraction_a!r}; its header is {header}.')
    a = np.array([float(r[fraction_a]) for r in rows])
    b = np.array([float(r[fraction_b]) for r in rows]) if fraction_b in header else 1 - a
    p = a / (a + b)
    return {'pairs': int(len(p)), 'human_ceiling': human_ceiling(p), 'oracle_ceiling': oracle_ceiling(p)}
