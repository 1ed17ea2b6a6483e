"""What the answers say: majority votes, agreement, per-annotator work, win rates, and the exports.

* Majority vote per instance across annotators: the candidate named best most often and the one named
  worst most often; a tie, a majority of "no clear preference", or best = worst gives no pair. A
  description counts as hallucinated when at least half of the item's annotators ticked it.
* Agreement: mean pairwise agreement (share of annotator pairs giving the same answer on an item) and
  Fleiss' kappa (Fleiss, 1971), with the per-item form that allows a varying number of raters per item.
* Win rate (DSPO, section 5.3): share of answers preferring method A, with the Wilson score 95% interval,
  per round and pooled over rounds.

Exports: the ``dspo-human-annotation`` JSON read by ``score_instances.py --scorer human``; for 2AFC, the
vote list in the RealSR-1K layout (``sr_pair_names, group, name1_column, name2_column, score1_column,
score2_column``; pair names ``<method1>_<method2>``, group ``mad``, file names ``<image>_<method>.png``;
vote fractions) with those files copied beside it,
and the vote-count matrix read by ``rank_methods.py``.
"""
import csv
import itertools
import math
import os
import shutil
from collections import Counter, defaultdict

import numpy as np

from dspo_basicsr.utils.atomic_write import atomic_json_dump

__all__ = ['fleiss_kappa', 'pairwise_agreement', 'wilson_interval', 'majority_instances', 'annotator_table',
           'human_annotation_json', 'write_realsr1k_votes', 'write_count_matrix', 'win_rates', 'plot_win_rates',
           'build_report', 'write_report', 'REALSR1K_COLUMNS']

REALSR1K_COLUMNS = ('sr_pair_names', 'group', 'name1_column', 'name2_column', 'score1_column', 'score2_column')


def fleiss_kappa(labels_per_item):
    """Fleiss' kappa of categorical labels.

    Args:
        labels_per_item (list[list]): Per item, the labels its raters gave (items with fewer than two
            raters are left out).

    Returns:
        float | None: Kappa; None when no item has two raters; 1.0 when every rater used one category.
    """
    items = [labels for labels in labels_per_item if len(labels) >= 2]
    if not items:
        return None
    agreement, totals = [], Counter()
    for labels in items:
        counts = Counter(labels)
        n = len(labels)
        agreement.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
    p_bar = float(np.mean(agreement))
    total = sum(totals.values())
    p_e = sum((c / total) ** 2 for c in totals.values())
    if p_e == 1.0:
        return 1.0
    return (p_bar - p_e) / (1 - p_e)


def pairwise_agreement(labels_per_item):
    """Share of rater pairs (over all items with two raters or more) that gave the same label; None if none."""
    same = pairs = 0
    for labels in labels_per_item:
        for a, b in itertools.combinations(labels, 2):
            same += a == b
            pairs += 1
    return same / pairs if pairs else None


def wilson_interval(wins, total, z=1.959964):
    """Wilson score interval of a proportion (95% by default); (nan, nan) when total is 0."""
    if total == 0:
        return float('nan'), float('nan')
    p = wins / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def _by_item(answers):
    grouped = defaultdict(list)
    for answer in answers:
        grouped[(answer.round, answer.item)].append(answer)
    return grouped


def _majority(values):
    """The most common value, or None on a tie or when there is none."""
    counts = Counter(values).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def majority_instances(study, answers, min_votes=1):
    """Majority vote per instance item.

    Returns:
        dict: ``{key: {'win', 'lose', 'negative' (texts), 'votes', 'no_preference'}}`` for items with at
        least ``min_votes`` answers; ``win = lose = -1`` when the vote gives no pair.
    """
    result = {}
    for (_, key), item_answers in sorted(_by_item(answers).items()):
        if len(item_answers) < min_votes:
            continue
        picks = [(a.answer['best'], a.answer['worst']) if not a.answer['no_preference'] else (None, None)
                 for a in item_answers]
        best = _majority([p[0] for p in picks])
        worst = _majority([p[1] for p in picks])
        win, lose = (best, worst) if best is not None and worst is not None and best != worst else (-1, -1)
        view = study.view(key)
        ticks = Counter(c for a in item_answers for c in a.answer.get('hallucinated', []))
        negative = [view['candidates'][c]['description'] for c, count in sorted(ticks.items())
                    if 2 * count >= len(item_answers) and view['candidates'][c]['description']]
        result[key] = {'win': win, 'lose': lose, 'negative': negative, 'votes': len(item_answers),
                       'no_preference': sum(p == (None, None) for p in picks)}
    return result


def human_annotation_json(study, majority):
    """The ``dspo-human-annotation`` content of the samples whose instances were all answered.

    Returns:
        tuple[dict, list[str]]: The JSON content and the ids of samples left out (not fully answered).
    """
    samples, incomplete = {}, []
    for sid in study.samples:
        keys = [f'{sid}/{i}' for i in study.records[sid]['instances']]
        if not all(k in majority for k in keys):
            incomplete.append(sid)
            continue
        instances = {}
        for key in keys:
            vote = majority[key]
            if vote['win'] >= 0:
                entry = {'win': vote['win'], 'lose': vote['lose']}
                if vote['negative']:
                    entry['negative'] = vote['negative']
                instances[key.rpartition('/')[2]] = entry
        samples[sid] = {'instances': instances}
    return {'format': 'dspo-human-annotation', 'version': 1, 'samples': samples}, incomplete


def annotator_table(answers):
    """Per annotator: answers, median and mean seconds per answer, "no clear preference" answers."""
    table = {}
    for name in sorted({a.annotator for a in answers}):
        own = [a for a in answers if a.annotator == name]
        seconds = [a.seconds for a in own if a.seconds is not None]
        table[name] = {'answers': len(own),
                       'median_seconds': float(np.median(seconds)) if seconds else None,
                       'mean_seconds': float(np.mean(seconds)) if seconds else None,
                       'no_preference': sum(bool(a.answer.get('no_preference')) for a in own)}
    return table


def agreement(study, answers):
    """Pairwise agreement and Fleiss' kappa of each answer field (best and worst, or the choice)."""
    fields = ('best', 'worst') if study.kind == 'instances' else ('method',)
    grouped = _by_item(answers)
    out = {}
    for name in fields:
        labels = [[str(a.answer.get(name)) for a in item] for item in grouped.values()]
        out[name] = {'pairwise_agreement': pairwise_agreement(labels), 'fleiss_kappa': fleiss_kappa(labels),
                     'items_with_two_or_more': sum(len(x) >= 2 for x in labels)}
    return out


def _pair_votes(study, answers):
    """``{pair key: Counter(method -> votes)}`` over all rounds."""
    votes = defaultdict(Counter)
    for answer in answers:
        votes[answer.item][answer.answer['method']] += 1
    return votes


def _flat_name(image, method):
    return f'{image}_{method}.png'


def write_realsr1k_votes(study, answers, path, copy_images=True):
    """The 2AFC vote list in the RealSR-1K layout, one row per answered pair, vote fractions as scores.

    As in ``sr_subjective_results.csv`` of cschenjunlin/SR-IQA-SMC25: ``sr_pair_names`` is
    ``<method1>_<method2>``, ``group`` the selection (``mad``: the pairs come from ``mad_select.py``), the
    names ``<image>_<method>.png`` and the scores each side's share of the pair's votes (the number of
    votes differs between pairs when annotators skipped some; ``vote_counts.csv`` keeps the exact counts).

    With ``copy_images`` the SR images are copied beside the list as ``images/<image>_<method>.png`` (the
    names in the list), so ``TwoAFCPairDataset`` reads it with ``dataroot: <folder>/images``.

    Returns:
        int: Rows written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    votes = _pair_votes(study, answers)
    image_dir = os.path.join(os.path.dirname(os.path.abspath(path)), 'images')
    rows = 0
    with open(path, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(REALSR1K_COLUMNS)
        for key in study.items:
            if key not in votes:
                continue
            pair = study.pairs[key]
            total = sum(votes[key].values())
            a, b = pair['method_a'], pair['method_b']
            # RealSR-1K names a row by its method pair and its selection (``mad``), not by a unique id
            writer.writerow([f'{a}_{b}', 'mad', _flat_name(pair['image'], a), _flat_name(pair['image'], b),
                             f'{votes[key][a] / total:.6f}', f'{votes[key][b] / total:.6f}'])
            rows += 1
            if copy_images:
                os.makedirs(image_dir, exist_ok=True)
                for side, method in (('a', a), ('b', b)):
                    target = os.path.join(image_dir, _flat_name(pair['image'], method))
                    if not os.path.exists(target):
                        _copy_as_png(study.safe_path(pair[f'path_{side}']), target)
    return rows


def _copy_as_png(source, target):
    if source.lower().endswith('.png'):
        shutil.copyfile(source, target)
    else:
        import cv2
        cv2.imwrite(target, cv2.imread(source, cv2.IMREAD_COLOR))


def write_count_matrix(study, answers, path):
    """The vote-count matrix (``counts[i][j]`` = votes for method i over j) that ``rank_methods.py`` reads."""
    votes = _pair_votes(study, answers)
    methods = sorted({m for pair in study.pairs.values() for m in (pair['method_a'], pair['method_b'])})
    index = {m: i for i, m in enumerate(methods)}
    counts = np.zeros((len(methods), len(methods)), dtype=np.int64)
    for key, tally in votes.items():
        a, b = study.pairs[key]['method_a'], study.pairs[key]['method_b']
        counts[index[a], index[b]] += tally[a]
        counts[index[b], index[a]] += tally[b]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline='', encoding='utf-8') as handle:
        writer = csv.writer(handle)
        writer.writerow(['method'] + methods)
        for m in methods:
            writer.writerow([m] + counts[index[m]].tolist())
    return counts


def win_rates(study, answers):
    """Win rate of method A (``study.names[0]``) over B with its Wilson 95% interval, per round and pooled.

    Returns:
        list[dict]: ``{'round': 1..R | 'all', 'wins', 'answers', 'win_rate', 'low', 'high'}``.
    """
    a = study.names[0]
    rows = []
    for round_index in list(range(study.rounds)) + ['all']:
        own = [x for x in answers if round_index == 'all' or x.round == round_index]
        wins = sum(x.answer['method'] == a for x in own)
        low, high = wilson_interval(wins, len(own))
        rows.append({'round': round_index + 1 if round_index != 'all' else 'all', 'wins': wins, 'answers': len(own),
                     'win_rate': wins / len(own) if own else None, 'low': low if own else None,
                     'high': high if own else None})
    return rows


def plot_win_rates(rows, names, path):
    """Bar plot of the win rate of ``names[0]`` over ``names[1]`` per round and pooled, with 95% intervals."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r['answers']]
    labels = [f'round {r["round"]}' if r['round'] != 'all' else 'all rounds' for r in shown]
    rates = [100 * r['win_rate'] for r in shown]
    errors = [[100 * (r['win_rate'] - r['low']) for r in shown], [100 * (r['high'] - r['win_rate']) for r in shown]]
    fig, ax = plt.subplots(figsize=(1.4 * len(shown) + 2, 3.2), dpi=100)
    ax.bar(labels, rates, yerr=errors, capsize=5, color=['#4878a8'] * (len(shown) - 1) + ['#2b4d6e'])
    ax.axhline(50, color='grey', linestyle='--', linewidth=1)
    ax.set_ylim(0, 100)
    ax.set_ylabel(f'{names[0]} preferred (%)')
    ax.set_title(f'{names[0]} vs {names[1]}: win rate, 95% CI')
    for x, (rate, r) in enumerate(zip(rates, shown)):
        ax.text(x, 3, f'{rate:.0f}%\nn={r["answers"]}', ha='center', color='white', fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(study, store, min_votes=1):
    """Everything the report prints and writes, as one JSON-ready dict."""
    answers = store.answers()
    report = {'kind': study.kind, 'items': len(study.items), 'rounds': study.rounds, 'answers': len(answers),
              'annotators': annotator_table(answers), 'agreement': agreement(study, answers)}
    if study.kind == 'instances':
        majority = majority_instances(study, answers, min_votes)
        report['majority'] = majority
        report['pairs'] = sum(v['win'] >= 0 for v in majority.values())
    elif study.kind == 'winrate':
        report['names'] = study.names
        report['win_rates'] = win_rates(study, answers)
    return report


def _format_number(value, digits=3):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def format_report(report):
    """The report as printed text."""
    lines = [f'{report["kind"]} study: {report["items"]} items x {report["rounds"]} round(s), '
             f'{report["answers"]} answers']
    lines.append('annotator            answers  median s  mean s  no preference')
    for name, row in report['annotators'].items():
        lines.append(f'{name[:20]:20} {row["answers"]:7d}  {_format_number(row["median_seconds"], 1):>8}  '
                     f'{_format_number(row["mean_seconds"], 1):>6}  {row["no_preference"]:13d}')
    for name, row in report['agreement'].items():
        lines.append(f'agreement on {name}: pairwise {_format_number(row["pairwise_agreement"])}, Fleiss kappa '
                     f'{_format_number(row["fleiss_kappa"])} ({row["items_with_two_or_more"]} items with 2+ answers)')
    if 'pairs' in report:
        lines.append(f'majority vote: {report["pairs"]} of {len(report["majority"])} answered instances give a pair')
    for row in report.get('win_rates', []):
        label = f'round {row["round"]}' if row['round'] != 'all' else 'all rounds'
        lines.append(f'{report["names"][0]} over {report["names"][1]}, {label}: '
                     f'{_format_number(row["win_rate"] and 100 * row["win_rate"], 1)}% '
                     f'[{_format_number(row["low"] and 100 * row["low"], 1)}, '
                     f'{_format_number(row["high"] and 100 * row["high"], 1)}] ({row["wins"]}/{row["answers"]})')
    return '\n'.join(lines)


def write_report(study, store, out_dir, min_votes=1):
    """Write ``report.json`` and the exports of the study kind into ``out_dir``.

    Returns:
        dict: The report, with ``files`` (what was written) and, for instances, ``incomplete`` samples.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(study, store, min_votes)
    files = {}
    answers = store.answers()
    if study.kind == 'instances':
        content, report['incomplete'] = human_annotation_json(study, report['majority'])
        files['human_annotation'] = os.path.join(out_dir, 'human_annotations.json')
        atomic_json_dump(content, files['human_annotation'], indent=1)
    elif study.kind == 'pairs':
        files['realsr1k_votes'] = os.path.join(out_dir, 'votes_realsr1k.csv')
        write_realsr1k_votes(study, answers, files['realsr1k_votes'])
        files['count_matrix'] = os.path.join(out_dir, 'vote_counts.csv')
        write_count_matrix(study, answers, files['count_matrix'])
    else:
        files['win_rates_csv'] = os.path.join(out_dir, 'win_rates.csv')
        with open(files['win_rates_csv'], 'w', newline='', encoding='utf-8') as handle:
            writer = csv.DictWriter(handle, ['round', 'wins', 'answers', 'win_rate', 'low', 'high'])
            writer.writeheader()
            writer.writerows(report['win_rates'])
        if answers:
            files['win_rates_png'] = plot_win_rates(report['win_rates'], study.names,
                                                    os.path.join(out_dir, 'win_rates.png'))
    report['files'] = files
    files['report'] = os.path.join(out_dir, 'report.json')
    atomic_json_dump(report, files['report'], indent=1, default=str)
    return report
