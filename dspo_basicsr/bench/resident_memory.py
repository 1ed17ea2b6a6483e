"""Peak resident memory (RSS) of this process on Linux: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

The kernel keeps the high-water mark as ``VmHWM`` in ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS (Linux 4.0+, ``Documentation/filesystems/proc.rst``),
so a benchmark can measure the peak of one phase (the training step) apart from an earlier one (building
the model).
"""
import resource

__all__ = ['peak_rss_bytes', 'reset_peak_rss']


def reset_peak_rss():
    """Reset the high-water mark to the current RSS. Returns False where the kernel does not allow it."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Peak RSS since the start (or the last :func:`reset_peak_rss`), in bytes."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux; never reset
