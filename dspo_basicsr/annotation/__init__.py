"""The annotation studio: a local web app for instance preferences, 2AFC pairs and win-rate studies.

``scripts/annotate.py serve | report | demo``; :mod:`.studies` (what is shown), :mod:`.store` (SQLite
answers), :mod:`.server` (pages and API), :mod:`.report` (votes, agreement, win rates, exports).
This is a top layer: it imports preference, ranking and data code; nothing below imports it.
"""
from dspo_basicsr.annotation.store import AnnotationStore
from dspo_basicsr.annotation.studies import InstanceStudy, PairStudy, StudyError, WinRateStudy, build_study

__all__ = ['AnnotationStore', 'InstanceStudy', 'PairStudy', 'WinRateStudy', 'StudyError', 'build_study']
