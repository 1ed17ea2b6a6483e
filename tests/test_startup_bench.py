"""The start-up benchmark (scripts/bench_import.py): CPU seconds of fresh interpreters and -X importtime tables."""
import os

import pytest

from dspo_basicsr.bench import startup

IMPORTTIME = """import time: self [us] | cumulative | imported package
import time:       120 |        120 |   _io
import time:      2500 |       2620 | json
import time:        40 |         40 |     json.decoder
import time:        99 |         99 | json
not an import-time line
"""


def test_importtime_lines_are_read_in_seconds_and_a_module_once():
    times = startup.parse_import_times(IMPORTTIME)
    assert set(times) == {'_io', 'json', 'json.decoder'}
    assert times['json'] == (0.0025, 0.00262)  # its first import, not a later line of the same name
    assert times['json.decoder'] == (4e-05, 4e-05)


def test_every_start_of_the_benchmark_is_python_code():
    for name, (code, args) in startup.STARTS.items():
        compile(code, name, 'exec')
        assert isinstance(args, tuple)
    assert startup.STARTS['basicsr --help'][1] == ('--help',)


@pytest.mark.slow
def test_starts_are_timed_in_alternating_rounds_and_a_failure_is_reported():
    starts = {'pass': ('pass', ()), 'sum': ('import sys; sum(range(int(sys.argv[1])))', ('3000000',))}
    timings = startup.time_starts(starts, repeats=2, warmup=0)
    assert list(timings) == ['pass', 'sum']
    assert all(len(t.cpu) == len(t.wall) == 2 for t in timings.values())
    assert timings['sum'].cpu_median > timings['pass'].cpu_median > 0  # the child's own CPU time is counted
    with pytest.raises(RuntimeError, match='exited with 3'):
        startup.time_start('import sys; sys.exit(3)')


@pytest.mark.slow
def test_modules_added_lists_what_the_floor_does_not_import():
    added = dict(startup.modules_added('import json', 'pass'))
    assert 'json' in added and 'json.decoder' in added
    assert 'sys' not in added


def test_children_import_this_checkout_and_can_cache_their_bytecode(monkeypatch, tmp_path):
    monkeypatch.setenv('PYTHONPATH', '/elsewhere')
    monkeypatch.setenv('PYTHONDONTWRITEBYTECODE', '1')
    env = startup.repository_env('/repo')
    assert env['PYTHONPATH'].split(os.pathsep) == ['/repo', '/elsewhere'] and env['PYTHONDONTWRITEBYTECODE'] == '1'
    cached = startup.repository_env('/repo', bytecode_cache=str(tmp_path))
    assert 'PYTHONDONTWRITEBYTECODE' not in cached and cached['PYTHONPYCACHEPREFIX'] == str(tmp_path)
