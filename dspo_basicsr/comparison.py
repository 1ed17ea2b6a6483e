"""The preference-alignment comparison of the DSPO paper: SFT vs Diffusion-DPO vs DSPO vs Diffusion-DRO.

The same framework is fine-tuned on the same preference set with each objective (one BasicSR option file per
objective, differing only in ``model_type`` and the ``train`` section), each run is trained through the
``basicsr`` CLI, and every trained checkpoint (plus the untouched pretrained model) is evaluated on the same
validation sets with the same metrics and seeds through the model's own validation (BasicSR metrics on SR
samples; the implicit accuracy of DSPO's logits on a preference set). The results go to a Markdown and a
CSV table and to a radar plot like the paper's Figure 4 (each axis rescaled over the compared models, so
that outward is better).

Used by ``scripts/compare_objectives.py``.
"""
import copy
import csv
import math
import os
import subprocess
import sys
import time

import yaml

from dspo_basicsr.losses.preference_loss import DEFAULT_BETA
from dspo_basicsr.utils.options import as_test_options

#: preference loss type -> (short key, label in the paper's words).
OBJECTIVES = {
    'DiffusionSFTLoss': ('sft', 'SFT'),
    'DiffusionDPOLoss': ('dpo', 'Diffusion-DPO'),
    'DSPOLoss': ('dspo', 'DSPO'),
    'DiffusionDROLoss': ('dro', 'Diffusion-DRO'),
}
BASE = ('base', 'Pretrained (no alignment)')
#: option sections that must be identical across the compared option files.
SHARED_SECTIONS = ('scale', 'manual_seed', 'network_g', 'datasets', 'val')
#: metrics of the preference validation, with their direction (``logit_mean`` is not a quality: no radar axis).
PREFERENCE_METRICS = {'implicit_acc': ('Implicit acc.', False), 'logit_mean': ('Logit mean', False)}
RADAR_EXCLUDED = ('logit_mean', )

#: objective options shown in a variant's label only when they differ from these values.
VARIANT_DEFAULTS = {'beta': DEFAULT_BETA, 'margin': 1e-3, 'pairs': 'best_worst', 'top_n': 1, 'weighting': 'none',
                    'instance_level': False}

PRESETS = {
    'demo': [f'options/demo/compare_{k}.yml' for k in ('sft', 'dpo', 'dspo', 'dro')],
    # DSPO's best/worst pair against several pairs per instance, without and with hierarchical weights
    'demo_pairs': [f'options/demo/compare_{k}.yml' for k in ('dspo', 'dspo_top_bottom', 'dspo_hierarchical')],
    'sd21': [f'options/compare_{k}_sd21.yml' for k in ('sft', 'dpo', 'dspo', 'dro')],
}


class ComparisonError(RuntimeError):
    """A comparison that cannot run as asked; the message says which file or run and what to do."""


def load_objective_options(option_files):
    """Read the option files (safe YAML) and check that they compare objectives on one shared setup.

    Args:
        option_files (list[str]): One BasicSR option file per objective.

    Returns:
        list[dict]: per file: ``file``, ``opt`` (plain dict), ``key`` and ``label`` of its objective.

    Raises:
        ComparisonError: unknown objective, the same objective twice, or a shared section that differs.
    """
    from dspo_basicsr.utils.options import plain_options, read_option_file
    runs = []
    for path in option_files:
        opt = plain_options(read_option_file(path))
        loss_type = opt.get('train', {}).get('preference_opt', {}).get('type')
        if loss_type not in OBJECTIVES:
            raise ComparisonError(f"{path}: train.preference_opt.type is {loss_type!r}; the comparison knows "
                                  f'{sorted(OBJECTIVES)}.')
        key, label = OBJECTIVES[loss_type]
        same = [run for run in runs if run['opt']['train']['preference_opt'].get('type') == loss_type]
        if any(run['opt']['train']['preference_opt'] == opt['train']['preference_opt'] for run in same):
            raise ComparisonError(f'{path}: objective {label} is given twice with the same train.preference_opt; '
                                  'pass one option file per objective or variant.')
        if same:  # a variant of an objective already compared (e.g. DSPO's pairs / weighting)
            key = f'{key}_{len(same) + 1}'
        runs.append({'file': path, 'opt': opt, 'key': key, 'label': label})
    if not runs:
        raise ComparisonError('no option files to compare.')
    types = [run['opt']['train']['preference_opt']['type'] for run in runs]
    for run, loss_type in zip(runs, types):
        if types.count(loss_type) > 1:  # variants of one objective: name them by what differs from the defaults
            options = run['opt']['train']['preference_opt']
            variant = ', '.join(f'{k} {v}' for k, v in options.items()
                                if k not in ('type', 'loss_weight') and VARIANT_DEFAULTS.get(k, object()) != v)
            run['label'] = f"{run['label']} ({variant})" if variant else run['label']
    first = runs[0]
    for run in runs[1:]:
        for section in SHARED_SECTIONS:
            if run['opt'].get(section) != first['opt'].get(section):
                raise ComparisonError(
                    f"{run['file']}: section '{section}' differs from {first['file']}; the comparison trains the "
                    'same framework on the same data and evaluates with the same metrics and seeds, so only '
                    "model_type and the train section may differ.")
    return runs


def training_options(opt, name, iters):
    """The option dict of one comparison run: ``iters`` iterations, no validation during training.

    Validation happens afterwards, in :func:`evaluate_checkpoint`, identically for every objective.
    """
    opt = copy.deepcopy(opt)
    opt['name'] = name
    opt['datasets'] = {phase: value for phase, value in opt['datasets'].items() if not phase.startswith('val')}
    opt.pop('val', None)
    if iters is not None:
        opt['train']['total_iter'] = int(iters)
    total = int(opt['train']['total_iter'])
    opt['logger'] = dict(opt.get('logger') or {}, save_checkpoint_freq=total, use_tb_logger=False)
    opt['path'] = dict(opt.get('path') or {}, pretrain_network_g=None, resume_state=None)
    return opt


def train_run(option_file, name, workdir, log_path):
    """Train one option file through the ``basicsr`` CLI in ``workdir``; return (checkpoint, seconds).

    Raises:
        ComparisonError: the run failed (the message holds the end of its log) or left no checkpoint.
    """
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    start = time.time()
    with open(log_path, 'w', encoding='utf-8') as log:
        command = [sys.executable, '-m', 'dspo_basicsr.cli', 'train', '-opt', os.path.abspath(option_file)]
        result = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.time() - start
    if result.returncode != 0:
        with open(log_path, encoding='utf-8') as log:
            tail = log.read()[-2000:]
        raise ComparisonError(f'training {option_file} failed (exit {result.returncode}); full log: {log_path}\n{tail}')
    checkpoint = os.path.join(workdir, 'experiments', name, 'models', 'net_g_latest.pth')
    if not os.path.isfile(checkpoint):
        raise ComparisonError(f'training {option_file} finished but left no {checkpoint}; see {log_path}.')
    return checkpoint, seconds


def _metric_directions(opt):
    """{metric name: (label, lower_better)} of the option's SR metrics, from ``better`` or the metric table."""
    from dspo_basicsr.metrics.metric_table import metric_info
    directions = {}
    for name, metric_opt in (opt.get('val', {}).get('metrics') or {}).items():
        try:
            info = metric_info(metric_opt['type'])
            label, lower = info.name.split(' (')[0], info.lower_better
        except KeyError:
            label, lower = name, False
        if 'better' in metric_opt:
            lower = metric_opt['better'] == 'lower'
        directions[name] = (label, lower)
    return directions


def evaluation_options(opt, checkpoint, results_root):
    """:func:`~dspo_basicsr.utils.options.as_test_options`, only the ``val*`` sets, results in ``results_root``."""
    opt = as_test_options(opt, checkpoint)
    opt['datasets'] = {phase: dict(value, phase=phase.split('_')[0], scale=opt['scale'])
                       for phase, value in opt['datasets'].items() if phase.startswith('val')}
    opt['path'] = {'pretrain_network_g': checkpoint, 'strict_load_g': True, 'param_key_g': 'params',
                   'results_root': results_root, 'log': results_root,
                   'visualization': os.path.join(results_root, 'visualization')}
    opt['val'] = dict(opt['val'], save_img=False)
    return opt


def evaluate_checkpoint(opt, checkpoint, results_root, iteration=0):
    """Validate one model on every ``val*`` set of ``opt``; returns {column: value} and the column facts.

    Returns:
        tuple[dict, dict]: values by column, and {column: (label, lower_better)}.
    """
    import torch

    import dspo_basicsr  # noqa: F401  (compat first, then registration)
    from dspo_basicsr.utils.dataloader import build_dataloader

    from basicsr.data import build_dataset
    from basicsr.models import build_model

    opt = evaluation_options(opt, checkpoint, results_root)
    os.makedirs(results_root, exist_ok=True)
    directions = _metric_directions(opt)
    model = build_model(opt)
    values, facts = {}, {}
    for dataset_opt in opt['datasets'].values():
        dataset = build_dataset(dataset_opt)
        loader = build_dataloader(dataset, dataset_opt, num_gpu=opt['num_gpu'], dist=False, sampler=None,
                                  seed=opt.get('manual_seed'))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(opt.get('manual_seed') or 0))
            model.validation(loader, iteration, None, False)
        name = dataset_opt['name']
        for metric, record in model.best_metric_results[name].items():
            label, lower = PREFERENCE_METRICS.get(metric) or directions.get(metric, (metric, False))
            column = metric if metric not in values else f'{name}/{metric}'
            values[column] = float(record['val'])
            facts[column] = (label, lower)
    del model
    return values, facts


def _format(value):
    return 'n/a' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.4f}'


def write_tables(rows, facts, out_dir, note=''):
    """Write ``table.md`` and ``table.csv``; the best value of each metric is bold in Markdown."""
    columns = list(facts)
    with open(os.path.join(out_dir, 'table.csv'), 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['method', 'objective', 'iterations', 'train_seconds', *columns, 'option_file', 'checkpoint'])
        for row in rows:
            writer.writerow([row['label'], row['key'], row['iterations'], f"{row['seconds']:.1f}",
                             *[row['metrics'].get(c, '') for c in columns], row['file'], row['checkpoint'] or ''])
    best = {}
    for column, (_, lower) in facts.items():
        present = [row['metrics'][column] for row in rows if column in row['metrics']]
        best[column] = (min if lower else max)(present) if present else None
    arrows = {c: '↓' if lower else '↑' for c, (_, lower) in facts.items()}
    header = ['Method', 'Iterations', 'Train (s)'] + [f'{label} {arrows[c]}' for c, (label, _) in facts.items()]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in rows:
        cells = [row['label'], str(row['iterations']), f"{row['seconds']:.0f}"]
        for column in columns:
            value = row['metrics'].get(column)
            text = _format(value)
            cells.append(f'**{text}**' if value is not None and value == best[column] and len(rows) > 1 else text)
        lines.append('| ' + ' | '.join(cells) + ' |')
    text = '\n'.join(([note, ''] if note else []) + lines) + '\n'
    with open(os.path.join(out_dir, 'table.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    return text


def radar_plot(rows, facts, path, title='Preference alignment objectives'):
    """Radar plot (Figure 4 style): one axis per metric, min-max rescaled over the models, outward = better."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    columns = [c for c in facts if c not in RADAR_EXCLUDED]
    if len(columns) < 3:
        raise ComparisonError(f'a radar plot needs at least 3 metrics, got {columns}; add metrics to val.metrics.')
    angles = np.linspace(0, 2 * np.pi, len(columns), endpoint=False)
    scaled = {}
    for column in columns:
        lower = facts[column][1]
        raw = np.array([row['metrics'].get(column, np.nan) for row in rows], dtype=float)
        oriented = -raw if lower else raw
        low, high = np.nanmin(oriented), np.nanmax(oriented)
        scaled[column] = 0.2 + 0.8 * (oriented - low) / (high - low) if high > low else np.full_like(raw, 0.6)
    fig, ax = plt.subplots(figsize=(7, 7.5), subplot_kw={'projection': 'polar'})
    for i, row in enumerate(rows):
        values = np.array([scaled[c][i] for c in columns])
        ax.plot(np.append(angles, angles[0]), np.append(values, values[0]), linewidth=2, label=row['label'])
        ax.fill(np.append(angles, angles[0]), np.append(values, values[0]), alpha=0.08)
    labels = []
    for column in columns:
        raw = [row['metrics'].get(column) for row in rows if row['metrics'].get(column) is not None]
        label, lower = facts[column]
        labels.append(f"{label} {'↓' if lower else '↑'}\n[{min(raw):.4g}, {max(raw):.4g}]")
    ax.set_xticks(angles)
    ax.set_xticklabels(labels, fontsize=9)
    ax.tick_params(axis='x', pad=14)
    ax.set_ylim(0, 1.05)
    ax.set_yticklabels([])
    ax.set_title(f'{title}\n(each axis rescaled from the worst to the best model; raw range in brackets)',
                 pad=30, fontsize=10)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=9, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def run_comparison(option_files, out_dir, iters=None, workdir='.', include_base=True, prefix='compare', note=''):
    """Train every objective, evaluate all models identically, write the tables and the radar plot.

    Args:
        option_files (list[str]): One option file per objective (see :func:`load_objective_options`).
        out_dir (str): Where ``table.md``, ``table.csv``, ``radar.png``, ``options/`` and ``logs/`` go.
        iters (int | None): Training iterations per objective (default: each file's ``train.total_iter``).
        workdir (str): Working directory of the training runs (``experiments/`` is created there; relative
            paths in the option files are relative to it).
        include_base (bool): Also evaluate the pretrained model without fine-tuning.
        prefix (str): Experiment names are ``{prefix}_{objective}``.
        note (str): A line written above the Markdown table.

    Returns:
        dict: ``rows`` (per model: label, key, iterations, seconds, metrics, file, checkpoint), ``facts``,
        ``table`` (the Markdown text) and the output paths.
    """
    from tqdm import tqdm
    runs = load_objective_options(option_files)
    out_dir = os.path.abspath(out_dir)
    for sub in ('options', 'logs', 'eval'):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    workdir = os.path.abspath(workdir)
    rows, facts = [], {}
    shared = runs[0]['opt']
    cwd = os.getcwd()
    os.chdir(workdir)  # relative dataset paths of the option files
    try:
        if include_base:
            values, facts = evaluate_checkpoint(shared, None, os.path.join(out_dir, 'eval', BASE[0]))
            rows.append({'label': BASE[1], 'key': BASE[0], 'iterations': 0, 'seconds': 0.0, 'metrics': values,
                         'file': runs[0]['file'], 'checkpoint': None})
        for run in tqdm(runs, desc='objectives', unit='run'):
            name = f"{prefix}_{run['key']}"
            opt = training_options(run['opt'], name, iters)
            option_file = os.path.join(out_dir, 'options', f"{name}.yml")
            with open(option_file, 'w', encoding='utf-8') as f:
                yaml.safe_dump(opt, f, sort_keys=False)
            checkpoint, seconds = train_run(option_file, name, workdir, os.path.join(out_dir, 'logs', f'{name}.log'))
            values, run_facts = evaluate_checkpoint(run['opt'], checkpoint, os.path.join(out_dir, 'eval', run['key']),
                                                    opt['train']['total_iter'])
            facts.update(run_facts)
            rows.append({'label': run['label'], 'key': run['key'], 'iterations': opt['train']['total_iter'],
                         'seconds': seconds, 'metrics': values, 'file': run['file'], 'checkpoint': checkpoint})
    finally:
        os.chdir(cwd)
    table = write_tables(rows, facts, out_dir, note)
    radar = os.path.join(out_dir, 'radar.png')
    radar_plot(rows, facts, radar)
    return {'rows': rows, 'facts': facts, 'table': table, 'table_md': os.path.join(out_dir, 'table.md'),
            'table_csv': os.path.join(out_dir, 'table.csv'), 'radar': radar}


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: one option file, one key, several values (the DSPO paper's beta study, its Fig. 7).


def parse_sweep(text):
    """``KEY=V1,V2,...`` -> (key path list, values); each value is read as YAML (``500`` -> 500, ``none`` stays)."""
    key, sep, values = text.partition('=')
    parts = [p for p in key.strip().split('.') if p]
    if not sep or not parts or not values.strip():
        raise ComparisonError(f"--sweep {text!r}: write KEY=V1,V2,... (e.g. train.preference_opt.beta=500,2000).")
    parsed = [_sweep_value(v.strip()) for v in values.split(',') if v.strip()]
    if len(set(map(str, parsed))) != len(parsed):
        raise ComparisonError(f'--sweep {text!r}: a value is given twice.')
    return parts, parsed


def _sweep_value(text):
    """One sweep value as YAML reads it, with YAML 1.1's strings like ``8e3`` taken as numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_option(opt, parts, value, source='the option file'):
    """``opt`` with ``opt[parts[0]]...[parts[-1]] = value`` (a copy); the parent sections must exist."""
    opt = copy.deepcopy(opt)
    node = opt
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ComparisonError(f"--sweep key {'.'.join(parts)}: {source} has no section "
                                  f"'{'.'.join(parts[:i + 1])}'.")
        node = node[part]
    node[parts[-1]] = value
    return opt


def run_sweep(option_file, sweep, out_dir, iters=None, workdir='.', include_base=True, prefix='sweep', note=''):
    """Train one run per value of ``sweep`` on the same setup, evaluate all identically, tabulate and plot.

    Args:
        option_file (str): The training option file (one objective).
        sweep (str): ``KEY=V1,V2,...``, e.g. ``train.preference_opt.beta=500,2000,8000,32000``.
        out_dir, iters, workdir, include_base, prefix, note: as :func:`run_comparison`.

    Returns:
        dict: ``rows``, ``facts``, ``table`` and the paths of ``table.md``, ``table.csv`` and ``sweep.png``.
    """
    from tqdm import tqdm

    from dspo_basicsr.utils.options import plain_options, read_option_file
    parts, values = parse_sweep(sweep)
    base_opt = plain_options(read_option_file(option_file))
    key = '.'.join(parts)
    out_dir = os.path.abspath(out_dir)
    for sub in ('options', 'logs', 'eval'):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    workdir = os.path.abspath(workdir)
    runs = [(value, set_option(base_opt, parts, value, option_file)) for value in values]
    rows, facts = [], {}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        if include_base:
            values_base, facts = evaluate_checkpoint(base_opt, None, os.path.join(out_dir, 'eval', BASE[0]))
            rows.append({'label': BASE[1], 'key': BASE[0], 'value': None, 'iterations': 0, 'seconds': 0.0,
                         'metrics': values_base, 'file': option_file, 'checkpoint': None})
        for value, opt in tqdm(runs, desc=f'sweep {key}', unit='run'):
            tag = str(value).replace('/', '_').replace(' ', '_')
            name = f'{prefix}_{parts[-1]}_{tag}'
            train_opt = training_options(opt, name, iters)
            run_file = os.path.join(out_dir, 'options', f'{name}.yml')
            with open(run_file, 'w', encoding='utf-8') as f:
                yaml.safe_dump(train_opt, f, sort_keys=False)
            checkpoint, seconds = train_run(run_file, name, workdir, os.path.join(out_dir, 'logs', f'{name}.log'))
            metrics, run_facts = evaluate_checkpoint(opt, checkpoint, os.path.join(out_dir, 'eval', name),
                                                     train_opt['train']['total_iter'])
            facts.update(run_facts)
            rows.append({'label': f'{parts[-1]} = {value}', 'key': tag, 'value': value,
                         'iterations': train_opt['train']['total_iter'], 'seconds': seconds, 'metrics': metrics,
                         'file': option_file, 'checkpoint': checkpoint})
    finally:
        os.chdir(cwd)
    table = write_tables(rows, facts, out_dir, note)
    plot = os.path.join(out_dir, 'sweep.png')
    sweep_plot(rows, facts, key, plot)
    return {'rows': rows, 'facts': facts, 'table': table, 'table_md': os.path.join(out_dir, 'table.md'),
            'table_csv': os.path.join(out_dir, 'table.csv'), 'plot': plot}


def sweep_plot(rows, facts, key, path):
    """Metric against the swept value, one panel per metric; the pretrained model as a horizontal line."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    swept = [row for row in rows if row['key'] != BASE[0]]
    base = next((row for row in rows if row['key'] == BASE[0]), None)
    values = [row['value'] for row in swept]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    columns = list(facts)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns):
        label, lower = facts[column]
        ax.plot(x, [row['metrics'].get(column, math.nan) for row in swept], 'o-', label='fine-tuned')
        if base is not None and column in base['metrics']:
            ax.axhline(base['metrics'][column], color='gray', linestyle='--', label='pretrained')
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale('log')
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
        ax.set_xlabel(key.split('.')[-1])
        ax.set_title(f"{label} {'↓' if lower else '↑'}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f'Sweep of {key}', fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
