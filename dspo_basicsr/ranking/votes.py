"""Readers of pairwise votes between SR methods: a vote-count matrix or a list of compared pairs.

Two layouts are read:

* **Vote-count matrix** (CSV): a header row of method names (first cell is a label and is ignored), then
  one row per method ``name, c_1, ..., c_N`` where ``c_j`` counts the votes for the row method over
  method j.
* **Pair list** (CSV/TSV): one row per compared image with the two method names and their vote
  fractions (or counts), columns ``name1, name2, score1, score2`` by default. Fractions are turned into
  counts with ``votes_per_pair`` (the number of subjects who judged each pair); integer counts are used
  as they are when ``votes_per_pair`` is not given.
"""
import csv
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ['PairVotes', 'read_count_matrix', 'read_pair_votes', 'read_votes']


@dataclass
class PairVotes:
    """Votes between methods.

    Attributes:
        names (list[str]): Method names; index i in the records and matrices refers to ``names[i]``.
        records (list[tuple]): ``(i, j, wins_i, wins_j)`` per compared image (or one per matrix cell pair
            when read from a count matrix).
    """
    names: list
    records: list = field(default_factory=list)

    def counts(self):
        """(N, N) vote counts, ``counts[i, j]`` = votes for i over j."""
        n = len(self.names)
        counts = np.zeros((n, n))
        for i, j, wins_i, wins_j in self.records:
            counts[i, j] += wins_i
            counts[j, i] += wins_j
        return counts


def _delimiter(path, delimiter):
    if delimiter is not None:
        return delimiter
    return '\t' if os.path.splitext(path)[1].lower() in ('.tsv', '.txt') else ','


def read_count_matrix(path, delimiter=None):
    """Read a vote-count matrix CSV.

    Args:
        path (str): CSV file, header ``label, name_1, ..., name_N`` then N rows ``name_i, counts...``.
        delimiter (str, optional): Field separator; default ',' (tab for .tsv/.txt).

    Returns:
        PairVotes: Names in header order. With integer counts, one record per vote (so a bootstrap
        resamples votes: a matrix carries no per-image information); otherwise one record per pair, which
        a bootstrap cannot resample (zero-width intervals).
    """
    with open(path, newline='', encoding='utf-8') as f:
        rows = [row for row in csv.reader(f, delimiter=_delimiter(path, delimiter)) if row and any(row)]
    if len(rows) < 3:
        raise ValueError(f'vote-count matrix {path!r} needs a header row and at least two method rows.')
    names = [name.strip() for name in rows[0][1:]]
    if len(rows) - 1 != len(names):
        raise ValueError(f'vote-count matrix {path!r} has {len(names)} methods in its header but '
                         f'{len(rows) - 1} rows; it must be square.')
    counts = np.zeros((len(names), len(names)))
    for r, row in enumerate(rows[1:]):
        if row[0].strip() != names[r]:
            raise ValueError(f'vote-count matrix {path!r}, row {r + 2}: method {row[0].strip()!r} does not '
                             f'match header column {names[r]!r}; rows and columns must list methods in the '
                             'same order.')
        if len(row) - 1 != len(names):
            raise ValueError(f'vote-count matrix {path!r}, row {r + 2}: expected {len(names)} counts, got '
                             f'{len(row) - 1}.')
        try:
            counts[r] = [float(v) for v in row[1:]]
        except ValueError:
            raise ValueError(f'vote-count matrix {path!r}, row {r + 2}: counts must be numbers, got '
                             f'{row[1:]}.') from None
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names)) if counts[i, j] + counts[j, i] > 0]
    if np.all(counts % 1 == 0):
        # no image information: every vote is its own bootstrap resampling unit
        records = [record for i, j in pairs
                   for record in [(i, j, 1.0, 0.0)] * int(counts[i, j]) + [(i, j, 0.0, 1.0)] * int(counts[j, i])]
    else:
        records = [(i, j, counts[i, j], counts[j, i]) for i, j in pairs]
    return PairVotes(names, records)


def read_pair_votes(path, votes_per_pair=None, columns=('name1', 'name2', 'score1', 'score2'),
                    delimiter=None):
    """Read a list of compared pairs with vote fractions or counts.

    Args:
        path (str): CSV/TSV file with a header row.
        votes_per_pair (int, optional): Subjects per pair; vote fractions are multiplied by it. When None,
            the scores must already be vote counts.
        columns (tuple[str]): Header names of (method 1, method 2, score of 1, score of 2).
        delimiter (str, optional): Field separator; default ',' (tab for .tsv/.txt).

    Returns:
        PairVotes: Method names in order of first appearance and one record per row.
    """
    name1, name2, score1, score2 = columns
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path, delimiter))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f'pair list {path!r} has no column(s) {missing}; its header is {header}. '
                             'Pass columns=(name1, name2, score1, score2) naming yours.')
        names, index, records = [], {}, []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or '').strip() for k, v in row.items() if k is not None}
            try:
                a, b = float(row[score1]), float(row[score2])
            except ValueError:
                raise ValueError(f'pair list {path!r}, line {line}: scores {row[score1]!r}, {row[score2]!r} '
                                 'are not numbers.') from None
            if votes_per_pair is not None:
                a, b = a * votes_per_pair, b * votes_per_pair
            elif (a % 1) or (b % 1):
                raise ValueError(f'pair list {path!r}, line {line}: scores {a}, {b} look like vote fractions; '
                                 'pass votes_per_pair (subjects per pair) to turn them into counts.')
            for name in (row[name1], row[name2]):
                if name not in index:
                    index[name] = len(names)
                    names.append(name)
            records.append((index[row[name1]], index[row[name2]], a, b))
    if not records:
        raise ValueError(f'pair list {path!r} holds no pairs.')
    return PairVotes(names, records)


def read_votes(path, votes_per_pair=None, columns=('name1', 'name2', 'score1', 'score2'), delimiter=None):
    """Read either layout: a pair list when the header has ``columns``, a count matrix otherwise."""
    with open(path, newline='', encoding='utf-8') as f:
        header = next(csv.reader(f, delimiter=_delimiter(path, delimiter)), [])
    if all(c in [h.strip() for h in header] for c in columns):
        return read_pair_votes(path, votes_per_pair, columns, delimiter)
    return read_count_matrix(path, delimiter)
