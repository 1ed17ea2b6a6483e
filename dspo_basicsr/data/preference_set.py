"""Preference sets in LMDB (docs/preference_lmdb.md): the atomic, resumable writer and the lazy reader.

A set is a folder ``NAME.lmdb/`` with one LMDB environment and a human-readable ``meta_info.txt``.
Values are PNG bytes, UTF-8 JSON or ``.npy`` bytes written without pickle; nothing is pickled.

Keys (``{sid}`` is a sample id, N the number of candidates):

* ``__format__``: JSON header ``{"format": "dspo-preference", "version": 1, "num_samples",
  "num_candidates", "scale", "num_with_gt", "extras", "writer", "content_digest"}``; ``content_digest``
  (BLAKE2b of every sample's ids, keys and stored bytes, in write order) tells a set rebuilt with the same
  ids but other pixels apart (sets written before it was added have none).
* ``__ids__``: JSON list of the sample ids, in write order.
* ``{sid}/lq``, ``{sid}/gt`` (optional), ``{sid}/c0`` .. ``{sid}/c{N-1}``: PNG, RGB images.
* ``{sid}/seg``: 16-bit single-channel PNG label map at SR size.
* ``{sid}/meta``: JSON, the prompts, the instance table and the sample's other meta fields, plus
  ``stored`` (sizes, N, whether ``gt`` and which extras are stored).
* ``{sid}/x/{name}``: ``.npy`` bytes of an extra array (e.g. RAM embeddings), read with
  ``allow_pickle=False``.

Precomputed candidate latents (optional, ``scripts/add_candidate_latents.py``): the extra
``candidate_latents`` is a float32 array (N, 2, C, H/f, W/f): for each candidate its VAE latent posterior,
``[:, 0]`` the mean and ``[:, 1]`` the std, unscaled (before the VAE's ``scaling_factor``). The sample's meta
field ``candidate_latents`` records ``vae_digest`` (``DiffusionSRArch.vae_digest`` of the VAE that wrote them),
``vae_scale_factor`` f and ``scaling_factor``.
"""
import errno
import hashlib
import os
import shutil

import lmdb
from tqdm import tqdm

from dspo_basicsr.data.preference_sample import (
    PreferenceDataError,
    check_sample,
    decode_json,
    decode_npy,
    decode_png,
    encode_json,
    encode_npy,
    encode_png,
    sample_from_meta,
    stored_meta,
)

__all__ = ['PreferenceDataError', 'PreferenceLMDB', 'write_preference_lmdb', 'resumable_ids',
           'CANDIDATE_LATENTS_KEY']

#: Name of the extra array and of the meta field of precomputed candidate latents (see the module docstring).
CANDIDATE_LATENTS_KEY = 'candidate_latents'

FORMAT_NAME = 'dspo-preference'
FORMAT_VERSION = 1
_BUILD_KEY = b'__build__'
_ORDER_PREFIX = b'__order__/'
_DIGEST_PREFIX = b'__digest__/'
_MIB = 1 << 20
# The map of a build starts here and grows as samples arrive (LMDB files grow with the data, not the map).
INITIAL_MAP_SIZE = 64 * _MIB


def _temp_folder(path):
    return f'{path}.tmp-build'


def _encode_sample(sample, counts, compression):
    """(key, value) byte pairs of one checked sample, meta last."""
    sid = sample.sid
    items = [(f'{sid}/lq', encode_png(sample.lq, compression))]
    items += [(f'{sid}/c{n}', encode_png(c, compression)) for n, c in enumerate(sample.candidates)]
    # Label maps are mostly long runs: compressed, they are tiny and still decode fast.
    items.append((f'{sid}/seg', encode_png(sample.seg.astype('uint16', copy=False), max(compression, 1))))
    if sample.gt is not None:
        items.append((f'{sid}/gt', encode_png(sample.gt, compression)))
    items += [(f'{sid}/x/{name}', encode_npy(array)) for name, array in sorted((sample.extras or {}).items())]
    items.append((f'{sid}/meta', encode_json(stored_meta(sample, counts))))
    return [(k.encode('utf-8'), v) for k, v in items]


class _Builder:
    """The LMDB environment of a build in progress (the temporary folder), written in batches."""

    def __init__(self, folder, batch_bytes):
        self.folder = folder
        self.batch_bytes = batch_bytes
        self.env = lmdb.open(folder, map_size=INITIAL_MAP_SIZE, subdir=True, meminit=False)
        self.pending, self.pending_bytes = [], 0
        with self.env.begin() as txn:
            raw = txn.get(_BUILD_KEY)
            self.build = decode_json(raw, folder, None, '__build__') if raw else {}
            self.order = self._read_order(txn)

    @staticmethod
    def _read_order(txn):
        return [value.decode('utf-8') for _, value in _prefix_items(txn, _ORDER_PREFIX)]

    def add(self, sid, items):
        n = b'%09d' % len(self.order)
        items = items + [(_ORDER_PREFIX + n, sid.encode('utf-8')), (_DIGEST_PREFIX + n, _sample_digest(items))]
        self.order.append(sid)
        self.pending.append(items)
        self.pending_bytes += sum(len(k) + len(v) for k, v in items)
        if self.pending_bytes >= self.batch_bytes:
            self.flush()

    def _used_bytes(self):
        return (self.env.info()['last_pgno'] + 1) * self.env.stat()['psize']

    def flush(self, extra=()):
        """Commit the pending samples (and ``extra`` pairs) in one transaction, growing the map as needed."""
        if not self.pending and not extra:
            return
        payload = [pair for items in self.pending for pair in items] + list(extra)
        # LMDB pages add overhead to every value; twice the payload plus slack always fits.
        needed = self._used_bytes() + 2 * sum(len(k) + len(v) for k, v in payload) + 4 * _MIB
        map_size = self.env.info()['map_size']
        if needed > map_size:
            self.env.set_mapsize(max(needed, 2 * map_size))
        while True:
            try:
                self._commit(payload)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(2 * self.env.info()['map_size'])
            except (lmdb.Error, OSError) as error:
                if _disk_full(error, self.folder, 2 * sum(len(k) + len(v) for k, v in payload)):
                    raise _DiskFull(self.folder) from None
                raise
        self.pending, self.pending_bytes = [], 0

    def _commit(self, payload):
        with self.env.begin(write=True) as txn:
            for key, value in payload:
                txn.put(key, value)

    def drop_pending(self):
        del self.order[len(self.order) - len(self.pending):]
        self.pending, self.pending_bytes = [], 0


def _sample_digest(items):
    """16-byte BLAKE2b of one sample's stored (key, value) pairs, in key order."""
    digest = hashlib.blake2b(digest_size=16)
    for key, value in sorted(items):
        digest.update(b'%d:%s%d:' % (len(key), key, len(value)))
        digest.update(value)
    return digest.digest()


class _DiskFull(Exception):
    """The file system of a build ran out of space (turned into one OSError by the writer)."""


def _free_bytes(folder):
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _disk_full(error, folder, needed):
    """True when ``error`` of a write to ``folder`` comes from a full disk.

    LMDB reports a failed write as ``mdb_txn_commit: Input/output error`` (EIO) or ENOSPC; the free
    space of the file system tells the two causes apart.
    """
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if 'No space left' in text or 'Disk quota' in text:
        return True
    try:
        return 'Input/output error' in text and _free_bytes(folder) < needed + 4 * _MIB
    except OSError:
        return False


def resumable_ids(path):
    """Sample ids already stored by an interrupted :func:`write_preference_lmdb` build of ``path``.

    A builder can skip generating these samples; the next build includes them without re-encoding.

    Args:
        path (str): The set's final path (``NAME.lmdb``).

    Returns:
        list[str]: The ids, in write order (empty when there is no interrupted build).
    """
    folder = _temp_folder(os.path.abspath(path).rstrip(os.sep))
    if not os.path.isfile(os.path.join(folder, 'data.mdb')):
        return []
    env = lmdb.open(folder, readonly=True, lock=False, readahead=False, subdir=True)
    try:
        with env.begin() as txn:
            return _Builder._read_order(txn)
    finally:
        env.close()


def write_preference_lmdb(path, samples, scale=None, overwrite=False, resume=True, total=None,
                          png_compression=0, batch_bytes=64 * _MIB, progress=True):
    """Write preference samples to an LMDB set, atomically and resumably.

    The set is built in ``path + '.tmp-build'`` and renamed to ``path`` only once complete, so an
    exception part-way (a bad sample, a crash of the sample generator) never leaves a set, or a half
    set, under ``path``, and an existing set at ``path`` survives until the new one replaces it.
    Samples are committed in batches; after an interruption, a rerun with ``resume=True`` keeps the
    samples already in the temporary folder (a sample whose id is stored there is skipped, not
    re-encoded; see :func:`resumable_ids`), and the finished set holds every stored sample in write
    order. The LMDB map grows with the data, so sets of mixed image sizes need no size estimate.

    Args:
        path (str): Destination folder, conventionally ``NAME.lmdb``.
        samples (Iterable[PreferenceSample]): The samples; each is checked as :class:`PreferenceLMDB`
            checks it when reading, and a bad one raises :class:`PreferenceDataError` naming it.
        scale (int | None): SR / LQ size ratio of every sample; None takes it from the first sample.
        overwrite (bool): Replace an existing set at ``path`` (only once the new one is complete).
        resume (bool): Reuse the samples of an interrupted build of ``path``; False starts afresh.
        total (int | None): Number of samples for the progress bar when ``samples`` has no ``len``.
        png_compression (int): 0 (default) stores the images as uncompressed PNGs, about the raw pixel
            size, which decode about 5x faster than compressed ones: data loading is PNG decoding. 1-9
            compress (zlib level, SUB filter, RLE strategy: about 35% smaller at 1). Label maps are
            always compressed.
        batch_bytes (int): Encoded bytes committed per transaction.
        progress (bool): Show a tqdm progress bar.

    Returns:
        PreferenceLMDB: The finished set (opened lazily).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        PreferenceDataError: A sample does not satisfy the format.
        RuntimeError: Another process is building the same set.
    """
    final = os.path.abspath(path).rstrip(os.sep)
    if os.path.exists(final) and not overwrite:
        raise FileExistsError(f"preference set '{final}' already exists; pass overwrite=True to replace it.")
    temp = _temp_folder(final)
    os.makedirs(temp, exist_ok=True)
    # The lock comes before any deletion: a second writer is refused and never removes the first's build.
    guard = _lock_build(temp, final)
    try:
        if not resume:
            _empty_folder(temp)
        builder = _Builder(temp, batch_bytes)
    except BaseException:
        os.close(guard)
        raise
    try:
        built_scale = builder.build.get('scale')
        if built_scale is not None and scale is not None and built_scale != scale:
            raise ValueError(f"the interrupted build in '{temp}' used scale {built_scale}, not {scale}; "
                             'pass resume=False to start afresh.')
        scale = scale or built_scale
        num_candidates = builder.build.get('num_candidates')
        stored, seen = set(builder.order), set()
        if total is None and hasattr(samples, '__len__'):
            total = len(samples)
        for sample in tqdm(samples, total=total, desc=f'write {os.path.basename(final)}', unit='sample',
                           disable=not progress):
            sid = getattr(sample, 'sid', None)
            if sid in seen:
                raise PreferenceDataError(final, sid, None, 'this sample id was given twice; ids must be unique.')
            seen.add(sid)
            if sid in stored:
                continue
            if scale is None:
                scale = _infer_scale(sample, final)
            counts = check_sample(sample, final, scale=scale, num_candidates=num_candidates)
            if num_candidates is None:
                num_candidates = len(sample.candidates)
                builder.flush([(_BUILD_KEY, encode_json({'scale': scale, 'num_candidates': num_candidates}))])
            builder.add(sid, _encode_sample(sample, counts, png_compression))
        builder.flush()
        if not builder.order:
            builder.env.close()
            shutil.rmtree(temp)
            raise ValueError(f"no samples were given for preference set '{final}'.")
        _finish(builder, final, scale, num_candidates, png_compression)
    except BaseException as error:
        builder.drop_pending()
        builder.env.close()
        full = isinstance(error, _DiskFull) or (isinstance(error, (lmdb.Error, OSError))
                                                and _disk_full(error, temp, 0))
        if full:  # the partial build would only fill the disk further; the old set stays as it was
            shutil.rmtree(temp, ignore_errors=True)
        os.close(guard)
        if full:
            raise OSError(errno.ENOSPC, f"no space left on {os.path.dirname(final) or '.'} while building "
                          f"preference set '{final}'; the partial build was removed and "
                          f"{'the existing set kept' if os.path.exists(final) else 'nothing written'}. Free "
                          'space (or build elsewhere) and run again.') from None
        raise
    builder.env.close()
    try:
        _move_into_place(temp, final)
    finally:
        os.close(guard)
    return PreferenceLMDB(final)


def _lock_build(temp, final):
    """Exclusive lock on the temporary folder (a directory flock): one build of a set at a time."""
    import fcntl

    guard = os.open(temp, os.O_RDONLY)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(guard)
        raise RuntimeError(f"another process is building preference set '{final}' (in '{temp}'); wait for it "
                           'to finish, or stop it first.') from None
    return guard


def _empty_folder(folder):
    """Remove what ``folder`` holds, keeping the folder itself (its flock guards the build)."""
    for name in os.listdir(folder):
        entry = os.path.join(folder, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.remove(entry)


def _infer_scale(sample, final):
    try:
        lq_h, lq_w = sample.lq.shape[:2]
        sr_h, sr_w = sample.candidates[0].shape[:2]
    except (AttributeError, IndexError, TypeError, ValueError):
        return None  # check_sample reports the malformed field
    if lq_h and sr_h % lq_h == 0 and sr_h // lq_h >= 1:
        return sr_h // lq_h
    raise PreferenceDataError(final, sample.sid, f'{sample.sid}/lq', f'LQ is {lq_h}x{lq_w} and c0 is {sr_h}x{sr_w}: '
                              'not an integer scale; pass scale= explicitly.')


def _finish(builder, final, scale, num_candidates, png_compression):
    """Write ``__ids__``, ``__format__`` and ``meta_info.txt`` into the temporary folder."""
    lines, num_with_gt, extras = [], 0, set()
    with builder.env.begin() as txn:
        for sid in builder.order:
            key = f'{sid}/meta'
            meta = decode_json(txn.get(key.encode('utf-8')), final, sid, key)
            stored = meta['stored']
            num_with_gt += bool(stored['gt'])
            extras.update(stored['extras'])
            (lq_h, lq_w), (sr_h, sr_w) = stored['lq_size'], stored['sr_size']
            lines.append(f"{sid} lq={lq_h}x{lq_w} sr={sr_h}x{sr_w} candidates={stored['num_candidates']} "
                         f"instances={len(meta['instances'])} gt={'yes' if stored['gt'] else 'no'}")
    from dspo_basicsr.version import __version__
    header = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'num_samples': len(builder.order),
              'num_candidates': num_candidates, 'scale': scale, 'num_with_gt': num_with_gt,
              'extras': sorted(extras), 'png_compression': png_compression, 'writer': f'dspo_basicsr {__version__}',
              'content_digest': _content_digest(builder)}
    builder.flush([(b'__ids__', encode_json(builder.order)), (b'__format__', encode_json(header))])
    with builder.env.begin(write=True) as txn:
        txn.delete(_BUILD_KEY)
        for n in range(len(builder.order)):
            txn.delete(_ORDER_PREFIX + b'%09d' % n)
            txn.delete(_DIGEST_PREFIX + b'%09d' % n)
    builder.env.sync(True)
    with open(os.path.join(builder.folder, 'meta_info.txt'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')


def _prefix_items(txn, prefix):
    """(key, value) bytes of every entry whose key starts with ``prefix``, in key order."""
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield bytes(key), bytes(value)


def _content_digest(builder):
    """Hex BLAKE2b over the samples' ids and digests, in write order."""
    digest = hashlib.blake2b(digest_size=16)
    with builder.env.begin() as txn:
        for n, sid in enumerate(builder.order):
            sample = txn.get(_DIGEST_PREFIX + b'%09d' % n)
            if sample is None:  # a build interrupted by a writer without digests: hash what is stored
                sample = _sample_digest(list(_prefix_items(txn, f'{sid}/'.encode('utf-8'))))
            digest.update(sid.encode('utf-8') + b'\0' + bytes(sample))
    return digest.hexdigest()


def _move_into_place(temp, final):
    if not os.path.exists(final):
        os.rename(temp, final)
        return
    retired = f'{final}.old-{os.getpid()}'
    os.rename(final, retired)
    os.rename(temp, final)
    shutil.rmtree(retired)


# One read-only environment per set file and process: LMDB forbids opening the same file twice in one
# process, and an environment inherited through fork() must be closed and reopened in the child.
# Keyed by path; the data file's inode tells a set replaced at the same path (overwrite=True) apart.
_READ_ENVIRONMENTS = {}


def _data_file_id(path):
    try:
        st = os.stat(os.path.join(path, 'data.mdb'))
    except OSError:
        raise PreferenceDataError(path, None, None, 'the folder holds no LMDB data.mdb; this is not a preference '
                                  'set written by write_preference_lmdb.') from None
    return st.st_dev, st.st_ino, st.st_size


_META_MAGIC = 0xBEEFC0DE


def check_data_file_size(path):
    """Refuse a ``data.mdb`` shorter than its own header says (reading it would die of SIGBUS).

    LMDB's two meta pages (``lmdb/mdb.c``: ``MDB_meta`` after a 16-byte page header) record the page
    size (``mm_dbs[FREE_DBI].md_pad``) and the last page used (``mm_last_pg``) of each commit; the newer
    meta (higher ``mm_txnid``) says how long the file must be.
    """
    import struct
    data_file = os.path.join(path, 'data.mdb')
    size = os.path.getsize(data_file)
    with open(data_file, 'rb') as f:
        head = f.read(2 * 65536)
    metas = []
    page_size = struct.unpack_from('<I', head, 40)[0] if len(head) >= 152 else 0
    for offset in (0, page_size):
        if page_size and len(head) >= offset + 152 and struct.unpack_from('<I', head, offset + 16)[0] == _META_MAGIC:
            last_page, txn_id = struct.unpack_from('<QQ', head, offset + 136)
            metas.append((txn_id, last_page))
    if not metas:
        raise PreferenceDataError(path, None, None, f'data.mdb ({size} bytes) has no LMDB header; the file is '
                                  'truncated or not an LMDB file. Copy the set again or rebuild it.')
    needed = (max(metas)[1] + 1) * page_size
    if size < needed:
        raise PreferenceDataError(path, None, None, f'data.mdb is {size} bytes but its LMDB header says it holds '
                                  f'{needed}; the file was truncated (an interrupted copy?). Copy the set again or '
                                  'rebuild it.')


def _open_readonly(path):
    dev, ino, size = _data_file_id(path)
    file_id, pid = (dev, ino), os.getpid()
    entry = _READ_ENVIRONMENTS.get(path)
    if entry is not None and entry[:2] == (pid, file_id):
        # Re-checked before every read: a data.mdb truncated under an open map would end the process
        # with SIGBUS on the first page past its end (see docs/preference_lmdb.md for what stays).
        if size < entry[3]:
            raise PreferenceDataError(path, None, None, f'data.mdb shrank from {entry[3]} to {size} bytes while '
                                      'it was being read (truncated by a copy or another program); restore or '
                                      'rebuild the set and restart the job that reads it.')
        return entry[2]
    if entry is not None:
        _close_readonly(path)  # inherited from the parent process, or the set was replaced
    check_data_file_size(path)
    try:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True, max_readers=1024)
    except lmdb.Error as error:
        raise PreferenceDataError(path, None, None, f'not a readable LMDB environment ({error}).') from None
    _READ_ENVIRONMENTS[path] = (pid, file_id, env, size)
    return env


def _close_readonly(path):
    entry = _READ_ENVIRONMENTS.pop(path, None)
    if entry is not None:
        entry[2].close()


class PreferenceLMDB:
    """Read-only access to a preference LMDB set, safe in DataLoader workers.

    The LMDB environment opens on first access in each process (and reopens after a fork), read-only,
    without locking and without readahead; readers of the same set in one process share it. The object
    holds no open handle, so it pickles (DataLoader workers with the spawn start method). Every sample
    is checked as it is read.

    Args:
        path (str): The set folder (``NAME.lmdb``).

    Example:
        >>> store = PreferenceLMDB('datasets/pref_train.lmdb')
        >>> sample = store[store.ids()[0]]
        >>> sample.candidates[0].shape  # (H, W, 3) uint8 RGB
    """

    def __init__(self, path):
        self.path = os.path.abspath(path).rstrip(os.sep)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"preference set '{self.path}' does not exist (expected a folder NAME.lmdb "
                                    'written by write_preference_lmdb).')
        self._header, self._ids, self._id_set, self._index_file = None, None, None, None

    def _environment(self):
        # Looked up on every access (a dict and a stat()): correct after fork(), close() or overwrite.
        env = _open_readonly(self.path)
        if self._ids is not None and _READ_ENVIRONMENTS[self.path][1] != self._index_file:
            # The set was replaced at this path after the index was read: reload it, and refuse to go on
            # when the samples changed (their ids would name other images).
            old = (self._header, self._ids)
            self._load_index()
            if (self._header, self._ids) != old:
                raise PreferenceDataError(self.path, None, None, 'the set was rebuilt at this path while it was '
                                          f'being read (it now holds {len(self._ids)} samples, before '
                                          f"{len(old[1])}; content digest {self._header.get('content_digest')}, "
                                          f"before {old[0].get('content_digest')}); restart the job that reads "
                                          'it.')
            env = _open_readonly(self.path)
        return env

    def close(self):
        """Close this process's environment of the set (every reader of it reopens on next access)."""
        _close_readonly(self.path)

    def _load_index(self):
        env = _open_readonly(self.path)
        file_id = _READ_ENVIRONMENTS[self.path][1]
        with env.begin(buffers=False) as txn:
            raw = txn.get(b'__format__')
            if raw is None:
                raise PreferenceDataError(self.path, None, '__format__', 'the header key is missing; this is not a '
                                          'preference set written by write_preference_lmdb (or its build did not '
                                          'finish).')
            header = decode_json(raw, self.path, None, '__format__')
            if not isinstance(header, dict) or header.get('format') != FORMAT_NAME:
                raise PreferenceDataError(self.path, None, '__format__', f"the header says format "
                                          f"{header.get('format') if isinstance(header, dict) else header!r}, "
                                          f"expected '{FORMAT_NAME}'.")
            if header.get('version') != FORMAT_VERSION:
                raise PreferenceDataError(self.path, None, '__format__', f"format version {header.get('version')!r} "
                                          f'is not supported by this reader (version {FORMAT_VERSION}).')
            for name in ('num_samples', 'num_candidates', 'scale'):
                if not isinstance(header.get(name), int):
                    raise PreferenceDataError(self.path, None, '__format__', f'the header lacks an integer {name!r}.')
            raw = txn.get(b'__ids__')
            if raw is None:
                raise PreferenceDataError(self.path, None, '__ids__', 'the list of sample ids is missing.')
            ids = decode_json(raw, self.path, None, '__ids__')
            if not isinstance(ids, list) or len(ids) != header['num_samples']:
                raise PreferenceDataError(self.path, None, '__ids__', f"the id list does not hold the header's "
                                          f"{header['num_samples']} sample ids.")
        self._header, self._ids, self._id_set, self._index_file = header, ids, set(ids), file_id

    @property
    def header(self):
        """dict: The ``__format__`` JSON (format, version, num_samples, num_candidates, scale, ...)."""
        if self._header is None:
            self._load_index()
        return self._header

    def ids(self):
        """list[str]: Sample ids in write order."""
        if self._ids is None:
            self._load_index()
        return list(self._ids)

    def __len__(self):
        return self.header['num_samples']

    def __contains__(self, sid):
        self.header  # noqa: B018  (loads the index)
        return sid in self._id_set

    def __iter__(self):
        return iter(self.ids())

    def _get(self, txn, sid, key):
        value = txn.get(key.encode('utf-8'))
        if value is None:
            raise PreferenceDataError(self.path, sid, key, 'the key is missing; the set is incomplete or corrupt, '
                                      'rebuild it with write_preference_lmdb.')
        return value

    def meta(self, sid):
        """The stored meta JSON of one sample (prompts, instance table, other fields), without images.

        Args:
            sid (str): Sample id.

        Returns:
            dict: The ``{sid}/meta`` JSON.
        """
        if sid not in self:
            raise KeyError(f"sample '{sid}' is not in preference set '{self.path}'.")
        with self._environment().begin(buffers=False) as txn:
            return self._read_meta(txn, sid)

    def _read_meta(self, txn, sid):
        key = f'{sid}/meta'
        meta = decode_json(self._get(txn, sid, key), self.path, sid, key)
        stored = meta.get('stored') if isinstance(meta, dict) else None
        if (not isinstance(stored, dict) or not isinstance(meta.get('instances'), list)
                or not isinstance(stored.get('num_candidates'), int) or not isinstance(stored.get('extras'), list)):
            raise PreferenceDataError(self.path, sid, key,
                                      "the meta JSON lacks 'instances' or a valid 'stored' record.")
        return meta

    def __getitem__(self, sid):
        """Read and check one sample.

        Args:
            sid (str): Sample id.

        Returns:
            PreferenceSample: Images as (H, W, 3) uint8 RGB, ``seg`` (H, W) uint16.

        Raises:
            KeyError: ``sid`` is not in the set.
            PreferenceDataError: A key of the sample is missing or its value is malformed.
        """
        if sid not in self:
            raise KeyError(f"sample '{sid}' is not in preference set '{self.path}'.")
        # buffers=True: values are views of the memory map, decoded before the transaction ends.
        with self._environment().begin(buffers=True) as txn:
            meta = self._read_meta(txn, sid)
            stored = meta['stored']

            def image(name):
                key = f'{sid}/{name}'
                return decode_png(self._get(txn, sid, key), self.path, sid, key, channels=3)

            lq = image('lq')
            candidates = [image(f'c{n}') for n in range(stored['num_candidates'])]
            seg = decode_png(self._get(txn, sid, f'{sid}/seg'), self.path, sid, f'{sid}/seg', channels=1)
            gt = image('gt') if stored.get('gt') else None
            extras = {name: decode_npy(self._get(txn, sid, f'{sid}/x/{name}'), self.path, sid, f'{sid}/x/{name}')
                      for name in stored['extras']}
        sample = sample_from_meta(sid, meta, lq, candidates, seg, gt, extras)
        check_sample(sample, self.path, scale=self.header['scale'], num_candidates=self.header['num_candidates'])
        return sample
