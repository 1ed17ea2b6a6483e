"""Shared pytest helpers: option files, the CLI in a subprocess (or in process), small generated image folders."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: a ``basicsr`` CLI run with ``action`` executed right after the optimizer step of iteration ``at``
AFTER_STEP = '''
import os, signal, sys, time
import dspo_basicsr  # noqa: F401
from basicsr.utils.registry import MODEL_REGISTRY
from dspo_basicsr.cli import main
model_class = MODEL_REGISTRY.get('{model}')
step = model_class.optimize_parameters
def step_then_act(self, current_iter):
    step(self, current_iter)
    if current_iter == {at}:
        {action}
model_class.optimize_parameters = step_then_act
sys.exit(main(sys.argv[1:]))
'''


def after_step_script(tmp_path, action, at, model='SRModel'):
    """The path of a script that runs the CLI with ``action`` (one line) after the step of iteration ``at``."""
    script = tmp_path / f'after_step_{at}.py'
    script.write_text(AFTER_STEP.format(model=model, at=at, action=action))
    return str(script)


def write_options(path, opt):
    """Write an option dict as YAML (plain mappings, safe dumper) and return the path as str."""
    with open(path, 'w', encoding='utf-8') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


def run_cli(args, cwd, timeout=600, launcher=None, env=None, module=True):
    """Run ``python -m dspo_basicsr.cli ARGS`` (or under ``launcher``, e.g. torchrun) in ``cwd``.

    With ``module=False`` the launcher is the whole command before ``ARGS`` (a script calling the CLI).
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **(env or {}))
    cmd = (launcher or [sys.executable]) + (['-m', 'dspo_basicsr.cli'] if module else []) + list(args)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli_refusal(args, cwd):
    """Run ``dspo_basicsr.cli.main(ARGS)`` in this process, for runs the CLI refuses before BasicSR starts.

    Cheaper than :func:`run_cli` (no interpreter start, no imports) for tests of the CLI's own checks; a run that
    gets as far as BasicSR's train or test pipeline fails the test (use :func:`run_cli` for those).

    Returns:
        subprocess.CompletedProcess: ``returncode`` (``main``'s return value, or the argparse exit code), and
        the captured ``stdout`` / ``stderr`` text.
    """
    import contextlib
    import io
    from unittest import mock

    from dspo_basicsr import cli

    def reached(*_):
        raise AssertionError(f'{args}: the in-process run reached BasicSR\'s pipeline; test it with run_cli.')

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with mock.patch('dspo_basicsr.train.train_pipeline', reached), \
                mock.patch('dspo_basicsr.test.test_pipeline', reached), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exit_:  # argparse: --help, bad arguments
                code = exit_.code or 0
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def make_paired_folders(root, num=4, size=32, scale=4, seed=0):
    """Write ``root/gt`` and ``root/lq`` PNG folders of smooth random images; returns (gt_dir, lq_dir)."""
    rng = np.random.default_rng(seed)
    gt_dir, lq_dir = os.path.join(root, 'gt'), os.path.join(root, 'lq')
    os.makedirs(gt_dir, exist_ok=True)
    os.makedirs(lq_dir, exist_ok=True)
    for i in range(num):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        gt = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        lq = cv2.resize(gt, (size // scale, size // scale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(gt_dir, f'{i:03d}.png'), gt)
        cv2.imwrite(os.path.join(lq_dir, f'{i:03d}.png'), lq)
    return gt_dir, lq_dir


@pytest.fixture
def paired_folders(tmp_path):
    return make_paired_folders(str(tmp_path / 'paired'))
