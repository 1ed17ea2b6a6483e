"""The one reader of YAML option files (safe: no Python tags; order kept; errors that name the file), and the
preparation of the options for our train and test pipelines (BasicSR's ``parse_options``, on a read dict)."""
import collections
import os
import random

import yaml

__all__ = ['OptionFileError', 'SafeOrderedLoader', 'read_option_file', 'yaml_literal', 'parse_options',
           'plain_options', 'as_test_options']


class OptionFileError(ValueError):
    """An option file that cannot be used; the message names the file and the problem."""


class SafeOrderedLoader(yaml.SafeLoader):
    """PyYAML's safe loader returning ``OrderedDict`` mappings, as BasicSR's option code expects."""


def _construct_ordered_mapping(loader, node):
    loader.flatten_mapping(node)
    return collections.OrderedDict(loader.construct_pairs(node))


SafeOrderedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_ordered_mapping)


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


def yaml_literal(value):
    """A ``--force_yml`` value as a YAML literal (``1e-4``, ``[1, 2]``, ``~``, ``true``), never evaluated.

    Raises:
        yaml.YAMLError: ``value`` is not a YAML literal.
    """
    parsed = yaml.load(value, Loader=SafeOrderedLoader) if value.strip() else value
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads 1e-4 as a string; an option value of that form means the number
            return float(parsed) if parsed.strip().lower() not in ('nan', 'inf', '-inf', 'infinity') else parsed
        except ValueError:
            return parsed
    return parsed


def parse_options(root_path, opt, args, is_train=True):
    """``basicsr.utils.options.parse_options`` for an option dict already read and overridden by ``--force_yml``.

    Starts the process group (:func:`dspo_basicsr.utils.distributed.init_dist`), sets the seed after the
    overrides (1.4.2 applies ``--force_yml`` after seeding), and sets the paths of ``experiments/<name>``
    (training) or ``results/<name>`` (test) under ``root_path``, as BasicSR does.

    Args:
        root_path (str): Where ``experiments/`` or ``results/`` are written.
        opt (dict): The option file's content with ``--force_yml`` applied; completed in place.
        args (argparse.Namespace): ``launcher``, ``auto_resume``, ``debug``.
        is_train (bool): Training (``basicsr train``) or test (``basicsr test``) paths.

    Returns:
        dict: ``opt``.
    """
    import torch

    from dspo_basicsr.utils.distributed import init_dist

    from basicsr.utils import set_random_seed
    from basicsr.utils.dist_util import get_dist_info

    if args.launcher == 'none':
        opt['dist'] = False
        print('Disable distributed.', flush=True)
    else:
        opt['dist'] = True
        if args.launcher == 'slurm' and 'dist_params' in opt:
            init_dist(args.launcher, **opt['dist_params'])
        else:
            init_dist(args.launcher)
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']
    if opt['num_gpu'] == 'auto':
        opt['num_gpu'] = torch.cuda.device_count()
    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in ('dataroot_gt', 'dataroot_lq'):
            if dataset.get(key) is not None:
                dataset[key] = os.path.expanduser(dataset[key])
    for key, val in opt['path'].items():
        if val is not None and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = os.path.expanduser(val)

    if is_train:
        experiments_root = os.path.join(root_path, 'experiments', opt['name'])
        opt['path'].update(experiments_root=experiments_root, models=os.path.join(experiments_root, 'models'),
                           training_states=os.path.join(experiments_root, 'training_states'), log=experiments_root,
                           visualization=os.path.join(experiments_root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = os.path.join(root_path, 'results', opt['name'])
        opt['path'].update(results_root=results_root, log=results_root,
                           visualization=os.path.join(results_root, 'visualization'))
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
