"""Concurrent VLM scoring: the same instance tables and cache as the sequential run, bounded and rate-limited."""
import json
import os
import time

import pytest

from dspo_basicsr.preference.pipeline import (
    WorkFolder,
    feedback_from_options,
    run_scoring_step,
    scorer_from_options,
)
from dspo_basicsr.preference.vlm_client import RateLimit
from dspo_basicsr.preference.vlm_stub_server import StubVLMServer

from pipeline_fixtures import make_segmented_work


@pytest.fixture(scope='module')
def segmented(tmp_path_factory):
    root = tmp_path_factory.mktemp('vlm_concurrency')
    work = make_segmented_work(root, num=6, n_segments=4, min_area=32)
    return work


def _copy_of(work, dest):
    import shutil
    shutil.copytree(work.root, dest)
    return WorkFolder(dest)


def _score(work, server, cache, concurrency, **client):
    vlm_opt = {'base_url': server.base_url, 'model': 'stub', 'api_key_env': None, 'timeout': 5, 'max_retries': 2,
               'backoff': 0.01, 'cache_dir': str(cache), 'max_concurrency': concurrency, **client}
    opt = {'scorer': dict(vlm_opt, type='vlm', min_crop=8),
           'feedback': {'vlm': vlm_opt, 'embedder': 'hashing', 'threshold': 0.5, 'min_crop': 8}}
    return run_scoring_step(work, scorer_from_options(opt), top_k=3, feedback=feedback_from_options(opt),
                            progress=False)


def _folder_text(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding='utf-8') as handle:
            out[name] = handle.read()
    return out


def test_concurrent_scoring_equals_sequential(segmented, tmp_path):
    sequential, concurrent = _copy_of(segmented, tmp_path / 'seq'), _copy_of(segmented, tmp_path / 'conc')
    # Every third distinct request fails once (retried), answers take 20-80 ms so they arrive out of order.
    with StubVLMServer(latency=0.02, jitter=0.06, fail_first_every=3, seed=1) as server:
        report_seq = _score(sequential, server, tmp_path / 'cache_seq', 1)
        assert server.max_in_flight == 1
    with StubVLMServer(latency=0.02, jitter=0.06, fail_first_every=3, seed=2) as server:
        report_conc = _score(concurrent, server, tmp_path / 'cache_conc', 4)
        assert 1 < server.max_in_flight <= 4
    assert report_seq.done == report_conc.done == sorted(report_seq.done) and len(report_seq.done) == 6
    assert not report_seq.failed and not report_conc.failed
    instances = _folder_text(os.path.join(sequential.root, 'instances'))
    assert instances == _folder_text(os.path.join(concurrent.root, 'instances'))
    paired = [i for text in instances.values() for i in json.loads(text)['instances'] if i['win'] >= 0]
    assert paired and all(i['feedback']['gt_description'].startswith('a region') for i in paired)
    assert _folder_text(tmp_path / 'cache_seq') == _folder_text(tmp_path / 'cache_conc')

    # A rerun with --overwrite reads every reply from the cache: no request reaches the server.
    with StubVLMServer() as server:
        report = run_scoring_step(concurrent, scorer_from_options({'scorer': {
            'type': 'vlm', 'min_crop': 8, 'base_url': server.base_url, 'model': 'stub', 'api_key_env': None,
            'cache_dir': str(tmp_path / 'cache_conc')}}), top_k=3, overwrite=True, progress=False)
        assert len(report.done) == 6 and server.requests == 0


def test_failed_items_are_reported_in_input_order(segmented, tmp_path):
    work = _copy_of(segmented, tmp_path / 'work')
    with StubVLMServer(latency=0.01, jitter=0.03, fail_first_every=2) as server:
        report = _score(work, server, tmp_path / 'cache', 4, max_retries=0)
    assert report.failed and list(report.failed) == sorted(report.failed)
    assert all('HTTP 500' in reason for reason in report.failed.values())
    assert sorted(report.done + list(report.failed)) == [f'img{i}' for i in range(6)]
    with open(work.errors_json('instances')) as handle:
        assert list(json.load(handle)) == list(report.failed)


def test_rate_limit_spaces_request_starts(tmp_path):
    limit = RateLimit(requests_per_minute=600)  # one every 0.1 s
    from concurrent.futures import ThreadPoolExecutor
    stamps = []

    def hit(_):
        limit.wait()
        stamps.append(time.monotonic())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(hit, range(6)))
    stamps.sort()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= 0.09 and stamps[-1] - stamps[0] >= 0.45
