"""Readers of pairwise votes between SR methods: a vote-count matrix or a list of compared pairs.

Two layouts are read:

* **Vote-count matrix** (CSV): a header row of method names (first cell is a label and is ignored), then
  one row per method ``name, c_1, ..., c_N`` where ``c_j`` counts the votes for the row method over
  method j.
* **Pair list** (CSV/TSV): one row per compared image with the two method names and their vote
  fractions (or counts), columns ``name1, name2, score1, score2`` by default. Fractions are turned into
  counts with ``votes_per_pair`` (the number of subjects who judged each pair); integer counts are used
  as they are when ``votes_per_pair`` is not given.

The name columns may hold method names, or image file names ``<image>_<method>.png`` as in the RealSR-1K
subjective results released with the SR-IQA paper (github.com/cschenjunlin/SR-IQA-SMC25,
``sr_subjective_results.csv``: ``sr_pair_names, group, name1_column, name2_column, score1_column,
score2_column``, vote fractions of 23 subjects, ``group`` ``mad`` or ``mid``). Then the method of each
side comes from the pair-name column (``BSRGAN_Real-ESRGAN``) when the file has one, else from the
file-name suffix after the image id that both names share. ``PAIR_FORMATS`` holds the column presets.
"""
import csv
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ['PAIR_FORMATS', 'PairVotes', 'VoteFileError', 'methods_from_file_names', 'read_count_matrix',
           'read_pair_votes', 'read_votes']


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')

# column presets of pair lists: (name1, name2, score1, score2) and the optional pair-name / group columns
PAIR_FORMATS = {
    'pairs': {'columns': ('name1', 'name2', 'score1', 'score2'), 'pair_name': None, 'group': 'group'},
    # RealSR-1K (cschenjunlin/SR-IQA-SMC25, sr_subjective_results.csv)
    'realsr1k': {'columns': ('name1_column', 'name2_column', 'score1_column', 'score2_column'),
                 'pair_name': 'sr_pair_names', 'group': 'group'},
}


class VoteFileError(ValueError):
    """A vote file that cannot be read as any known layout; the message says what to pass instead."""


def _short_list(items, limit=5):
    items = list(items)
    shown = ', '.join(repr(x) for x in items[:limit])
    return shown + (f' ... ({len(items) - limit} more)' if len(items) > limit else '')


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


def _looks_like_file(name):
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def methods_from_file_names(file1, file2, pair_name=None):
    """Methods of the two sides of a 2AFC row whose names are files ``<image>_<method>.<ext>`` (or
    ``<method>/<image>.<ext>``, the layout of ``scripts/run_sr_methods.py``).

    Args:
        file1, file2 (str): The two compared files of the same image, e.g. ``grass_72_BSRGAN.png``.
        pair_name (str, optional): ``<method1>_<method2>`` (RealSR-1K's ``sr_pair_names``); method names
            may contain '_' only when this is given.

    Returns:
        tuple[str, str] | None: The two methods, or None when the names do not fit the pattern.
    """
    stem1 = os.path.splitext(os.path.basename(file1))[0]
    stem2 = os.path.splitext(os.path.basename(file2))[0]
    folder1, folder2 = os.path.basename(os.path.dirname(file1)), os.path.basename(os.path.dirname(file2))
    if stem1 == stem2 and folder1 and folder2 and folder1 != folder2:
        return folder1, folder2          # sr_outputs/<method>/<image>.png
    if pair_name:
        for cut in [k for k, ch in enumerate(pair_name) if ch == '_']:
            m1, m2 = pair_name[:cut], pair_name[cut + 1:]
            if (stem1 == m1 or stem1.endswith('_' + m1)) and (stem2 == m2 or stem2.endswith('_' + m2)):
                return m1, m2
        return None
    # the image id is the longest common prefix of both stems that ends with '_'
    common = os.path.commonprefix([stem1, stem2])
    cut = common.rfind('_')
    if cut < 0:
        return None
    m1, m2 = stem1[cut + 1:], stem2[cut + 1:]
    return (m1, m2) if m1 and m2 and m1 != m2 else None


def read_pair_votes(path, votes_per_pair=None, columns=None, delimiter=None, format=None, group=None,
                    method_from='auto'):
    """Read a list of compared pairs with vote fractions or counts.

    Args:
        path (str): CSV/TSV file with a header row.
        votes_per_pair (int, optional): Subjects per pair; vote fractions are multiplied by it. When None,
            the scores must already be vote counts.
        columns (tuple[str], optional): Header names of (name 1, name 2, score of 1, score of 2); default
            those of ``format``.
        delimiter (str, optional): Field separator; default ',' (tab for .tsv/.txt).
        format (str, optional): A key of ``PAIR_FORMATS`` ('pairs' by default, 'realsr1k').
        group (str, optional): Keep only rows whose group column has this value (RealSR-1K: 'mad', 'mid').
        method_from (str): 'auto' (file names -> method from the pair name or the suffix, otherwise the
            names are methods), 'column' (the names are methods), 'pair_name' or 'suffix'.

    Returns:
        PairVotes: Method names in order of first appearance and one record per row.
    """
    preset = PAIR_FORMATS.get(format or 'pairs')
    if preset is None:
        raise VoteFileError(f'unknown vote format {format!r}; choose one of {sorted(PAIR_FORMATS)} (--format).')
    if method_from not in ('auto', 'column', 'pair_name', 'suffix'):
        raise ValueError(f"method_from must be 'auto', 'column', 'pair_name' or 'suffix', got {method_from!r}.")
    name1, name2, score1, score2 = columns or preset['columns']
    with open(path, newline='', encoding='utf-8') as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path, delimiter))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in (name1, name2, score1, score2) if c not in header]
        if missing:
            raise VoteFileError(f'pair list {path!r} has no column(s) {missing}; its header is '
                                f'{_short_list(header, 8)}. Pass --columns NAME1 NAME2 SCORE1 SCORE2 naming yours, '
                                f'or --format ({", ".join(sorted(PAIR_FORMATS))}).')
        pair_column = preset['pair_name'] if preset['pair_name'] in header else None
        group_column = preset['group']
        if group is not None and group_column not in header:
            raise VoteFileError(f'pair list {path!r} has no {group_column!r} column to select --group {group!r} '
                                f'from; its header is {_short_list(header, 8)}.')
        rows = [(line, {k.strip(): (v or '').strip() for k, v in row.items() if k is not None})
                for line, row in enumerate(reader, start=2)]
    if group is not None:
        groups_found = sorted({row.get(group_column, '') for _, row in rows})
        rows = [(line, row) for line, row in rows if row.get(group_column) == group]
        if not rows:
            raise VoteFileError(f'pair list {path!r} has no row with {group_column} == {group!r}; its groups are '
                                f'{_short_list(groups_found)}. Pass one of them to --group, or leave --group out.')
    names, index, records = [], {}, []
    for line, row in rows:
        try:
            a, b = float(row[score1]), float(row[score2])
        except ValueError:
            raise VoteFileError(f'pair list {path!r}, line {line}: scores {row[score1]!r}, {row[score2]!r} '
                                'are not numbers.') from None
        if votes_per_pair is not None:
            a, b = a * votes_per_pair, b * votes_per_pair
        elif (a % 1) or (b % 1):
            raise VoteFileError(f'pair list {path!r}, line {line}: scores {a}, {b} look like vote fractions; '
                                'pass --votes-per-pair N (votes_per_pair in Python: subjects per pair) to turn '
                                'them into counts.')
        methods = _row_methods(path, line, row[name1], row[name2], row.get(pair_column) if pair_column else None,
                               method_from)
        for name in methods:
            if name not in index:
                index[name] = len(names)
                names.append(name)
        records.append((index[methods[0]], index[methods[1]], a, b))
    if not records:
        raise VoteFileError(f'pair list {path!r} holds no pairs.')
    return PairVotes(names, records)


def _row_methods(path, line, side1, side2, pair_name, method_from):
    if method_from == 'column' or (method_from == 'auto' and not (_looks_like_file(side1) and _looks_like_file(side2))):
        return side1, side2
    if method_from == 'pair_name' and not pair_name:
        raise VoteFileError(f'pair list {path!r} has no pair-name column to take the methods from; use '
                            '--method-from suffix or --format realsr1k.')
    methods = methods_from_file_names(side1, side2, None if method_from == 'suffix' else pair_name)
    if methods is None:
        source = f'pair name {pair_name!r}' if pair_name and method_from != 'suffix' else 'file-name suffix'
        raise VoteFileError(f'pair list {path!r}, line {line}: cannot tell the methods of {side1!r} and {side2!r} '
                            f'from the {source}; files must be named <image>_<method>.<ext> or '
                            '<method>/<image>.<ext>. Pass '
                            '--method-from column if the name columns hold method names.')
    return methods


def _count_matrix_shape(path, delimiter):
    with open(path, newline='', encoding='utf-8') as f:
        rows = [row for row in csv.reader(f, delimiter=_delimiter(path, delimiter)) if row and any(row)]
    return (len(rows[0]) - 1 if rows else 0), len(rows) - 1


def read_votes(path, votes_per_pair=None, columns=None, delimiter=None, format=None, group=None,
               method_from='auto'):
    """Read either layout: a pair list (``columns``, ``format``, or any preset whose columns the header has),
    else a square vote-count matrix; anything else is a :class:`VoteFileError` saying which layouts were tried.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'vote file {path!r} does not exist.')
    with open(path, newline='', encoding='utf-8') as f:
        header = [h.strip() for h in next(csv.reader(f, delimiter=_delimiter(path, delimiter)), [])]
    if columns is not None or format is not None:
        return read_pair_votes(path, votes_per_pair, columns, delimiter, format, group, method_from)
    for name, preset in PAIR_FORMATS.items():
        if all(c in header for c in preset['columns']):
            return read_pair_votes(path, votes_per_pair, None, delimiter, name, group, method_from)
    methods, rows = _count_matrix_shape(path, delimiter)
    if methods >= 2 and methods == rows:
        if group is not None:
            raise VoteFileError(f'{path!r} is a vote-count matrix, which has no groups; leave --group out.')
        return read_count_matrix(path, delimiter)
    tried = '; '.join(f'{name} pair list (columns {", ".join(p["columns"])})' for name, p in PAIR_FORMATS.items())
    raise VoteFileError(
        f'cannot read {path!r}: its header is {_short_list(header, 8)}. Tried: {tried}; a square vote-count '
        f'matrix (it has {methods} names in its header but {rows} rows). Pass --columns NAME1 NAME2 SCORE1 SCORE2 '
        f'naming your pair-list columns, or --format ({", ".join(sorted(PAIR_FORMATS))}).')
