"""One preference sample, its checks, and the codecs that store it (PNG, UTF-8 JSON, ``.npy``).

A sample is what DSPO trains on (docs/preference_lmdb.md): a low-quality input, N candidate SR outputs of
it, a SAM-style instance label map at SR size, and, for each instance, the preferred (``win``) and
dispreferred (``lose``) candidate. The same checks run when a set is written and when it is read, so a
set that was written can always be read back.
"""
import dataclasses
import functools
import io
import json
import re

import cv2
import numpy as np

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# Keys of the stored meta JSON that the format owns; ``PreferenceSample.meta`` may not use them.
RESERVED_META_KEYS = ('prompt', 'negative_prompt', 'instances', 'stored')
_NAME_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]+$')


class PreferenceDataError(ValueError):
    """A preference sample or set is malformed.

    The message names the set, the sample id and the key, e.g.
    ``preference set '/x/y.lmdb', sample 'img_003', key 'img_003/c2': candidate is 128x96 but c0 is 128x128``.

    Attributes:
        path (str | None): The preference set.
        sid (str | None): The sample id.
        key (str | None): The LMDB key (or file) holding the bad value.
    """

    def __init__(self, path, sid, key, problem):
        self.path, self.sid, self.key, self.problem = path, sid, key, problem
        where = [f"preference set '{path}'"]
        if sid is not None:
            where.append(f"sample '{sid}'")
        if key is not None:
            where.append(f"key '{key}'")
        super().__init__(f"{', '.join(where)}: {problem}")


@dataclasses.dataclass
class PreferenceSample:
    """One LQ image, its N candidate SR outputs and the per-instance preferences between them.

    Attributes:
        sid (str): Sample id, unique in its set: letters, digits, ``_``, ``-``, ``.``.
        lq (ndarray): (h, w, 3) uint8 RGB low-quality input.
        candidates (list[ndarray]): N arrays (H, W, 3) uint8 RGB, H = h * scale, W = w * scale.
        seg (ndarray): (H, W) uint16 instance label map at SR size; each pixel holds one instance id
            (a partition of the image).
        instances (list[dict]): One row per instance id in ``seg``: ``id`` (int), ``win`` and ``lose``
            (candidate indices in [0, N-1], or both -1 when the instance has no pair), ``area`` (pixel
            count; the writer fills it when absent), optional ``scores``, ``candidate_scores`` (one number
            per candidate, higher is better, the values the pair was picked by; null = unscored) and
            ``feedback``.
        prompt (str): Text prompt of the SR model.
        negative_prompt (str): Negative prompt (user description feedback).
        gt (ndarray | None): (H, W, 3) uint8 RGB ground truth, if any.
        meta (dict): Other JSON fields, e.g. ``candidates`` (settings that produced each candidate),
            ``default_candidate``, ``pair`` ([win, lose] for image-level DPO).
        extras (dict[str, ndarray]): Named arrays stored as ``.npy`` (no pickle), e.g. RAM embeddings.
    """
    sid: str
    lq: np.ndarray
    candidates: list
    seg: np.ndarray
    instances: list
    prompt: str = ''
    negative_prompt: str = ''
    gt: np.ndarray = None
    meta: dict = dataclasses.field(default_factory=dict)
    extras: dict = dataclasses.field(default_factory=dict)

    @property
    def num_candidates(self):
        """int: N, the number of candidates."""
        return len(self.candidates)

    @property
    def sr_size(self):
        """tuple[int, int]: (H, W) of the candidates."""
        return tuple(self.candidates[0].shape[:2])


def _hw(array):
    return f'{array.shape[0]}x{array.shape[1]}'


def check_sample(sample, path, scale=None, num_candidates=None):
    """Check a sample against the format; raise :class:`PreferenceDataError` on the first problem.

    The images, the label map, the instance table and the meta are checked in that order.

    Args:
        sample (PreferenceSample): The sample (arrays as decoded; ``seg`` any integer dtype).
        path (str): The set, for the message.
        scale (int | None): Required SR / LQ size ratio; None skips that check.
        num_candidates (int | None): Required N; None skips that check.

    Returns:
        ndarray: (max label + 1,) int64 pixel count of every label value in ``seg``.
    """
    sid = sample.sid
    if not isinstance(sid, str) or not _NAME_PATTERN.match(sid) or sid.startswith('__'):
        raise PreferenceDataError(path, sid, None, 'a sample id must be a non-empty string of letters, digits, '
                                  "'_', '-' and '.', not starting with '__'.")
    fail = functools.partial(_fail, path, sid)
    sr_size = _check_images(sample, fail, scale, num_candidates)
    counts = _check_label_map(sample.seg, sr_size, fail)
    _check_instance_table(sample.instances, counts, len(sample.candidates), fail)
    _check_meta(sample, len(sample.candidates), fail)
    return counts


def _fail(path, sid, key, problem):
    raise PreferenceDataError(path, sid, f'{sid}/{key}', problem)


def _check_image(fail, key, image, what):
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, 'shape', None)
        dtype = getattr(image, 'dtype', type(image).__name__)
        fail(key, f'{what} must be an HxWx3 uint8 RGB array, got shape {shape} and dtype {dtype}.')


def _check_images(sample, fail, scale, num_candidates):
    """The LQ, the candidates and the GT: types, equal sizes, the scale. Returns the SR size (h, w)."""
    _check_image(fail, 'lq', sample.lq, 'the LQ image')
    candidates = sample.candidates
    if not isinstance(candidates, (list, tuple)) or not candidates:
        fail('c0', 'a sample needs at least one candidate image.')
    if num_candidates is not None and len(candidates) != num_candidates:
        fail(f'c{len(candidates) - 1}' if len(candidates) > num_candidates else f'c{len(candidates)}',
             f'the sample has {len(candidates)} candidates but the set has {num_candidates}; '
             'every sample of a set needs the same number.')
    for n, candidate in enumerate(candidates):
        _check_image(fail, f'c{n}', candidate, f'candidate {n}')
        if candidate.shape != candidates[0].shape:
            fail(f'c{n}', f'candidate is {_hw(candidate)} but c0 is {_hw(candidates[0])}; '
                 'all candidates of a sample must have the same size.')
    sr_h, sr_w = candidates[0].shape[:2]
    if sample.gt is not None:
        _check_image(fail, 'gt', sample.gt, 'the ground truth')
        if sample.gt.shape[:2] != (sr_h, sr_w):
            fail('gt', f'ground truth is {_hw(sample.gt)} but c0 is {sr_h}x{sr_w}.')
    if scale is not None:
        h, w = sample.lq.shape[:2]
        if (h * scale, w * scale) != (sr_h, sr_w):
            fail('lq', f'LQ is {h}x{w}, so x{scale} candidates would be {h * scale}x{w * scale}, '
                 f'but c0 is {sr_h}x{sr_w}.')
    return sr_h, sr_w


def _check_label_map(seg, sr_size, fail):
    """An integer map at SR size with values in [0, 65535]. Returns the pixel count of every label value."""
    sr_h, sr_w = sr_size
    if not isinstance(seg, np.ndarray) or seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        fail('seg', f'the label map must be an HxW integer array, got shape {getattr(seg, "shape", None)} '
             f'and dtype {getattr(seg, "dtype", type(seg).__name__)}.')
    if seg.shape != (sr_h, sr_w):
        fail('seg', f'label map is {_hw(seg)} but c0 is {sr_h}x{sr_w}; it must be at SR size.')
    if seg.dtype != np.uint16 and seg.size and (seg.min() < 0 or seg.max() > 65535):
        fail('seg', 'label values must lie in [0, 65535] (stored as uint16).')
    return np.bincount(seg.ravel().astype(np.int64, copy=False), minlength=1)


def _check_instance_table(instances, counts, n_cand, fail):
    """One row per label value of the map (``counts``), each with a valid pair and optional candidate scores."""
    if not isinstance(instances, (list, tuple)) or not instances:
        fail('meta', 'a sample needs a non-empty list of instances (one row per label value).')
    seen = set()
    for row in instances:
        if not isinstance(row, dict) or not all(k in row for k in ('id', 'win', 'lose')):
            fail('meta', f'instance row {row!r} needs the keys id, win and lose.')
        iid, win, lose = row['id'], row['win'], row['lose']
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (iid, win, lose)):
            fail('meta', f'instance row {row!r}: id, win and lose must be integers.')
        if iid in seen:
            fail('meta', f'instance id {iid} appears twice in the instance table.')
        seen.add(iid)
        for name, value in (('win', win), ('lose', lose)):
            if not -1 <= value <= n_cand - 1:
                fail('meta', f'instance {iid}: {name} = {value} is outside [-1, {n_cand - 1}] '
                     f'for {n_cand} candidates.')
        if (win == -1) != (lose == -1) or (win != -1 and win == lose):
            fail('meta', f'instance {iid}: win = {win}, lose = {lose}; a pair needs two different candidates, '
                 'or both -1 when the instance has no pair.')
        if not 0 <= iid < len(counts) or counts[iid] == 0:
            fail('seg', f'instance id {iid} of the instance table does not occur in the label map.')
        scores = row.get('candidate_scores')
        if scores is not None and (not isinstance(scores, (list, tuple)) or len(scores) != n_cand or not all(
                v is None or (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                              and np.isfinite(v)) for v in scores)):
            fail('meta', f'instance {iid}: candidate_scores must list one finite number (or null = unscored) per '
                 f'candidate ({n_cand}), higher is better; got {scores!r:.200}.')
    orphans = sorted(set(np.flatnonzero(counts).tolist()) - seen)
    if orphans:
        fail('seg', f'label value(s) {orphans[:10]} have no row in the instance table; the label map must '
             'be a partition into the listed instances.')


def _check_meta(sample, n_cand, fail):
    """The meta dict (no reserved key, a valid ``pair``), the prompts and the extra arrays."""
    pair = sample.meta.get('pair') if isinstance(sample.meta, dict) else None
    if not isinstance(sample.meta, dict):
        fail('meta', f'meta must be a dict, got {type(sample.meta).__name__}.')
    reserved = [k for k in RESERVED_META_KEYS if k in sample.meta]
    if reserved:
        fail('meta', f'meta may not use the reserved key(s) {reserved}; they are set from the sample fields.')
    if pair is not None:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, (int, np.integer)) and 0 <= v < n_cand for v in pair) or pair[0] == pair[1]):
            fail('meta', f'pair {pair!r} must be [win, lose], two different candidate indices in [0, {n_cand - 1}].')
    for name, value in (('prompt', sample.prompt), ('negative_prompt', sample.negative_prompt)):
        if not isinstance(value, str):
            fail('meta', f'{name} must be a string, got {type(value).__name__}.')
    for name, array in (sample.extras or {}).items():
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            fail(f'x/{name}', "an extra's name must be letters, digits, '_', '-' and '.'.")
        if not isinstance(array, np.ndarray) or array.dtype.hasobject:
            fail(f'x/{name}', f'extra {name!r} must be a numeric numpy array (object arrays would need pickle).')


def encode_png(image, compression=0):
    """PNG bytes of an (H, W, 3) uint8 RGB image or an (H, W) uint8/uint16 single-channel map.

    Args:
        image (ndarray): The array.
        compression (int | None): 0 stores the pixels without filter or zlib compression (the largest
            PNG, but it decodes several times faster than a compressed one); 1-9 is the zlib level, with
            OpenCV's fast-decoding defaults (SUB filter, RLE strategy); None uses OpenCV's defaults.

    Returns:
        bytes: The PNG file.
    """
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if compression is None:
        params = []
    elif compression == 0:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 0, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
                  cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, buffer = cv2.imencode('.png', image, params)
    if not ok:
        raise ValueError(f'OpenCV could not encode an array of shape {image.shape} as PNG.')
    return buffer.tobytes()


def decode_png(data, path, sid, key, channels):
    """Decode PNG bytes; raise :class:`PreferenceDataError` naming ``key`` when they are not a valid PNG.

    Args:
        data (bytes | memoryview): The stored value.
        path (str), sid (str), key (str): Where it comes from, for the message.
        channels (int): 3 for an RGB image (returned (H, W, 3) uint8 RGB), 1 for a label map
            (returned (H, W) uint16).

    Returns:
        ndarray: The decoded array.
    """
    if bytes(data[:8]) != PNG_SIGNATURE:
        raise PreferenceDataError(path, sid, key, 'the value is not PNG data (bad signature); '
                                  'the set is corrupt, rebuild it with write_preference_lmdb.')
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise PreferenceDataError(path, sid, key, 'the PNG data cannot be decoded (truncated or corrupt); '
                                  'rebuild the set with write_preference_lmdb.')
    if channels == 1:
        if image.ndim != 2:
            raise PreferenceDataError(path, sid, key,
                                      f'expected a single-channel label map PNG, got shape {image.shape}.')
        return image.astype(np.uint16, copy=False)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise PreferenceDataError(path, sid, key, f'expected an 8-bit 3-channel PNG, got shape {image.shape} '
                                  f'and dtype {image.dtype}.')
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


def encode_json(value):
    """UTF-8 JSON bytes; numpy scalars and arrays become numbers and lists."""
    return json.dumps(value, ensure_ascii=False, default=_json_default).encode('utf-8')


def decode_json(data, path, sid, key):
    """Parse UTF-8 JSON bytes; raise :class:`PreferenceDataError` naming ``key`` when they are not JSON."""
    try:
        return json.loads(bytes(data).decode('utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PreferenceDataError(path, sid, key, f'the value is not UTF-8 JSON ({error}).') from None


def encode_npy(array):
    """``.npy`` bytes of a numeric array, written without pickle."""
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def decode_npy(data, path, sid, key):
    """Read ``.npy`` bytes without pickle; raise :class:`PreferenceDataError` naming ``key`` on failure."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise PreferenceDataError(path, sid, key, f'the value is not a readable .npy array ({error}).') from None


def stored_meta(sample, counts):
    """The ``{sid}/meta`` JSON value of a checked sample, with ``area`` filled from ``counts``.

    ``stored`` records what the other keys hold, so a reader knows which keys must exist.
    """
    instances = []
    for row in sample.instances:
        row = dict(row)
        row['id'], row['win'], row['lose'] = int(row['id']), int(row['win']), int(row['lose'])
        row.setdefault('area', int(counts[row['id']]))
        instances.append(row)
    meta = dict(sample.meta)
    meta.update(prompt=sample.prompt, negative_prompt=sample.negative_prompt, instances=instances)
    meta['stored'] = {
        'lq_size': list(sample.lq.shape[:2]),
        'sr_size': list(sample.candidates[0].shape[:2]),
        'num_candidates': len(sample.candidates),
        'gt': sample.gt is not None,
        'extras': sorted(sample.extras or {}),
    }
    return meta


def sample_from_meta(sid, meta, lq, candidates, seg, gt, extras):
    """Rebuild a :class:`PreferenceSample` from its stored meta JSON and decoded arrays."""
    other = {k: v for k, v in meta.items() if k not in RESERVED_META_KEYS}
    return PreferenceSample(sid=sid, lq=lq, candidates=candidates, seg=seg, instances=meta['instances'],
                            prompt=meta.get('prompt', ''), negative_prompt=meta.get('negative_prompt', ''),
                            gt=gt, meta=other, extras=extras)
