"""The one reader of YAML option files: safe (no Python tags), order kept, errors that name the file."""
import os

import yaml

__all__ = ['OptionFileError', 'read_option_file', 'plain_options']


class OptionFileError(ValueError):
    """An option file that cannot be used; the message names the file and the problem."""


def read_option_file(path, require=('name', 'model_type')):
    """Read a BasicSR option file with the safe ordered loader.

    Args:
        path (str): YAML option file.
        require (Sequence[str]): Top-level keys it must have (BasicSR's ``name`` and ``model_type`` by
            default; ``()`` for other option files, such as a preference-data chain's).

    Returns:
        OrderedDict: The options.

    Raises:
        OptionFileError: Missing file, not UTF-8 text, YAML syntax error, a Python tag, not a mapping, or a
            key of ``require`` absent.
    """
    from dspo_basicsr.compat import SafeOrderedLoader
    if not os.path.isfile(path):
        raise OptionFileError(f'option file {path!r} does not exist.')
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as err:
        raise OptionFileError(f'option file {path!r} is not UTF-8 text (byte {err.start}); give the YAML option '
                              'file, saved as UTF-8.') from None
    if '\0' in text:
        raise OptionFileError(f'option file {path!r} is a binary file, not a YAML option file.')
    loader = SafeOrderedLoader(text)
    try:
        opt = loader.get_single_data()
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        where = f' (line {mark.line + 1})' if mark is not None else ''
        raise OptionFileError(
            f'option file {path!r}{where}: {err.problem}. Option files are read with a safe YAML loader, '
            'so tags that build Python objects are refused; write plain values instead.') from None
    except yaml.YAMLError as err:
        raise OptionFileError(f'option file {path!r} is not valid YAML: {err}') from None
    finally:
        loader.dispose()
    if not isinstance(opt, dict):
        raise OptionFileError(f'option file {path!r} must hold a mapping of options, got {type(opt).__name__}.')
    for key in require:
        if key not in opt:
            raise OptionFileError(f"option file {path!r} has no '{key}' key; add it (required: {', '.join(require)}).")
    return opt


def plain_options(value):
    """The reader's OrderedDicts as plain dicts, recursively (what ``yaml.safe_dump`` and JSON records take)."""
    if isinstance(value, dict):
        return {key: plain_options(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_options(item) for item in value]
    return value


def as_test_options(opt, checkpoint):
    """``opt`` prepared as BasicSR's test pipeline prepares it, loading ``checkpoint`` (None: the pretrained model).

    The one place that turns a training or test option dict into the options of a one-process evaluation; the
    objective comparison and the seed-consistency measure both start from it.
    """
    import copy

    import torch
    opt = copy.deepcopy(opt)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, auto_resume=False)
    if opt.get('num_gpu') == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()
    opt['path'] = dict(opt.get('path') or {}, pretrain_network_g=checkpoint, strict_load_g=True)
    return opt
