"""The preference-data chain on disk: candidates -> instances -> instance preferences -> LMDB set.

Each step reads and writes a work folder (:mod:`.work_folder`, layout there), one item per LQ image, and writes
its JSON record last (atomically), so an interrupted step rerun skips every finished item and redoes only the
rest (:mod:`.step_runner`). The chain's option file and what its sections build are in :mod:`.chain_options`.

A failed item is reported (progress bar, ``errors/<step>.json``, the step's :class:`StepReport`) and left
unfinished; the other items go on. :func:`assemble_preference_set` writes the finished items into a
preference LMDB set (:func:`dspo_basicsr.data.preference_set.write_preference_lmdb`).
"""
import os

import numpy as np

from dspo_basicsr.preference.chain_options import (
    build_framework,
    feedback_from_options,
    load_chain_options,
    sampling_settings,
    scorer_from_options,
)
from dspo_basicsr.preference.step_runner import StepReport, invalidate, run_interruptible, run_resumable
from dspo_basicsr.preference.work_folder import (
    IMAGE_EXTENSIONS,
    WorkFolder,
    discover_inputs,
    read_image,
    read_json,
    read_label_map,
    write_image,
    write_json,
)

__all__ = [
    'IMAGE_EXTENSIONS', 'StepReport', 'WorkFolder', 'discover_inputs', 'load_chain_options', 'build_framework',
    'run_candidate_step', 'run_segment_step', 'run_scoring_step', 'assemble_preference_set', 'read_image',
    'write_image', 'read_label_map', 'sampling_settings', 'scorer_from_options', 'feedback_from_options',
    'run_interruptible'
]


# -- step 1: candidates ------------------------------------------------------------------------------------
def run_candidate_step(work, inputs, framework, settings, num_keep=4, metrics=None, prompt='', prompts=None,
                       negative_prompt=None, overwrite=False, progress=True, batch_size=8, shard=None):
    """Generate, score and select candidates for every input not finished yet.

    Args:
        work (str | WorkFolder): The work folder.
        inputs (list[tuple]): ``(sid, lq_path, gt_path or None)`` (:func:`discover_inputs`).
        framework: Diffusion SR framework with ``sample(...)`` and ``scale``.
        settings (list[dict]): Sampling settings, ``settings[0]`` the default
            (:func:`dspo_basicsr.preference.candidates.expand_settings_grid`).
        num_keep (int): N candidates kept per image. Default: 4.
        metrics (dict, optional): IQA metric options (default PSNR/SSIM vs GT, NIQE, CLIP-IQA).
        prompt (str): Prompt of every image unless ``prompts`` has one.
        prompts (dict, optional): ``{sid: prompt}``.
        negative_prompt (str, optional): Negative prompt used when sampling (and the base of the set's).
        overwrite (bool): Redo finished items.
        progress (bool): Show a progress bar.
        batch_size (int): Most settings differing only in seed sampled as one batch (``sampling.batch_size``).
        shard (DataShard, optional): This process's share of the items (:mod:`dspo_basicsr.utils.distributed`).

    Returns:
        StepReport: What was done, skipped and failed.
    """
    from dspo_basicsr.metrics.pyiqa_metric import check_metric_weights
    from dspo_basicsr.preference.candidates import DEFAULT_METRICS, generate_candidates

    # before the first image is sampled: every missing weight file of every metric, in one error
    check_metric_weights(DEFAULT_METRICS if metrics is None else metrics, where='metrics')
    work = work if isinstance(work, WorkFolder) else WorkFolder(work)
    paths = {sid: (lq_path, gt_path) for sid, lq_path, gt_path in inputs}

    def process(sid):
        lq_path, gt_path = paths[sid]
        lq = read_image(lq_path)
        gt = read_image(gt_path) if gt_path else None
        text = (prompts or {}).get(sid, prompt)
        result = generate_candidates(framework, lq, settings, num_keep=num_keep, gt=gt, prompt=text,
                                     negative_prompt=negative_prompt, metrics=metrics, batch_size=batch_size)
        os.makedirs(work.candidate_dir(sid), exist_ok=True)
        # redoing an item: it is unfinished until its new record is written, and later steps redo it
        invalidate(work.candidates_json(sid), work.seg_json(sid), work.instances_json(sid))
        write_image(work.lq_png(sid), lq)
        if gt is not None:
            write_image(work.gt_png(sid), gt)
        for n, image in enumerate(result['images']):
            write_image(work.candidate_png(sid, n), image)
        record = {key: value for key, value in result.items() if key != 'images'}
        record.update(sid=sid, prompt=text, negative_prompt=negative_prompt or '', has_gt=gt is not None,
                      num_candidates=len(result['images']), scale=int(getattr(framework, 'scale', 0)) or
                      result['images'][0].shape[0] // lq.shape[0], grid=settings,
                      source={'lq': os.path.abspath(lq_path), 'gt': os.path.abspath(gt_path) if gt_path else None})
        write_json(work.candidates_json(sid), record)  # last: marks the item finished

    return run_resumable(work, StepReport('candidates'), list(paths), work.candidates_json, process, overwrite,
                         progress, shard=shard)


# -- step 2: instances -------------------------------------------------------------------------------------
def run_segment_step(work, segmenter, min_area=0, uncovered='background', source='auto', overwrite=False,
                     progress=True, shard=None):
    """Segment one image per finished candidate item into a partition label map.

    Args:
        work (str | WorkFolder): The work folder.
        segmenter (callable): ``segmenter(image) -> list of bool masks`` (:mod:`.segmentation`).
        min_area (int): Minimum instance area in SR pixels.
        uncovered (str): ``'background'`` or ``'neighbours'``.
        source (str): Which image to segment: ``'auto'`` (GT when present, else the default candidate),
            ``'gt'`` or ``'default'``.
        overwrite (bool): Redo finished items.
        progress (bool): Show a progress bar.
        shard (DataShard, optional): This process's share of the items (:mod:`dspo_basicsr.utils.distributed`).

    Returns:
        StepReport
    """
    from dspo_basicsr.preference.segmentation import segment_instances

    if source not in ('auto', 'gt', 'default'):
        raise ValueError(f"source must be 'auto', 'gt' or 'default', got {source!r}.")
    work = work if isinstance(work, WorkFolder) else WorkFolder(work)
    os.makedirs(os.path.join(work.root, 'seg'), exist_ok=True)

    def process(sid):
        record = read_json(work.candidates_json(sid))
        use_gt = record.get('has_gt') and source in ('auto', 'gt')
        if source == 'gt' and not record.get('has_gt'):
            raise ValueError('source is gt but this item has no GT image.')
        path = work.gt_png(sid) if use_gt else work.candidate_png(sid, record['default_candidate'])
        seg = segment_instances(segmenter, read_image(path), min_area=min_area, uncovered=uncovered)
        invalidate(work.seg_json(sid), work.instances_json(sid))
        write_image(work.seg_png(sid), seg)
        describe = getattr(segmenter, 'describe', None)
        write_json(work.seg_json(sid), {
            'num_instances': int(seg.max()) + 1, 'areas': np.bincount(seg.ravel()).tolist(),
            'segmented': 'gt' if use_gt else f'c{record["default_candidate"]}', 'min_area': min_area,
            'uncovered': uncovered, 'segmenter': describe() if callable(describe) else type(segmenter).__name__})

    return run_resumable(work, StepReport('seg'), work.sids('candidates'), work.seg_json, process, overwrite,
                         progress, desc='instances', shard=shard)


# -- step 3: instance preferences --------------------------------------------------------------------------
def run_scoring_step(work, scorer, top_k=5, feedback=None, overwrite=False, progress=True, max_concurrency=None,
                     shard=None):
    """Pick the preferred / dispreferred candidate of the K largest instances of every segmented item.

    Args:
        work (str | WorkFolder): The work folder.
        scorer (InstanceScorer): :mod:`.instance_scoring` scorer (metric, biqa, vlm, human).
        top_k (int): Instances per image that get a pair. Default: 5.
        feedback (dict, optional): Description feedback: ``describe`` (callable image -> text, e.g.
            ``VLMClient.describe``), ``embed`` (sentence embedder), ``threshold`` (default 0.1),
            ``min_crop`` (default 64). Applied to the paired instances of items with a GT.
        overwrite (bool): Redo finished items.
        progress (bool): Show a progress bar.
        max_concurrency (int, optional): Items scored at once (threads); default: the scorer's
            ``max_concurrency`` (a VLM client's, 8 by default), 1 for the other scorers.
        shard (DataShard, optional): This process's share of the items (:mod:`dspo_basicsr.utils.distributed`).

    Returns:
        StepReport: an item with any failed instance is reported and stays unfinished (a VLM's
        successful replies are cached, so the rerun asks only for the failed ones).
    """
    from dspo_basicsr.preference.feedback import instance_feedback, negative_prompt_from_instances
    from dspo_basicsr.preference.instance_scoring import InstanceContext, score_sample_instances

    work = work if isinstance(work, WorkFolder) else WorkFolder(work)
    os.makedirs(os.path.join(work.root, 'instances'), exist_ok=True)

    def process(sid):
        record, lq, gt, candidates = work.load_candidates(sid)
        seg = read_label_map(work.seg_png(sid))
        if seg.shape != candidates[0].shape[:2]:
            raise ValueError(f'label map {work.seg_png(sid)} is {seg.shape} but the candidates are '
                             f'{candidates[0].shape[:2]}; rerun the segment step with --overwrite.')
        context = InstanceContext(sid, lq=lq, candidates=candidates, seg=seg, gt=gt, prompt=record.get('prompt', ''))
        instances, errors = score_sample_instances(scorer, context, top_k=top_k)
        if feedback and gt is not None:
            for instance in instances:
                if instance['win'] < 0 or 'feedback' in instance:
                    continue
                try:
                    instance['feedback'] = instance_feedback(
                        feedback['describe'], context, instance['id'], feedback['embed'],
                        threshold=feedback.get('threshold', 0.1), min_crop=feedback.get('min_crop', 64))
                except Exception as err:  # noqa: BLE001  (VLM errors are per item)
                    errors.append(f'Sample {sid!r}, instance {instance["id"]}: feedback failed: {err}')
        if errors:
            raise RuntimeError('; '.join(errors))
        base = ', '.join(t for t in (record.get('negative_prompt', ''),
                                     scorer.sample_extras(context).get('negative_prompt', '')) if t)
        write_json(work.instances_json(sid), {
            'instances': instances, 'negative_prompt': negative_prompt_from_instances(instances, base),
            'top_k': top_k, 'scorer': scorer.describe()})

    workers = int(max_concurrency or getattr(scorer, 'max_concurrency', 1))
    return run_resumable(work, StepReport('instances'), work.sids('seg'), work.instances_json, process, overwrite,
                         progress, desc='scoring', workers=workers, shard=shard)


# -- step 4: assembly --------------------------------------------------------------------------------------
def assemble_preference_set(work, path, overwrite=False, resume=True, progress=True, **write_opt):
    """Write every finished item of the work folder into a preference LMDB set.

    Args:
        work (str | WorkFolder): The work folder.
        path (str): Destination ``NAME.lmdb``.
        overwrite (bool): Replace an existing set (only once the new one is complete).
        resume (bool): Keep the samples of an interrupted build of ``path``.
        progress (bool): Show a progress bar.
        **write_opt: More options of ``write_preference_lmdb`` (``png_compression``, ``batch_bytes``).

    Returns:
        tuple[PreferenceLMDB, StepReport]: The set, and which items were written or left out (unfinished).
    """
    from dspo_basicsr.data.preference_set import resumable_ids, write_preference_lmdb

    work = work if isinstance(work, WorkFolder) else WorkFolder(work)
    report = StepReport('assemble')
    finished = work.sids('instances')
    for sid in work.sids('candidates'):
        if sid not in finished:
            report.failed[sid] = 'not scored yet (run segment_instances.py and score_instances.py first)'
    if not finished:
        raise ValueError(f'No finished item in {work.root}: run the candidate, segment and scoring steps first.')
    scales = {read_json(work.candidates_json(sid)).get('scale') for sid in finished}
    if len(scales) != 1:
        raise ValueError(f'Items of {work.root} have different scales {sorted(scales)}; one set holds one scale.')
    stored = set(resumable_ids(path)) if resume else set()  # an interrupted build keeps these
    report.skipped = [sid for sid in finished if sid in stored]
    report.done = [sid for sid in finished if sid not in stored]
    samples = (work.load_sample(sid) for sid in report.done)
    preference_set = write_preference_lmdb(path, samples, scale=scales.pop(), overwrite=overwrite, resume=resume,
                                           total=len(report.done), progress=progress, **write_opt)
    return preference_set, report
