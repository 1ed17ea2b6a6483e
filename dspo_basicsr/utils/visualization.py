"""Pictures of a run a person can look at: the validation summary grid and the training curves.

Pure drawing functions (numpy / OpenCV / matplotlib); the model gathers what they draw.
"""
import math
import os
import re

import cv2
import numpy as np

from dspo_basicsr.utils.atomic_write import atomic_json_dump

#: Column order of :func:`draw_summary`.
SUMMARY_COLUMNS = ('LQ (bicubic x{scale})', 'reference', 'current', 'GT')

_CAPTION_LINE = 16  # px per caption line
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _fit_tile(image, size):
    """(h, w, 3) uint8 RGB -> (size, size * w / h, 3), nearest-neighbour so pixels stay visible."""
    h, w = image.shape[:2]
    factor = size / h
    return cv2.resize(image, (max(1, round(w * factor)), size), interpolation=cv2.INTER_NEAREST)


def format_metrics(metrics):
    """``{'psnr': 23.41, 'ssim': 0.712}`` -> ``['psnr 23.41', 'ssim 0.712']`` (3 significant decimals)."""
    return [f'{name} {value:.2f}' if abs(value) >= 10 else f'{name} {value:.3f}' for name, value in metrics.items()]


def draw_summary(rows, path, tile_size=192, scale=4):
    """Write a grid PNG: one row per image, columns LQ | reference | current | GT, metrics under each tile.

    Args:
        rows (list[dict]): Per image: ``name``; ``lq``, ``reference``, ``current``, ``gt`` (uint8 RGB, the
            LQ at its own size is shown bicubic-upsampled to the GT's); ``metrics``: a dict per column
            key (``lq``, ``reference``, ``current``) of metric name -> value (the GT has none).
        path (str): Output PNG path (its folder is created).
        tile_size (int): Height of a tile in the picture.
        scale (int): SR factor, for the LQ column's title.

    Returns:
        dict: The layout: ``tile_size``, ``caption_height``, ``columns`` and per row ``top`` (pixel row of the
        tiles), the caption lines drawn under each tile and the metrics, as written to ``path`` with ``.json``.
    """
    keys = ('lq', 'reference', 'current', 'gt')
    titles = [c.format(scale=scale) for c in SUMMARY_COLUMNS]
    n_lines = 1 + max([1] + [len(r.get('metrics', {}).get(k, {})) for r in rows for k in keys])
    caption = n_lines * _CAPTION_LINE + 4
    layout = {'tile_size': tile_size, 'caption_height': caption, 'columns': list(keys), 'rows': []}
    canvas_rows = []
    for row in rows:
        gt = row['gt']
        lq = cv2.resize(row['lq'], (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_CUBIC)
        tiles, captions = [], {}
        for key, title, image in zip(keys, titles, (lq, row['reference'], row['current'], gt)):
            tile = _fit_tile(image, tile_size)
            # the GT tile names the image where the others give their metrics
            lines = [title] + (format_metrics(row.get('metrics', {}).get(key, {})) if key != 'gt' else [row['name']])
            band = np.full((caption, tile.shape[1], 3), 255, np.uint8)
            for i, line in enumerate(lines):
                cv2.putText(band, line, (4, (i + 1) * _CAPTION_LINE), _FONT, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
            captions[key] = lines
            tiles.append(np.concatenate([tile, band], axis=0))
            tiles.append(np.full((tile.shape[0] + caption, 4, 3), 255, np.uint8))  # gutter
        layout['rows'].append({'name': row['name'], 'top': sum(r.shape[0] for r in canvas_rows), 'captions': captions,
                               'metrics': row.get('metrics', {})})
        canvas_rows.append(np.concatenate(tiles[:-1], axis=1))
    width = max(r.shape[1] for r in canvas_rows)
    canvas = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255)
                             for r in canvas_rows], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    atomic_json_dump(layout, os.path.splitext(path)[0] + '.json', indent=1)
    return layout


# BasicSR's training log line: "[name..][epoch:  0, iter:     100, lr:(1.000e-04,)] [eta: ...] l_dspo: 6.9e-01 ..."
_ITER = re.compile(r'iter:\s*([\d,]+)')
_VALUE = re.compile(r'(\w+): ([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)')
_SKIPPED = {'epoch', 'iter', 'eta', 'time', 'data_time', 'lr'}


def parse_training_log(path):
    """Logged values per iteration from a BasicSR ``train_*.log``.

    Returns:
        dict[str, list[tuple[int, float]]]: name -> [(iteration, value), ...] in log order.
    """
    series = {}
    with open(path, encoding='utf-8', errors='replace') as f:
        for line in f:
            match = _ITER.search(line)
            if not match or 'lr:(' not in line:
                continue
            it = int(match.group(1).replace(',', ''))
            rest = line.rsplit(']', 1)[-1]
            for name, value in _VALUE.findall(rest):
                if name not in _SKIPPED:
                    series.setdefault(name, []).append((it, float(value)))
    return series


def plot_training_curves(log_path, png_path):
    """Plot the loss, implicit accuracy, logit mean and per-instance error differences of a training log.

    The error differences are ``err_theta_w - err_ref_w`` and ``err_theta_l - err_ref_l`` (the policy's
    change in denoising error on preferred and dispreferred instances; DSPO drives the first below the second).

    Returns:
        list[str]: Names of the panels drawn (empty when the log holds no training line; nothing written).
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    series = parse_training_log(log_path)
    if 'err_theta_w' in series and 'err_ref_w' in series:
        for side in ('w', 'l'):
            theta, ref = series.get(f'err_theta_{side}', []), dict(series.get(f'err_ref_{side}', []))
            series[f'err_diff_{side}'] = [(i, v - ref[i]) for i, v in theta if i in ref]
    losses = [name for name in series if name.startswith('l_')]
    panels = [(name, [name]) for name in losses]
    panels += [(name, [name]) for name in ('implicit_acc', 'logit_mean') if name in series]
    if 'err_diff_w' in series:
        panels.append(('err_theta - err_ref', ['err_diff_w', 'err_diff_l']))
    if not panels:
        return []
    cols = min(4, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            its, values = zip(*series[name])
            ax.plot(its, values, label={'err_diff_w': 'preferred', 'err_diff_l': 'dispreferred'}.get(name, name))
        ax.set_title(title)
        ax.set_xlabel('iteration')
        if len(names) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis('off')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [title for title, _ in panels]
