"""Demo data builders: tiny frameworks and synthetic sets that the demos and tests train on (``biqa``: BIQA).

``dspo_basicsr/demo.py`` (the embedded DSPO demo, ``build_demo_data``) moves into this package once the branch
that edits it has merged. Until then this package, which shadows that file, loads it from beside this folder on
first use and answers with its names, so ``from dspo_basicsr.demo import build_demo_data`` keeps working.
"""
import importlib.util
import os
import sys

_SR_DEMO_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'demo.py')


def _sr_demo():
    name = f'{__name__}._sr_demo'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _SR_DEMO_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def __getattr__(name):
    if not name.startswith('_') and os.path.isfile(_SR_DEMO_FILE) and hasattr(_sr_demo(), name):
        return getattr(_sr_demo(), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
