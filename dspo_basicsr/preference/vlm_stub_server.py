"""A local stand-in for an OpenAI-compatible VLM server, for tests and benchmarks of the VLM scoring.

It listens on 127.0.0.1 only and answers ``POST /v1/chat/completions`` after an injected latency (plus a random
jitter, so concurrent answers arrive out of order). Its answer is a function of the request alone (the best
and worst candidate come from a hash of the body), so a sequential and a concurrent run get the same replies.
It can fail chosen requests once with HTTP 500, to exercise the client's retries, and it records how many
requests were in flight at once.
"""
import hashlib
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ['StubVLMServer']


class StubVLMServer:
    """Context manager running the stub server in a daemon thread.

    Args:
        latency (float): Seconds before each answer. Default: 0.
        jitter (float): Up to this many more seconds, drawn at random per request. Default: 0.
        fail_first_every (int): The first attempt of every ``n``-th distinct request answers HTTP 500
            (0: never). Default: 0.
        seed (int): Seed of the jitter.

    Attributes:
        base_url (str): ``http://127.0.0.1:<port>/v1`` once started.
        requests (int): Requests answered (any status).
        max_in_flight (int): Most requests handled at the same time.
        starts (list[float]): ``time.monotonic()`` at the arrival of each request.
    """

    def __init__(self, latency=0.0, jitter=0.0, fail_first_every=0, seed=0):
        self.latency, self.jitter, self.fail_first_every = float(latency), float(jitter), int(fail_first_every)
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.starts, self.seen = [], {}
        self.httpd = None

    def __enter__(self):
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
        self.base_url = f'http://127.0.0.1:{self.httpd.server_address[1]}/v1'
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body):
        """``(status, content text)`` of one request body."""
        content = body['messages'][0]['content']
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            order = self.seen.setdefault(digest, len(self.seen))
            attempt = self.seen.setdefault((digest, 'attempts'), 0)
            self.seen[(digest, 'attempts')] = attempt + 1
        if self.fail_first_every and attempt == 0 and order % self.fail_first_every == 0:
            return 500, None
        if 'Describe' in content[0]['text']:
            return 200, json.dumps({'description': f'a region {digest[:6]}'})
        n = sum(part['type'] == 'image_url' for part in content) - 1  # the first image is the LQ crop
        best = int(digest[:8], 16) % n
        worst = (best + 1 + int(digest[8:16], 16) % (n - 1)) % n
        return 200, json.dumps({'best': best, 'worst': worst, 'reason': digest[:12]})

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.starts.append(time.monotonic())
                    delay = server.latency + server.random.random() * server.jitter
                try:
                    time.sleep(delay)
                    status, text = server.answer(body)
                finally:
                    # before the reply is sent: a client that has it may send its next request at once, which
                    # must not count as one more in flight
                    with server.lock:
                        server.in_flight -= 1
                payload = {'error': 'overloaded'} if text is None else \
                    {'choices': [{'message': {'role': 'assistant', 'content': text}}]}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler
