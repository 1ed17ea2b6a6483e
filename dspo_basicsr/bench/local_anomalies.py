"""Local-anomalies benchmark: a preference set whose image-level and instance-level labels disagree by construction.

The DSPO paper's mechanism is that image-level Diffusion-DPO is "overly sensitive to local anomalies": the
candidate preferred overall can be worse inside some instances. This benchmark makes that happen with a known
truth. Starting from the embedded demo set (``scripts/make_demo_data.py``), in each sample the candidate with the
best whole-image PSNR (the image-level winner, stored as ``meta.pair``) gets a colour blotch pasted into some of
its instances, as long as it stays the whole-image winner over the image-level loser. The instance labels are then
recomputed by instance PSNR against the GT (the demo's rule), so inside a blotched instance the image-level winner
is the instance loser.

Each objective (SFT, Diffusion-DPO, DSPO, Diffusion-DRO; ``options/demo/compare_*.yml``) is trained on it with the
same runner as ``scripts/compare_objectives.py`` for several seeds and measured on the held-out crops: the
instance-level win rate against the pretrained base, the share of instances with a colour blotch (a detector of
the pasted defect family, no human needed), PSNR and SSIM. Used by ``scripts/bench_local_anomalies.py``.
"""
import csv
import dataclasses
import math
import os

import numpy as np
import yaml

#: option files of the compared objectives (their train set is replaced by the benchmark set).
OBJECTIVE_FILES = {**{key: f'options/demo/compare_{key}.yml' for key in ('sft', 'dpo', 'dspo', 'dro')},
                   'online': 'options/demo/online_group_demo.yml',
                   'online_advantages': 'options/demo/online_group_advantages_demo.yml'}
LABELS = {'base': 'Pretrained', 'sft': 'SFT', 'dpo': 'Diffusion-DPO', 'dspo': 'DSPO', 'dro': 'Diffusion-DRO',
          'online': 'Online group DSPO', 'online_advantages': 'Online group advantages'}
#: an instance is blotched when its mean colour is this far (8-bit levels, any channel) from the GT's.
BLOTCH_THRESHOLD = 12.0
MEASURES = ('win_rate', 'defect_rate', 'psnr', 'ssim')


def _psnr(image, gt, mask=None):
    diff = (image.astype(np.float64) - gt.astype(np.float64))**2
    mse = diff[mask].mean() if mask is not None else diff.mean()
    return 10 * math.log10(255.0**2 / max(mse, 1e-10))


def paste_blotch(image, mask, shift):
    """``image`` with the colour ``shift`` (8-bit levels per channel) added inside ``mask`` (a copy; uint8 RGB)."""
    out = image.astype(np.float64)
    out[mask] += np.asarray(shift, dtype=np.float64)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def with_local_anomalies(sample, rng, share=0.4, strength=24.0):
    """A demo sample whose image-level winner carries colour blotches in some instances.

    The image-level pair (``meta.pair``) is [best, worst] candidate by whole-image PSNR of the clean candidates.
    In random order, up to ``share`` of the instances of the best candidate get a colour blotch (a shift of
    ``strength`` 8-bit levels in a random colour direction, which :func:`blotch_rate` flags); a blotch is kept
    only if the best candidate still beats the worst by whole-image PSNR, so the image-level label
    stays true overall. The instance rows are then relabelled by instance PSNR (``instance_pairs_by_psnr``).
    With ``share`` 0 nothing is pasted: the demo set with the whole-image pair, the control of the benchmark.

    Args:
        sample (PreferenceSample): With a GT (the demo set has one).
        rng (np.random.Generator): Picks instances and colour directions.

    Returns:
        PreferenceSample: ``meta.local_anomalies`` lists the blotched instance ids.
    """
    from dspo_basicsr.demo.dspo import instance_pairs_by_psnr
    if sample.gt is None:
        raise ValueError(f"sample '{sample.sid}': the local-anomalies benchmark needs a GT (the demo set has one).")
    whole = [_psnr(c, sample.gt) for c in sample.candidates]
    best, worst = int(np.argmax(whole)), int(np.argmin(whole))
    candidates = [c.copy() for c in sample.candidates]
    ids = [int(i) for i in np.unique(sample.seg)]
    blotched = []
    for iid in rng.permutation(ids)[:int(round(share * len(ids)))]:
        direction = rng.normal(size=3)
        trial = paste_blotch(candidates[best], sample.seg == iid, strength * direction / np.linalg.norm(direction))
        if best != worst and _psnr(trial, sample.gt) > whole[worst]:
            candidates[best] = trial
            blotched.append(int(iid))
    meta = dict(sample.meta, pair=[best, worst], local_anomalies=blotched)
    return dataclasses.replace(sample, candidates=candidates, meta=meta,
                               instances=instance_pairs_by_psnr(candidates, sample.gt, sample.seg))


def label_disagreement(sample):
    """Share of the paired instances whose instance winner is the image-level loser or whose instance loser is the
    image-level winner (0 on a set where both levels agree)."""
    win, lose = sample.meta['pair']
    paired = [row for row in sample.instances if row['win'] >= 0]
    return sum(row['lose'] == win or row['win'] == lose for row in paired) / max(len(paired), 1)


def build_local_anomalies_set(source, path, seed=0, share=0.4, strength=24.0, overwrite=True):
    """Write the benchmark set at ``path`` from the demo set at ``source``; returns the mean label disagreement."""
    from dspo_basicsr.data.preference_set import PreferenceLMDB, write_preference_lmdb
    store = PreferenceLMDB(source)
    rng = np.random.default_rng(seed)
    samples = [with_local_anomalies(store[sid], rng, share, strength) for sid in store.ids()]
    write_preference_lmdb(path, samples, overwrite=overwrite, progress=False)
    return float(np.mean([label_disagreement(s) for s in samples]))


def blotch_rate(images, gts, segs, threshold=BLOTCH_THRESHOLD):
    """Share of instances whose mean colour is more than ``threshold`` 8-bit levels (any channel) off the GT's."""
    flagged = total = 0
    for image, gt, seg in zip(images, gts, segs):
        for iid in np.unique(seg):
            mask = seg == iid
            shift = np.abs(image[mask].astype(np.float64).mean(0) - gt[mask].astype(np.float64).mean(0))
            flagged += bool(shift.max() > threshold)
            total += 1
    return flagged / total if total else float('nan')


def mean_ci95(values):
    """(mean, half width of the 95 % Student-t interval) of ``values``; half width NaN for one value."""
    from scipy import stats
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float('nan')
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def benchmark_options(option_file, set_path, seed, name, iters):
    """A compare option file trained on the benchmark set with ``seed``, as the comparison runner trains it."""
    from dspo_basicsr.comparison import training_options
    from dspo_basicsr.utils.options import plain_options, read_option_file
    opt = plain_options(read_option_file(option_file))
    opt['datasets']['train']['dataroot'] = os.path.abspath(set_path)
    opt['manual_seed'] = int(seed)
    return training_options(opt, name, iters)


def evaluate_held_out(option_file, checkpoint, n_segments=8):
    """The four measures of one model (``checkpoint``; None: the pretrained base) on the held-out demo crops.

    Returns:
        dict: ``win_rate`` (instance win rate over the base; 0.5 for the base), ``defect_rate``
        (:func:`blotch_rate`), ``psnr`` and ``ssim`` (BasicSR, crop border 4).
    """
    import dspo_basicsr  # noqa: F401  (compat, then registration)
    from dspo_basicsr.demo.dspo import held_out_samples, instance_win_rate

    from basicsr.metrics import calculate_psnr, calculate_ssim

    current, base, gts, segs = held_out_samples(option_file, checkpoint, n_segments, 'local anomalies: held-out crops')
    return dict(win_rate=instance_win_rate(current, base, gts, segs)['win_rate'],
                defect_rate=blotch_rate(current, gts, segs),
                psnr=float(np.mean([calculate_psnr(i, g, crop_border=4) for i, g in zip(current, gts)])),
                ssim=float(np.mean([calculate_ssim(i, g, crop_border=4) for i, g in zip(current, gts)])))


def summarise(rows):
    """{objective: {measure: (mean, ci95)}} over the seeds of ``rows`` (one dict per run)."""
    summary = {}
    for key in dict.fromkeys(row['objective'] for row in rows):
        runs = [row for row in rows if row['objective'] == key]
        summary[key] = {m: mean_ci95([row[m] for row in runs]) for m in MEASURES}
        summary[key]['seeds'] = len(runs)
    return summary


def write_results(rows, out_dir, note=''):
    """runs.csv (one row per run), table.md (means with 95 % intervals) and local_anomalies.png under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'runs.csv'), 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=['objective', 'seed', *MEASURES, 'seconds'])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    lines = [note, ''] if note else []
    lines += ['| Model | seeds | instance win rate vs base | blotched instances | PSNR (dB) | SSIM |',
              '|---|---|---|---|---|---|']
    for key, values in summary.items():
        cells = [f'{values[m][0]:.4f} ± {values[m][1]:.4f}' if not math.isnan(values[m][1]) else f'{values[m][0]:.4f}'
                 for m in MEASURES]
        lines.append(f"| {LABELS.get(key, key)} | {values['seeds']} | " + ' | '.join(cells) + ' |')
    table = '\n'.join(lines) + '\n'
    with open(os.path.join(out_dir, 'table.md'), 'w', encoding='utf-8') as f:
        f.write(table)
    plot = os.path.join(out_dir, 'local_anomalies.png')
    _plot(summary, plot)
    return table, plot


def _plot(summary, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    titles = {'win_rate': 'instance win rate vs base', 'defect_rate': 'blotched instances', 'psnr': 'PSNR (dB)',
              'ssim': 'SSIM'}
    keys = list(summary)
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(3.2 * len(MEASURES), 3.2))
    for ax, measure in zip(axes, MEASURES):
        means = [summary[k][measure][0] for k in keys]
        errors = [0 if math.isnan(summary[k][measure][1]) else summary[k][measure][1] for k in keys]
        ax.bar(range(len(keys)), means, yerr=errors, capsize=3, color='tab:blue')
        ax.set_xticks(range(len(keys)), [LABELS.get(k, k) for k in keys], rotation=30, ha='right', fontsize=8)
        ax.set_title(titles[measure], fontsize=9)
        low, high = min(m - e for m, e in zip(means, errors)), max(m + e for m, e in zip(means, errors))
        pad = 0.1 * (high - low) or 0.01
        ax.set_ylim(low - pad, high + pad)
    fig.suptitle('Local-anomalies benchmark (means, 95 % intervals over seeds)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_local_anomalies(out_dir, source='datasets/demo/demo_pref.lmdb', seeds=(0, 1, 2, 3, 4), iters=50,
                        objectives=('sft', 'dpo', 'dspo', 'dro'), workdir='.', share=0.4, note=''):
    """Build the benchmark set, train every objective for every seed and measure it; returns (table, plot, rows).

    ``objectives`` are keys of :data:`OBJECTIVE_FILES` (``online``, ``online_advantages``: OnlineGroupModel, which
    samples its own candidates and reads only the LQ, GT and instances of the set). Every run trains through the
    ``basicsr`` CLI with :func:`dspo_basicsr.comparison.train_run`, the runner of ``scripts/compare_objectives.py``.
    """
    import time

    from dspo_basicsr.comparison import train_run
    os.makedirs(out_dir, exist_ok=True)
    set_path = os.path.join(out_dir, 'local_anomalies.lmdb')
    disagreement = build_local_anomalies_set(source, set_path, seed=0, share=share)
    note = note or (f'{len(seeds)} seeds x {iters} iterations per objective on {set_path} (instance labels disagree '
                    f'with the image-level pair in {disagreement:.1%} of the paired instances).')
    start = time.time()
    rows = [dict(objective='base', seed=0, seconds=0.0, **evaluate_held_out(OBJECTIVE_FILES['dspo'], None))]
    for key in objectives:
        for seed in seeds:
            name = f'local_anomalies_{key}_s{seed}'
            option_path = os.path.join(out_dir, f'{name}.yml')
            with open(option_path, 'w', encoding='utf-8') as f:
                yaml.safe_dump(benchmark_options(OBJECTIVE_FILES[key], set_path, seed, name, iters), f)
            checkpoint, seconds = train_run(option_path, name, workdir, os.path.join(out_dir, f'{name}.log'))
            rows.append(dict(objective=key, seed=seed, seconds=round(seconds, 1),
                             **evaluate_held_out(OBJECTIVE_FILES[key], checkpoint)))
    table, plot = write_results(rows, out_dir, note + f' Total {time.time() - start:.0f} s.')
    return table, plot, rows
