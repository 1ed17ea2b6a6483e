"""The one atomic file writer: every checkpoint, training state and JSON record of the package goes through it.

A file is written to a temporary name next to its final path, flushed to disk (``fsync``) and renamed, so a
kill during the write leaves the temporary file (``<path>.tmp<pid>-<thread>``), never a truncated ``path``.
"""
import json
import os
import threading

__all__ = ['atomic_write', 'atomic_torch_save', 'atomic_json_dump', 'atomic_write_bytes']


def atomic_write(path, write, mode='wb', encoding=None):
    """Call ``write(f)`` on a temporary file next to ``path``, flush it to disk, then rename it to ``path``.

    Args:
        path (str): The final file.
        write (Callable[[IO], object]): Writes the content into the open file.
        mode (str): ``'wb'`` or ``'w'``.
        encoding (str | None): Text encoding for ``mode='w'``.
    """
    # pid and thread: two processes or threads writing the same path never share a temporary file
    tmp = f'{path}.tmp{os.getpid()}-{threading.get_ident()}'
    try:
        with open(tmp, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    import torch
    atomic_write(str(path), lambda f: torch.save(obj, f))


def atomic_json_dump(obj, path, **json_kwargs):
    """``json.dump(obj, **json_kwargs)`` to ``path`` (UTF-8) through :func:`atomic_write`."""
    atomic_write(str(path), lambda f: json.dump(obj, f, **json_kwargs), mode='w', encoding='utf-8')


def atomic_write_bytes(path, data):
    """``data`` (bytes) to ``path`` through :func:`atomic_write`."""
    atomic_write(str(path), lambda f: f.write(data))
