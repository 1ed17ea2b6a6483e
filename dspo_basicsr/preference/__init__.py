"""Preference sets: samples, the LMDB writer and reader, and the tools that build them.

Public API::

    PreferenceSample            one LQ image, N candidates, an instance label map and per-instance preferences
    write_preference_lmdb(...)  atomic, resumable writer of a NAME.lmdb set
    PreferenceLMDB(path)        lazy, worker-safe reader: len(), ids(), [sid], header
    PreferenceDataError         a malformed sample or set (names the set, the sample and the key)
    resumable_ids(path)         ids already stored by an interrupted build of path
    check_sample(...)           the checks the writer and the reader apply to every sample

Building preference data (imported on first use, so reading a set stays light)::

    segmentation     masks_to_partition, segment_instances, SAMSegmenter, SLICSegmenter, build_segmenter
    candidates       expand_settings_grid, generate_candidates
    instance_scoring score_sample_instances, build_instance_scorer, load_biqa_quality
    vlm_client       VLMClient
    feedback         description_feedback, MiniLMEmbedder
    pipeline         WorkFolder, run_candidate_step, run_segment_step, run_scoring_step, assemble_preference_set
    contact_sheet    write_contact_sheets
    candidate_latents samples_with_candidate_latents, candidate_latents_record
"""
import importlib

from dspo_basicsr.data.preference_sample import PreferenceDataError, PreferenceSample, check_sample
from dspo_basicsr.data.preference_set import PreferenceLMDB, resumable_ids, write_preference_lmdb

_BUILDING = {
    'segmentation': ('masks_to_partition', 'segment_instances', 'SAMSegmenter', 'SLICSegmenter', 'build_segmenter'),
    'candidates': ('expand_settings_grid', 'generate_candidates'),
    'instance_scoring': ('score_sample_instances', 'build_instance_scorer', 'load_biqa_quality'),
    'vlm_client': ('VLMClient', ),
    'feedback': ('description_feedback', 'MiniLMEmbedder'),
    'pipeline': ('WorkFolder', 'run_candidate_step', 'run_segment_step', 'run_scoring_step', 'assemble_preference_set'),
    'contact_sheet': ('write_contact_sheets', ),
    'candidate_latents': ('samples_with_candidate_latents', 'candidate_latents_record'),
}
_LAZY = {name: module for module, names in _BUILDING.items() for name in names}

__all__ = ['PreferenceSample', 'PreferenceDataError', 'PreferenceLMDB', 'write_preference_lmdb', 'resumable_ids',
           'check_sample', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
