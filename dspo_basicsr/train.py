"""The train pipeline the ``basicsr train`` command runs (the shape of Real-ESRGAN's ``realesrgan/train.py``).

It follows ``basicsr.train.train_pipeline`` (1.4.2) step by step, with the same folders, files and logs, and
owns the loop for what BasicSR's does not do:

* one experiment at a time: the run holds an exclusive OS lock on ``experiments/.<name>.lock`` before anything
  is renamed or written (:class:`ExperimentLock`); a second run of the same name is refused in one line naming
  the running process; the OS releases the lock when the holder dies, so a killed run never blocks its resume;
* ``--force_yml`` takes effect before the random seed is set (1.4.2 seeds first, so ``manual_seed=1`` was
  logged and ignored);
* SIGTERM / SIGINT finish the current optimizer update (the whole gradient-accumulation window), write the
  checkpoint and training state of that iteration and exit with 128 + the signal; a second signal exits at
  once (:class:`GracefulStop`); a torchrun worker exits when its launcher dies (:func:`exit_with_launcher`);
* a run in which every optimizer update was skipped (non-finite losses or gradients) is an error
  (:class:`AllUpdatesSkippedError`), not a success;
* a resume refuses a preference set whose content changed since the run started
  (:func:`check_train_set`: ``training_states/train_set.json`` holds the set's content digest).

It also owns the train loader: a :class:`ResumableSampler` that continues an interrupted epoch exactly, enough
epochs to reach ``total_iter``, and the dataset's ``collate_fn``. The options are prepared, the process group
started (gloo without CUDA) and the state to resume from chosen by :mod:`dspo_basicsr.utils` (``options``,
``distributed``, ``resume``); BasicSR's own functions are called, never replaced.
"""
import datetime
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from os import path as osp

import torch


class ExperimentLockedError(RuntimeError):
    """Another running process holds the experiment of the same name."""


class AllUpdatesSkippedError(RuntimeError):
    """A run ended without a single applied optimizer update."""


class ExperimentLock:
    """An exclusive ``fcntl.flock`` on ``experiments/.<name>.lock``, held for the life of the run.

    The file sits next to the experiment folder, not inside it, because BasicSR renames an existing folder
    to ``<name>_archived_<time>`` when a run starts afresh. The file keeps the holder's pid, host and start
    time so that a refused run can name it; the lock itself is the kernel's and goes with the process.
    """

    def __init__(self, root_path, name):
        self.path = osp.join(root_path, 'experiments', f'.{name}.lock')
        self.name = name
        self._file = None

    def acquire(self):
        """Take the lock, or raise :class:`ExperimentLockedError` naming the process that holds it."""
        os.makedirs(osp.dirname(self.path), exist_ok=True)
        f = open(self.path, 'a+')
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise ExperimentLockedError(
                f"experiment '{self.name}' is in use by {holder} ({self.path}); wait for it to end, stop it, or "
                'give this run another name.') from None
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        f.write(f'pid {os.getpid()} on {socket.gethostname()}, started {started}\n')
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


class GracefulStop:
    """SIGTERM / SIGINT handlers: the first asks the loop to stop after the current update, a second exits now.

    ``requested`` is the signal number of the first signal (0 while none came).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = 0
        self.signals = signals
        self._previous = {}

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested:
            print(f'basicsr train: second {signal.Signals(signum).name}, exiting now without a checkpoint.',
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)  # no cleanup: a collective waiting on a dead peer would never return
        self.requested = signum

    def agreed(self, device, distributed):
        """The signal to stop on, agreed by every rank (the largest one any rank received), 0 to go on."""
        if not distributed:
            return self.requested
        flag = torch.tensor([self.requested], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def exit_with_launcher(poll_s=0.5, grace_s=120):
    """Make this torchrun worker stop when its launcher dies (a SIGKILLed launcher cannot stop its workers).

    A daemon thread watches the parent pid; when the launcher is gone it sends this process SIGTERM (which
    checkpoints through :class:`GracefulStop`) and, should that hang on a dead peer, exits after ``grace_s``.
    """
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name='launcher-watchdog', daemon=True).start()


def _enlarged_sampler_class():
    from basicsr.data.data_sampler import EnlargedSampler
    return EnlargedSampler


class ResumableSampler(_enlarged_sampler_class()):
    """BasicSR's ``EnlargedSampler`` that can continue an epoch where an interrupted run left it.

    After :meth:`resume_at`, the iteration over the resumed epoch skips the batches already trained on and
    restores the saved RNG states just before the first index is handed out: lazily, because the loader draws
    its own seed between ``iter()`` and the first batch, which the interrupted run did not do mid-epoch.
    """

    def __init__(self, dataset, num_replicas, rank, ratio=1):
        super().__init__(dataset, num_replicas, rank, ratio)
        self.pending = None

    def resume_at(self, epoch, current_iter, batch_size, rng=None):
        """Continue ``epoch`` after ``current_iter`` iterations of ``batch_size`` (the last partial batch dropped)."""
        self.pending = {'epoch': epoch, 'iter': current_iter, 'batch_size': batch_size, 'rng': rng}

    def __iter__(self):
        from dspo_basicsr.utils.rng import set_rng_states
        g = torch.Generator()
        g.manual_seed(self.epoch)
        indices = torch.randperm(self.total_size, generator=g).tolist()
        indices = [v % len(self.dataset) for v in indices][self.rank:self.total_size:self.num_replicas]
        pending = self.pending
        if pending is not None and pending['epoch'] == self.epoch and pending['batch_size']:
            per_epoch = self.num_samples // pending['batch_size']
            done = pending['iter'] - self.epoch * per_epoch
            if 0 <= done <= per_epoch:
                indices = indices[done * pending['batch_size']:]
            if pending['rng'] is not None:
                set_rng_states(pending['rng'])
            self.pending = None
        yield from indices


def create_train_val_dataloader(opt, logger):
    """``basicsr.train.create_train_val_dataloader`` with a :class:`ResumableSampler`, the datasets' own
    ``collate_fn``, and enough epochs to reach ``total_iter`` (1.4.2 counts the dropped last batch)."""
    from dspo_basicsr.utils.dataloader import build_dataloader

    from basicsr.data import build_dataset

    def loader(dataset, dataset_opt, sampler):
        return build_dataloader(dataset, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'], sampler=sampler,
                                seed=opt['manual_seed'])

    train_loader, train_sampler, val_loaders, total_epochs, total_iters = None, None, [], 0, 0
    for phase, dataset_opt in opt['datasets'].items():
        if phase == 'train':
            ratio = dataset_opt.get('dataset_enlarge_ratio', 1)
            train_set = build_dataset(dataset_opt)
            train_sampler = ResumableSampler(train_set, opt['world_size'], opt['rank'], ratio)
            train_loader = loader(train_set, dataset_opt, train_sampler)
            total_iters = int(opt['train']['total_iter'])
            per_epoch = math.ceil(len(train_set) * ratio / (dataset_opt['batch_size_per_gpu'] * opt['world_size']))
            total_epochs = math.ceil(total_iters / per_epoch)
            if len(train_loader):
                total_epochs = max(total_epochs, math.ceil(total_iters / len(train_loader)))
            logger.info('Training statistics:'
                        f'\n\tNumber of train images: {len(train_set)}'
                        f'\n\tDataset enlarge ratio: {ratio}'
                        f'\n\tBatch size per gpu: {dataset_opt["batch_size_per_gpu"]}'
                        f'\n\tWorld size (gpu number): {opt["world_size"]}'
                        f'\n\tRequire iter number per epoch: {per_epoch}'
                        f'\n\tTotal epochs: {total_epochs}; iters: {total_iters}.')
        elif phase.split('_')[0] == 'val':
            val_set = build_dataset(dataset_opt)
            val_loaders.append(loader(val_set, dataset_opt, None))
            logger.info(f'Number of val images/folders in {dataset_opt["name"]}: {len(val_set)}')
        else:
            raise ValueError(f'Dataset phase {phase} is not recognized.')
    return train_loader, train_sampler, val_loaders, total_epochs, total_iters


#: the train set a run started on (its content digest), next to the training states
TRAIN_SET_RECORD = 'train_set.json'


def train_set_record(train_set):
    """``{'dataroot', 'content_digest'}`` of the preference set a run trains on; None for a dataset without a
    content digest (BasicSR's datasets, or a set written before digests)."""
    store = getattr(train_set, 'store', None)
    header = getattr(store, 'header', None) or {}
    digest = header.get('content_digest') if isinstance(header, dict) else None
    return None if digest is None else {'dataroot': str(store.path), 'content_digest': digest}


def check_train_set(opt, train_set, resumed):
    """Record the train set's content digest when a run starts; refuse a resume on a set whose content changed.

    Raises:
        ResumeStateError: The run is resumed and ``train_set.json`` names another content digest than the set's
            now (it was rebuilt or replaced); nothing was trained.
    """
    from dspo_basicsr.utils.atomic_write import atomic_json_dump
    from dspo_basicsr.utils.resume import ResumeStateError
    record = train_set_record(train_set)
    if record is None:
        return
    path = osp.join(opt['path']['training_states'], TRAIN_SET_RECORD)
    if resumed and osp.isfile(path):
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
        if saved.get('content_digest') != record['content_digest']:
            raise ResumeStateError(
                f"{path}: this run trained on {saved.get('dataroot')} with content digest "
                f"{saved.get('content_digest')}, but {record['dataroot']} now has {record['content_digest']} (the set "
                'was rebuilt or replaced). Resume on the set it trained on, or start a new experiment name with '
                'path.pretrain_network_g set to its latest net_g.')
    elif opt['rank'] == 0:
        atomic_json_dump(record, path, indent=1)


def resume_sampler(opt, sampler, resume_state):
    """Set ``sampler`` to continue the interrupted epoch with this rank's saved RNG states (exact resume)."""
    rngs = resume_state.get('rng')
    rng = None
    if rngs and len(rngs) == opt.get('world_size', 1):
        rng = rngs[opt.get('rank', 0)]
    elif rngs and opt.get('rank', 0) == 0:
        print(f"resume: the state was written by {len(rngs)} processes, this run has {opt.get('world_size', 1)}; "
              'RNG states are not restored (batches and noise differ from the interrupted run).', flush=True)
    sampler.resume_at(resume_state['epoch'], resume_state['iter'], resume_state.get('batch_size_per_gpu'), rng)


def build_model(opt):
    """``basicsr.models.build_model``, with :class:`~dspo_basicsr.models.base_model.DSPOBaseModel` in front of a
    BasicSR model class (rank-0 atomic checkpoints, exact-resume states, any optimizer, DDP on CPU), and a
    hint naming the closest registered models when ``model_type`` is not one (used by ``basicsr test`` too)."""
    from dspo_basicsr.models.base_model import with_plugin_base
    from dspo_basicsr.utils.registry import registry_get

    from basicsr.utils import get_root_logger
    from basicsr.utils.registry import MODEL_REGISTRY
    model = with_plugin_base(registry_get(MODEL_REGISTRY, opt['model_type']))(opt)
    get_root_logger().info(f'Model [{model.__class__.__name__}] is created.')
    return model


def _lock_experiment(opt, root_path):
    """Rank 0 takes the experiment lock; every rank learns whether it did (and raises together if not)."""
    lock, refusal = None, None
    if opt['rank'] == 0:
        try:
            lock = ExperimentLock(root_path, opt['name']).acquire()
        except ExperimentLockedError as err:
            refusal = str(err)
    if opt['dist']:
        shared = [refusal]
        torch.distributed.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise ExperimentLockedError(refusal)
    return lock


def close_process_group():
    """End a distributed run together: every rank waits for the others, then the process group is destroyed.

    Left to interpreter exit, gloo's background threads can be torn down while still joinable, and a rank then
    dies of SIGABRT ("terminate called without an active exception") after a complete run.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_pipeline(root_path, opt, args):
    """Train as ``basicsr.train.train_pipeline`` does, with the lock, graceful stops and the all-skipped check.

    Args:
        root_path (str): Where ``experiments/`` and ``tb_logger/`` are written.
        opt (dict): The option file's content with ``--force_yml`` applied.
        args (argparse.Namespace): ``opt`` (the file path), ``launcher``, ``auto_resume``, ``debug``.

    Returns:
        int: 0 when training reached ``train.total_iter``; 128 + the signal after a graceful stop.

    Raises:
        ExperimentLockedError: Another process runs the experiment; nothing was written.
        AllUpdatesSkippedError: Every optimizer update of the run was skipped.
        ResumeStateError: No state to resume from, or the train set changed since the run started.
    """
    from dspo_basicsr.utils.options import parse_options
    from dspo_basicsr.utils.resume import load_resume_state

    from basicsr.data.prefetch_dataloader import CPUPrefetcher, CUDAPrefetcher
    from basicsr.train import init_tb_loggers
    from basicsr.utils import (
        AvgTimer,
        MessageLogger,
        get_env_info,
        get_root_logger,
        get_time_str,
        make_exp_dirs,
        mkdir_and_rename,
    )
    from basicsr.utils.options import copy_opt_file, dict2str

    stop = GracefulStop().install()
    if args.launcher == 'pytorch':
        exit_with_launcher()
    opt = parse_options(root_path, opt, args, is_train=True)
    opt['root_path'] = root_path
    torch.backends.cudnn.benchmark = True

    lock = _lock_experiment(opt, root_path)  # before anything is renamed or written
    try:
        resume_state = load_resume_state(opt)
        if resume_state is None:
            make_exp_dirs(opt)
            if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name'] and opt['rank'] == 0:
                mkdir_and_rename(osp.join(opt['root_path'], 'tb_logger', opt['name']))
        copy_opt_file(args.opt, opt['path']['experiments_root'])

        log_file = osp.join(opt['path']['log'], f"train_{opt['name']}_{get_time_str()}.log")
        logger = get_root_logger(logger_name='basicsr', log_level=logging.INFO, log_file=log_file)
        logger.info(get_env_info())
        logger.info(dict2str(opt))
        tb_logger = init_tb_loggers(opt)

        train_loader, train_sampler, val_loaders, total_epochs, total_iters = create_train_val_dataloader(opt, logger)
        check_train_set(opt, train_loader.dataset, resumed=resume_state is not None)
        model = build_model(opt)
        if resume_state:
            resume_sampler(opt, train_sampler, resume_state)
            model.resume_training(resume_state)
            logger.info(f"Resuming training from epoch: {resume_state['epoch']}, iter: {resume_state['iter']}.")
            start_epoch, current_iter = resume_state['epoch'], resume_state['iter']
        else:
            start_epoch, current_iter = 0, 0
        msg_logger = MessageLogger(opt, current_iter, tb_logger)

        prefetch_mode = opt['datasets']['train'].get('prefetch_mode')
        if prefetch_mode is None or prefetch_mode == 'cpu':
            prefetcher = CPUPrefetcher(train_loader)
        elif prefetch_mode == 'cuda':
            prefetcher = CUDAPrefetcher(train_loader, opt)
            logger.info(f'Use {prefetch_mode} prefetch dataloader')
            if opt['datasets']['train'].get('pin_memory') is not True:
                raise ValueError('Please set pin_memory=True for CUDAPrefetcher.')
        else:
            raise ValueError(f"Wrong prefetch_mode {prefetch_mode}. Supported ones are: None, 'cuda', 'cpu'.")

        # an optimizer update spans k iterations (DSPOModel's gradient accumulation); stops wait for its end
        per_update = int(getattr(model, 'accumulate', 1) or 1)
        logger.info(f'Start training from epoch: {start_epoch}, iter: {current_iter}')
        data_timer, iter_timer = AvgTimer(), AvgTimer()
        start_time = time.time()
        stopped = 0
        epoch = start_epoch
        for epoch in range(start_epoch, total_epochs + 1):
            train_sampler.set_epoch(epoch)
            prefetcher.reset()
            train_data = prefetcher.next()
            while train_data is not None:
                data_timer.record()
                current_iter += 1
                if current_iter > total_iters:
                    break
                model.update_learning_rate(current_iter, warmup_iter=opt['train'].get('warmup_iter', -1))
                model.feed_data(train_data)
                model.optimize_parameters(current_iter)
                iter_timer.record()
                if current_iter == 1:
                    msg_logger.reset_start_time()
                if current_iter % opt['logger']['print_freq'] == 0:
                    log_vars = {'epoch': epoch, 'iter': current_iter, 'lrs': model.get_current_learning_rate(),
                                'time': iter_timer.get_avg_time(), 'data_time': data_timer.get_avg_time()}
                    log_vars.update(model.get_current_log())
                    msg_logger(log_vars)
                if current_iter % per_update == 0:
                    stopped = stop.agreed(model.device, opt['dist'])
                if stopped:
                    logger.info('Saving models and training states.')
                    model.save(epoch, current_iter)
                    break
                if current_iter % opt['logger']['save_checkpoint_freq'] == 0:
                    logger.info('Saving models and training states.')
                    model.save(epoch, current_iter)
                if opt.get('val') is not None and current_iter % opt['val']['val_freq'] == 0:
                    if len(val_loaders) > 1:
                        logger.warning('Multiple validation datasets are *only* supported by SRModel.')
                    for val_loader in val_loaders:
                        model.validation(val_loader, current_iter, tb_logger, opt['val']['save_img'])
                data_timer.start()
                iter_timer.start()
                train_data = prefetcher.next()
            if stopped:
                break

        if stopped:
            name = signal.Signals(stopped).name
            logger.info(f'{name}: stopped at iteration {current_iter}.')
            if opt['rank'] == 0:
                print(f"basicsr train: {name}: saved iteration {current_iter} to {opt['path']['experiments_root']}; "
                      'resume with --auto_resume.', file=sys.stderr, flush=True)
            if tb_logger:
                tb_logger.close()
            return 128 + stopped

        applied, skipped = getattr(model, 'updates_applied', None), getattr(model, 'nonfinite_total', 0)
        if applied == 0 and skipped:
            raise AllUpdatesSkippedError(
                f'all {skipped} optimizer updates of this run were skipped (non-finite loss or gradient), the '
                'weights are unchanged; lower the learning rate or beta, or check the preference set.')

        consumed_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
        logger.info(f'End of training. Time consumed: {consumed_time}')
        logger.info('Save the latest model.')
        model.save(epoch=-1, current_iter=-1)
        if opt.get('val') is not None:
            for val_loader in val_loaders:
                model.validation(val_loader, current_iter, tb_logger, opt['val']['save_img'])
        if tb_logger:
            tb_logger.close()
        close_process_group()
        return 0
    finally:
        if lock is not None:
            lock.release()
        stop.uninstall()
