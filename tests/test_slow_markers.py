"""Every test that starts other processes is marked ``slow`` (read statically with ast), so that
``pytest -m "not slow"`` stays the fast inner loop (docs/architecture.md, "Start-up and the test loop").

A test starts processes when its body, a helper or fixture it uses (from its own module, ``conftest.py`` or a
``*_fixtures.py`` module), calls ``subprocess.*``, the CLI helper ``run_cli`` (``conftest.py``), or names
``'torchrun'``. It is marked when ``pytest.mark.slow`` is in its decorators, its class's, or the module's
``pytestmark``.
"""
import ast
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
SPAWNING_CALLS = {'run_cli'}  # conftest.run_cli: ``python -m dspo_basicsr.cli`` in a subprocess
SUBPROCESS_FUNCTIONS = {'run', 'Popen', 'call', 'check_call', 'check_output'}
# a launcher's name in a command list or path; a module constant, so that no function of this file names it
LAUNCHER = 'torchrun'


def _starts_processes_itself(node):
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            func = child.func
            if (isinstance(func, ast.Attribute) and func.attr in SUBPROCESS_FUNCTIONS
                    and isinstance(func.value, ast.Name) and func.value.id == 'subprocess'):
                return True
        elif isinstance(child, ast.Constant) and child.value == LAUNCHER:
            return True
    return False


def _names_used(node):
    """Names a function calls or refers to, and the fixtures it asks for (its arguments)."""
    names = {child.id for child in ast.walk(node) if isinstance(child, ast.Name)}
    names |= {child.attr for child in ast.walk(node) if isinstance(child, ast.Attribute)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names |= {arg.arg for arg in node.args.args}
    return names


def _functions(tree):
    """Every function of a module by name, the methods of its classes included."""
    return {node.name: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def spawning_names(trees, spawning=frozenset()):
    """Names of the functions and fixtures of ``trees`` that start processes, directly or through another one
    (``spawning``: names known to, e.g. the shared helpers); tests themselves are left out."""
    functions = {}
    for tree in trees:
        functions.update({name: node for name, node in _functions(tree).items() if not name.startswith('test')})
    spawning = set(SPAWNING_CALLS) | set(spawning)
    spawning |= {name for name, node in functions.items() if _starts_processes_itself(node)}
    uses = {name: _names_used(node) for name, node in functions.items()}
    grew = True
    while grew:
        more = {name for name, used in uses.items() if name not in spawning and used & spawning}
        spawning |= more
        grew = bool(more)
    return spawning


def _is_slow_mark(node):
    return any(isinstance(child, ast.Attribute) and child.attr == 'slow' and isinstance(child.value, ast.Attribute)
               and child.value.attr == 'mark' for child in ast.walk(node))


def _module_is_slow(tree):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == 'pytestmark' for t in node.targets):
            if _is_slow_mark(node.value):
                return True
    return False


def unmarked_spawning_tests(source, shared_spawning=frozenset()):
    """Names of the tests of a test module (its text) that start processes and are not marked slow."""
    tree = ast.parse(source)
    if _module_is_slow(tree):
        return []
    spawning = spawning_names([tree], shared_spawning)
    found = []
    for node in tree.body:
        tests, class_slow = [], False
        if isinstance(node, ast.ClassDef) and node.name.startswith('Test'):
            class_slow = any(_is_slow_mark(d) for d in node.decorator_list)
            tests = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            tests = [node]
        for test in tests:
            if not test.name.startswith('test') or class_slow or any(_is_slow_mark(d) for d in test.decorator_list):
                continue
            if _starts_processes_itself(test) or _names_used(test) & spawning:
                found.append(test.name)
    return found


def _read(name):
    with open(os.path.join(TESTS, name), encoding='utf-8') as f:
        return f.read()


def shared_spawning_names():
    """Spawning helpers and fixtures of ``conftest.py`` and the ``*_fixtures.py`` modules."""
    shared = [name for name in sorted(os.listdir(TESTS)) if name == 'conftest.py' or name.endswith('_fixtures.py')]
    return spawning_names([ast.parse(_read(name)) for name in shared])


def test_every_test_that_starts_processes_is_marked_slow():
    modules = sorted(name for name in os.listdir(TESTS) if name.startswith('test_') and name.endswith('.py'))
    assert len(modules) > 40  # the listing found the suite
    shared = shared_spawning_names()
    assert 'run_cli' in shared
    unmarked = {name: tests for name in modules if (tests := unmarked_spawning_tests(_read(name), shared))}
    assert not unmarked, ('tests that start processes (subprocess, run_cli, torchrun) without @pytest.mark.slow '
                          f'(module-level pytestmark where the whole file is such): {unmarked}')


@pytest.mark.parametrize('source, expected', [
    ('import subprocess\ndef test_a():\n    subprocess.run(["x"])\n', ['test_a']),
    ('from conftest import run_cli\ndef test_a(tmp_path):\n    run_cli(["train"], cwd=tmp_path)\n', ['test_a']),
    ('import os, sys\ndef test_a():\n    launcher = [os.path.join(os.path.dirname(sys.executable), "torchrun")]\n',
     ['test_a']),
    ('import subprocess\ndef helper():\n    return subprocess.Popen(["x"])\ndef test_a():\n    helper()\n', ['test_a']),
    ('import subprocess, pytest\n@pytest.fixture\ndef server():\n    subprocess.Popen(["x"])\n'
     'def test_a(server):\n    pass\n', ['test_a']),
    ('def test_a(studio_server):\n    pass\n', ['test_a']),  # a shared fixture that spawns
    ('import subprocess, pytest\n@pytest.mark.slow\ndef test_a():\n    subprocess.run(["x"])\n', []),
    ('import subprocess, pytest\npytestmark = [pytest.mark.browser, pytest.mark.slow]\n'
     'def test_a():\n    subprocess.run(["x"])\n', []),
    ('import subprocess, pytest\n@pytest.mark.slow\nclass TestA:\n    def test_a(self):\n'
     '        subprocess.run(["x"])\n', []),
    ('from conftest import run_cli_refusal\ndef test_a(tmp_path):\n    run_cli_refusal(["train"], tmp_path)\n', []),
    ('import subprocess\ndef test_a():\n    assert subprocess.CompletedProcess([], 0).returncode == 0\n', []),
])
def test_a_spawning_test_without_the_marker_is_found(source, expected):
    assert unmarked_spawning_tests(source, {'run_cli', 'studio_server'}) == expected
