"""The VLM client against a local OpenAI-compatible server: good, malformed, 500 and slow replies."""
import glob
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import numpy as np
import pytest

from dspo_basicsr.preference.instance_scoring import (
    InstanceContext,
    VLMInstanceScorer,
    largest_instances,
    score_sample_instances,
)
from dspo_basicsr.preference.vlm_client import (
    VLMClient,
    VLMReplyError,
    VLMRequestError,
    image_data_url,
    parse_json_reply,
)


class FakeVLM:
    """Behaviour of the local server: a queue of modes, then ``default`` for every later request."""

    def __init__(self):
        self.modes = []
        self.default = 'good'
        self.requests = []
        self.lock = threading.Lock()

    def next_mode(self):
        with self.lock:
            return self.modes.pop(0) if self.modes else self.default


def make_handler(state):

    class Handler(BaseHTTPRequestHandler):

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
            state.requests.append({'body': body, 'auth': self.headers.get('Authorization'), 'path': self.path})
            mode = state.next_mode()
            if mode == '500':
                return self.reply(500, {'error': 'overloaded'})
            if mode == '404':
                return self.reply(404, {'error': 'no such model'})
            if mode == 'echo_key':  # a server that quotes the request's credentials back
                return self.reply(401, {'error': f"invalid key, header was {self.headers.get('Authorization')}"})
            if mode == 'echo_key_500':
                return self.reply(500, {'error': f"upstream refused {self.headers.get('Authorization')}"})
            if mode == 'echo_key_reply':
                key = self.headers.get('Authorization', '').split()[-1]
                return self.reply(200, {'choices': [{'message': {'content': f'your key {key} is fine'}}]})
            if mode in ('echo_key_escaped', 'reason_quotes_key'):  # the key as JSON text escapes it: sk-a\/b
                key = self.headers.get('Authorization', '').split()[-1].replace('/', '\\/')
                if mode == 'echo_key_escaped':
                    url = quote(key.replace('\\/', '/'), safe='')
                    raw = '{"error": "invalid key ' + key + ', also sent as ' + url + '"}'
                    return self.reply(401, None, raw)
                n_images = sum(part['type'] == 'image_url' for part in body['messages'][0]['content'])
                text = json.dumps({'best': n_images - 2, 'worst': 0, 'reason': 'the key is KEY'}).replace('KEY', key)
                return self.reply(200, {'choices': [{'message': {'role': 'assistant', 'content': text}}]})
            if mode == 'slow':
                time.sleep(0.6)
            content = body['messages'][0]['content']
            n_images = sum(part['type'] == 'image_url' for part in content)
            if 'Describe' in content[0]['text']:
                text = json.dumps({'description': 'a sharp furry cat'})
            elif mode == 'malformed':
                text = 'I think the second one looks best!'
            elif mode == 'out_of_range':
                text = json.dumps({'best': n_images + 3, 'worst': 0})
            else:  # good: the last candidate is best, the first worst (fenced, as many models do)
                text = '```json\n' + json.dumps({'best': n_images - 2, 'worst': 0, 'reason': 'sharper'}) + '\n```'
            return self.reply(200, {'choices': [{'message': {'role': 'assistant', 'content': text}}]})

        def reply(self, status, payload, raw=None):
            data = (raw if raw is not None else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

    return Handler


@pytest.fixture()
def server():
    state = FakeVLM()
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), make_handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    state.base_url = f'http://127.0.0.1:{httpd.server_address[1]}/v1'
    yield state
    httpd.shutdown()
    httpd.server_close()


def images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def client(state, tmp_path, **kwargs):
    opts = dict(model='tiny-vlm', api_key_env='DSPO_TEST_VLM_KEY', timeout=0.3, max_retries=2, backoff=0.01,
                cache_dir=str(tmp_path / 'cache'))
    opts.update(kwargs)
    return VLMClient(state.base_url, **opts)


def test_good_reply_is_parsed_sent_with_images_and_key_and_cached(server, tmp_path, monkeypatch):
    monkeypatch.setenv('DSPO_TEST_VLM_KEY', 'sk-test')
    vlm = client(server, tmp_path)
    lq, *cands = images(4)
    assert vlm.compare(lq, cands, context='a cat') == {'best': 2, 'worst': 0, 'reason': 'sharper'}
    request = server.requests[0]
    assert request['path'] == '/v1/chat/completions' and request['auth'] == 'Bearer sk-test'
    assert request['body']['model'] == 'tiny-vlm'
    urls = [p['image_url']['url'] for p in request['body']['messages'][0]['content'] if p['type'] == 'image_url']
    assert len(urls) == 4 and urls[0] == image_data_url(lq) and urls[0].startswith('data:image/png;base64,')
    assert 'realism' in request['body']['messages'][0]['content'][0]['text']
    # a rerun (fresh client, same cache) does not pay twice
    again = client(server, tmp_path)
    assert again.compare(lq, cands, context='a cat')['best'] == 2
    assert len(server.requests) == 1 and again.num_cache_hits == 1 and again.num_requests == 0
    assert vlm.describe(cands[0]) == 'a sharp furry cat'


def test_malformed_and_out_of_range_replies_are_clear_errors_and_not_cached(server, tmp_path):
    vlm = client(server, tmp_path)
    lq, *cands = images(3)
    server.modes = ['malformed']
    with pytest.raises(VLMReplyError, match='not JSON'):
        vlm.compare(lq, cands)
    server.modes = ['out_of_range']
    with pytest.raises(VLMReplyError, match="'best' = 6 is not a candidate index 0..1"):
        vlm.compare(lq, cands)
    assert vlm.compare(lq, cands)['best'] == 1  # asked again, not served a cached bad reply
    with pytest.raises(VLMReplyError):
        parse_json_reply('Sure! {"best": 1, "worst": 0}')
    with pytest.raises(VLMReplyError, match='not an object'):
        parse_json_reply('[1, 0]')


def test_5xx_is_retried_with_backoff_then_fails_clearly(server, tmp_path):
    vlm = client(server, tmp_path, max_retries=2)
    lq, *cands = images(3)
    server.modes = ['500', '500']
    assert vlm.compare(lq, cands)['best'] == 1  # third attempt succeeds
    assert vlm.num_requests == 3
    server.default = '500'
    with pytest.raises(VLMRequestError, match=r'HTTP 500.*3 attempts'):
        vlm.compare(*images(3, seed=1)[:1], images(2, seed=2))
    server.default = '404'
    before = len(server.requests)
    with pytest.raises(VLMRequestError, match='404 .not retried'):
        vlm.compare(*images(3, seed=3)[:1], images(2, seed=4))
    assert len(server.requests) == before + 1


def test_timeout_is_retried_then_fails_clearly(server, tmp_path):
    vlm = client(server, tmp_path, timeout=0.2, max_retries=1)
    lq, *cands = images(3)
    server.modes = ['slow']
    assert vlm.compare(lq, cands)['worst'] == 0  # first attempt timed out, retry fine
    server.default = 'slow'
    with pytest.raises(VLMRequestError, match=r'timed out after 0.2 s \(2 attempts\)'):
        vlm.compare(*images(3, seed=5)[:1], images(2, seed=6))


def test_scorer_keeps_scored_instances_and_reports_failed_ones(server, tmp_path):
    rng = np.random.default_rng(0)
    seg = np.zeros((16, 16), np.uint16)
    seg[:, 10:] = 1
    seg[12:, :4] = 2
    context = InstanceContext('img7', lq=(rng.random((8, 8, 3)) * 255).astype(np.uint8),
                              candidates=images(3, size=16), seg=seg)
    vlm = client(server, tmp_path, max_retries=0)
    server.modes = ['good', 'malformed', '500']
    instances, errors = score_sample_instances(VLMInstanceScorer(vlm, min_crop=4), context, top_k=3)
    assert largest_instances(seg, 3) == [0, 1, 2]
    assert (instances[0]['win'], instances[0]['lose']) == (2, 0)
    assert instances[1]['win'] == instances[2]['win'] == -1
    assert len(errors) == 2 and all("Sample 'img7', instance" in e for e in errors)
    assert 'not JSON' in errors[0] and 'HTTP 500' in errors[1]
    # rerun: the scored instance comes from the cache, only the two failures are asked again
    n = len(server.requests)
    instances, errors = score_sample_instances(VLMInstanceScorer(vlm, min_crop=4), context, top_k=3)
    assert not errors and len(server.requests) == n + 2
    assert all(inst['win'] == 2 and inst['lose'] == 0 for inst in instances)


def test_scoring_step_with_vlm_and_feedback_resumes_failed_items_only(server, tmp_path):
    """Step level: a malformed reply fails one image (reported, left unfinished); the rerun asks only for it."""
    from dspo_basicsr.preference.pipeline import feedback_from_options, run_scoring_step, scorer_from_options

    from pipeline_fixtures import make_segmented_work

    work = make_segmented_work(tmp_path, num=2, n_segments=3, min_area=64)
    # max_concurrency 1: the injected replies below are consumed in the order of the items
    vlm_opt = {'base_url': server.base_url, 'model': 'tiny-vlm', 'api_key_env': None, 'timeout': 2, 'max_retries': 0,
               'backoff': 0.01, 'cache_dir': str(tmp_path / 'vlm_cache'), 'max_concurrency': 1}
    opt = {'scorer': dict(vlm_opt, type='vlm', min_crop=8),
           'feedback': {'vlm': vlm_opt, 'embedder': 'hashing', 'threshold': 0.1, 'min_crop': 8}}
    top_k = 2
    server.modes = ['good'] * (top_k * 5) + ['malformed']  # img0: 2 compares + 2 x 4 descriptions; img1's first fails
    report = run_scoring_step(work, scorer_from_options(opt), top_k=top_k, feedback=feedback_from_options(opt),
                              progress=False)
    assert report.done == ['img0'] and list(report.failed) == ['img1']
    assert "Sample 'img1', instance" in report.failed['img1'] and 'not JSON' in report.failed['img1']
    with open(work.errors_json('instances')) as handle:
        assert list(json.load(handle)) == ['img1']
    first = len(server.requests)
    assert first == top_k * 5 + 1 + (top_k - 1) * 5  # img1 went on with its other instance and its feedback

    report = run_scoring_step(work, scorer_from_options(opt), top_k=top_k, feedback=feedback_from_options(opt),
                              progress=False)
    assert report.skipped == ['img0'] and report.done == ['img1'] and not report.failed
    assert len(server.requests) - first == 1 + 4  # only the failed compare and its instance's descriptions
    with open(work.instances_json('img1')) as handle:
        record = json.load(handle)
    paired = [i for i in record['instances'] if i['win'] >= 0]
    assert len(paired) == top_k and all(i['feedback']['gt_description'] == 'a sharp furry cat' for i in paired)
    assert record['negative_prompt'] == ''  # every description matches the GT's: no negative feedback


@pytest.mark.parametrize('mode', ['echo_key', 'echo_key_500', 'echo_key_reply'])
def test_api_key_echoed_by_the_server_is_redacted_from_errors(server, tmp_path, monkeypatch, capsys, mode):
    monkeypatch.setenv('DSPO_TEST_VLM_KEY', 'sk-very-secret-123')
    vlm = client(server, tmp_path, max_retries=0)
    server.default = mode
    with pytest.raises((VLMRequestError, VLMReplyError)) as err:
        vlm.compare(*images(3)[:1], images(2, seed=1))
    print(err.value)
    assert 'sk-very-secret-123' not in str(err.value) + capsys.readouterr().out
    assert '***' in str(err.value)
    assert not any('sk-very-secret' in open(f).read() for f in glob.glob(str(tmp_path / '**' / '*'), recursive=True)
                   if os.path.isfile(f))


def test_redact_secrets_removes_key_and_any_bearer_token():
    from dspo_basicsr.preference.vlm_client import redact_secrets
    text = redact_secrets('key sk-abc; header "Authorization: Bearer tok.en-9"', ['sk-abc'])
    assert text == 'key ***; header "Authorization: Bearer ***"'


SLASH_KEY = 'sk-proj-Ab3/xY+9/zz'


def test_key_with_slash_in_every_encoding_is_redacted():
    from dspo_basicsr.preference.redaction import redact, redact_value
    escaped = SLASH_KEY.replace('/', '\\/')
    text = redact(f'raw {SLASH_KEY} json {escaped} url {quote(SLASH_KEY, safe="")} {json.dumps(escaped)}',
                  [SLASH_KEY])
    assert 'Ab3' not in text and text.count('***') == 4
    assert redact_value({'e': [f'x {escaped}']}, [SLASH_KEY]) == {'e': ['x ***']}


def test_key_echoed_json_escaped_or_quoted_in_a_reason_reaches_no_file_and_no_output(server, tmp_path, monkeypatch,
                                                                                      capsys):
    """Issue 24 item 6: errors/instances.json, stdout, vlm_cache/*.json and instances/*.json stay free of the key."""
    from dspo_basicsr.preference.pipeline import run_scoring_step, scorer_from_options

    from pipeline_fixtures import make_segmented_work

    monkeypatch.setenv('DSPO_TEST_VLM_KEY', SLASH_KEY)
    work = make_segmented_work(tmp_path, num=2, n_segments=3, min_area=64)
    opt = {'scorer': {'type': 'vlm', 'base_url': server.base_url, 'model': 'tiny-vlm', 'min_crop': 8,
                      'api_key_env': 'DSPO_TEST_VLM_KEY', 'timeout': 2, 'max_retries': 0, 'backoff': 0.01,
                      'cache_dir': str(tmp_path / 'vlm_cache'), 'max_concurrency': 1}}
    server.modes = ['reason_quotes_key', 'reason_quotes_key', 'echo_key_escaped']
    report = run_scoring_step(work, scorer_from_options(opt), top_k=2, progress=True)
    print(report.summary())
    assert report.done == ['img0'] and list(report.failed) == ['img1']
    out = capsys.readouterr()
    leaks = ('Ab3', 'Ab3%2F')
    files = [f for f in glob.glob(str(tmp_path / '**' / '*'), recursive=True) if os.path.isfile(f)]
    assert any('vlm_cache' in f for f in files) and os.path.isfile(work.errors_json('instances'))
    assert '***' in open(work.errors_json('instances')).read()
    for f in files:
        if f.endswith('.json'):
            assert not any(leak in open(f).read() for leak in leaks), f
    assert not any(leak in out.out + out.err for leak in leaks)
