"""The SeeSR / AddSR / OSEDiff option files: safe YAML, known network and metric options, M1 vs M1+M2 pair."""
import inspect
import os

import pytest

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.cli import _build_parser, read_option_file
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA

from basicsr.utils.registry import ARCH_REGISTRY, METRIC_REGISTRY

from conftest import REPO

FRAMEWORKS = ('seesr', 'addsr', 'osediff')
FILES = ([f'options/dspo_{f}.yml' for f in FRAMEWORKS] + ['options/dspo_seesr_m1.yml']
         + [f'options/test_dspo_{f}.yml' for f in FRAMEWORKS] + [f'options/demo/dspo_{f}_demo.yml' for f in FRAMEWORKS])
PAPER_METRICS = {'psnr', 'ssim', 'lpips', 'dists', 'niqe', 'musiq', 'maniqa', 'clipiqa'}


def _read(path):
    return read_option_file(os.path.join(REPO, path))


def _init_parameters(cls):
    names = set()
    for klass in cls.__mro__:
        if '__init__' in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters) - {'self', 'kwargs'}
    return names


@pytest.mark.parametrize('path', FILES)
def test_option_file_names_known_networks_options_and_metrics(path):
    opt = _read(path)
    net = dict(opt['network_g'])
    cls = ARCH_REGISTRY.get(net.pop('type'))
    unknown = set(net) - _init_parameters(cls)
    assert not unknown, f'{path}: network_g options {unknown} are not arguments of {cls.__name__}'
    metrics = opt['val']['metrics']
    for name, metric in metrics.items():
        assert METRIC_REGISTRY.get(metric['type']), name
    if 'demo' not in path:
        assert set(metrics) == PAPER_METRICS
        sets = {d['name'] for d in opt['datasets'].values() if d['type'] == 'PairedImageDataset'}
        assert sets == {'DRealSR', 'RealSR'}
    if path.startswith('options/dspo_'):
        assert opt['train']['preference_opt'] == {'type': 'DSPOLoss', 'beta': DEFAULT_BETA, 'loss_weight': 1.0}
        # The run commands in the file's header are accepted by our CLI, train this file, and cover one
        # process, torchrun and slurm.
        header = open(os.path.join(REPO, path), encoding='utf-8').read().split('\n\n')[0]
        commands = [line.split('basicsr train', 1)[1].split() if 'basicsr train' in line
                    else line.split('dspo_basicsr.cli train', 1)[1].split()
                    for line in header.splitlines() if 'basicsr train' in line or 'dspo_basicsr.cli train' in line]
        parsed = [_build_parser().parse_args(['train', *argv]) for argv in commands]
        assert {args.opt for args in parsed} == {path}
        assert {args.launcher for args in parsed} == {'none', 'pytorch', 'slurm'}


def test_m1_and_m1_plus_m2_differ_only_in_feedback_guidance():
    full, m1 = _read('options/dspo_seesr.yml'), _read('options/dspo_seesr_m1.yml')
    assert full['train'].pop('feedback_guidance_scale') > 1
    assert 'feedback_guidance_scale' not in m1['train']
    assert full.pop('name') == 'dspo_seesr' and m1.pop('name') == 'dspo_seesr_m1'
    assert full == m1


# The demo option files' networks are built from the folders make_framework_demo.py writes, loaded back through
# the real loading code: tests/test_framework_demos.py.
