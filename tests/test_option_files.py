"""Every shipped option file is safe YAML, has BasicSR's sections, and names only registered types."""
import glob
import os

import pytest

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.cli import read_option_file

from basicsr.utils import registry

from conftest import REPO

# chain_*.yml are options of the data-building chain (docs/preference_data.md), not BasicSR option files.
OPTION_FILES = sorted(f for f in glob.glob(os.path.join(REPO, 'options', '*.yml')) +
                      glob.glob(os.path.join(REPO, 'options', 'demo', '*.yml'))
                      if not os.path.basename(f).startswith('chain_'))
CHAIN_FILES = sorted(glob.glob(os.path.join(REPO, 'options', '**', 'chain_*.yml'), recursive=True))


def _types(opt):
    """(registry, type name, where) for every registered type an option file names."""
    yield registry.MODEL_REGISTRY, opt['model_type'], 'model_type'
    for phase, dataset in (opt.get('datasets') or {}).items():
        yield registry.DATASET_REGISTRY, dataset['type'], f'datasets.{phase}.type'
    for key, value in opt.items():
        if key.startswith('network_') and isinstance(value, dict):
            yield registry.ARCH_REGISTRY, value['type'], f'{key}.type'
    for key, value in (opt.get('train') or {}).items():
        if key.endswith('_opt') and isinstance(value, dict) and 'type' in value:
            yield registry.LOSS_REGISTRY, value['type'], f'train.{key}.type'
    for name, metric in ((opt.get('val') or {}).get('metrics') or {}).items():
        yield registry.METRIC_REGISTRY, metric['type'], f'val.metrics.{name}.type'


def test_there_are_option_files():
    names = {os.path.relpath(f, REPO) for f in OPTION_FILES}
    assert {'options/dspo_sd21.yml', 'options/demo/dspo_demo.yml', 'options/dspo_seesr.yml'} <= names


@pytest.mark.parametrize('path', CHAIN_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_chain_option_file_names_registered_types(path):
    import yaml
    with open(path, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    assert opt['framework']['network']['type'] in registry.ARCH_REGISTRY, path
    for name, metric in {**opt.get('metrics', {}), **opt['scorer'].get('metrics', {})}.items():
        assert metric['type'] in registry.METRIC_REGISTRY, f'{path}: metric {name}'


@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_option_file_is_consistent(path):
    opt = read_option_file(path)
    for section in ('name', 'model_type', 'path'):
        assert section in opt, f'{path}: no {section}'
    for reg, name, where in _types(opt):
        assert name in reg, f'{path}: {where} = {name} is not registered in {reg._name}'
