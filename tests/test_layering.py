"""Imports run downward: the lower layers never import the layers that build on them (read statically with ast).

Layers, from the bottom (docs/architecture.md draws them)::

    utils, version, registration, compat      helpers; utils imports none of the subpackages
    archs, losses, data, ranking, metrics     the registered building blocks
    models, preference, annotation, comparison, sr_methods, cli, bench, demo, the top package

``registration`` (import-by-suffix) and ``compat`` (the import shims basicsr 1.4.2 needs, which every entry point
needs applied first) are lower helpers: any layer may import them.
"""
import ast
import os

import pytest

PACKAGE = 'dspo_basicsr'
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
HELPERS = {'utils', 'version', 'registration', 'compat'}
LOWER = ('archs', 'losses', 'data', 'ranking', 'metrics', 'utils')
BUILDING_BLOCKS = {'archs', 'losses', 'data', 'ranking', 'metrics'}


def imported_modules(source, module):
    """Dotted names ``source`` (the text of the module ``module``) imports, relative imports resolved."""
    names = []
    package = module.split('.')[:-1]  # a module's package; for `pkg.__init__` the package itself
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import name` may import the submodule pkg.name: count both (the top package only as
            # `dspo_basicsr.name`, so that `from dspo_basicsr import compat` is the helper it names)
            if base != PACKAGE:
                names.append(base)
            names.extend(f'{base}.{alias.name}' for alias in node.names)
    return names


def layering_violations(source, module):
    """The imports of ``module`` (dotted, e.g. ``dspo_basicsr.archs.x_arch``) that run upward."""
    layer = module.split('.')[1]
    allowed = HELPERS if layer == 'utils' else HELPERS | BUILDING_BLOCKS
    bad = []
    for name in imported_modules(source, module):
        parts = name.split('.')
        if parts[0] != PACKAGE:
            continue
        if len(parts) == 1:
            bad.append(name)  # `import dspo_basicsr`: applies compat and registers everything
        elif parts[1] not in allowed:
            bad.append(name)
    return sorted(set(bad))


def lower_modules():
    for layer in LOWER:
        folder = os.path.join(ROOT, layer)
        for dirpath, _, files in os.walk(folder):
            for name in sorted(files):
                if name.endswith('.py'):
                    path = os.path.join(dirpath, name)
                    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
                    yield path, rel.replace(os.sep, '.')


def test_lower_layers_import_nothing_above_them():
    modules = list(lower_modules())
    assert len(modules) > 20  # the walk found the package
    found = {}
    for path, module in modules:
        with open(path, encoding='utf-8') as f:
            bad = layering_violations(f.read(), module)
        if bad:
            found[module] = bad
    assert not found, f'imports that run upward (see docs/architecture.md): {found}'


@pytest.mark.parametrize('line', [
    'from dspo_basicsr.models.dspo_model import DSPOModel',
    'import dspo_basicsr.preference',
    'from dspo_basicsr import __version__',
    'import dspo_basicsr',
    'from dspo_basicsr.cli import read_option_file',
    'from dspo_basicsr.bench.timer import timed',
    '    from dspo_basicsr.demo.biqa import make_biqa_demo_data',
    'from ..models import dspo_model',
    'from .. import preference',
    'from dspo_basicsr import models',
    'from dspo_basicsr.comparison import compare',
    'from dspo_basicsr.annotation.studio import open_study',
])
def test_an_upward_import_is_caught(line):
    source = f'def f():\n{line}\n' if line.startswith(' ') else f'{line}\n'
    assert layering_violations(source, 'dspo_basicsr.archs.new_arch')


@pytest.mark.parametrize('module, line', [
    ('dspo_basicsr.archs.new_arch', 'from dspo_basicsr.utils.checkpoint import read_checkpoint'),
    ('dspo_basicsr.archs.new_arch', 'from dspo_basicsr.data.preference_set import PreferenceLMDB'),
    ('dspo_basicsr.data.new_dataset', 'from .preference_sample import PreferenceSample'),
    ('dspo_basicsr.data.new_dataset', 'from dspo_basicsr.utils.options import SafeOrderedLoader'),
    ('dspo_basicsr.data.new_dataset', 'from dspo_basicsr import compat'),
    ('dspo_basicsr.data.new_dataset', 'from dspo_basicsr.version import __version__'),
    ('dspo_basicsr.archs.new_arch', 'from basicsr.utils.registry import ARCH_REGISTRY'),
])
def test_downward_imports_pass(module, line):
    assert layering_violations(line + '\n', module) == []


def test_utils_import_no_building_block():
    assert layering_violations('from dspo_basicsr.archs import seesr_arch\n', 'dspo_basicsr.utils.new')
    assert layering_violations('from dspo_basicsr.compat import apply\n', 'dspo_basicsr.utils.new') == []
