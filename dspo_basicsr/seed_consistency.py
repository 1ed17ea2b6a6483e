"""Seed consistency: how good the best, the average and the worst of M samples of one input are.

A diffusion SR model gives a different output for every seed. DP2O-SR (Wu et al., NeurIPS 2025; cswry/DP2O-SR)
reports Best@M / Mean@M / Worst@M curves over M = 1..64 samples per input to show that preference training
raises the quality floor across seeds. For each test image, M samples with different seeds are scored by the
chosen metrics; Best@M is the best score among the first M samples (in the metric's direction), Mean@M their
mean and Worst@M their worst, each averaged over the images. At M = 1 all three are the single sample's score.

Used by ``scripts/seed_consistency.py``; writes ``seed_consistency.csv`` and one line plot per metric.
"""
import csv
import os

import numpy as np

from dspo_basicsr.utils.options import as_test_options

#: columns of the CSV.
CSV_FIELDS = ('checkpoint', 'metric', 'M', 'best', 'mean', 'worst')


def sample_counts(num_seeds):
    """M = 1, 2, 4, ... up to ``num_seeds`` (which is included even when it is not a power of two)."""
    counts, m = [], 1
    while m < num_seeds:
        counts.append(m)
        m *= 2
    return counts + [num_seeds]


def best_mean_worst(values, counts, higher_better=True):
    """Best@M, Mean@M, Worst@M of per-seed scores, averaged over the images.

    Args:
        values (ndarray): (I, S) score of image i's sample with seed index s.
        counts (list[int]): The M values, each at most S; the first M seeds of every image are used.
        higher_better (bool): The metric's direction (Best is the max when True, the min otherwise).

    Returns:
        dict[str, ndarray]: ``best``, ``mean``, ``worst``, each (len(counts),).
    """
    values = np.asarray(values, dtype=np.float64)
    signed = values if higher_better else -values
    # running best / worst over the seeds, (I, S); a prefix of M seeds is column M - 1
    best = np.maximum.accumulate(signed, axis=1)
    worst = np.minimum.accumulate(signed, axis=1)
    mean = np.cumsum(values, axis=1) / np.arange(1, values.shape[1] + 1)
    index = np.asarray(counts) - 1
    sign = 1.0 if higher_better else -1.0
    return {'best': sign * best[:, index].mean(axis=0), 'mean': mean[:, index].mean(axis=0),
            'worst': sign * worst[:, index].mean(axis=0)}


def image_sets(opt):
    """The test / validation sets of ``opt`` that hold LQ and GT images (preference sets are skipped)."""
    sets = [dict(value, phase='val', scale=opt['scale']) for phase, value in opt.get('datasets', {}).items()
            if phase.startswith(('test', 'val')) and value.get('type') != 'PreferenceLMDBDataset']
    if not sets:
        raise ValueError('the option file has no test_* / val_* image set (e.g. a PairedImageDataset) to sample.')
    return sets


def sample_seeds(bare, lq, num_seeds, sample_opt, batch_size, seed=0):
    """``num_seeds`` SR samples of one LQ image, ``batch_size`` seeds per sampler call.

    Samples ``k .. k + batch_size - 1`` come from one call whose generator is seeded with ``seed + k``.

    Args:
        bare (DiffusionSRArch): The framework.
        lq (Tensor): (1, 3, h, w) LQ image in [0, 1].
        num_seeds (int): S.
        sample_opt (dict): ``val.sample`` options (``steps``, ``guidance_scale``, ``prompt``, ``negative_prompt``,
            ``sampler``, and the protocol keys ``color_fix``, ``prompt_source``, tiling).
        batch_size (int): Seeds per call.
        seed (int): Base seed.

    Returns:
        Tensor: (S, 3, H, W) samples in [0, 1] on the CPU.
    """
    import torch

    from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
    outputs = []
    for start in range(0, num_seeds, batch_size):
        count = min(batch_size, num_seeds - start)
        generator = torch.Generator(device=lq.device).manual_seed(int(seed) + start)
        with torch.no_grad():
            # colour fix, tag prompts, tiling: sampled as the model's own validation does
            out = sample_with_options(bare, lq.expand(count, -1, -1, -1), sample_opt, generator)
        outputs.append(out.float().clamp(0, 1).cpu())
    return torch.cat(outputs)


def score_samples(samples, gt, metrics):
    """(S,) score per sample for each metric: {name: ndarray}. ``gt`` (3, H, W) in [0, 1] or None."""
    from dspo_basicsr.metrics.calculate import calculate_metric

    from basicsr.utils import tensor2img
    gt_img = None if gt is None else tensor2img(gt)
    scores = {}
    for name, metric_opt in metrics.items():
        values = []
        for sample in samples:
            data = {'img': tensor2img(sample)}
            if gt_img is not None:
                data['img2'] = gt_img
            values.append(float(calculate_metric(data, dict(metric_opt))))
        scores[name] = np.asarray(values)
    return scores


def seed_scores(opt, checkpoint, num_seeds, metric_names=None, batch_size=8, max_images=None, seed=0):
    """Per-image, per-seed scores of one checkpoint: {metric: (I, S) ndarray}, and the metric options."""
    import torch
    from tqdm import tqdm

    import dspo_basicsr  # noqa: F401  (compat first, then registration)

    from basicsr.data import build_dataset
    from basicsr.models import build_model

    opt = as_test_options(opt, checkpoint)
    metrics = dict((opt.get('val') or {}).get('metrics') or {})
    if metric_names:
        unknown = sorted(set(metric_names) - set(metrics))
        if unknown:
            raise ValueError(f'--metrics {unknown} are not in the option file\'s val.metrics ({sorted(metrics)}); '
                             'add them there (any BasicSR / pyiqa / calibrated metric option).')
        metrics = {name: metrics[name] for name in metric_names}
    if not metrics:
        raise ValueError('no metrics: give --metrics or add val.metrics to the option file.')
    from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
    sample_opt = resolve_sample_options((opt.get('val') or {}).get('sample'))  # a protocol preset expanded
    model = build_model(opt)
    bare = model.bare
    bare.eval()
    per_metric = {name: [] for name in metrics}
    datasets = [build_dataset(dataset_opt) for dataset_opt in image_sets(opt)]
    items = [(dataset, index) for dataset in datasets for index in range(len(dataset))][:max_images]
    for dataset, index in tqdm(items, desc=f'seeds of {checkpoint or "pretrained"}', unit='image'):
        item = dataset[index]
        lq = item['lq'].unsqueeze(0).to(model.device)
        samples = sample_seeds(bare, lq, num_seeds, sample_opt, batch_size, seed)
        for name, values in score_samples(samples, item.get('gt'), metrics).items():
            per_metric[name].append(values)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {name: np.stack(rows) for name, rows in per_metric.items()}, metrics


def run_seed_consistency(opt, checkpoints, out_dir, num_seeds=64, metric_names=None, batch_size=8, max_images=None,
                         seed=0):
    """Best@M / Mean@M / Worst@M of every checkpoint; writes the CSV and one plot per metric.

    Args:
        opt (dict): A test option file's content (``network_g``, test sets, ``val.metrics``, ``val.sample``).
        checkpoints (dict[str, str | None]): label -> trained checkpoint (None: the pretrained model).
        out_dir (str): Output folder.
        num_seeds (int): S, samples per image.
        metric_names (list[str] | None): Names in ``val.metrics`` (default: all).
        batch_size (int): Seeds per sampler call.
        max_images (int | None): Use only the first images.
        seed (int): Base seed (the same for every checkpoint, so they see the same noise).

    Returns:
        dict: ``rows`` (the CSV rows), ``csv`` and ``plots`` (paths).
    """
    from dspo_basicsr.preference.candidates import metric_is_higher_better
    os.makedirs(out_dir, exist_ok=True)
    counts = sample_counts(num_seeds)
    rows, curves, metrics = [], {}, {}
    for label, checkpoint in checkpoints.items():
        scores, metrics = seed_scores(opt, checkpoint, num_seeds, metric_names, batch_size, max_images, seed)
        np.savez(os.path.join(out_dir, f'scores_{label}.npz'), **scores)
        for name, values in scores.items():
            curve = best_mean_worst(values, counts, metric_is_higher_better(metrics[name]))
            curves[(label, name)] = curve
            for i, m in enumerate(counts):
                rows.append({'checkpoint': label, 'metric': name, 'M': m, 'best': float(curve['best'][i]),
                             'mean': float(curve['mean'][i]), 'worst': float(curve['worst'][i])})
    path = os.path.join(out_dir, 'seed_consistency.csv')
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plots = [plot_curves(curves, counts, name, list(checkpoints), os.path.join(out_dir, f'seed_consistency_{name}.png'))
             for name in metrics]
    return {'rows': rows, 'csv': path, 'plots': plots}


def plot_curves(curves, counts, metric, labels, path):
    """Best (solid), Mean (dashed) and Worst (dotted) @M of each checkpoint against M (log2 axis), as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for color, label in zip(plt.rcParams['axes.prop_cycle'].by_key()['color'] * 4, labels):
        curve = curves[(label, metric)]
        for key, style in (('best', '-'), ('mean', '--'), ('worst', ':')):
            ax.plot(counts, curve[key], style, color=color, marker='o', markersize=3, label=f'{label} {key.title()}@M')
    ax.set_xscale('log', base=2)
    ax.set_xticks(counts, [str(m) for m in counts])
    ax.set_xlabel('M (samples per image)')
    ax.set_ylabel(metric)
    ax.set_title(f'Seed consistency: {metric}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(labels)))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
