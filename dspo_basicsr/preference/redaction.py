"""One redaction function for everything the preference-data steps write or print.

A secret (the VLM API key) can come back from a server or a model reply in another encoding than the
one it was sent in: JSON-escaped (``sk-proj-ab\\/cd``), URL-encoded (``sk-proj-ab%2Fcd``) or inside a
``Bearer`` header. :func:`redact` replaces every known secret in each of these encodings with ``***``;
the work folder's JSON writer, the VLM cache and the progress lines all go through it.
"""
import json
import re
import threading
from urllib.parse import quote, quote_plus

__all__ = ['register_secret', 'redact', 'redact_value']

_BEARER = re.compile(r'(Bearer\s+)[^\s"\'\\,;]+', re.IGNORECASE)
_SECRETS = set()
_LOCK = threading.Lock()


def register_secret(secret):
    """Add ``secret`` to the secrets :func:`redact` removes (for the life of the process)."""
    if secret:
        with _LOCK:
            _SECRETS.add(str(secret))


def _encodings(secret):
    json_escaped = json.dumps(secret)[1:-1]
    forms = {secret, json_escaped, json_escaped.replace('/', '\\/'), secret.replace('/', '\\/'),
             quote(secret, safe=''), quote(secret), quote_plus(secret)}
    # the JSON text of a string that already holds an escaped form (a reply quoting ``\/``, dumped again)
    forms |= {json.dumps(form)[1:-1] for form in list(forms)}
    return sorted(forms, key=len, reverse=True)


def redact(text, secrets=()):
    """``text`` with every known secret (and ``secrets``) in any encoding, and any Bearer token, as ``***``."""
    text = str(text)
    with _LOCK:
        known = _SECRETS | {str(s) for s in secrets if s}
    for secret in sorted(known, key=len, reverse=True):
        for form in _encodings(secret):
            if form:
                text = text.replace(form, '***')
    return _BEARER.sub(r'\1***', text)


def redact_value(value, secrets=()):
    """``value`` (JSON-like: dict, list, str, number) with :func:`redact` applied to every string in it."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact(k, secrets) if isinstance(k, str) else k: redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    return value
