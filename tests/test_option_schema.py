"""The option schemas are the one list of options: every key the code reads is declared, every declared key is
read, the defaults the code uses are the declared ones, and docs/options.md is generated from them."""
import ast
import importlib
import inspect
import math
import os
import re
import textwrap

import pytest

import dspo_basicsr  # noqa: F401  (fills the registries)
from dspo_basicsr.option_check import BASICSR_DATASET_OPTIONS, BASICSR_MODELS_OPTIONS, update_option_docs
from dspo_basicsr.utils.option_schema import (
    BASICSR_MODEL_OPTIONS,
    LOADER_OPTIONS,
    REQUIRED,
    Option,
    OptionSchema,
    OptionValueError,
)

from basicsr.utils.registry import DATASET_REGISTRY, MODEL_REGISTRY

from conftest import REPO

#: keys BasicSR's parse_options sets itself (never read from the file)
SET_BY_BASICSR = {'rank', 'world_size', 'dist', 'is_train', 'auto_resume', 'root_path', 'experiments_root',
                  'models', 'training_states', 'log', 'visualization', 'results_root'}
#: where a key declared with read_by is read
READ_BY_MODULE = {'run_summary': 'dspo_basicsr.models.run_summary',
                  'sample_with_options': 'dspo_basicsr.archs.diffusion_sr_base',
                  'resolve_sample_options': 'dspo_basicsr.archs.sampling_protocols'}


def our_classes():
    for registry in (MODEL_REGISTRY, DATASET_REGISTRY):
        for _, cls in sorted(registry._obj_map.items()):
            if cls.__module__.startswith('dspo_basicsr') and getattr(cls, 'option_schema', None) is not None:
                yield cls


def _option_like(node):
    tokens = re.findall(r'\w+', ast.unparse(node))
    if any(t.startswith('network') for t in tokens):
        return False  # an arch's arguments, checked against the arch's __init__
    return any(t == 'opt' or t.endswith('_opt') or t == 'options' for t in tokens)


def keys_read(source):
    """Option names a class or module (or its name) reads: ``opt[...]``, ``opt.get(...)`` on option dicts,
    ``schema.value(opt, 'a.b')``, ``schema.section(opt, 'a.b')`` (dotted: every part), ``*_KEYS`` tuples."""
    if isinstance(source, str):
        source = importlib.import_module(source)
    tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
    names = set()
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and _option_like(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            if node.func.attr in ('get', 'pop') and _option_like(node.func.value):
                key = node.args[0]
            elif node.func.attr in ('value', 'section') and len(node.args) > 1:
                key = node.args[1]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'option' \
                and len(node.args) > 1:
            key = node.args[1]
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith('_KEYS')
                                                  for t in node.targets) and isinstance(node.value, ast.Tuple):
            names |= {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names |= set(key.value.split('.'))
    return names


def basicsr_constants():
    """Every string constant of the BasicSR files that read options."""
    import basicsr
    root = os.path.dirname(basicsr.__file__)
    constants = set()
    for path in ('train.py', 'test.py', 'utils/options.py', 'data/__init__.py', 'models/base_model.py',
                 'models/sr_model.py', 'models/__init__.py', 'data/paired_image_dataset.py',
                 'data/prefetch_dataloader.py', 'utils/logger.py'):
        with open(os.path.join(root, path), encoding='utf-8') as f:
            constants |= {n.value for n in ast.walk(ast.parse(f.read()))
                          if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return constants


def sources_of(cls):
    """The class and its ancestors of ours, and the module-level functions of their modules."""
    classes = [k for k in cls.__mro__ if k.__module__.startswith('dspo_basicsr')]
    functions = [f for k in classes for _, f in inspect.getmembers(importlib.import_module(k.__module__),
                                                                   inspect.isfunction)
                 if f.__module__ == k.__module__]
    return classes + functions


@pytest.mark.parametrize('cls', list(our_classes()), ids=lambda c: c.__name__)
def test_every_key_the_code_reads_is_declared(cls):
    declared = {o.name for o in cls.option_schema} | SET_BY_BASICSR
    read = set().union(*(keys_read(source) for source in sources_of(cls)))
    undeclared = read - declared - {o.name for o in LOADER_OPTIONS} - {o.name for o in BASICSR_MODEL_OPTIONS}
    assert not undeclared, f'{cls.__name__} reads options {sorted(undeclared)} that it does not declare'


@pytest.mark.parametrize('cls', list(our_classes()), ids=lambda c: c.__name__)
def test_every_declared_key_is_read(cls):
    read = set().union(*(keys_read(source) for source in sources_of(cls)))
    base = BASICSR_MODEL_OPTIONS if cls in MODEL_REGISTRY._obj_map.values() else LOADER_OPTIONS
    for option in cls.option_schema:
        if base.options.get(option.key) == option or option.read_by in ('the loss', 'the optimizer') \
                or (option.read_by or '').startswith('nobody'):
            continue  # BasicSR's (next test); a typed block's arguments (checked against the class)
        where = keys_read(READ_BY_MODULE[option.read_by]) if option.read_by in READ_BY_MODULE else read
        assert option.name in where, f'{cls.__name__} declares {option.key!r}, which nothing reads'


def test_every_basicsr_key_declared_is_one_basicsr_reads():
    constants = basicsr_constants()
    schemas = [BASICSR_MODEL_OPTIONS, LOADER_OPTIONS, *BASICSR_MODELS_OPTIONS.values(),
               *BASICSR_DATASET_OPTIONS.values()]
    unread = {o.key for s in schemas for o in s if o.read_by == 'BasicSR' and o.name not in constants}
    ignored = {o.key for s in schemas for o in s if o.read_by and o.read_by.startswith('nobody')}
    assert ignored == {'use_shuffle'} and 'use_shuffle' not in constants
    assert not unread


def test_keys_read_by_the_loss_and_the_optimizer_are_their_arguments():
    from dspo_basicsr.losses.preference_loss import DSPOLoss
    from dspo_basicsr.option_check import init_arguments
    assert {'beta', 'loss_weight'} <= init_arguments(DSPOLoss)
    assert 'lr' in inspect.signature(__import__('torch').optim.AdamW).parameters


def test_scan_finds_reads_it_should():
    dspo_reads = keys_read('dspo_basicsr.models.dspo_model')
    assert {'max_nonfinite_steps', 'preference_timesteps', 'seed', 'pbar'} <= dspo_reads
    assert {'steps', 'guidance_scale', 'color_fix', 'tile_size'} <= keys_read('dspo_basicsr.archs.diffusion_sr_base')


def test_docs_option_tables_are_up_to_date():
    path = os.path.join(REPO, 'docs', 'options.md')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    assert update_option_docs(text) == text, 'docs/options.md is out of date: run python scripts/option_tables.py'
    for cls in our_classes():
        assert f'<!-- options: {cls.__name__} -->' in text, f'docs/options.md has no table of {cls.__name__}'


def test_the_defaults_the_code_reads_are_the_declared_ones():
    from dspo_basicsr.models.dro_model import DiffusionDROModel
    schema = DiffusionDROModel.option_schema
    assert schema.section({'train': {'dro': {'seed': 3}}}, 'train.dro') == {
        **{o.name: o.default for o in schema if o.parent == 'train.dro'}, 'seed': 3}
    assert schema.value({'train': {}}, 'train.max_nonfinite_steps') == schema['train.max_nonfinite_steps'].default
    fidelity = schema.value({}, 'val.preference_timesteps')
    fidelity.append(1)  # a mutable default is handed out as a copy
    assert schema.value({}, 'val.preference_timesteps') == [100, 300, 500, 700, 900]


def test_a_value_read_without_the_start_check_is_refused_in_one_line():
    from dspo_basicsr.models.dro_model import DiffusionDROModel
    schema = DiffusionDROModel.option_schema
    with pytest.raises(OptionValueError, match=r"^train.dro.online_ratio must be a non-negative finite number <= 1, "
                                               r"got 1.5$"):
        schema.section({'train': {'dro': {'online_ratio': 1.5}}}, 'train.dro')
    with pytest.raises(OptionValueError, match="unknown option 'train.dro.buffer'"):
        schema.section({'train': {'dro': {'buffer': 3}}}, 'train.dro')


@pytest.mark.parametrize('kind, good, bad', [
    ('bool', [True, False], ['false', 'true', 0, 1]),
    ('number', [1, 0.5, -2], [math.inf, -math.inf, math.nan, '1', True]),
    ('whole', [5000, 5000.0], [5000.5, 'abc', math.inf]),
    ('int', [3, -1], [3.0, '3', True]),
])
def test_kinds_accept_and_refuse(kind, good, bad):
    option = Option('x', kind, REQUIRED)
    assert all(option.finding(v) is None for v in good)
    assert all(option.finding(v) is not None for v in bad)


def test_adding_an_option_is_one_line():
    schema = OptionSchema(Option('train', 'dict', {}, 'training')).extend(
        Option('train.ema_decay', 'number', 0.999, 'EMA decay', ge=0, le=1))
    errors, unknown = schema.findings({'train': {'ema_decay': 2, 'emma': 1}})
    assert errors == ['train.ema_decay must be a non-negative finite number <= 1, got 2']
    assert [(section, key) for section, key, _ in unknown] == [('train', 'emma')]
    assert '`train.ema_decay`' in schema.table()


def test_val_sample_defaults_are_those_of_the_framework_sample():
    from dspo_basicsr.archs.diffusion_sr_base import DiffusionSRArch
    from dspo_basicsr.models.dspo_model import DSPOModel
    parameters = inspect.signature(DiffusionSRArch.sample).parameters
    declared = {o.name: o.default for o in DSPOModel.option_schema if o.parent == 'val.sample'}
    shared = set(declared) & set(parameters) - {'prompt'}  # sample_with_options passes prompt '' (sample: None)
    assert {'steps', 'guidance_scale', 'color_fix', 'tile_overlap', 'vae_tile', 'prompt_source'} <= shared
    assert {name: parameters[name].default for name in shared} == {name: declared[name] for name in shared}


def test_option_tables_script_checks_and_rewrites(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location('option_tables', os.path.join(REPO, 'scripts', 'option_tables.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = tmp_path / 'options.md'
    page.write_text('# x\n\n<!-- options: DSPOModel -->\nstale\n<!-- /options -->\n', encoding='utf-8')
    assert script.main(['--check', '--docs', str(page)]) == 1
    assert script.main(['--docs', str(page)]) == 0 and '`train.grad_clip`' in page.read_text(encoding='utf-8')
    assert script.main(['--check', '--docs', str(page)]) == 0
