"""``import dspo_basicsr`` leaves BasicSR as it found it; ``basicsr test`` runs our pipeline with BasicSR's results.

A BasicSR ``SRModel`` trained with BasicSR's own ``basicsr.train`` writes the same bytes with and without the
import: ``tests/test_train_pipeline.py::test_import_dspo_basicsr_leaves_a_basicsr_srmodel_run_as_it_was``.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from test_cli import msrresnet_options

from conftest import run_cli, write_options

BASICSR_DIR = os.path.dirname(os.path.abspath(importlib.util.find_spec('basicsr').origin))


def _defined_in_basicsr(obj):
    code = getattr(obj, '__code__', None)
    return (code is not None and code.co_filename.startswith(BASICSR_DIR + os.sep)
            and not hasattr(obj, '__wrapped__'))


def test_basicsr_functions_are_basicsrs_own_after_import():
    import dspo_basicsr  # noqa: F401

    import basicsr.data
    import basicsr.metrics
    import basicsr.test
    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    from basicsr.utils.registry import METRIC_REGISTRY, Registry
    objects = {
        'options.ordered_yaml': options.ordered_yaml, 'options._postprocess_yml_value': options._postprocess_yml_value,
        'options.parse_options': options.parse_options, 'Registry.get': Registry.get,
        'data.build_dataloader': basicsr.data.build_dataloader,
        'train.build_dataloader': basicsr.train.build_dataloader,
        'test.build_dataloader': basicsr.test.build_dataloader, 'dist_util.init_dist': dist_util.init_dist,
        'dist_util._init_dist_pytorch': dist_util._init_dist_pytorch,
        'dist_util._init_dist_slurm': dist_util._init_dist_slurm,
        "METRIC_REGISTRY.get('calculate_niqe')": METRIC_REGISTRY.get('calculate_niqe'),
        'metrics.calculate_niqe': basicsr.metrics.calculate_niqe,
        'metrics.calculate_metric': basicsr.metrics.calculate_metric,
    }
    assert [name for name, obj in objects.items() if not _defined_in_basicsr(obj)] == []
    assert basicsr.metrics.calculate_niqe is METRIC_REGISTRY.get('calculate_niqe')


#: every attribute of every loaded basicsr module and class, and every registry entry, before and after the import
SNAPSHOT = '''
import json, sys
from torchvision.transforms import _functional_tensor
sys.modules['torchvision.transforms.functional_tensor'] = _functional_tensor  # the one shim, as compat applies it
import basicsr, basicsr.test, basicsr.train, basicsr.utils.options, basicsr.utils.dist_util
from basicsr.utils import registry

def snapshot():
    seen = {}
    for name, module in list(sys.modules.items()):
        if name == 'basicsr' or name.startswith('basicsr.'):
            for attr, value in list(vars(module).items()):
                seen[f'{name}.{attr}'] = id(value)
                if isinstance(value, type) and value.__module__.startswith('basicsr'):
                    seen.update({f'{name}.{attr}.{k}': id(v) for k, v in vars(value).items()})
    for attr, value in vars(registry).items():
        if isinstance(value, registry.Registry):
            seen.update({f'{attr}[{k}]': id(v) for k, v in value._obj_map.items()})
    return seen

before = snapshot()
import dspo_basicsr
after = snapshot()
print(json.dumps({'changed': sorted(k for k in before if after.get(k) != before[k]), 'compared': len(before)}))
'''


@pytest.mark.slow
def test_import_changes_no_basicsr_attribute_or_registry_entry(tmp_path):
    script = tmp_path / 'snapshot.py'
    script.write_text(SNAPSHOT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result['compared'] > 1000 and result['changed'] == []


#: BasicSR's own ``basicsr.test.test_pipeline`` on the option file in argv[1], without dspo_basicsr
BASICSR_TEST = '''
import os, sys
from torchvision.transforms import _functional_tensor
sys.modules['torchvision.transforms.functional_tensor'] = _functional_tensor
from basicsr.test import test_pipeline
sys.argv = ['basicsr', '-opt', sys.argv[1]]
test_pipeline(os.getcwd())
'''
_LOG_TIME = re.compile(r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ')


def _results(root, name):
    """{relative path: bytes} of the images, and the log lines without their time stamps."""
    results = root / 'results' / name
    files = {str(p.relative_to(results)): p.read_bytes() for p in results.rglob('*') if p.suffix == '.png'}
    logs = list(results.glob(f'test_{name}_*.log'))
    assert len(logs) == 1, logs
    lines = [_LOG_TIME.sub('', line) for line in logs[0].read_text().splitlines()]
    return files, lines


@pytest.mark.slow
def test_basicsr_test_writes_what_basicsrs_test_pipeline_writes(tmp_path, paired_folders):
    opt = msrresnet_options(*paired_folders, name='msr_test')
    opt.pop('train'), opt.pop('logger')
    opt['datasets'] = {'test_1': dict(opt['datasets']['val'], name='toy_test')}
    opt['val'] = {'save_img': True, 'suffix': None,
                  'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': False}}}
    (tmp_path / 'basicsr_test.py').write_text(BASICSR_TEST)
    outputs = {}
    for mode in ('basicsr', 'ours'):
        cwd = tmp_path / mode
        cwd.mkdir()
        opt_file = write_options(cwd / 'test.yml', opt)
        if mode == 'basicsr':
            run = subprocess.run([sys.executable, str(tmp_path / 'basicsr_test.py'), opt_file], cwd=cwd,
                                 capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
        else:
            run = run_cli(['test', '-opt', opt_file], cwd=cwd)
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[mode] = _results(cwd, 'msr_test')
    (theirs, their_log), (ours, our_log) = outputs['basicsr'], outputs['ours']
    assert sorted(theirs) == [f'visualization/toy_test/{i:03d}_msr_test.png' for i in range(4)]
    assert ours == theirs
    assert any('# psnr:' in line for line in their_log)
    assert our_log == [line.replace(str(tmp_path / 'basicsr'), str(tmp_path / 'ours')) for line in their_log]
