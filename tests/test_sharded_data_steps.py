"""Data steps on several processes: each sample processed once, the same work folder as one process."""
import json
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from dspo_basicsr.utils.distributed import DataShard, data_shard

from pipeline_fixtures import make_image_folders, write_chain_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [('generate_candidates', 'candidates'), ('segment_instances', 'seg'), ('score_instances', 'instances')]


def test_shard_from_launcher_environment(monkeypatch):
    assert data_shard('none') == DataShard()
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setenv('WORLD_SIZE', '1')  # a world of one starts no process group
    monkeypatch.setenv('LOCAL_RANK', '3')
    shard = data_shard('pytorch')
    assert (shard.rank, shard.local_rank, shard.device('cuda'), shard.device('cpu')) == (1, 3, 'cuda:3', 'cpu')
    for name, value in {'SLURM_PROCID': '1', 'SLURM_NTASKS': '2', 'SLURM_LOCALID': '1', 'SLURM_ARRAY_TASK_ID': '5',
                        'SLURM_ARRAY_TASK_MIN': '4', 'SLURM_ARRAY_TASK_COUNT': '3'}.items():
        monkeypatch.setenv(name, value)
    shard = data_shard('slurm')  # array task 1 of 3, task 1 of its 2: rank 3 of 6, no barrier
    assert (shard.rank, shard.world_size, shard.array) == (3, 6, True)
    assert shard.take(range(14)) == [3, 9]
    monkeypatch.delenv('SLURM_PROCID')
    with pytest.raises(RuntimeError, match='SLURM_PROCID'):
        data_shard('slurm')


DRIVER = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    code = runpy.run_path(argv[0], run_name='dspo_test')['main'](argv[1:])
    if code:
        sys.exit(code)
"""


def _script(name):
    return os.path.join(ROOT, 'scripts', f'{name}.py')


def _tree(root):
    """Every file of a work folder (bytes), except the per-rank error reports."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not re.search(r'\.rank\d+\.json$', name):
                with open(path, 'rb') as handle:
                    files[os.path.relpath(path, root)] = handle.read()
    return files


@pytest.mark.slow
def test_two_process_steps_process_each_sample_once_and_equal_one_process(tmp_path):
    lq_dir, gt_dir = make_image_folders(str(tmp_path / 'data'), num=5, size=32)
    chain = write_chain_yaml(tmp_path / 'chain.yml')

    def argv(step, work, *extra):
        inputs = ['--lq', lq_dir, '--gt', gt_dir] if step == 'generate_candidates' else []
        return [_script(step), '-opt', chain, '--work', str(work), '--no-progress', *inputs, *extra]

    # One process (in this one), then the three scripts under torchrun with two processes (one launch).
    # Both runs on one thread each: thread counts change floating-point sums, hence scores and PNG bytes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step, _ in STEPS:
            assert runpy.run_path(_script(step), run_name='dspo_test')['main'](argv(step, tmp_path / 'one')[1:]) == 0
    finally:
        torch.set_num_threads(threads)
    runs = [argv(step, tmp_path / 'two', '--launcher', 'pytorch') for step, _ in STEPS]
    runs.append(argv('score_instances', tmp_path / 'two', '--launcher', 'pytorch'))  # a rerun: nothing to do
    (tmp_path / 'driver.py').write_text(DRIVER)
    torchrun = [os.path.join(os.path.dirname(sys.executable), 'torchrun'), '--nproc_per_node=2',
                '--master_port=29641']
    result = subprocess.run(torchrun + [str(tmp_path / 'driver.py'), json.dumps(runs)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for _, stage in STEPS:
        done = [int(n) for n in re.findall(rf'{stage}: (\d+) done', result.stdout)]
        expected = [2, 3] if stage != 'instances' else [0, 0, 2, 3]  # ids 1, 3 and 0, 2, 4; the rerun does nothing
        assert sorted(done) == expected, result.stdout
        with open(tmp_path / 'two' / 'errors' / f'{stage}.json') as handle:
            assert json.load(handle) == {}  # merged by the last rank
    one, two = _tree(tmp_path / 'one'), _tree(tmp_path / 'two')
    assert sorted(one) == sorted(two) and len([p for p in one if p.startswith('instances')]) == 5
    assert [path for path in one if one[path] != two[path]] == []

    # One process afterwards writes the whole report and drops the per-rank ones.
    assert os.path.isfile(tmp_path / 'two' / 'errors' / 'instances.rank1.json')
    score = runpy.run_path(_script('score_instances'), run_name='dspo_test')['main']
    assert score(argv('score_instances', tmp_path / 'two', '--overwrite')[1:]) == 0
    assert sorted(os.listdir(tmp_path / 'two' / 'errors')) == [
        'candidates.json', 'candidates.rank0.json', 'candidates.rank1.json', 'instances.json', 'seg.json',
        'seg.rank0.json', 'seg.rank1.json']
