"""A vision-language model as an instance scorer and describer, over an OpenAI-compatible chat API.

DSPO (section 5.1) asks a VLM which candidate is best and which is worst inside each instance, judged on
quality, realism and consistency with the LQ input, and for short descriptions of crops (the user
description feedback of :mod:`.feedback`). Any server speaking OpenAI's ``POST {base_url}/chat/completions``
works (OpenAI, vLLM, SGLang, Ollama, LM Studio ...): images go as base64 PNG data URLs.

Robustness: each request has a timeout; timeouts, connection errors, 429 and 5xx are retried with
exponential backoff; replies are parsed strictly (a JSON object with the expected keys and types); every
successful parsed reply is cached on disk as ``<cache_dir>/<sha256 of the request>.json`` so a rerun does
not pay twice. A failure raises :class:`VLMError` naming the URL and what went wrong; the caller records
it for that item and goes on.

Concurrency: the client is thread-safe. ``max_concurrency`` says how many requests the scoring step keeps in
flight (it scores that many items at once); ``requests_per_minute`` spaces the starts of HTTP attempts
(retries included) across all threads. A reply depends only on its request, so results and cache files do
not depend on the order in which answers arrive.
"""
import base64
import hashlib
import json
import os
import re
import threading
import time

import cv2
import numpy as np

from dspo_basicsr.preference.redaction import redact, register_secret
from dspo_basicsr.utils.atomic_write import atomic_json_dump

__all__ = ['VLMClient', 'RateLimit', 'VLMError', 'VLMRequestError', 'VLMReplyError', 'image_data_url',
           'parse_json_reply', 'COMPARE_PROMPT', 'DESCRIBE_PROMPT']

COMPARE_PROMPT = (
    'You are judging image super-resolution results. The first image is the low-quality input region. '
    'The next {n} images are candidate restorations of the same region, numbered 0 to {last} in order. '
    'Judge each candidate on perceptual quality (sharpness, no noise or artifacts), realism (natural textures '
    'and structures) and consistency with the low-quality input (same content, colours and layout). {context}'
    'Reply with only a JSON object: {{"best": <index>, "worst": <index>, "reason": "<one sentence>"}}, where best '
    'and worst are different integers from 0 to {last}.')
DESCRIBE_PROMPT = (
    'Describe the visual content and quality of this image region in one short sentence (textures, '
    'sharpness, artifacts). {context}Reply with only a JSON object: {{"description": "<sentence>"}}.')


class VLMError(RuntimeError):
    """A VLM request failed for one item; the message says where and why."""


class VLMRequestError(VLMError):
    """The HTTP request failed: timeout, connection error, or an error status after the retries."""


class VLMReplyError(VLMError):
    """The server answered, but the reply is not the JSON that was asked for."""


def image_data_url(image):
    """(H, W, 3) uint8 RGB -> ``data:image/png;base64,...``."""
    ok, png = cv2.imencode('.png', np.ascontiguousarray(np.asarray(image)[..., ::-1]))
    if not ok:
        raise ValueError('Could not encode an image as PNG for the VLM request.')
    return 'data:image/png;base64,' + base64.b64encode(png.tobytes()).decode('ascii')


_FENCE = re.compile(r'^```(?:json)?\s*(.*?)\s*```$', re.DOTALL)


def parse_json_reply(text):
    """Parse a reply that must be one JSON object, optionally inside a single ```json fence.

    Raises:
        VLMReplyError: Anything else (prose around the JSON, an array, invalid JSON).
    """
    if not isinstance(text, str):
        raise VLMReplyError(f'The reply content is {type(text).__name__}, not text.')
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as err:
        raise VLMReplyError(f'The reply is not JSON ({err.msg}): {_clip(text)!r}') from err
    if not isinstance(value, dict):
        raise VLMReplyError(f'The reply is JSON but not an object: {_clip(text)!r}')
    return value


def _clip(text, limit=200):
    text = str(text)
    return text if len(text) <= limit else text[:limit] + '...'


class RateLimit:
    """Spaces events at least ``60 / requests_per_minute`` seconds apart, across threads.

    Args:
        requests_per_minute (float | None): None or 0: no limit.
    """

    def __init__(self, requests_per_minute=None):
        self.interval = 60.0 / float(requests_per_minute) if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self):
        if not self.interval:
            return
        with self._lock:  # reserve the next slot, then sleep outside the lock
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def redact_secrets(text, secrets=()):
    """``text`` with every known secret (and ``secrets``) in any encoding and any Bearer token as ``***``."""
    return redact(text, secrets)


class VLMClient:
    """OpenAI-compatible chat-completions client with retries, backoff and a disk cache.

    Args:
        base_url (str): API root, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1``.
        model (str): Model name sent in the request.
        api_key_env (str, optional): Name of the environment variable holding the API key (sent as
            ``Authorization: Bearer``); None or an unset variable sends no key (local servers).
        timeout (float): Seconds per request. Default: 60.
        max_retries (int): Retries after the first attempt on timeouts, connection errors, 429 and 5xx.
        backoff (float): First retry delay in seconds, doubled each retry. Default: 1.
        cache_dir (str, optional): Folder of the request cache; None disables it.
        temperature (float): Sampling temperature. Default: 0.
        max_tokens (int): Reply length limit. Default: 300.
        extra_body (dict, optional): More request fields (e.g. ``{"top_p": 1}``).
        max_concurrency (int): Requests the scoring step keeps in flight at once. Default: 8.
        requests_per_minute (float, optional): Most HTTP attempts started per minute, over all threads;
            None: no limit.
    """

    def __init__(self, base_url, model, api_key_env='OPENAI_API_KEY', timeout=60.0, max_retries=3, backoff=1.0,
                 cache_dir=None, temperature=0.0, max_tokens=300, extra_body=None, max_concurrency=8,
                 requests_per_minute=None):
        self.url = base_url.rstrip('/') + '/chat/completions'
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.cache_dir = cache_dir
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.extra_body = dict(extra_body or {})
        self.max_concurrency = int(max_concurrency)
        if self.max_concurrency < 1:
            raise ValueError(f'max_concurrency must be at least 1, got {max_concurrency}.')
        self.rate_limit = RateLimit(requests_per_minute)
        self.num_requests = 0  # HTTP attempts made (tests and logs)
        self.num_cache_hits = 0
        self._count_lock = threading.Lock()
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    # -- transport -------------------------------------------------------------------------------
    def _headers(self):
        headers = {'Content-Type': 'application/json'}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            register_secret(key)
            headers['Authorization'] = f'Bearer {key}'
        return headers

    def _remote(self, text):
        """Text from the server, clipped and with the API key and Bearer tokens redacted."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return _clip(redact_secrets(text, [key]))

    def _post(self, body):
        """POST with retries; returns the decoded JSON response."""
        import requests

        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2**(attempt - 1))
            self.rate_limit.wait()
            with self._count_lock:
                self.num_requests += 1
            try:
                response = requests.post(self.url, json=body, headers=self._headers(), timeout=self.timeout)
            except requests.Timeout:
                last = f'timed out after {self.timeout:g} s'
                continue
            except requests.ConnectionError as err:
                last = f'connection failed ({err.__class__.__name__})'
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f'HTTP {response.status_code}: {self._remote(response.text)!r}'
                continue
            if response.status_code != 200:
                raise VLMRequestError(f'{self.url} answered HTTP {response.status_code} (not retried): '
                                      f'{self._remote(response.text)!r}; check base_url, model and the key in '
                                      f'${self.api_key_env}.')
            try:
                return response.json()
            except ValueError as err:
                raise VLMReplyError(f'{self.url} returned a body that is not JSON: '
                                    f'{self._remote(response.text)!r}') from err
        raise VLMRequestError(f'{self.url}: {last} ({self.max_retries + 1} attempts).')

    def _cache_path(self, body):
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(',', ':')).encode()).hexdigest()
        return os.path.join(self.cache_dir, f'{digest}.json') if self.cache_dir else None

    def request(self, messages, parse):
        """Send one chat request (or read it from the cache) and parse the reply text.

        Args:
            messages (list[dict]): OpenAI chat messages.
            parse (callable): ``parse(text) -> value``; raises :class:`VLMReplyError` on a bad reply.
                Only replies that parse are cached.

        Returns:
            The parsed value.
        """
        body = {'model': self.model, 'messages': messages, 'temperature': self.temperature,
                'max_tokens': self.max_tokens, **self.extra_body}
        path = self._cache_path(body)
        if path and os.path.isfile(path):
            try:
                with open(path, encoding='utf-8') as handle:
                    text = json.load(handle)['content']
                value = parse(redact(text, [os.environ.get(self.api_key_env or '')]))
                with self._count_lock:
                    self.num_cache_hits += 1
                return value
            except (OSError, ValueError, KeyError, VLMReplyError):
                pass  # a damaged cache entry is simply asked again
        response = self._post(body)
        try:
            text = response['choices'][0]['message']['content']
        except (KeyError, IndexError, TypeError) as err:
            raise VLMReplyError(f'{self.url} returned no choices[0].message.content: '
                                f'{self._remote(json.dumps(response))!r}') from err
        # a reply may quote the key (in any encoding): it is neither cached nor passed on
        text = redact(text, [os.environ.get(self.api_key_env or '')])
        try:
            value = parse(text)
        except VLMReplyError as err:  # its message quotes the reply, which may echo the key
            raise VLMReplyError(redact_secrets(str(err), [os.environ.get(self.api_key_env or '')])) from None
        if path:
            atomic_json_dump({'model': self.model, 'content': text}, path)
        return value

    # -- tasks -----------------------------------------------------------------------------------
    def compare(self, lq_image, candidate_images, context=''):
        """Ask for the best and worst candidate of one region.

        Args:
            lq_image (np.ndarray): (h, w, 3) uint8 RGB low-quality region.
            candidate_images (list[np.ndarray]): N (H, W, 3) uint8 RGB candidate regions.
            context (str): Optional words about the image (its prompt).

        Returns:
            dict: ``{'best': int, 'worst': int, 'reason': str}``.
        """
        n = len(candidate_images)
        if n < 2:
            raise ValueError('compare needs at least two candidates.')
        text = COMPARE_PROMPT.format(n=n, last=n - 1, context=f'The image shows: {context}. ' if context else '')
        content = [{'type': 'text', 'text': text}]
        for image in [lq_image, *candidate_images]:
            content.append({'type': 'image_url', 'image_url': {'url': image_data_url(image)}})

        def parse(reply):
            value = parse_json_reply(reply)
            for key in ('best', 'worst'):
                if key not in value:
                    raise VLMReplyError(f'The reply has no {key!r}: {_clip(reply)!r}')
                index = value[key]
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
                    raise VLMReplyError(f'The reply\'s {key!r} = {index!r} is not a candidate index 0..{n - 1}.')
            if value['best'] == value['worst']:
                raise VLMReplyError(f'The reply names candidate {value["best"]} as both best and worst.')
            return {'best': value['best'], 'worst': value['worst'], 'reason': str(value.get('reason', ''))}

        return self.request([{'role': 'user', 'content': content}], parse)

    def describe(self, image, context=''):
        """One-sentence description of an image region (for description feedback).

        Returns:
            str: The description.
        """
        text = DESCRIBE_PROMPT.format(context=f'The image shows: {context}. ' if context else '')
        content = [{'type': 'text', 'text': text},
                   {'type': 'image_url', 'image_url': {'url': image_data_url(image)}}]

        def parse(reply):
            value = parse_json_reply(reply)
            description = value.get('description')
            if not isinstance(description, str) or not description.strip():
                raise VLMReplyError(f'The reply has no non-empty "description": {_clip(reply)!r}')
            return description.strip()

        return self.request([{'role': 'user', 'content': content}], parse)
