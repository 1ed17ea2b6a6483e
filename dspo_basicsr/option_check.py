"""Option checking at start, before anything is written: unknown keys, types, ranges and paths.

A typo (``train.grad_clp``) would otherwise be ignored by ``dict.get`` and train the wrong model to the
end. For our models and datasets every key of ``train:``, ``val:``, ``network_g:``, ``datasets.*:`` and the
top level is checked against what the class reads; an unknown key is an error naming the closest known
key. For BasicSR's own models the same findings are warnings (BasicSR reads keys we do not list).

What a class reads is declared once, on the class:
    * models: ``known_options``, a dict of section (``top``, ``train``, ``val``, ``val.sample``) -> keys,
      beyond :data:`BASICSR_KEYS`;
    * datasets: ``known_options``, a tuple of keys beyond BasicSR's loader keys;
    * archs and losses: their ``__init__`` arguments.
"""
import difflib
import inspect
import os

#: keys BasicSR's own pipeline reads or sets, by section
BASICSR_KEYS = {
    'top': ('name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'network_g', 'network_d', 'path',
            'train', 'val', 'logger', 'dist_params', 'is_train', 'dist', 'rank', 'world_size', 'auto_resume',
            'root_path', 'find_unused_parameters'),
    'train': ('optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'ema_decay'),
    'val': ('val_freq', 'save_img', 'metrics', 'suffix', 'pbar'),
    'val.sample': (),
}

#: keys BasicSR's data loaders read from (or put into) every dataset block
LOADER_KEYS = ('name', 'type', 'phase', 'scale', 'use_shuffle', 'num_worker_per_gpu', 'batch_size_per_gpu',
               'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory', 'persistent_workers', 'io_backend')


class OptionCheckError(ValueError):
    """Options that cannot train what they say; the message lists every finding."""


def _positive_number(value):
    return _is_number(value) and value > 0


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value):
    return _is_number(value) and value > 0 and float(value).is_integer()


def _timestep_range(value):
    return (isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive_int(v) or v == 0 for v in value)
            and value[0] < value[1])


#: dotted option -> (check, what it must be); checked for our models when present and not null
VALUE_CHECKS = {
    'train.preference_opt.beta': (_positive_number, 'a positive number'),
    'train.preference_opt.loss_weight': (_is_number, 'a number'),
    'train.grad_clip': (_positive_number, 'a positive number (or ~ for no clipping)'),
    'train.max_nonfinite_steps': (_positive_int, 'a positive integer'),
    'train.accumulate_grad_batches': (_positive_int, 'a positive integer'),
    'train.feedback_guidance_scale': (_is_number, 'a number'),
    'train.timestep_range': (_timestep_range, 'a list [low, high) of two timesteps with low < high'),
    'train.total_iter': (_positive_number, 'a positive number'),
    'train.optim_g.lr': (_positive_number, 'a positive number'),
    'val.val_freq': (_positive_number, 'a positive number'),
    'val.preference_seed': (_is_number, 'an integer'),
    'val.preference_beta': (_positive_number, 'a positive number'),
    'val.preference_timesteps': (lambda v: isinstance(v, list) and v and all(_positive_int(t) or t == 0 for t in v),
                                 'a non-empty list of timesteps'),
    'logger.save_checkpoint_freq': (_positive_number, 'a positive number'),
    'logger.print_freq': (_positive_number, 'a positive number'),
}

#: dataset keys naming a file or folder that must exist
DATASET_PATH_KEYS = ('dataroot', 'dataroot_gt', 'dataroot_lq', 'meta_file', 'meta_info_file', 'ranking_json')


def _closest(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _unknown(section_opt, known, where, findings):
    for key in section_opt:
        if key not in known:
            findings.append(f"unknown option '{where}.{key}'{_closest(key, known)}" if where else
                            f"unknown option '{key}'{_closest(key, known)}")


def init_arguments(cls):
    """Names the ``__init__`` of ``cls`` accepts, following ``**kwargs`` up the class hierarchy.

    Returns:
        set[str] | None: None when some class takes ``**kwargs`` without passing them to a parent.
    """
    names = set()
    for klass in cls.__mro__:
        if klass is object or '__init__' not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != 'self'}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _ours(cls):
    return cls.__module__.startswith('dspo_basicsr')


def _get(opt, dotted):
    value = opt
    for part in dotted.split('.'):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _registered(registry, name, where, errors):
    try:
        return registry.get(name)
    except KeyError as err:
        errors.append(f'{where}: {err.args[0]}')
    return None


def _check_typed_block(registry, block, where, errors, warnings):
    """A ``{type: X, ...}`` block whose other keys are the arguments of the registered class X."""
    cls = _registered(registry, block.get('type'), f'{where}.type', errors)
    if cls is None:
        return
    known = init_arguments(cls)
    if known is not None:
        _unknown({k: v for k, v in block.items() if k != 'type'}, known, where, errors if _ours(cls) else warnings)


def check_options(opt, check_paths=True):
    """Check an option dict (as read from its file, ``--force_yml`` applied) before anything runs.

    Args:
        opt (dict): The options.
        check_paths (bool): Also check that the files and folders the options name exist.

    Returns:
        list[str]: Warnings (findings in BasicSR's own classes, whose keys we do not list).

    Raises:
        OptionCheckError: Every error found, one per line.
    """
    import dspo_basicsr  # noqa: F401  (fills the registries)

    from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

    errors, warnings = [], []
    model_cls = _registered(MODEL_REGISTRY, opt.get('model_type'), 'model_type', errors)
    if model_cls is not None:
        ours = _ours(model_cls)
        declared = getattr(model_cls, 'known_options', {}) if ours else {}
        known = {section: set(keys) | set(declared.get(section, ())) for section, keys in BASICSR_KEYS.items()}
        findings = errors if ours else warnings
        _unknown({k: v for k, v in opt.items() if not k.startswith('network_')}, known['top'], '', findings)
        for section in ('train', 'val'):
            if isinstance(opt.get(section), dict):
                _unknown(opt[section], known[section], section, findings)
        if ours and isinstance(_get(opt, 'val.sample'), dict):
            _unknown(opt['val']['sample'], known['val.sample'], 'val.sample', findings)
        if ours:
            for dotted, (check, what) in VALUE_CHECKS.items():
                value = _get(opt, dotted)
                if value is not None and not check(value):
                    hint = ' (YAML reads 1e-4 as a string: write 1.0e-4 or !!float 1e-4)' \
                        if isinstance(value, str) and value[:1].isdigit() else ''
                    errors.append(f'{dotted} must be {what}, got {value!r}{hint}')
    for phase, dataset in (opt.get('datasets') or {}).items():
        where = f'datasets.{phase}'
        if not isinstance(dataset, dict):
            errors.append(f'{where} must be a mapping of dataset options')
            continue
        cls = _registered(DATASET_REGISTRY, dataset.get('type'), f'{where}.type', errors)
        if cls is not None and getattr(cls, 'known_options', None) is not None:
            _unknown(dataset, set(cls.known_options) | set(LOADER_KEYS), where, errors)
        if check_paths:
            for key in DATASET_PATH_KEYS:
                if isinstance(dataset.get(key), str) and dataset[key] and not os.path.exists(dataset[key]):
                    errors.append(f"{where}.{key}: '{dataset[key]}' does not exist")
    for key, network in opt.items():
        if key.startswith('network_') and isinstance(network, dict):
            _check_typed_block(ARCH_REGISTRY, network, key, errors, warnings)
            if check_paths:
                for name, value in network.items():
                    if name.endswith('_path') and isinstance(value, str) and value and not os.path.exists(value):
                        errors.append(f"{key}.{name}: '{value}' does not exist")
    for key, block in (opt.get('train') or {}).items():
        if key.endswith('_opt') and isinstance(block, dict) and 'type' in block:
            _check_typed_block(LOSS_REGISTRY, block, f'train.{key}', errors, warnings)
    if check_paths:
        for key, value in (opt.get('path') or {}).items():
            if key.startswith('pretrain_network') and isinstance(value, str) and not os.path.exists(value):
                errors.append(f"path.{key}: '{value}' does not exist")
    if check_paths:  # a bad validation image would otherwise end the run at its first validation
        from dspo_basicsr.data.validation_images import unreadable_validation_images
        errors += unreadable_validation_images(opt)
    if errors:
        shown = errors[:8] + ([f'... and {len(errors) - 8} more'] if len(errors) > 8 else [])
        raise OptionCheckError('\n  '.join(['the options do not check:'] + shown))
    return warnings
