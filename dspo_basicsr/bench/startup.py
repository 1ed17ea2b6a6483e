"""Start-up cost of fresh interpreters: CPU seconds (user + sys of the child) and wall seconds, side by side.

Each start is a new ``python -c CODE ARGS`` process; its CPU time is the growth of this process's
``RUSAGE_CHILDREN`` across the run (one child at a time), its wall time the run's. The starts run in rounds
(a, b, c, a, b, c, ...), so each sees the same machine load; a busy machine raises wall time far more than CPU
time, which is why CPU seconds are the figure to compare.
"""
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ['COMPAT_SHIM', 'STARTS', 'StartTiming', 'time_start', 'time_starts', 'import_times',
           'parse_import_times', 'modules_added', 'repository_env']

#: basicsr 1.4.2 does not import on torchvision >= 0.17 without ``compat.apply``'s shim; this runs compat.py itself,
#: loaded from its file so that the package's ``__init__`` (the registration) is not imported with it.
COMPAT_SHIM = ("import importlib.util; spec = importlib.util.spec_from_file_location('dspo_compat', {!r}); "
               'shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim); shim.apply(); '
               ).format(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'compat.py'))

#: name -> (code, command-line arguments) of the starts ``scripts/bench_import.py`` compares; ``basicsr --help``
#: runs what the console script runs (``dspo_basicsr.cli:main``); "the cli's own imports" is what it would cost
#: if answered before the package is imported.
STARTS = {
    'python (pass)': ('pass', ()),
    'import torch': ('import torch', ()),
    'import torchvision': ('import torchvision', ()),
    'import basicsr (+ compat shim)': (COMPAT_SHIM + 'import basicsr', ()),
    'import dspo_basicsr': ('import dspo_basicsr', ()),
    "the cli's own imports": ('import argparse, os, re, sys; import yaml', ()),
    'basicsr --help': ('import sys; from dspo_basicsr.cli import main; sys.exit(main())', ('--help',)),
}


@dataclass
class StartTiming:
    """CPU and wall seconds of repeated starts of one kind."""

    cpu: list = field(default_factory=list)
    wall: list = field(default_factory=list)

    @property
    def cpu_median(self):
        return statistics.median(self.cpu)

    @property
    def wall_median(self):
        return statistics.median(self.wall)


def time_start(code, args=(), env=None, cwd=None):
    """(CPU seconds, wall seconds) of one ``python -c code *args`` in a new process.

    Raises:
        RuntimeError: The process failed; the message holds the end of its stderr.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, '-c', code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f'python -c {code!r} {" ".join(args)} exited with {done.returncode}: '
                           f'{done.stderr[-2000:]}')
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def time_starts(starts, repeats, env=None, cwd=None, warmup=1):
    """Time each start of ``starts`` ({name: (code, args)}) ``repeats`` times, in alternating rounds.

    Args:
        starts (dict[str, tuple[str, Sequence[str]]]): What to start, e.g. :data:`STARTS`.
        repeats (int): Timed rounds (at least 1).
        env (dict | None): Environment of the children (None: this process's).
        cwd (str | None): Their working directory.
        warmup (int): Untimed rounds first (file-system caches).

    Returns:
        dict[str, StartTiming]: By name, in the order of ``starts``.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}.')
    for _ in range(warmup):
        for code, args in starts.values():
            time_start(code, args, env, cwd)
    timings = {name: StartTiming() for name in starts}
    for _ in range(repeats):
        for name, (code, args) in starts.items():
            cpu, wall = time_start(code, args, env, cwd)
            timings[name].cpu.append(cpu)
            timings[name].wall.append(wall)
    return timings


def parse_import_times(text):
    """{module: (self seconds, cumulative seconds)} from the stderr of ``python -X importtime``.

    A module is listed once, at its first import; the header line and any other line are skipped.
    """
    times = {}
    for line in text.splitlines():
        # "import time:       self [us] |  cumulative | imported package"
        if not line.startswith('import time:') or 'self [us]' in line:
            continue
        self_us, cumulative_us, module = line[len('import time:'):].split('|', 2)
        times.setdefault(module.strip(), (int(self_us) / 1e6, int(cumulative_us) / 1e6))
    return times


def import_times(code, env=None, cwd=None):
    """``python -X importtime -c code``: {module: (self seconds, cumulative seconds)} of every module it imported.

    Raises:
        RuntimeError: The process failed.
    """
    done = subprocess.run([sys.executable, '-X', 'importtime', '-c', code], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f'python -X importtime -c {code!r} exited with {done.returncode}: {done.stderr[-2000:]}')
    return parse_import_times(done.stderr)


def modules_added(code, floor_code, env=None, cwd=None):
    """Modules ``code`` imports that ``floor_code`` does not, with their own (self) import seconds, largest first.

    Returns:
        list[tuple[str, float]]: (module, self seconds).
    """
    floor = import_times(floor_code, env, cwd)
    added = {module: self_s for module, (self_s, _) in import_times(code, env, cwd).items() if module not in floor}
    return sorted(added.items(), key=lambda item: -item[1])


def repository_env(repo, bytecode_cache=None):
    """This process's environment with ``repo`` first on ``PYTHONPATH`` (the children import this checkout).

    Args:
        repo (str): The checkout.
        bytecode_cache (str | None): A folder for the children's compiled bytecode (``PYTHONPYCACHEPREFIX``,
            ``PYTHONDONTWRITEBYTECODE`` dropped), so that after the first start none compiles a module again,
            as on a user's machine; None keeps this process's setting.
    """
    path = os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env = dict(os.environ, PYTHONPATH=path)
    if bytecode_cache is not None:
        env.pop('PYTHONDONTWRITEBYTECODE', None)
        env['PYTHONPYCACHEPREFIX'] = bytecode_cache
    return env
