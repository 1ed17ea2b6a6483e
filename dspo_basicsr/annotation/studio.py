"""Opening a study with its database, serving it, and the demo work folder.

A database belongs to one study: the first ``serve`` stores the study's options in it, later ones (and
``report``) rebuild the study from them, so ``annotate.py report --db DB`` needs nothing else.
"""
import json
import os
import secrets

from dspo_basicsr.annotation.store import AnnotationStore
from dspo_basicsr.annotation.studies import StudyError, build_study

__all__ = ['open_study', 'access_token', 'serve', 'demo_work_folder', 'LOOPBACK_HOSTS']

LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '::1')


def open_study(db_path, options=None):
    """``(study, store)`` of a database; ``options`` (a study's ``options()``) start or must match it.

    Raises:
        StudyError: The database holds another study, or none and no options were given.
    """
    store = AnnotationStore(db_path)
    stored = store.get_meta('study')
    if options is None:
        if stored is None:
            raise StudyError(f'{db_path} holds no study yet; start one with annotate.py serve.')
        options = stored
    study = build_study(options)
    options = study.options()
    if stored is None:
        store.set_meta('study', options)
        store.set_meta('items', study.items)
    elif stored != options:
        changed = sorted(k for k in set(stored) | set(options) if stored.get(k) != options.get(k))
        raise StudyError(f'{db_path} belongs to another study (different {", ".join(changed)}: stored '
                         f'{json.dumps({k: stored.get(k) for k in changed})}); pass another --db.')
    elif store.get_meta('items') != study.items:
        missing = [k for k in store.get_meta('items') if k not in set(study.items)]
        if missing:
            raise StudyError(f'{db_path}: {len(missing)} items of the study are gone from its folders (e.g. '
                             f'{missing[:3]}); restore them or pass another --db.')
        store.set_meta('items', study.items)  # new items only: answers so far stay valid
    return study, store


def access_token(host, token=None):
    """The token a server on ``host`` requires: ``token`` if given, a new random one off loopback, else None."""
    if token:
        return token
    return None if host in LOOPBACK_HOSTS else secrets.token_urlsafe(18)


def invitation_links(store, address, annotators, token=None):
    """``{name: link}``: each annotator's own address (their secret issued now when they have none yet)."""
    from urllib.parse import urlencode

    from dspo_basicsr.annotation.server import check_annotator, issue_annotator_secret

    links = {}
    for name in annotators:
        name = check_annotator(name)
        query = {'annotator': name, 'invite': issue_annotator_secret(store, name)}
        if token:
            query['token'] = token
        links[name] = f'{address}annotate?{urlencode(query)}'
    return links


def serve(study, store, host='127.0.0.1', port=8765, token=None, log_level='warning', annotators=None):
    """Run the app with uvicorn until interrupted (prints the address to open).

    ``annotators`` (list of names): print one invitation link per name and let only these names sign in.
    """
    import uvicorn

    from dspo_basicsr.annotation.server import create_app

    token = access_token(host, token)
    shown = f'[{host}]' if ':' in host else host
    base = f'http://{shown}:{port}/'
    address = base + (f'?token={token}' if token else '')
    print(f'{study.kind} study, {len(study.items)} items, answers in {store.path}\nopen {address}', flush=True)
    if annotators:
        print('invitation links (one per annotator; each holds that annotator\'s secret, send it to them only):')
        for name, link in invitation_links(store, base, annotators, token).items():
            print(f'  {name}: {link}', flush=True)
    uvicorn.run(create_app(study, store, token, invited_only=bool(annotators)), host=host, port=port,
                log_level=log_level)


def demo_work_folder(root='datasets/demo', work=None, progress=True):
    """A work folder (candidates, label maps) of the embedded demo's preference set, built when missing.

    The demo set of ``scripts/make_demo_data.py`` (``ROOT/demo_pref.lmdb``) is made first if it is not
    there; each of its samples is written out in the work-folder layout of
    :mod:`dspo_basicsr.preference.pipeline`, so ``annotate.py serve --work`` and ``score_instances.py``
    read it.

    Returns:
        str: The work folder (default ``ROOT/annotation_work``).
    """
    import numpy as np

    from dspo_basicsr.data.preference_set import PreferenceLMDB
    from dspo_basicsr.preference.work_folder import WorkFolder, write_image, write_json

    lmdb_path = os.path.join(root, 'demo_pref.lmdb')
    if not os.path.isdir(lmdb_path):
        from dspo_basicsr.demo.dspo import build_demo_data
        print(f'building the embedded demo in {root} first (a few minutes on a CPU)', flush=True)
        build_demo_data(root)
    work = WorkFolder(work or os.path.join(root, 'annotation_work'))
    preference_set = PreferenceLMDB(lmdb_path)
    for sid in preference_set.ids():
        if os.path.isfile(work.seg_json(sid)):
            continue
        sample = preference_set[sid]
        os.makedirs(work.candidate_dir(sid), exist_ok=True)
        os.makedirs(os.path.dirname(work.seg_png(sid)), exist_ok=True)
        write_image(work.lq_png(sid), sample.lq)
        if sample.gt is not None:
            write_image(work.gt_png(sid), sample.gt)
        for n, candidate in enumerate(sample.candidates):
            write_image(work.candidate_png(sid, n), candidate)
        meta = sample.meta or {}
        write_json(work.candidates_json(sid), {
            'sid': sid, 'prompt': sample.prompt, 'negative_prompt': '', 'has_gt': sample.gt is not None,
            'num_candidates': len(sample.candidates), 'scale': sample.candidates[0].shape[0] // sample.lq.shape[0],
            'settings': meta.get('candidates', [{}] * len(sample.candidates)),
            'default_candidate': int(meta.get('default_candidate', 0)),
            'scores': meta.get('candidate_scores', {}), 'mean_score': meta.get('candidate_mean_score', []),
            'source': {'preference_set': os.path.abspath(lmdb_path)}})
        write_image(work.seg_png(sid), sample.seg.astype(np.uint16))
        write_json(work.seg_json(sid), {'num_instances': int(sample.seg.max()) + 1,
                                         'areas': np.bincount(sample.seg.ravel().astype(np.int64)).tolist(),
                                         'segmented': 'demo preference set', 'segmenter': meta.get('segmenter')})
    return work.root


def write_instance_files(study, annotation_path, progress=True):
    """Write ``WORK/instances/<sid>.json`` of the fully answered samples from a human annotation export.

    Runs the chain's scoring step with the ``human`` scorer (as ``score_instances.py --scorer human``
    would) on the exported samples only; the VLM descriptions the old files held are kept in each
    instance's ``feedback.descriptions``, so the study still shows them.

    Returns:
        StepReport: The scoring step's report.
    """
    from dspo_basicsr.preference.instance_scoring import HumanInstanceScorer
    from dspo_basicsr.preference.pipeline import run_scoring_step
    from dspo_basicsr.preference.work_folder import WorkFolder, read_json, write_json

    scorer = HumanInstanceScorer(annotation_path)
    exported = sorted(scorer.samples)

    class ExportedSamples(WorkFolder):
        def sids(self, stage='candidates'):
            return [sid for sid in super().sids(stage) if sid in scorer.samples]

    work = ExportedSamples(study.work.root)
    kept = {sid: {i: study.descriptions(sid, i) for i in study.records[sid]['instances']} for sid in exported}
    report = run_scoring_step(work, scorer, top_k=study.top_k, overwrite=True, progress=progress)
    for sid in report.done:
        record = read_json(work.instances_json(sid))
        for entry in record['instances']:
            descriptions = kept[sid].get(entry['id'])
            if descriptions:
                entry.setdefault('feedback', {'negative': [], 'source': 'human'})['descriptions'] = descriptions
        write_json(work.instances_json(sid), record)
    return report
