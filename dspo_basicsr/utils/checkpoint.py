"""The one strict reader of local checkpoints, and the errors it raises.

Nothing is downloaded at run time: a missing file raises :func:`missing_weights_error`, which names the file
and where it goes. Files are read without unpickling Python objects (``torch.load(weights_only=True)`` or
safetensors), and a state dict is checked key by key before it is copied into a network.
"""
import os

import torch

__all__ = ['missing_weights_error', 'read_checkpoint', 'check_state_dict_matches', 'load_state_dict_strictly',
           'STATE_DICT_WRAPPERS']

#: Entries that wrap a state dict in common checkpoint files (BasicSR's ``params_ema`` / ``params``, Lightning's
#: ``state_dict``, the ``model`` of RAM, SAM and others), tried in this order.
STATE_DICT_WRAPPERS = ('params_ema', 'params', 'state_dict', 'model')


def missing_weights_error(path, expected=None, what='weights'):
    """The error for an absent pretrained file: names it and where it goes.

    Args:
        path (str): The file, or the folder ``expected`` should be in.
        expected (str | None): The file expected under the folder ``path``; None when ``path`` is the file.
        what (str): What the file holds, e.g. ``'RAM checkpoint'``.

    Returns:
        FileNotFoundError: To be raised by the caller.
    """
    where = f"the file '{path}'" if expected is None else f"'{expected}' under '{path}'"
    return FileNotFoundError(
        f'{what}: expected {where}, but it is not there. Nothing is downloaded at run time: download the '
        'released weights yourself and put them at that path (see docs/frameworks.md).')


def read_checkpoint(path, what='weights', unwrap=STATE_DICT_WRAPPERS):
    """Read a local ``.pth`` / ``.pt`` / ``.bin`` (weights only) or ``.safetensors`` file.

    Args:
        path (str): The file.
        what (str): What it holds, for the messages.
        unwrap (Sequence[str]): Keys of a wrapping dict whose value is the state dict, the first one present
            is taken; ``()`` returns the file's dict as it is.

    Returns:
        dict: The (unwrapped) dict.

    Raises:
        FileNotFoundError: The file is missing (:func:`missing_weights_error`).
        ValueError: It holds pickled Python objects, or no dict with string keys.
    """
    if not path or not os.path.isfile(path):
        raise missing_weights_error(path, what=what)
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as error:  # noqa: BLE001  (weights_only refuses pickled objects; truncated files)
            raise ValueError(f"{what}: '{path}' holds more than tensors and plain values, or is damaged (read with "
                             f'weights_only=True: {error}). It is not loaded, because unpickling arbitrary objects '
                             'can run code: save its state dict with a trusted tool (torch.save(model.state_dict(), '
                             '...) or safetensors).') from None
    for key in unwrap:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{what}: '{path}' is not a state dict (a mapping from names to tensors), "
                         f'but a {type(state).__name__}.')
    return state


def check_state_dict_matches(expected, state, source, what, hint=''):
    """Raise unless ``state`` has exactly the keys of ``expected`` with the same shapes.

    Args:
        expected (dict): name -> tensor the state must match.
        state (dict): name -> tensor being loaded.
        source (str): Where the state comes from (a file), for the message.
        what (str): What it is loaded into, for the message.
        hint (str): A sentence on what to check, appended to a key mismatch.

    Raises:
        KeyError: names the missing and the unexpected keys (the first five of each, then a count).
        ValueError: names the first key whose shape differs.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def listed(keys):
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
        raise KeyError(f'{source} does not match {what}: missing keys {listed(missing)}, unexpected keys '
                       f'{listed(unexpected)}.{" " + hint if hint else ""}')
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{source}: key '{key}' has shape {tuple(value.shape)}, expected "
                             f'{tuple(expected[key].shape)} in {what}.')


def load_state_dict_strictly(model, state, source, what=None, hint=''):
    """Copy ``state`` into ``model`` after checking that the keys and shapes match exactly.

    The tensors are assigned (``load_state_dict(..., assign=True)``), so ``model`` may be built on the ``meta``
    device; a parameter or buffer still there afterwards is an error.

    Args:
        model (nn.Module): Loaded in place.
        state (dict): name -> tensor, exactly the model's keys.
        source (str): Where the state comes from (a file), for the messages.
        what (str | None): What it is loaded into, for the messages; None: the model's class name.
        hint (str): A sentence on what to check, appended to a key mismatch.

    Returns:
        nn.Module: ``model``.

    Raises:
        KeyError: names the missing and unexpected keys and ``source``.
        ValueError: names the first key whose shape differs.
        RuntimeError: names parameters left on the ``meta`` device.
    """
    check_state_dict_matches(model.state_dict(), state, source, what or type(model).__name__, hint=hint)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f'{source}: {leftover[:3]} were not loaded (still on the meta device).')
    return model
