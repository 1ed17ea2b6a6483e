"""The preference-data chain on disk: candidates -> instances -> instance preferences -> LMDB set.

Each step reads and writes a work folder, one item per LQ image, and writes its JSON record last (atomically),
so an interrupted step rerun skips every finished item and redoes only the rest::

    WORK/candidates/<sid>/lq.png            the LQ input (copied)
    WORK/candidates/<sid>/gt.png            the GT, when there is one
    WORK/candidates/<sid>/c{n}.png          kept candidates n = 0..N-1, best mean normalised score first
    WORK/candidates/<sid>/candidates.json   prompt, settings, scores of each candidate, default_candidate
    WORK/seg/<sid>.png                      uint16 partition label map at SR size (16-bit PNG)
    WORK/seg/<sid>.json                     number of instances, areas, which image was segmented, segmenter
    WORK/instances/<sid>.json               instance table {id, area, win, lose, scores?, feedback?}, negative prompt
    WORK/errors/<step>.json                 the items that failed in the last run of a step, with the reason
    WORK/errors/<step>.rank<r>.json         the same, of rank r of a sharded run (merged into <step>.json)

A failed item is reported (progress bar, ``errors/<step>.json``, the step's :class:`StepReport`) and left
unfinished; the other items go on. :func:`assemble_preference_set` writes the finished items into a
preference LMDB set (:func:`dspo_basicsr.data.preference_set.write_preference_lmdb`).
"""
import copy
import json
import os
import re
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    'IMAGE_EXTENSIONS', 'StepReport', 'WorkFolder', 'discover_inputs', 'load_chain_options', 'build_framework',
    'run_candidate_step', 'run_segment_step', 'run_scoring_step', 'assemble_preference_set', 'read_image',
    'write_image', 'read_label_map', 'sampling_settings', 'scorer_from_options', 'feedback_from_options'
]

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
_SID_PATTERN = re.compile(r'^[A-Za-z0-9_.\-]+$')


# -- files -------------------------------------------------------------------------------------------------
def read_image(path):
    """(H, W, 3) uint8 RGB from an image file; clear error when it cannot be read."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'Cannot read image {path}.')
    return np.ascontiguousarray(image[..., ::-1])


def _atomic_write_bytes(path, data):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as handle:
        handle.write(data)
    os.replace(tmp, path)


def write_image(path, image):
    """Write (H, W, 3) uint8 RGB or (H, W) uint16 as PNG, atomically."""
    image = np.asarray(image)
    array = image[..., ::-1] if image.ndim == 3 else image
    ok, png = cv2.imencode('.png', np.ascontiguousarray(array))
    if not ok:
        raise ValueError(f'Cannot encode {path} as PNG.')
    _atomic_write_bytes(path, png.tobytes())


def read_label_map(path):
    """(H, W) uint16 label map from a 16-bit PNG."""
    seg = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if seg is None or seg.ndim != 2:
        raise ValueError(f'Cannot read the label map {path} as a single-channel PNG.')
    return seg.astype(np.uint16)


def _write_json(path, value):
    _atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=False).encode('utf-8'))


def _read_json(path):
    with open(path, encoding='utf-8') as handle:
        return json.load(handle)


@dataclass
class StepReport:
    """What one run of a step did.

    Attributes:
        step (str): The step's name.
        done (list[str]): Ids processed in this run.
        skipped (list[str]): Ids finished before this run.
        failed (dict[str, str]): Id -> reason, for the items that failed (left unfinished).
    """
    step: str
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)

    def summary(self):
        text = f'{self.step}: {len(self.done)} done, {len(self.skipped)} already finished, {len(self.failed)} failed'
        for sid, reason in self.failed.items():
            text += f'\n  {sid}: {reason}'
        return text


class WorkFolder:
    """Paths of the work folder (layout in the module docstring)."""

    def __init__(self, root):
        self.root = os.path.abspath(str(root))

    def candidate_dir(self, sid):
        return os.path.join(self.root, 'candidates', sid)

    def candidates_json(self, sid):
        return os.path.join(self.candidate_dir(sid), 'candidates.json')

    def candidate_png(self, sid, n):
        return os.path.join(self.candidate_dir(sid), f'c{n}.png')

    def lq_png(self, sid):
        return os.path.join(self.candidate_dir(sid), 'lq.png')

    def gt_png(self, sid):
        return os.path.join(self.candidate_dir(sid), 'gt.png')

    def seg_png(self, sid):
        return os.path.join(self.root, 'seg', f'{sid}.png')

    def seg_json(self, sid):
        return os.path.join(self.root, 'seg', f'{sid}.json')

    def instances_json(self, sid):
        return os.path.join(self.root, 'instances', f'{sid}.json')

    def errors_json(self, step):
        return os.path.join(self.root, 'errors', f'{step}.json')

    def rank_errors_json(self, step, rank):
        return os.path.join(self.root, 'errors', f'{step}.rank{rank}.json')

    def sids(self, stage='candidates'):
        """Sample ids finished at ``stage`` (``candidates``, ``seg`` or ``instances``), sorted."""
        marker = {'candidates': self.candidates_json, 'seg': self.seg_json, 'instances': self.instances_json}[stage]
        folder = os.path.join(self.root, 'candidates')
        if not os.path.isdir(folder):
            return []
        return sorted(sid for sid in os.listdir(folder) if os.path.isfile(marker(sid)))

    def load_candidates(self, sid):
        """``(record, lq, gt or None, [candidates])`` of a finished candidate item."""
        record = _read_json(self.candidates_json(sid))
        lq = read_image(self.lq_png(sid))
        gt = read_image(self.gt_png(sid)) if record.get('has_gt') else None
        candidates = [read_image(self.candidate_png(sid, n)) for n in range(record['num_candidates'])]
        return record, lq, gt, candidates

    def load_sample(self, sid):
        """The :class:`PreferenceSample` of a finished item (after the scoring step)."""
        from dspo_basicsr.data.preference_sample import PreferenceSample

        record, lq, gt, candidates = self.load_candidates(sid)
        seg = read_label_map(self.seg_png(sid))
        scored = _read_json(self.instances_json(sid))
        meta = {
            'candidates': record['settings'],
            'default_candidate': record['default_candidate'],
            'candidate_scores': record['scores'],
            'candidate_mean_score': record['mean_score'],
            'segmenter': _read_json(self.seg_json(sid)).get('segmenter'),
            'scorer': scored.get('scorer'),
        }
        if record.get('source'):
            meta['source'] = record['source']
        return PreferenceSample(sid=sid, lq=lq, candidates=candidates, seg=seg, instances=scored['instances'],
                                prompt=record.get('prompt', ''), negative_prompt=scored.get('negative_prompt', ''),
                                gt=gt, meta=meta)

    def write_errors(self, report):
        os.makedirs(os.path.dirname(self.errors_json(report.step)), exist_ok=True)
        _write_json(self.errors_json(report.step), report.failed)


# -- options -----------------------------------------------------------------------------------------------
def load_chain_options(path):
    """Read the chain's YAML option file with the one safe option reader (no Python tags, UTF-8 text)."""
    from dspo_basicsr.utils.options import read_option_file
    opt = read_option_file(path, require=())
    if not isinstance(opt, dict):
        raise ValueError(f'{path} must hold a mapping of sections (framework, sampling, metrics, segmenter, ...).')
    return _plain(opt)


def _plain(value):
    """OrderedDicts of the option reader -> plain dicts (what the steps store as JSON), recursively."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def build_framework(opt, device='cpu'):
    """Build a diffusion SR framework from ``{network: <network_g-style dict>, pretrain_network?, param_key?}``.

    ``network`` goes through BasicSR's ``build_network`` (so any registered arch works); the optional
    ``pretrain_network`` is a BasicSR checkpoint (``{param_key: state_dict}``, read weights-only) loaded on top
    with every key checked: a fine-tuned ``net_g_*.pth`` holds exactly the trained parameters of the framework
    (``load_trainable_state_dict``), any other network's file its whole state dict.
    """
    from dspo_basicsr.utils.checkpoint import check_state_dict_matches, read_checkpoint

    from basicsr.archs import build_network

    if 'network' not in opt:
        raise KeyError("The framework section needs 'network': a network_g-style dict (type: ControlSD2Arch, ...).")
    net = build_network(copy.deepcopy(dict(opt['network'])))
    path = opt.get('pretrain_network')
    if path:
        state = read_checkpoint(path, what='framework.pretrain_network', unwrap=(opt.get('param_key', 'params'),))
        source = f"framework.pretrain_network '{path}'"
        if hasattr(net, 'load_trainable_state_dict'):
            net.load_trainable_state_dict(state, source=source)
        else:
            check_state_dict_matches(net.state_dict(), state, source, type(net).__name__)
            net.load_state_dict(state)
    return net.to(device).eval()


def sampling_settings(framework, sampling_opt):
    """The candidate settings of the ``sampling`` section: ``default`` first, then the ``grid``.

    ``default`` falls back to the framework's own (``default_steps``, ``default_cfg``, seed 0). The section's
    ``prompt_source`` (``tags``: RAM / DAPE tags at sampling time), ``color_fix``, ``process_size``,
    ``tile_size``, ``tile_overlap`` and ``vae_tile`` are added to every setting.
    """
    from dspo_basicsr.preference.candidates import expand_settings_grid

    sampling_opt = dict(sampling_opt or {})
    default = sampling_opt.get('default')
    if default is None:
        default = {'steps': getattr(framework, 'default_steps', 50), 'cfg': getattr(framework, 'default_cfg', 5.5),
                   'seed': 0}
    settings = expand_settings_grid(sampling_opt.get('grid'), default)
    # prompt_source / color_fix / tiling of the section apply to every candidate (framework.sample keywords).
    from dspo_basicsr.archs.diffusion_sr_base import SAMPLE_PROTOCOL_KEYS
    protocol = {k: sampling_opt[k] for k in SAMPLE_PROTOCOL_KEYS if sampling_opt.get(k) is not None}
    return [dict(protocol, **setting) for setting in settings]


def scorer_from_options(opt, scorer_type=None, annotations=None):
    """The instance scorer of the ``scorer`` section (``type`` metric | biqa | vlm | human)."""
    from dspo_basicsr.preference.instance_scoring import build_instance_scorer

    scorer_opt = dict(opt.get('scorer') or {'type': 'metric'})
    if scorer_type:
        if scorer_type != scorer_opt.get('type'):
            scorer_opt = dict(opt.get(f'scorer_{scorer_type}') or {})
        scorer_opt['type'] = scorer_type
    if annotations:
        scorer_opt['annotations'] = annotations
    if scorer_opt.get('type') == 'metric' and 'metrics' not in scorer_opt and opt.get('instance_metrics'):
        scorer_opt['metrics'] = opt['instance_metrics']
    return build_instance_scorer(scorer_opt)


def feedback_from_options(opt):
    """The description-feedback settings of the ``feedback`` section, or None when it is absent.

    Section keys: ``vlm`` (options of :class:`.vlm_client.VLMClient`), ``embedder`` (``minilm`` |
    ``hashing``), ``threshold`` (0.1), ``min_crop`` (64).
    """
    section = opt.get('feedback')
    if not section:
        return None
    from dspo_basicsr.preference.feedback import build_embedder
    from dspo_basicsr.preference.vlm_client import VLMClient

    if 'vlm' not in section:
        raise KeyError("The feedback section needs 'vlm': the options of the VLM that describes the crops.")
    client = VLMClient(**section['vlm'])
    return {'describe': client.describe, 'embed': build_embedder(section.get('embedder', 'minilm')),
            'threshold': float(section.get('threshold', 0.1)), 'min_crop': int(section.get('min_crop', 64))}


def discover_inputs(lq_dir, gt_dir=None):
    """``[(sid, lq_path, gt_path or None)]`` for the images of ``lq_dir``, GT matched by file stem.

    Raises:
        ValueError: A file stem is not a valid sample id, or two files share one.
    """
    if not os.path.isdir(lq_dir):
        raise FileNotFoundError(f'LQ folder not found: {lq_dir}.')
    gt_paths = {}
    if gt_dir:
        if not os.path.isdir(gt_dir):
            raise FileNotFoundError(f'GT folder not found: {gt_dir}.')
        for name in sorted(os.listdir(gt_dir)):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                gt_paths[os.path.splitext(name)[0]] = os.path.join(gt_dir, name)
    inputs, seen = [], set()
    for name in sorted(os.listdir(lq_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        sid = os.path.splitext(name)[0]
        if not _SID_PATTERN.match(sid):
            raise ValueError(f'{os.path.join(lq_dir, name)}: the file stem {sid!r} is used as the sample id and may '
                             'hold only letters, digits, "_", "-" and "."; rename the file.')
        if sid in seen:
            raise ValueError(f'{lq_dir}: two images share the stem {sid!r}; sample ids must be unique.')
        seen.add(sid)
        inputs.append((sid, os.path.join(lq_dir, name), gt_paths.get(sid)))
    if not inputs:
        raise ValueError(f'No images ({", ".join(IMAGE_EXTENSIONS)}) in {lq_dir}.')
    return inputs


def _invalidate(*markers):
    """Remove the finished-markers of later steps of an item that is being redone."""
    for marker in markers:
        if os.path.isfile(marker):
            os.remove(marker)


def _progress(iterable, desc, total=None, enabled=True):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit='img')


def _fail(report, bar, sid, err):
    report.failed[sid] = f'{type(err).__name__}: {err}'
    bar.write(f'[{report.step}] {sid} failed: {report.failed[sid]}')


def _run_resumable(work, report, sids, finished, process, overwrite=False, progress=True, desc=None, workers=1,
                   shard=None):
    """The loop every step shares: skip finished items, process the others, report failures per item.

    Args:
        work (WorkFolder): The work folder (its error file is rewritten at the end).
        report (StepReport): Filled with done, skipped and failed sample ids.
        sids (Iterable[str]): Sample ids to go through.
        finished (callable): ``finished(sid)`` -> path of the item's finished-marker for this step.
        process (callable): ``process(sid)`` does the step for one item and writes its marker last.
        overwrite (bool): Redo finished items.
        progress (bool): Show a progress bar.
        workers (int): Items processed at once in a thread pool (for steps waiting on a server, such as VLM
            scoring); the report lists the ids in input order whatever order they finish in.
        shard (DataShard, optional): This process's share (:mod:`dspo_basicsr.utils.distributed`): rank r of W
            takes the unfinished ids r, r + W, ...; only rank 0 shows a progress bar (of all ranks' items), each
            rank writes ``errors/<step>.rank<r>.json`` and the last rank to finish merges them. The ranks wait
            for each other after listing and at the end (not in a slurm job array).

    Returns:
        StepReport: ``report`` (this rank's items when sharded).
    """
    from dspo_basicsr.utils.distributed import DataShard

    shard = shard or DataShard()
    sids = list(sids)
    todo = []
    for sid in sids:
        if not overwrite and os.path.isfile(finished(sid)):
            report.skipped.append(sid)
        else:
            todo.append(sid)
    if shard.array:  # no common start: every task shards all ids the same way and skips the finished ones
        unfinished = set(todo)
        mine = [sid for sid in shard.take(sids) if sid in unfinished]
    else:
        mine = shard.take(todo)
    if shard.distributed:
        _remove(work.rank_errors_json(report.step, shard.rank))
        shard.barrier()  # every rank has listed the unfinished items before any rank finishes one
    bar = _progress(None, desc or report.step, total=len(sids), enabled=progress and shard.is_main)
    bar.update(len(report.skipped))
    others = GlobalCount(todo, finished, bar, len(report.skipped)) if shard.distributed and shard.is_main else None
    outcome = {}
    if workers > 1:
        _process_concurrently(mine, process, outcome, bar, report.step, workers, others)
    else:
        for sid in mine:
            outcome[sid] = _attempt(process, sid)
            _show(bar, report.step, sid, outcome[sid], others)
    if others:
        others.refresh(force=True)
    bar.close()
    for sid in mine:
        if outcome[sid] is None:
            report.done.append(sid)
        else:
            report.failed[sid] = f'{type(outcome[sid]).__name__}: {outcome[sid]}'
    if shard.distributed:
        _merge_rank_errors(work, report, shard, sids)
        shard.barrier()  # a next step in the same launch lists the items of every rank's shard
    else:
        work.write_errors(report)
        for name in os.listdir(os.path.dirname(work.errors_json(report.step))):  # of an earlier sharded run
            if re.fullmatch(rf'{re.escape(report.step)}\.rank\d+\.json', name):
                _remove(os.path.join(os.path.dirname(work.errors_json(report.step)), name))
    return report


def _attempt(process, sid):
    try:
        process(sid)
    except Exception as err:  # noqa: BLE001  (one bad image must not stop the others)
        return err
    return None


def _show(bar, step, sid, error, others):
    if error is not None:
        bar.write(f'[{step}] {sid} failed: {type(error).__name__}: {error}')
    if others:
        others.refresh()
    else:
        bar.update(1)


class GlobalCount:
    """Rank 0's progress over every rank's items: the finished-markers, counted at most once a second."""

    def __init__(self, todo, finished, bar, skipped):
        self.todo, self.finished, self.bar, self.skipped, self.last = todo, finished, bar, skipped, 0.0

    def refresh(self, force=False):
        import time
        if not force and time.monotonic() - self.last < 1.0:
            return
        self.last = time.monotonic()
        self.bar.n = self.skipped + sum(os.path.isfile(self.finished(sid)) for sid in self.todo)
        self.bar.refresh()


def _process_concurrently(sids, process, outcome, bar, step, workers, others):
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(workers) as pool:
        pending, queue = {}, iter(sids)
        while True:
            while len(pending) < 2 * workers:  # a bounded queue: items are read only shortly before their turn
                sid = next(queue, None)
                if sid is None:
                    break
                pending[pool.submit(_attempt, process, sid)] = sid
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                sid = pending.pop(future)
                outcome[sid] = future.result()
                _show(bar, step, sid, outcome[sid], others)


def _remove(path):
    if os.path.isfile(path):
        os.remove(path)


def _merge_rank_errors(work, report, shard, sids):
    """Write this rank's failures; the rank that finds every rank's file merges them into ``errors/<step>.json``.

    A rank that died leaves its file missing, so nothing is merged; the next run lists its items again anyway.
    """
    step = report.step
    os.makedirs(os.path.dirname(work.errors_json(step)), exist_ok=True)
    _write_json(work.rank_errors_json(step, shard.rank), {'world_size': shard.world_size, 'failed': report.failed})
    paths = [work.rank_errors_json(step, rank) for rank in range(shard.world_size)]
    if not all(os.path.isfile(path) for path in paths):
        return
    failed = {}
    for path in paths:
        try:
            failed.update(_read_json(path)['failed'])
        except (OSError, ValueError, KeyError):
            return  # a rank is writing its file right now; it merges after writing
    _write_json(work.errors_json(step), {sid: failed[sid] for sid in sids if sid in failed})


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
        _invalidate(work.candidates_json(sid), work.seg_json(sid), work.instances_json(sid))
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
        _write_json(work.candidates_json(sid), record)  # last: marks the item finished

    return _run_resumable(work, StepReport('candidates'), list(paths), work.candidates_json, process, overwrite,
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
        record = _read_json(work.candidates_json(sid))
        use_gt = record.get('has_gt') and source in ('auto', 'gt')
        if source == 'gt' and not record.get('has_gt'):
            raise ValueError('source is gt but this item has no GT image.')
        path = work.gt_png(sid) if use_gt else work.candidate_png(sid, record['default_candidate'])
        seg = segment_instances(segmenter, read_image(path), min_area=min_area, uncovered=uncovered)
        _invalidate(work.seg_json(sid), work.instances_json(sid))
        write_image(work.seg_png(sid), seg)
        describe = getattr(segmenter, 'describe', None)
        _write_json(work.seg_json(sid), {
            'num_instances': int(seg.max()) + 1, 'areas': np.bincount(seg.ravel()).tolist(),
            'segmented': 'gt' if use_gt else f'c{record["default_candidate"]}', 'min_area': min_area,
            'uncovered': uncovered, 'segmenter': describe() if callable(describe) else type(segmenter).__name__})

    return _run_resumable(work, StepReport('seg'), work.sids('candidates'), work.seg_json, process, overwrite,
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
        _write_json(work.instances_json(sid), {
            'instances': instances, 'negative_prompt': negative_prompt_from_instances(instances, base),
            'top_k': top_k, 'scorer': scorer.describe()})

    workers = int(max_concurrency or getattr(scorer, 'max_concurrency', 1))
    return _run_resumable(work, StepReport('instances'), work.sids('seg'), work.instances_json, process, overwrite,
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
    scales = {_read_json(work.candidates_json(sid)).get('scale') for sid in finished}
    if len(scales) != 1:
        raise ValueError(f'Items of {work.root} have different scales {sorted(scales)}; one set holds one scale.')
    stored = set(resumable_ids(path)) if resume else set()  # an interrupted build keeps these
    report.skipped = [sid for sid in finished if sid in stored]
    report.done = [sid for sid in finished if sid not in stored]
    samples = (work.load_sample(sid) for sid in report.done)
    preference_set = write_preference_lmdb(path, samples, scale=scales.pop(), overwrite=overwrite, resume=resume,
                                           total=len(report.done), progress=progress, **write_opt)
    return preference_set, report


def run_interruptible(main):
    """Run a data script's ``main``; Ctrl-C ends it with one line, not a traceback.

    Every step commits each finished item, so what was done survives and a rerun resumes from it.

    Returns:
        int: ``main()``'s exit code, or 130 after Ctrl-C.
    """
    try:
        return main()
    except KeyboardInterrupt:
        print('interrupted: rerun to resume', file=sys.stderr, flush=True)
        return 130
