"""Preference LMDB sets: bit-exact round trip, corruption errors, atomic and resumable builds, map growth."""
import json
import os
import pickle
import re

import cv2
import numpy as np
import pytest

from dspo_basicsr.data import preference_set as lmdb_set
from dspo_basicsr.data.preference_sample import encode_json, encode_png
from dspo_basicsr.preference import (
    PreferenceDataError,
    PreferenceLMDB,
    PreferenceSample,
    resumable_ids,
    write_preference_lmdb,
)

from preference_fixtures import coordinate_sample, lmdb_get, lmdb_put, noise_sample


def _samples():
    return [coordinate_sample('img_000', seed=0), coordinate_sample('img_001', 32, 48, with_gt=False, seed=1),
            coordinate_sample('img_002', 48, 32, seed=2)]


@pytest.fixture
def set_path(tmp_path):
    path = str(tmp_path / 'pref.lmdb')
    write_preference_lmdb(path, _samples(), progress=False)
    return path


def test_round_trip_is_bit_exact(set_path):
    store = PreferenceLMDB(set_path)
    assert len(store) == 3 and store.ids() == ['img_000', 'img_001', 'img_002']
    assert store.header == {'format': 'dspo-preference', 'version': 1, 'num_samples': 3, 'num_candidates': 3,
                            'scale': 4, 'num_with_gt': 2, 'extras': ['ram_embedding', 'tags'],
                            'png_compression': 0, 'writer': store.header['writer'],
                            'content_digest': store.header['content_digest']}
    assert len(store.header['content_digest']) == 32
    for expected in _samples():
        got = store[expected.sid]
        assert isinstance(got, PreferenceSample) and got.sid == expected.sid
        np.testing.assert_array_equal(got.lq, expected.lq)
        assert got.lq.dtype == np.uint8 and got.lq.shape == expected.lq.shape
        assert len(got.candidates) == 3
        for a, b in zip(got.candidates, expected.candidates, strict=True):
            assert a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)  # RGB order kept: channel 2 holds the candidate index
        assert got.seg.dtype == np.uint16 and got.seg.max() > 255
        np.testing.assert_array_equal(got.seg, expected.seg)
        if expected.gt is None:
            assert got.gt is None
        else:
            np.testing.assert_array_equal(got.gt, expected.gt)
        assert got.prompt == expected.prompt and got.negative_prompt == expected.negative_prompt
        assert got.meta == expected.meta
        counts = np.bincount(expected.seg.ravel())
        assert got.instances == [dict(row, area=int(counts[row['id']])) for row in expected.instances]
        assert set(got.extras) == set(expected.extras)
        for name, array in expected.extras.items():
            assert got.extras[name].dtype == array.dtype
            np.testing.assert_array_equal(got.extras[name], array)


@pytest.mark.parametrize('level', [1, 9])
def test_compressed_round_trip_is_bit_exact(tmp_path, level):
    sample = noise_sample('n', 64, 64)
    sample.candidates[1] = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, :, None] * 3, (64, 64, 3)).copy()
    compressed = write_preference_lmdb(str(tmp_path / 'c.lmdb'), [sample], png_compression=level, progress=False)
    stored = write_preference_lmdb(str(tmp_path / 's.lmdb'), [sample], progress=False)
    for n in range(2):
        np.testing.assert_array_equal(compressed['n'].candidates[n], sample.candidates[n])
    compressed.close()
    assert len(lmdb_get(compressed.path, 'n/c1')) < len(lmdb_get(stored.path, 'n/c1')) / 4


def test_meta_info_and_layout(set_path):
    lines = open(os.path.join(set_path, 'meta_info.txt'), encoding='utf-8').read().splitlines()
    assert lines == ['img_000 lq=16x12 sr=64x48 candidates=3 instances=12 gt=yes',
                     'img_001 lq=8x12 sr=32x48 candidates=3 instances=6 gt=no',
                     'img_002 lq=12x8 sr=48x32 candidates=3 instances=6 gt=yes']
    png = lmdb_get(set_path, 'img_000/c1')
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    # A standard PNG reader sees the RGB image: OpenCV decodes to BGR.
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1],
                                  _samples()[0].candidates[1])
    assert lmdb_get(set_path, 'img_000/x/tags')[:6] == b'\x93NUMPY'
    assert json.loads(lmdb_get(set_path, 'img_000/meta'))['default_candidate'] == 0
    assert lmdb_get(set_path, 'img_001/gt') is None
    assert not os.path.exists(set_path + '.tmp-build')


def _png_of_size(h, w):
    return encode_png(np.zeros((h, w, 3), np.uint8))


def _edit_meta(edit):
    def corrupt(path):
        meta = json.loads(lmdb_get(path, 'img_001/meta'))
        edit(meta)
        lmdb_put(path, 'img_001/meta', encode_json(meta))
    return corrupt


CORRUPTIONS = {
    'missing candidate': (lambda p: lmdb_put(p, 'img_001/c1', None), 'img_001/c1', 'missing'),
    'missing label map': (lambda p: lmdb_put(p, 'img_001/seg', None), 'img_001/seg', 'missing'),
    'missing extra': (lambda p: lmdb_put(p, 'img_001/x/tags', None), 'img_001/x/tags', 'missing'),
    'garbage candidate': (lambda p: lmdb_put(p, 'img_001/c0', b'not a png at all'), 'img_001/c0', 'not PNG'),
    'truncated png': (lambda p: lmdb_put(p, 'img_001/c2', lmdb_get(p, 'img_001/c2')[:60]), 'img_001/c2',
                      'cannot be decoded'),
    'resized candidate': (lambda p: lmdb_put(p, 'img_001/c2', _png_of_size(32, 44)), 'img_001/c2',
                          'candidate is 32x44 but c0 is 32x48'),
    'label map size': (lambda p: lmdb_put(p, 'img_001/seg', encode_png(np.zeros((16, 48), np.uint16))),
                       'img_001/seg', 'label map is 16x48'),
    'garbage meta': (lambda p: lmdb_put(p, 'img_001/meta', b'{"instances": [1,'), 'img_001/meta', 'not UTF-8 JSON'),
    'garbage extra': (lambda p: lmdb_put(p, 'img_001/x/tags', b'\x93NUMPY garbage'), 'img_001/x/tags', '.npy'),
    'win out of range': (_edit_meta(lambda m: m['instances'][0].update(win=3)), 'img_001/meta',
                         'win = 3 is outside [-1, 2]'),
    'lose below -1': (_edit_meta(lambda m: m['instances'][1].update(lose=-2)), 'img_001/meta', 'outside [-1, 2]'),
    'instance not in label map': (_edit_meta(lambda m: m['instances'].append({'id': 999, 'win': 0, 'lose': 1})),
                                  'img_001/seg', 'instance id 999'),
    'label without instance row': (_edit_meta(lambda m: m['instances'].pop(0)), 'img_001/seg',
                                   'have no row in the instance table'),
}


@pytest.mark.parametrize('case', sorted(CORRUPTIONS))
def test_corrupt_sample_raises_naming_set_sample_and_key(set_path, case):
    corrupt, key, problem = CORRUPTIONS[case]
    corrupt(set_path)
    store = PreferenceLMDB(set_path)
    np.testing.assert_array_equal(store['img_000'].lq, _samples()[0].lq)  # the other samples stay readable
    with pytest.raises(PreferenceDataError) as info:
        store['img_001']
    message = str(info.value)
    assert f"preference set '{set_path}'" in message
    assert "sample 'img_001'" in message and f"key '{key}'" in message
    assert problem in message
    assert info.value.sid == 'img_001' and info.value.key == key


@pytest.mark.parametrize('header, problem', [
    (None, 'header key is missing'),
    (b'garbage', 'not UTF-8 JSON'),
    (encode_json({'format': 'something-else', 'version': 1}), "expected 'dspo-preference'"),
    (encode_json({'format': 'dspo-preference', 'version': 2, 'num_samples': 3, 'num_candidates': 3, 'scale': 4}),
     'version 2 is not supported'),
])
def test_wrong_header_raises(set_path, header, problem):
    lmdb_put(set_path, '__format__', header)
    store = PreferenceLMDB(set_path)
    with pytest.raises(PreferenceDataError, match=problem) as info:
        len(store)
    assert set_path in str(info.value) and "key '__format__'" in str(info.value)


def test_unknown_sample_is_a_key_error(set_path):
    with pytest.raises(KeyError, match='img_999'):
        PreferenceLMDB(set_path)['img_999']


def _bad_samples():
    good = coordinate_sample('ok_0')
    wrong_win = coordinate_sample('bad_win')
    wrong_win.instances[0]['win'] = 3
    resized = coordinate_sample('bad_size')
    resized.candidates[1] = resized.candidates[1][:, :40]
    orphan = coordinate_sample('bad_orphan')
    orphan.instances.pop()
    not_a_pair = coordinate_sample('bad_pair')
    not_a_pair.instances[0].update(win=1, lose=1)
    rgba = coordinate_sample('bad_dtype')
    rgba.lq = rgba.lq.astype(np.float32)
    return good, [(wrong_win, 'outside [-1, 2]'), (resized, 'candidate is 64x40 but c0 is 64x48'),
                  (orphan, 'no row in the instance table'), (not_a_pair, 'two different candidates'),
                  (rgba, 'HxWx3 uint8')]


@pytest.mark.parametrize('index', range(5))
def test_write_validates_samples(tmp_path, index):
    good, bad = _bad_samples()
    sample, problem = bad[index]
    path = str(tmp_path / 'bad.lmdb')
    with pytest.raises(PreferenceDataError, match=re.escape(problem)) as info:
        write_preference_lmdb(path, [good, sample], progress=False)
    assert f"sample '{sample.sid}'" in str(info.value)
    assert not os.path.exists(path)


def test_write_rejects_duplicate_ids_and_scale_mismatch(tmp_path):
    with pytest.raises(PreferenceDataError, match="sample 'a'.*twice"):
        write_preference_lmdb(str(tmp_path / 'dup.lmdb'), [coordinate_sample('a'), coordinate_sample('a')],
                              progress=False)
    with pytest.raises(PreferenceDataError, match='LQ is 16x12, so x2 candidates would be 32x24'):
        write_preference_lmdb(str(tmp_path / 'scale.lmdb'), [coordinate_sample('a')], scale=2, progress=False)
    with pytest.raises(ValueError, match='no samples'):
        write_preference_lmdb(str(tmp_path / 'empty' / 'empty.lmdb'), iter([]), progress=False)
    assert os.listdir(tmp_path / 'empty') == []  # neither a set nor a temporary folder


def _failing_after(samples, count):
    for index, sample in enumerate(samples):
        if index == count:
            raise RuntimeError('generator crashed')
        yield sample


def test_interrupted_build_leaves_no_set_and_resumes(tmp_path):
    path = str(tmp_path / 'pref.lmdb')
    samples = [coordinate_sample(f's{i}', seed=i) for i in range(5)]
    with pytest.raises(RuntimeError, match='generator crashed'):
        write_preference_lmdb(path, _failing_after(samples, 3), batch_bytes=1, progress=False)
    assert not os.path.exists(path)
    assert resumable_ids(path) == ['s0', 's1', 's2']  # committed one by one (batch_bytes=1)

    encoded = []
    original = lmdb_set._encode_sample
    lmdb_set._encode_sample = lambda sample, *args: encoded.append(sample.sid) or original(sample, *args)
    try:
        store = write_preference_lmdb(path, samples, progress=False)
    finally:
        lmdb_set._encode_sample = original
    assert encoded == ['s3', 's4']  # the stored samples were reused, not re-encoded
    assert store.ids() == ['s0', 's1', 's2', 's3', 's4'] and store.header['num_samples'] == 5
    np.testing.assert_array_equal(store['s1'].candidates[2], samples[1].candidates[2])
    assert not os.path.exists(path + '.tmp-build') and resumable_ids(path) == []
    # the content digest of a resumed build is the one of a build in one go
    once = write_preference_lmdb(str(tmp_path / 'once.lmdb'), samples, progress=False)
    assert store.header['content_digest'] == once.header['content_digest']


def test_concurrent_build_of_the_same_set_is_refused(tmp_path):
    import fcntl
    path = str(tmp_path / 'pref.lmdb')
    os.makedirs(path + '.tmp-build')
    other = os.open(path + '.tmp-build', os.O_RDONLY)  # another build holds the lock
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match='another process is building'):
            write_preference_lmdb(path, [coordinate_sample('a')], progress=False)
    finally:
        os.close(other)
    assert write_preference_lmdb(path, [coordinate_sample('a')], progress=False).ids() == ['a']


def test_failed_overwrite_keeps_existing_set(set_path):
    with pytest.raises(FileExistsError, match='overwrite=True'):
        write_preference_lmdb(set_path, _samples(), progress=False)
    with pytest.raises(RuntimeError):
        write_preference_lmdb(set_path, _failing_after([coordinate_sample('new')] * 2, 1), overwrite=True,
                              resume=False, progress=False)
    assert PreferenceLMDB(set_path).ids() == ['img_000', 'img_001', 'img_002']
    store = write_preference_lmdb(set_path, [coordinate_sample('new')], overwrite=True, resume=False, progress=False)
    assert store.ids() == ['new'] and os.listdir(os.path.dirname(set_path)) == ['pref.lmdb']


def test_mixed_sizes_grow_the_map(tmp_path, monkeypatch):
    # A 256 KiB initial map and one large transaction: without growth, LMDB raises MapFullError.
    monkeypatch.setattr(lmdb_set, 'INITIAL_MAP_SIZE', 256 << 10)
    sizes = [(16, 16), (256, 192), (32, 64), (192, 256), (64, 64)]
    samples = [noise_sample(f'n{i}', h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    store = write_preference_lmdb(str(tmp_path / 'mixed.lmdb'), samples, progress=False)
    for sample in samples:
        np.testing.assert_array_equal(store[sample.sid].candidates[1], sample.candidates[1])


def test_reader_opens_lazily_and_pickles(set_path):
    store = PreferenceLMDB(set_path)
    assert set_path not in lmdb_set._READ_ENVIRONMENTS
    assert 'img_002' in store and store['img_002'].sid == 'img_002'
    assert set_path in lmdb_set._READ_ENVIRONMENTS
    clone = pickle.loads(pickle.dumps(store))
    assert clone.ids() == store.ids()
    second = PreferenceLMDB(set_path)  # a second reader of the same set in the same process
    np.testing.assert_array_equal(second['img_000'].seg, clone['img_000'].seg)
    store.close()
    assert set_path not in lmdb_set._READ_ENVIRONMENTS
    np.testing.assert_array_equal(second['img_001'].lq, _samples()[1].lq)  # reopens


def test_reader_sees_a_set_replaced_in_place(set_path):
    store = PreferenceLMDB(set_path)
    assert store['img_000'].sid == 'img_000'
    write_preference_lmdb(set_path, [coordinate_sample('img_000', seed=5, with_gt=False)], overwrite=True,
                          progress=False)
    assert PreferenceLMDB(set_path)['img_000'].gt is None


def test_second_writer_with_resume_false_is_refused_and_leaves_the_first_build_intact(tmp_path):
    path = str(tmp_path / 'pref.lmdb')
    refusals = []

    def first_writer_samples():
        yield coordinate_sample('a', seed=0)
        try:  # while the first build is under way, another process starts afresh at the same path
            write_preference_lmdb(path, [coordinate_sample('z', seed=9)], resume=False, progress=False)
        except RuntimeError as err:
            refusals.append(str(err))
        yield coordinate_sample('b', seed=1)

    store = write_preference_lmdb(path, first_writer_samples(), batch_bytes=1, progress=False)
    assert len(refusals) == 1 and 'another process is building' in refusals[0]
    assert store.ids() == ['a', 'b']
    np.testing.assert_array_equal(store['b'].lq, coordinate_sample('b', seed=1).lq)


def test_reader_opened_before_a_rebuild_with_other_samples_raises_one_clear_error(set_path):
    store = PreferenceLMDB(set_path)
    assert store['img_001'].sid == 'img_001'
    write_preference_lmdb(set_path, [coordinate_sample('img_000', seed=5)], overwrite=True, progress=False)
    with pytest.raises(PreferenceDataError, match='rebuilt at this path while it was being read'):
        store['img_001']
    again = PreferenceLMDB(set_path)
    assert again.ids() == ['img_000']


def test_reader_follows_a_rebuild_with_the_same_samples(set_path):
    store = PreferenceLMDB(set_path)
    assert store['img_000'].sid == 'img_000'
    write_preference_lmdb(set_path, _samples(), overwrite=True, progress=False)
    np.testing.assert_array_equal(store['img_002'].candidates[0], _samples()[2].candidates[0])


@pytest.mark.parametrize('keep', [0.5, 0.0005])
def test_truncated_data_file_is_a_preference_data_error_not_sigbus(set_path, keep):
    lmdb_set._close_readonly(set_path)
    data = os.path.join(set_path, 'data.mdb')
    with open(data, 'r+b') as f:
        f.truncate(int(os.path.getsize(data) * keep))
    with pytest.raises(PreferenceDataError, match='truncated'):
        PreferenceLMDB(set_path)['img_002']


def _other_pixels():
    samples = _samples()
    samples[1].candidates[0] = 255 - samples[1].candidates[0]
    return samples


def test_reader_opened_before_a_rebuild_with_same_ids_but_other_pixels_raises(set_path):
    """Issue 24 item 3: same ids, other pixels is not picked up silently (the content digest differs)."""
    store = PreferenceLMDB(set_path)
    before = store.header['content_digest']
    assert store['img_001'].sid == 'img_001'
    write_preference_lmdb(set_path, _other_pixels(), overwrite=True, progress=False)
    with pytest.raises(PreferenceDataError, match=f'rebuilt at this path.*before {before}'):
        store['img_001']
    assert PreferenceLMDB(set_path).ids() == store.ids()


class _FullDisk:
    """Fault injection: the build's commits fail after ``after`` of them as LMDB fails on a full disk."""

    def __init__(self, monkeypatch, after, error):
        self.calls, self.after, self.error = 0, after, error
        original = lmdb_set._Builder._commit

        def commit(builder, payload):
            self.calls += 1
            if self.calls > self.after:
                raise self.error
            return original(builder, payload)

        monkeypatch.setattr(lmdb_set._Builder, '_commit', commit)
        monkeypatch.setattr(lmdb_set, '_free_bytes', lambda folder: 0)


@pytest.mark.parametrize('error', [lmdb_set.lmdb.Error('mdb_txn_commit: Input/output error'),
                                   OSError(28, 'No space left on device')])
def test_disk_full_during_a_build_names_the_folder_removes_the_partial_build_and_keeps_the_old_set(
        set_path, monkeypatch, error):
    """Issue 24 item 5: one clear error, no `.tmp-build` left filling the disk, the old set intact."""
    ids = PreferenceLMDB(set_path).ids()
    _FullDisk(monkeypatch, after=2, error=error)
    samples = [coordinate_sample(f's{i}', seed=i) for i in range(5)]
    with pytest.raises(OSError, match=f'no space left on {re.escape(os.path.dirname(set_path))}') as raised:
        write_preference_lmdb(set_path, samples, overwrite=True, batch_bytes=1, progress=False)
    assert 'existing set kept' in str(raised.value)
    assert not os.path.exists(set_path + '.tmp-build')
    lmdb_set._close_readonly(set_path)
    assert PreferenceLMDB(set_path).ids() == ids
    np.testing.assert_array_equal(PreferenceLMDB(set_path)['img_002'].lq, _samples()[2].lq)


def test_an_io_error_with_free_space_is_not_called_disk_full(tmp_path, monkeypatch):
    _FullDisk(monkeypatch, after=0, error=lmdb_set.lmdb.Error('mdb_txn_commit: Input/output error'))
    monkeypatch.setattr(lmdb_set, '_free_bytes', lambda folder: 1 << 40)
    with pytest.raises(lmdb_set.lmdb.Error, match='Input/output error'):
        write_preference_lmdb(str(tmp_path / 'p.lmdb'), _samples(), batch_bytes=1, progress=False)


_TRUNCATE_WHILE_READING = """
import os, sys
from dspo_basicsr.preference import PreferenceDataError, PreferenceLMDB
store = PreferenceLMDB(sys.argv[1])
store['img_000']
data = os.path.join(sys.argv[1], 'data.mdb')
with open(data, 'r+b') as f:
    f.truncate(os.path.getsize(data) // 3)
try:
    store['img_002']
except PreferenceDataError as err:
    print('refused:', err)
"""


@pytest.mark.slow
def test_data_file_truncated_while_a_reader_holds_it_is_refused_before_the_next_read(set_path):
    """Issue 24 item 5: the size is re-checked before each read (in a child: today's code dies of SIGBUS)."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, '-c', _TRUNCATE_WHILE_READING, set_path], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'refused:' in run.stdout and 'shrank from' in run.stdout
