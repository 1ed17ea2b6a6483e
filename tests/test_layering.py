"""Imports run downward: the lower layers never import the layers that build on them (read statically with ast).

Layers, from the bottom (docs/architecture.md draws them)::

    utils, version, registration, compat      helpers; utils imports none of the subpackages
    archs, losses, data, ranking, metrics     the registered building blocks
    models, preference, annotation, comparison, sr_methods, cli, bench, demo, the top package

``registration`` (import-by-suffix) and ``compat`` (the import shims basicsr 1.4.2 needs, which every entry point
needs applied first) are lower helpers: any layer may import them.

A ``_private`` name stays in its module: no module of the package or of ``scripts/`` imports one from another
module (a helper two modules need is public, in one place).
"""
import ast
import os

import pytest

PACKAGE = 'dspo_basicsr'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, PACKAGE)
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


def _is_private(name):
    return name.startswith('_') and not name.startswith('__')


def private_imports(source, module):
    """The ``_private`` names of other modules of the package that ``source`` (the module ``module``) imports,
    dotted (``dspo_basicsr.compat._helper``); relative imports resolved, other libraries' names ignored."""
    found = []
    for name in imported_modules(source, module):
        parts = name.split('.')
        if parts[0] == PACKAGE and any(_is_private(part) for part in parts[1:]):
            found.append(name)
    return sorted(set(found))


def package_and_script_modules():
    """(path, dotted module name) of every module of the package and of ``scripts/``; tests may test private
    helpers and are not read."""
    for top in (PACKAGE, 'scripts'):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            for name in sorted(files):
                if name.endswith('.py'):
                    path = os.path.join(dirpath, name)
                    yield path, os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')


def test_no_private_name_is_imported_from_another_module():
    modules = list(package_and_script_modules())
    assert any(module.startswith('scripts.') for _, module in modules)
    found = set()
    for path, module in modules:
        with open(path, encoding='utf-8') as f:
            found.update((module, name) for name in private_imports(f.read(), module))
    unexpected = sorted(found)
    assert not unexpected, (f'private names imported from another module (make the helper public, in one place): '
                            f'{unexpected}')


@pytest.mark.parametrize('module, line, expected', [
    ('dspo_basicsr.models.new_model', 'from dspo_basicsr.compat import _helper, atomic_torch_save',
     ['dspo_basicsr.compat._helper']),
    ('dspo_basicsr.preference.new', 'from .work_folder import _read_json',
     ['dspo_basicsr.preference.work_folder._read_json']),
    ('dspo_basicsr.demo.new', '    from ..archs.seesr_arch import _strip_config',
     ['dspo_basicsr.archs.seesr_arch._strip_config']),
    ('scripts.new', 'from dspo_basicsr.archs import _private_module', ['dspo_basicsr.archs._private_module']),
    ('scripts.new', 'import dspo_basicsr._private_module', ['dspo_basicsr._private_module']),
    ('dspo_basicsr.compat', 'from torchvision.transforms import _functional_tensor', []),
    ('dspo_basicsr.utils.new', 'from dspo_basicsr.version import __version__', []),
    ('dspo_basicsr.data.new', 'from dspo_basicsr.utils.image_io import read_rgb', []),
])
def test_a_private_import_is_caught(module, line, expected):
    source = f'def f():\n{line}\n' if line.startswith(' ') else f'{line}\n'
    assert private_imports(source, module) == expected
