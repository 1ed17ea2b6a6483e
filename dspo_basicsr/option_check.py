"""Option checking at start, before anything is written or renamed: missing sections, unknown keys, values, paths.

A typo (``train.grad_clp``) would otherwise be ignored by ``dict.get`` and train the wrong model to the end,
and a bad value (``batch_size_per_gpu: 0``) would pass, let BasicSR archive the last experiment, then crash.
What is allowed comes from one declaration per class (:mod:`dspo_basicsr.utils.option_schema`):

* models: ``option_schema`` (BasicSR's keys plus the model's, dotted from the top of the option file);
  BasicSR's own models get BasicSR's keys (:data:`~dspo_basicsr.utils.option_schema.BASICSR_MODEL_OPTIONS`);
* datasets: ``option_schema`` (BasicSR's loader keys plus the dataset's); BasicSR's ``PairedImageDataset``
  is declared here (:data:`BASICSR_DATASET_OPTIONS`);
* archs and losses (``network_g``, ``train.*_opt``): the arguments of their ``__init__``.

Unknown keys are errors for our classes, warnings for BasicSR's (which may read keys we do not declare);
wrong values and missing sections are errors for every class.
"""
import difflib
import inspect
import os

from dspo_basicsr.utils.option_schema import (
    BASICSR_MODEL_OPTIONS,
    LOADER_OPTIONS,
    REQUIRED,
    Option,
    multiple_of_scale,
    renamed_option_findings,
)
from dspo_basicsr.utils.registry import registry_get

__all__ = ['OptionCheckError', 'check_options', 'init_arguments', 'BASICSR_MODELS_OPTIONS', 'BASICSR_DATASET_OPTIONS']

#: dataset schemas of BasicSR's own datasets that our option files use (basicsr/data/paired_image_dataset.py)
BASICSR_DATASET_OPTIONS = {
    'PairedImageDataset': LOADER_OPTIONS.extend(
        Option('dataroot_gt', 'path', REQUIRED, 'folder (or LMDB) of the ground-truth images', read_by='BasicSR'),
        Option('dataroot_lq', 'path', REQUIRED, 'folder (or LMDB) of the LQ images', read_by='BasicSR'),
        Option('meta_info_file', 'path', None, 'list of the image names', read_by='BasicSR'),
        Option('filename_tmpl', 'str', '{}', 'LQ name template', read_by='BasicSR'),
        Option('gt_size', 'int', REQUIRED, 'GT crop size in training', ge=1, required_in='train',
               check=multiple_of_scale, read_by='BasicSR'),
        Option('use_hflip', 'bool', REQUIRED, 'random horizontal flips in training', required_in='train',
               read_by='BasicSR'),
        Option('use_rot', 'bool', REQUIRED, 'random rotations in training', required_in='train', read_by='BasicSR'),
        Option('color', 'str', None, 'y: the Y channel only', choices=('y',), read_by='BasicSR'),
        Option('mean', 'list', None, 'normalisation mean', read_by='BasicSR'),
        Option('std', 'list', None, 'normalisation std', read_by='BasicSR'),
    ),
}

#: model schemas of BasicSR's own models that our option files use (basicsr/models/sr_model.py)
BASICSR_MODELS_OPTIONS = {
    'SRModel': BASICSR_MODEL_OPTIONS.extend(
        Option('train.pixel_opt', 'dict', None, 'pixel loss: type and arguments', typed='loss', read_by='BasicSR'),
        Option('train.perceptual_opt', 'dict', None, 'perceptual loss: type and arguments', typed='loss',
               read_by='BasicSR'),
    ),
}

#: dataset keys naming a file or folder that must exist, for datasets with no schema
DATASET_PATH_KEYS = ('dataroot', 'dataroot_gt', 'dataroot_lq', 'meta_file', 'meta_info_file', 'ranking_json')

#: most findings shown; the rest are counted
MAX_SHOWN = 8


class OptionCheckError(ValueError):
    """Options that cannot train what they say; the message lists every finding, one per line."""


def _closest(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ''


def _unknown_lines(unknown):
    return [f"unknown option '{section + '.' if section else ''}{key}'{_closest(key, known)}"
            for section, key, known in unknown]


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


def _registered(registry, name, where, errors):
    if not isinstance(name, str):
        errors.append(f'{where} must name a registered class, got {name!r}')
        return None
    try:
        return registry_get(registry, name)
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
        findings = errors if _ours(cls) else warnings
        findings.extend(_unknown_lines([(where, key, known) for key in block if key != 'type' and key not in known]))


def _check_optimizers(train_opt, errors):
    """``train.optim_*.type`` names an optimizer :func:`~dspo_basicsr.utils.optimizers.build_optimizer` knows."""
    from dspo_basicsr.utils.optimizers import EIGHT_BIT_OPTIMIZERS, torch_optimizer_names
    known = torch_optimizer_names() + sorted(EIGHT_BIT_OPTIMIZERS)
    for key, block in (train_opt.items() if isinstance(train_opt, dict) else ()):
        if key.startswith('optim_') and isinstance(block, dict) and block.get('type') not in known:
            errors.append(f"train.{key}.type must be a torch.optim optimizer or {', '.join(EIGHT_BIT_OPTIMIZERS)}"
                          f"{_closest(str(block.get('type')), known)}, got {block.get('type')!r}")


def _missing_paths(schema, block, where, errors):
    for option in schema:
        if option.kind != 'path':
            continue
        node = block
        for part in option.key.split('.'):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and node and not os.path.exists(node):
            errors.append(f"{where}{option.key}: '{node}' does not exist")


def _check_datasets(opt, is_train, check_paths, errors, warnings):
    from basicsr.utils.registry import DATASET_REGISTRY
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict):
        return
    phases = [phase.split('_')[0] for phase in datasets]
    if is_train and 'train' not in phases:
        errors.append("missing section 'datasets.train': the training set (a block whose name starts with train)")
    for phase, block in datasets.items():
        where = f'datasets.{phase}'
        if is_train and phase.split('_')[0] not in ('train', 'val'):
            errors.append(f"{where}: a dataset block's name must start with train or val (BasicSR's phases)")
        if not isinstance(block, dict):
            errors.append(f'{where} must be a mapping of dataset options, got {block!r}')
            continue
        cls = _registered(DATASET_REGISTRY, block.get('type'), f'{where}.type', errors)
        schema = getattr(cls, 'option_schema', None) or BASICSR_DATASET_OPTIONS.get(getattr(cls, '__name__', None))
        training = is_train and phase.split('_')[0] == 'train'
        block_errors, unknown = (schema or LOADER_OPTIONS).findings(block, training=training, where=where, top=opt)
        errors.extend(block_errors)
        if schema is not None:
            (errors if _ours(cls) else warnings).extend(_unknown_lines(unknown))
        if check_paths:
            if schema is not None:
                _missing_paths(schema, block, f'{where}.', errors)
            else:
                for key in DATASET_PATH_KEYS:
                    if isinstance(block.get(key), str) and block[key] and not os.path.exists(block[key]):
                        errors.append(f"{where}.{key}: '{block[key]}' does not exist")


def _check_metrics(opt, errors):
    """Each ``val.metrics`` entry names a registered metric (else the first validation, after ``val_freq``
    iterations, would fail) and says ``better: higher | lower``."""
    from basicsr.utils.registry import METRIC_REGISTRY
    metrics = opt.get('val').get('metrics') if isinstance(opt.get('val'), dict) else None
    for name, metric in (metrics.items() if isinstance(metrics, dict) else ()):
        where = f'val.metrics.{name}'
        if not isinstance(metric, dict):
            errors.append(f'{where} must be a mapping (type: calculate_psnr, ...), got {metric!r}')
            continue
        _registered(METRIC_REGISTRY, metric.get('type'), f'{where}.type', errors)
        if metric.get('better', 'higher') not in ('higher', 'lower'):
            errors.append(f"{where}.better must be one of higher, lower, got {metric['better']!r}")


def check_options(opt, check_paths=True, is_train=True):
    """Check an option dict (as read from its file, ``--force_yml`` applied) before anything runs.

    Args:
        opt (dict): The options.
        check_paths (bool): Also check that the files and folders the options name exist.
        is_train (bool): For ``basicsr train`` (``train``, ``logger`` and a training set are required);
            False for ``basicsr test``.

    Returns:
        list[str]: Warnings (unknown keys of BasicSR's own classes, which may read keys we do not declare).

    Raises:
        OptionCheckError: A renamed key (one line naming the new ones), else every error found, one per line: the
            key, the value and what is allowed.
    """
    renamed = renamed_option_findings(opt)
    if renamed:  # one line: the old names, each with its new one (an unknown-key list would not say the new)
        raise OptionCheckError('; '.join(renamed))
    import dspo_basicsr  # noqa: F401  (fills the registries)

    from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

    errors, warnings = [], []
    model_cls = _registered(MODEL_REGISTRY, opt.get('model_type'), 'model_type', errors) \
        if 'model_type' in opt else None
    ours = model_cls is not None and _ours(model_cls)
    schema = getattr(model_cls, 'option_schema', None) if ours else \
        BASICSR_MODELS_OPTIONS.get(getattr(model_cls, '__name__', None))
    schema = schema or BASICSR_MODEL_OPTIONS
    model_errors, unknown = schema.findings(opt, training=is_train)
    errors.extend(model_errors)
    (errors if ours else warnings).extend(_unknown_lines(unknown))
    _check_datasets(opt, is_train, check_paths, errors, warnings)
    for key, network in opt.items():
        if key.startswith('network_') and isinstance(network, dict):
            _check_typed_block(ARCH_REGISTRY, network, key, errors, warnings)
            if check_paths:
                for name, value in network.items():
                    if name.endswith('_path') and isinstance(value, str) and value and not os.path.exists(value):
                        errors.append(f"{key}.{name}: '{value}' does not exist")
    _check_metrics(opt, errors)
    train_opt = opt.get('train')
    _check_optimizers(train_opt, errors)
    for key, block in (train_opt.items() if isinstance(train_opt, dict) else ()):
        if key.endswith('_opt') and isinstance(block, dict) and 'type' in block:
            _check_typed_block(LOSS_REGISTRY, block, f'train.{key}', errors, warnings)
    if check_paths:
        _missing_paths(schema, opt, '', errors)
    if check_paths:  # a bad validation image would otherwise end the run at its first validation
        from dspo_basicsr.data.validation_images import unreadable_validation_images
        errors += unreadable_validation_images(opt)
    if errors:
        shown = errors[:MAX_SHOWN] + ([f'... and {len(errors) - MAX_SHOWN} more'] if len(errors) > MAX_SHOWN else [])
        raise OptionCheckError('\n  '.join(['the options do not check:'] + shown))
    return warnings


def option_tables():
    """The option tables of ``docs/options.md``, by marker name: BasicSR's keys, then each class's own.

    Returns:
        dict[str, str]: Marker name (``basicsr-model``, ``basicsr-loader``, a model or dataset class name)
        -> Markdown table.
    """
    import dspo_basicsr  # noqa: F401  (fills the registries)

    from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

    tables = {'basicsr-model': BASICSR_MODEL_OPTIONS.table(), 'basicsr-loader': LOADER_OPTIONS.table()}
    for registry, base in ((MODEL_REGISTRY, BASICSR_MODEL_OPTIONS), (DATASET_REGISTRY, LOADER_OPTIONS)):
        for name, cls in sorted(registry._obj_map.items()):
            if _ours(cls) and getattr(cls, 'option_schema', None) is not None:
                parent = next((k.option_schema for k in cls.__mro__[1:] if _ours(k) and
                               getattr(k, 'option_schema', None) is not None), base)
                tables[name] = cls.option_schema.table(beyond=parent)
    for name, schema in {**BASICSR_MODELS_OPTIONS, **BASICSR_DATASET_OPTIONS}.items():
        tables[name] = schema.table(beyond=BASICSR_MODEL_OPTIONS if name in BASICSR_MODELS_OPTIONS else LOADER_OPTIONS)
    return tables


def update_option_docs(text):
    """``text`` (a docs page) with every ``<!-- options: NAME -->`` ... ``<!-- /options -->`` section regenerated.

    Raises:
        KeyError: A marker names no class with a schema.
    """
    import re
    tables = option_tables()

    def table(match):
        name = match.group(1)
        if name not in tables:
            raise KeyError(f"docs marker 'options: {name}' names no schema; known: {', '.join(sorted(tables))}")
        return f'<!-- options: {name} -->\n{tables[name]}\n<!-- /options -->'

    return re.sub(r'<!-- options: ([\w-]+) -->.*?<!-- /options -->', table, text, flags=re.S)
