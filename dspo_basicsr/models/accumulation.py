"""Gradient accumulation: k micro-batches (iterations) per optimizer update, and the open window's files.

``train.accumulate_grad_batches`` = k. Iteration i (1-based, as BasicSR counts) is micro-batch
``(i - 1) % k`` of optimizer update ``(i - 1) // k``; the window of an update collects whether all its
micro-batches were finite and their summed logs. A checkpoint can fall inside a window
(``save_checkpoint_freq`` counts micro-batches): each rank then saves the window's gradients next to
``{iter}.state`` and a resumed run continues the window with them instead of applying a part of it on its own.
"""
import os
from collections import OrderedDict

from dspo_basicsr.utils.atomic_write import atomic_torch_save
from dspo_basicsr.utils.checkpoint import read_checkpoint

from basicsr.utils import get_root_logger


class AccumulationWindow:
    """The micro-batches of one optimizer update so far: whether all were finite, and their summed logs."""

    def __init__(self, finite=True, count=0, sums=None):
        self.finite, self.count, self.sums = finite, count, sums if sums is not None else OrderedDict()

    def add(self, log):
        for key, value in log.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.count += 1

    def mean(self):
        return OrderedDict((key, value / self.count) for key, value in self.sums.items())


class GradientAccumulation:
    """Where an iteration falls among the k micro-batches of its update, the open window, its save and resume.

    Args:
        k (int): Micro-batches per optimizer update (``train.accumulate_grad_batches``).
    """

    def __init__(self, k=1):
        self.k = int(k)
        self.window = None  # the open AccumulationWindow, None between updates

    def update_index(self, current_iter):
        """0-based index of the optimizer update that iteration ``current_iter`` (1-based) contributes to."""
        return (current_iter - 1) // self.k

    def starts_update(self, current_iter):
        """Whether ``current_iter`` is the first micro-batch of its update."""
        return (current_iter - 1) % self.k == 0

    def ends_update(self, current_iter):
        """Whether ``current_iter`` is the last micro-batch of its update (the optimizer steps after it)."""
        return (current_iter - 1) % self.k == self.k - 1

    def open(self, current_iter):
        """The window ``current_iter`` adds to, and whether it is new (the caller then zeroes the gradients)."""
        fresh = self.starts_update(current_iter) or self.window is None
        if fresh:
            self.window = AccumulationWindow()
        return self.window, fresh

    def close(self):
        """End the open window (at the last micro-batch): return it and open none until the next iteration."""
        window, self.window = self.window, None
        return window

    @staticmethod
    def window_path(training_states, current_iter, rank):
        """``{training_states}/{iter}.window_rank{rank}.pth``: one rank's gradients of an unfinished window."""
        return os.path.join(training_states, f'{current_iter}.window_rank{rank}.pth')

    def save(self, path, parameters):
        """Write the open window (its gradients in ``parameters``, its logs, count and finiteness) to ``path``.

        Nothing is written between updates (no window open).

        Args:
            path (str): :meth:`window_path`.
            parameters (dict[str, Parameter]): the network's named parameters; the trainable ones with a
                gradient are saved.
        """
        if self.window is None:
            return
        state = {'grads': {name: p.grad.detach().cpu() for name, p in parameters.items()
                           if p.requires_grad and p.grad is not None},
                 'logs': {key: value.cpu() for key, value in self.window.sums.items()},
                 'count': self.window.count, 'finite': self.window.finite}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_torch_save(state, path)

    def resume(self, current_iter, path, parameters, device):
        """Reopen the window that iteration ``current_iter`` left unfinished, from the file :meth:`save` wrote.

        Sets the gradients of ``parameters`` and the window. A resume at the end of an update needs nothing;
        a missing file is reported and the window is then applied with only the micro-batches still to come.

        Returns:
            bool: whether a window was reopened.
        """
        if current_iter % self.k == 0:
            return False
        if not os.path.isfile(path):
            get_root_logger().warning(
                f'resuming at iteration {current_iter}, inside an accumulation window of {self.k} micro-batches, '
                f'but {path} is missing; that window is applied with only the micro-batches still to come.')
            return False
        state = read_checkpoint(path, what='accumulation window', unwrap=())
        for name, grad in state['grads'].items():
            parameters[name].grad = grad.to(parameters[name].device, parameters[name].dtype)
        self.window = AccumulationWindow(finite=bool(state['finite']), count=int(state['count']),
                                         sums=OrderedDict((k, v.to(device)) for k, v in state['logs'].items()))
        return True
