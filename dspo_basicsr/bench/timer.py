"""The one timer of the benchmarks: median / min wall time of repeated calls, after warm-up.

On CUDA the device is synchronised before and after each call, so a time covers the kernels the call
launched and not only their launch.
"""
import statistics
import time
from dataclasses import dataclass

import torch

__all__ = ['Timing', 'time_call', 'timed', 'timed_side_by_side']


@dataclass
class Timing:
    """Seconds of the timed calls (warm-up calls excluded)."""

    times: list

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def min(self):
        return min(self.times)


def _synchronize(device):
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn, device=None):
    """Wall seconds of one ``fn()``, CUDA-synchronised when ``device`` is a CUDA device."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def timed(fn, repeats, device=None, warmup=1):
    """Time ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones.

    Args:
        fn (Callable[[], Any]): The call to time.
        repeats (int): Timed calls (at least 1).
        device (torch.device | str | None): Synchronised around each call when it is a CUDA device.
        warmup (int): Untimed calls first (start-up costs, caches, cuDNN autotuning).

    Returns:
        Timing: ``.median`` and ``.min`` seconds, ``.times``.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}.')
    for _ in range(warmup):
        fn()
    return Timing([time_call(fn, device) for _ in range(repeats)])


def timed_side_by_side(fn_a, fn_b, repeats, device=None, warmup=1):
    """Time two calls alternately (a, b, a, b, ...), so both see the same machine load.

    Returns:
        tuple[Timing, Timing]: The timings of ``fn_a`` and ``fn_b``.
    """
    if repeats < 1:
        raise ValueError(f'repeats must be at least 1, got {repeats}.')
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(time_call(fn_a, device))
        times_b.append(time_call(fn_b, device))
    return Timing(times_a), Timing(times_b)
