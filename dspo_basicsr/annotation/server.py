"""The annotation studio's web app (Starlette): server-rendered HTML pages, a small script, a JSON API.

Every text put into a page (names, prompts, descriptions, methods) goes through :func:`html.escape`;
images are addressed by item key and role, resolved by the study and checked to lie inside its folders.
When an access token is set (always when the server listens on more than the loopback interface) every
request needs it: ``?token=`` once (it is then kept in a cookie) or the ``X-Annotation-Token`` header.
Without a token the server answers only requests addressed to a loopback name, and posts must be JSON, so
a web page elsewhere cannot send answers to it.

Each annotator has a secret of their own: issued at the first sign-in of a name (or beforehand, as the
invitation links of ``serve --annotators a,b,c``), kept in the database and in an HttpOnly cookie of the
browser. Opening, answering or undoing for a name needs its secret (cookie, or ``&invite=`` once), so one
annotator cannot answer for another (403). Request bodies are capped (:data:`MAX_BODY_BYTES`, else 413)
and an answer's fields are type-checked (400).

Routes::

    GET  /                              start page: your name, everyone's progress
    GET  /annotate?annotator=NAME[&invite=SECRET]  the annotator's next item (resume position), or "all done"
    GET  /image?item=KEY&role=R[&full=1][&annotator=NAME&round=I]
    POST /api/answer  {annotator, item, round, answer, seconds}
    POST /api/undo    {annotator}
    GET  /api/progress
"""
import hashlib
import hmac
import html
import json
import os
import secrets
import threading
import time

from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

__all__ = ['create_app', 'render_item_page', 'annotator_progress', 'check_annotator', 'TOKEN_COOKIE',
           'MAX_BODY_BYTES', 'annotator_cookie', 'issue_annotator_secret']

TOKEN_COOKIE = 'dspo_annotation_token'
# an answer is a few hundred bytes; anything far larger is refused before it is read into memory
MAX_BODY_BYTES = 64 * 1024
_SECRETS_META = 'annotator_secrets'
_ISSUE_LOCK = threading.Lock()
_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
_STATIC_FILES = {'annotate.js': 'text/javascript; charset=utf-8', 'annotate.css': 'text/css; charset=utf-8'}
_TITLES = {'instances': 'Instance preferences', 'pairs': '2AFC quality test', 'winrate': 'Win-rate study'}


def e(text):
    """HTML-escaped text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(text), quote=True)


def check_annotator(name):
    """The annotator's name, stripped; ValueError when empty, too long or holding control characters."""
    name = str(name or '').strip()
    if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
        raise ValueError('Give a name of 1 to 64 printable characters.')
    return name


def annotator_cookie(name):
    """The cookie name holding the secret of annotator ``name`` (names may hold any printable character)."""
    return 'dspo_annotator_' + hashlib.sha256(name.encode('utf-8')).hexdigest()[:16]


def issue_annotator_secret(store, name):
    """The secret of annotator ``name``, issued (and stored in the database) when the name has none."""
    with _ISSUE_LOCK:
        issued = store.get_meta(_SECRETS_META) or {}
        if name not in issued:
            issued[name] = secrets.token_urlsafe(18)
            store.set_meta(_SECRETS_META, issued)
    return issued[name]


class _Refused(Exception):

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def annotator_progress(study, store, annotator):
    """``(answered set of (round, key), next (round, key) or None)`` of one annotator."""
    answered = {(a.round, a.item) for a in store.answers(annotator)}
    return answered, study.next_item(answered, annotator)


def _page(title, body, kind=''):
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width"><title>{e(title)}</title>'
            '<link rel="stylesheet" href="static/annotate.css"></head>\n'
            f'<body data-kind="{e(kind)}">\n{body}\n<script src="static/annotate.js"></script></body></html>\n')


def _image_url(key, role, annotator, round_index, full=False):
    from urllib.parse import urlencode
    query = {'item': key, 'role': role, 'annotator': annotator, 'round': round_index}
    if full:
        query['full'] = 1
    return 'image?' + e(urlencode(query))


def _header(study, annotator, done, round_index):
    total = study.total()
    rounds = f' · round {round_index + 1} of {study.rounds}' if study.rounds > 1 else ''
    return (f'<header><span class="who">Annotator: <b id="annotator">{e(annotator)}</b></span> '
            f'<progress id="progress" value="{done}" max="{total}"></progress> '
            f'<span id="count">{done} / {total}</span>{rounds} · <a href="./">change name</a></header>')


def render_item_page(study, annotator, round_index, key, done):
    """The HTML page of one item for one annotator (what ``GET /annotate`` serves)."""
    view = study.view(key, annotator, round_index)
    data = (f'data-item="{e(key)}" data-round="{round_index}" data-annotator="{e(annotator)}"')
    if view['kind'] == 'instances':
        n = len(view['candidates'])
        tiles = [f'<figure class="tile lq"><img alt="LQ" src="{_image_url(key, "lq", annotator, round_index)}" '
                 f'data-full="{_image_url(key, "lq", annotator, round_index, True)}">'
                 '<figcaption>LQ input</figcaption></figure>']
        for candidate in view['candidates']:
            c, role = candidate['index'], candidate['role']
            description = candidate['description']
            text = (f'<p class="description">{e(description)}</p>'
                    f'<label><input type="checkbox" class="hallucinated" data-index="{c}"> does not match the LQ'
                    '</label>') if description else '<p class="description none">no description</p>'
            tiles.append(
                f'<figure class="tile candidate" id="candidate-{c}" data-index="{c}">'
                f'<img alt="candidate {c + 1}" src="{_image_url(key, role, annotator, round_index)}" '
                f'data-full="{_image_url(key, role, annotator, round_index, True)}">'
                f'<figcaption><span class="num">{c + 1}</span> <span class="mark"></span></figcaption>'
                f'<button type="button" class="best" data-index="{c}">best</button>'
                f'<button type="button" class="worst" data-index="{c}">worst</button>{text}</figure>')
        body = (f'<main class="study instances" {data} data-candidates="{n}">'
                f'<h1>Sample {e(view["sid"])} · instance {view["instance"]}</h1>'
                f'<p class="prompt">Prompt: {e(view["prompt"])}</p>'
                f'<p class="help">Inside the outlined instance, click (or press 1–{n}) the <b>best</b> candidate, '
                'then the <b>worst</b>. Tick descriptions that do not match the LQ (Shift+number). '
                '0: no clear preference · Enter: submit · F: whole image · U: undo the last answer.</p>'
                f'<div class="tiles">{"".join(tiles)}</div>'
                '<div class="actions"><button type="button" id="nopref">No clear preference (0)</button> '
                '<button type="button" id="submit" disabled>Submit (Enter)</button> '
                '<button type="button" id="toggle">Whole image (F)</button> '
                '<button type="button" id="undo">Undo last answer (U)</button></div>'
                '<p id="status" role="status"></p></main>')
    else:
        sides = []
        for side in ('left', 'right'):
            role = view[side]['role']
            sides.append(f'<figure class="tile choice" id="{side}" data-choice="{role}">'
                         f'<img alt="{side} image" src="{_image_url(key, role, annotator, round_index)}">'
                         f'<figcaption>{"← / A" if side == "left" else "→ / L"}</figcaption></figure>')
        body = (f'<main class="study pairwise" {data}>'
                f'<h1>{e(view["question"])}</h1>'
                f'<figure class="tile lr"><img alt="LQ" src="{_image_url(key, "lq", annotator, round_index)}">'
                f'<figcaption>LQ input ({e(view["image"])})</figcaption></figure>'
                f'<div class="tiles">{"".join(sides)}</div>'
                '<p class="help">Click the image you prefer, or press ← / A for the left one and → / L for the '
                'right one · U: undo the last answer.</p>'
                '<div class="actions"><button type="button" id="undo">Undo last answer (U)</button></div>'
                '<p id="status" role="status"></p></main>')
    return _page(f'{_TITLES[study.kind]}: {annotator}', _header(study, annotator, done, round_index) + body,
                 view['kind'])


def _done_page(study, annotator, done):
    body = (f'<main class="study done" data-annotator="{e(annotator)}" data-item="" data-round="">'
            f'<h1>All done, {e(annotator)}: {done} answers. Thank you.</h1>'
            '<div class="actions"><button type="button" id="undo">Undo last answer (U)</button></div>'
            '<p id="status" role="status"></p></main>')
    return _page(f'{_TITLES[study.kind]}: done', _header(study, annotator, done, study.rounds - 1) + body, 'done')


def _start_page(study, store):
    rows = []
    for name in store.annotators():
        answered, _ = annotator_progress(study, store, name)
        rows.append(f'<li><a href="annotate?annotator={e(_quote(name))}">{e(name)}</a> '
                    f'<progress value="{len(answered)}" max="{study.total()}"></progress> '
                    f'{len(answered)} / {study.total()}</li>')
    body = (f'<main class="start"><h1>{e(_TITLES[study.kind])}</h1>'
            f'<p>{len(study.items)} items{f" × {study.rounds} rounds" if study.rounds > 1 else ""}. '
            'Enter your name to start or resume.</p>'
            '<form action="annotate" method="get"><input name="annotator" id="name" maxlength="64" required '
            'autofocus placeholder="your name"> <button type="submit" id="start">Start</button></form>'
            f'<h2>Annotators</h2><ul id="annotators">{"".join(rows) or "<li>none yet</li>"}</ul></main>')
    return _page(_TITLES[study.kind], body, 'start')


def _quote(text):
    from urllib.parse import quote
    return quote(text, safe='')


def create_app(study, store, token=None, invited_only=False):
    """The Starlette app of one study.

    Args:
        study: :class:`~dspo_basicsr.annotation.studies.InstanceStudy`, ``PairStudy`` or ``WinRateStudy``.
        store (AnnotationStore): Where answers go.
        token (str, optional): Access token every request must carry; None for a loopback-only server.
        invited_only (bool): Only names with an issued secret (invitation links) may sign in.
    """

    def authorised(request):
        if not token:
            return True
        given = (request.query_params.get('token') or request.headers.get('x-annotation-token')
                 or request.cookies.get(TOKEN_COOKIE) or '')
        return hmac.compare_digest(given.encode(), token.encode())

    def guarded(handler):
        async def wrapper(request):
            if not authorised(request):
                return PlainTextResponse('Access token required: open the address printed by the server '
                                         '(it ends with ?token=...).', status_code=403)
            start = time.perf_counter()
            response = await handler(request)
            # what the server spent on the request, for scripts/bench_annotation.py and browser dev tools
            response.headers['Server-Timing'] = f'app;dur={1000 * (time.perf_counter() - start):.2f}'
            if token and request.query_params.get('token'):
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite='strict')
            return response
        return wrapper

    async def start(request):
        return HTMLResponse(_start_page(study, store))

    def signed_in(request, annotator):
        """True when the request carries the secret of ``annotator`` (its cookie)."""
        stored = (store.get_meta(_SECRETS_META) or {}).get(annotator)
        given = request.cookies.get(annotator_cookie(annotator)) or ''
        return stored is not None and hmac.compare_digest(given.encode(), stored.encode())

    async def annotate(request):
        try:
            annotator = check_annotator(request.query_params.get('annotator'))
        except ValueError:
            return RedirectResponse('./', status_code=303)
        issued = store.get_meta(_SECRETS_META) or {}
        invite = request.query_params.get('invite') or ''
        if annotator not in issued and not invited_only:
            secret = issue_annotator_secret(store, annotator)  # first sign-in: the name is now this browser's
        elif annotator in issued and (signed_in(request, annotator)
                                      or hmac.compare_digest(invite.encode(), issued[annotator].encode())):
            secret = issued[annotator]
        else:
            return PlainTextResponse(f'The name {annotator!r} is taken (or needs an invitation): open the link you '
                                     'were given, from the browser you signed in with, or pick another name.',
                                     status_code=403)
        answered, upcoming = annotator_progress(study, store, annotator)
        if upcoming is None:
            response = HTMLResponse(_done_page(study, annotator, len(answered)))
        else:
            round_index, key = upcoming
            response = HTMLResponse(render_item_page(study, annotator, round_index, key, len(answered)),
                                    headers={'Cache-Control': 'no-store'})
        response.set_cookie(annotator_cookie(annotator), secret, httponly=True, samesite='strict',
                            max_age=365 * 86400)
        return response

    async def image(request):
        query = request.query_params
        try:
            round_index = int(query.get('round', 0))
            data = study.image_png(query.get('item', ''), query.get('role', ''), query.get('annotator'),
                                   round_index, full=query.get('full') == '1')
        except (KeyError, ValueError):
            return PlainTextResponse('No such image.', status_code=404)
        except PermissionError:
            return PlainTextResponse('Refused: the file is outside the study folders.', status_code=403)
        return Response(data, media_type='image/png', headers={'Cache-Control': 'private, max-age=3600'})

    async def static(request):
        name = request.path_params['name']
        if name not in _STATIC_FILES:
            return PlainTextResponse('Not found.', status_code=404)
        with open(os.path.join(_STATIC, name), 'rb') as handle:
            return Response(handle.read(), media_type=_STATIC_FILES[name])

    async def read_json(request):
        # JSON only: a cross-site form or text/plain post (no CORS preflight) is refused
        if request.headers.get('content-type', '').split(';')[0].strip() != 'application/json':
            raise _Refused(400, 'Send the answer as application/json.')
        too_large = _Refused(413, f'The request body is larger than {MAX_BODY_BYTES} bytes.')
        try:
            if int(request.headers.get('content-length', 0)) > MAX_BODY_BYTES:
                raise too_large
        except ValueError:
            raise _Refused(400, 'Bad Content-Length.') from None
        data = b''
        async for chunk in request.stream():  # chunked bodies carry no length: count while reading
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise too_large
        try:
            body = json.loads(data)
        except ValueError:
            raise _Refused(400, 'The request body is not JSON.') from None
        if not isinstance(body, dict):
            raise _Refused(400, 'The request body must be a JSON object.')
        try:
            if not isinstance(body.get('annotator'), str):
                raise ValueError("'annotator' must be a string.")
            annotator = check_annotator(body['annotator'])
        except ValueError as err:
            raise _Refused(400, str(err)) from None
        if not signed_in(request, annotator):
            raise _Refused(403, f'Not signed in as {annotator!r}: open the annotation page of your own name.')
        return body, annotator

    async def answer(request):
        try:
            body, annotator = await read_json(request)
            round_index, key, given = body.get('round'), body.get('item'), body.get('answer')
            if not isinstance(round_index, int) or isinstance(round_index, bool) or not isinstance(key, str):
                raise _Refused(400, "'round' must be an integer and 'item' a string.")
            if not isinstance(given, dict):
                raise _Refused(400, "'answer' must be a JSON object.")
            _, upcoming = annotator_progress(study, store, annotator)
            item = (round_index, key)
            if upcoming != item:
                return JSONResponse({'error': 'This item is not your next one (answered in another tab?); '
                                              'the page reloads.'}, status_code=409)
            stored = study.validate(item[1], given)
        except _Refused as err:
            return JSONResponse({'error': str(err)}, status_code=err.status)
        except (TypeError, ValueError) as err:
            return JSONResponse({'error': str(err)}, status_code=400)
        seconds = body.get('seconds')
        seconds = float(seconds) if isinstance(seconds, (int, float)) and 0 <= seconds < 86400 else None
        row = store.add_answer(annotator, item[1], item[0], stored, study.shown(item[1], annotator, item[0]), seconds)
        return JSONResponse({'ok': True, 'id': row})

    async def undo(request):
        try:
            _, annotator = await read_json(request)
        except _Refused as err:
            return JSONResponse({'error': str(err)}, status_code=err.status)
        undone = store.undo_last(annotator)
        return JSONResponse({'ok': undone is not None, 'item': undone.item if undone else None})

    async def progress(request):
        people = {}
        for name in store.annotators():
            answered, upcoming = annotator_progress(study, store, name)
            people[name] = {'done': len(answered), 'next': list(upcoming) if upcoming else None}
        return JSONResponse({'kind': study.kind, 'total': study.total(), 'annotators': people, 'time': time.time()})

    routes = [Route('/', guarded(start)), Route('/annotate', guarded(annotate)), Route('/image', guarded(image)),
              Route('/static/{name}', guarded(static)), Route('/api/answer', guarded(answer), methods=['POST']),
              Route('/api/undo', guarded(undo), methods=['POST']), Route('/api/progress', guarded(progress))]
    middleware = []
    if not token:
        # a loopback server answers only to loopback names (no DNS rebinding from a web page)
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=['127.0.0.1', 'localhost', '::1', '[::1]']))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.study, app.state.store = study, store
    return app
