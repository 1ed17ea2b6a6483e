"""The loop every preference-data step shares: resumable, per-item failures, threads, sharding over ranks.

A failed item is reported (progress bar, ``errors/<step>.json``, the step's :class:`StepReport`) and left
unfinished; the other items go on. A rerun skips every item whose finished-marker is there.
"""
import os
import re
import sys
from dataclasses import dataclass, field

from dspo_basicsr.preference.redaction import redact
from dspo_basicsr.preference.work_folder import read_json, write_json

__all__ = ['StepReport', 'run_resumable', 'invalidate', 'run_interruptible']


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


def invalidate(*markers):
    """Remove the finished-markers of later steps of an item that is being redone."""
    for marker in markers:
        if os.path.isfile(marker):
            os.remove(marker)


def _progress(iterable, desc, total=None, enabled=True):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit='img')


def run_resumable(work, report, sids, finished, process, overwrite=False, progress=True, desc=None, workers=1,
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
            report.failed[sid] = redact(f'{type(outcome[sid]).__name__}: {outcome[sid]}')
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
        bar.write(redact(f'[{step}] {sid} failed: {type(error).__name__}: {error}'))
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
    write_json(work.rank_errors_json(step, shard.rank), {'world_size': shard.world_size, 'failed': report.failed})
    paths = [work.rank_errors_json(step, rank) for rank in range(shard.world_size)]
    if not all(os.path.isfile(path) for path in paths):
        return
    failed = {}
    for path in paths:
        try:
            failed.update(read_json(path)['failed'])
        except (OSError, ValueError, KeyError):
            return  # a rank is writing its file right now; it merges after writing
    write_json(work.errors_json(step), {sid: failed[sid] for sid in sids if sid in failed})


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
