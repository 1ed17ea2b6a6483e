"""Preference sets: samples, the LMDB writer and reader, and the tools that build them.

Public API::

    PreferenceSample            one LQ image, N candidates, an instance label map and per-instance preferences
    write_preference_lmdb(...)  atomic, resumable writer of a NAME.lmdb set
    PreferenceLMDB(path)        lazy, worker-safe reader: len(), ids(), [sid], header
    PreferenceDataError         a malformed sample or set (names the set, the sample and the key)
    resumable_ids(path)         ids already stored by an interrupted build of path
    check_sample(...)           the checks the writer and the reader apply to every sample
"""
from dspo_basicsr.preference.lmdb_set import PreferenceLMDB, resumable_ids, write_preference_lmdb
from dspo_basicsr.preference.sample import PreferenceDataError, PreferenceSample, check_sample

__all__ = ['PreferenceSample', 'PreferenceDataError', 'PreferenceLMDB', 'write_preference_lmdb', 'resumable_ids',
           'check_sample']
