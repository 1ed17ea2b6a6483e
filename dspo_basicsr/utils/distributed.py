"""Processes of a run: the process group of training, and the share of a data job each process does.

Training (``basicsr train|test --launcher none|pytorch|slurm``): :func:`init_dist` starts the process group
as BasicSR's ``init_dist`` does, with nccl when CUDA is present and gloo without, on the process's
``LOCAL_RANK``; :func:`is_main_process`, :func:`wait_for_all_ranks` and :func:`gather_in_sample_order` are
what the models and pipelines need of it, and all are no-ops in one process.

Data jobs: a data step started as G processes (``torchrun --nproc_per_node=G``, or ``srun`` with G tasks per
node on several nodes, or a slurm job array) splits its work by sample id: rank ``r`` of ``W`` takes the ids
``r, r + W, r + 2W, ...`` of the list every rank computed at the same moment, and runs on GPU ``LOCAL_RANK``.
The ranks meet once, at a barrier, after listing (so an item finished by a fast rank does not change another
rank's list); for that only, a CPU (gloo) process group is started. Slurm job arrays have no common start:
their tasks take ``r, r + W, ...`` of *all* ids and skip the finished ones.

This module imports nothing from the rest of the package, so any script can use it.
"""
import argparse
import os
from dataclasses import dataclass
from datetime import timedelta

__all__ = ['DataShard', 'data_shard', 'add_launcher_argument', 'init_dist', 'distributed_backend', 'training_device',
           'is_main_process', 'wait_for_all_ranks', 'gather_in_sample_order']

LAUNCHERS = ('none', 'pytorch', 'slurm')


@dataclass(frozen=True)
class DataShard:
    """Rank, world size and local rank of this process in a data job.

    Attributes:
        rank (int): Global rank r.
        world_size (int): Number of processes W.
        local_rank (int): Rank on this node (the GPU index).
        launcher (str): ``none``, ``pytorch`` or ``slurm``.
        array (bool): Part of a slurm job array (no barrier; shards are taken over all ids).
    """
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = 'none'
    array: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def take(self, ids):
        """This rank's ids: ``ids[r], ids[r + W], ...``."""
        return list(ids)[self.rank::self.world_size]

    def device(self, device):
        """``cuda`` -> ``cuda:LOCAL_RANK``; any other device (or one with an index) unchanged."""
        return f'cuda:{self.local_rank}' if str(device) == 'cuda' else device

    def barrier(self):
        """Wait for every rank (no-op alone or in a job array)."""
        import torch.distributed as dist
        if self.distributed and not self.array and dist.is_available() and dist.is_initialized():
            dist.barrier()


def _env_int(name, launcher):
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f'--launcher {launcher} needs the environment variable {name}; start the script with '
                           f'{"torchrun" if launcher == "pytorch" else "srun"} or use --launcher none.')
    return int(value)


def data_shard(launcher='none', port=None, timeout_hours=24):
    """The :class:`DataShard` of this process, from the launcher's environment variables.

    ``pytorch`` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (set by torchrun); ``slurm`` reads
    ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, and within a job array also
    ``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_MIN`` (each array task is then
    ``SLURM_NTASKS`` ranks of a larger world). With more than one rank (and no array) a gloo process group is
    started for the start barrier.

    Args:
        launcher (str): ``none`` | ``pytorch`` | ``slurm``.
        port (int, optional): Rendezvous port under slurm (default ``MASTER_PORT`` or 29500).
        timeout_hours (float): How long a rank waits at the barrier for the others.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'--launcher must be one of {LAUNCHERS}, got {launcher!r}.')
    if launcher == 'none':
        return DataShard()
    if launcher == 'pytorch':
        shard = DataShard(_env_int('RANK', launcher), _env_int('WORLD_SIZE', launcher),
                          int(os.environ.get('LOCAL_RANK', 0)), launcher)
    else:
        rank, world = _env_int('SLURM_PROCID', launcher), _env_int('SLURM_NTASKS', launcher)
        local_rank = int(os.environ.get('SLURM_LOCALID', 0))
        array = 'SLURM_ARRAY_TASK_ID' in os.environ
        if array:
            task = int(os.environ['SLURM_ARRAY_TASK_ID']) - int(os.environ.get('SLURM_ARRAY_TASK_MIN', 0))
            rank, world = task * world + rank, int(os.environ['SLURM_ARRAY_TASK_COUNT']) * world
        shard = DataShard(rank, world, local_rank, launcher, array)
    if shard.distributed and not shard.array:
        _start_process_group(shard, port, timeout_hours)
    return shard


def _start_process_group(shard, port, timeout_hours):
    import subprocess

    import torch.distributed as dist
    if dist.is_initialized():
        return
    if shard.launcher == 'slurm':
        nodes = os.environ.get('SLURM_NODELIST', 'localhost')
        os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(f'scontrol show hostname {nodes} | head -n1'))
        os.environ['MASTER_PORT'] = str(port or os.environ.get('MASTER_PORT', 29500))
    dist.init_process_group('gloo', init_method='env://', rank=shard.rank, world_size=shard.world_size,
                            timeout=timedelta(hours=timeout_hours))


def add_launcher_argument(parser):
    """Add ``--launcher none|pytorch|slurm`` (as ``basicsr train``) to an argparse parser."""
    if not isinstance(parser, argparse.ArgumentParser):
        raise TypeError('add_launcher_argument expects an argparse.ArgumentParser.')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='run as one of several processes started by torchrun (pytorch) or srun (slurm); '
                             'each takes every W-th unfinished sample')
    return parser


# -- the process group of training -------------------------------------------------------------------------

def distributed_backend():
    """nccl when this process has CUDA, gloo without (BasicSR 1.4.2 always asks for nccl)."""
    import torch
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def training_device():
    """The device this process trains on: its CUDA device when CUDA is present, else the CPU."""
    import torch
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def init_dist(launcher, **kwargs):
    """Start the process group of ``--launcher pytorch|slurm`` (``basicsr.utils.dist_util.init_dist``'s job).

    The backend is :func:`distributed_backend` (a ``backend`` in ``kwargs``, e.g. from ``dist_params``, is
    ignored: nccl cannot run without CUDA); the CUDA device is ``LOCAL_RANK`` (1.4.2 takes ``RANK`` modulo
    the GPUs of the node, wrong on a second node with fewer GPUs).

    Args:
        launcher (str): ``pytorch`` (torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or ``slurm`` (srun).
        **kwargs: ``port`` under slurm; other keys go to ``init_process_group`` under torchrun.
    """
    import torch.multiprocessing as mp
    kwargs.pop('backend', None)
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    if launcher == 'pytorch':
        _init_dist_pytorch(**kwargs)
    elif launcher == 'slurm':
        _init_dist_slurm(**kwargs)
    else:
        raise ValueError(f'--launcher must be pytorch or slurm to start a process group, got {launcher!r}.')


def _init_dist_pytorch(**kwargs):
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=distributed_backend(), **kwargs)


def _init_dist_slurm(port=None):
    import subprocess

    import torch
    import torch.distributed as dist
    proc_id = int(os.environ['SLURM_PROCID'])
    num_gpus = torch.cuda.device_count()
    local_rank = int(os.environ.get('SLURM_LOCALID', proc_id % max(num_gpus, 1)))
    if num_gpus:
        torch.cuda.set_device(local_rank)
    node_list = os.environ['SLURM_NODELIST']
    os.environ.setdefault('MASTER_ADDR', subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1'))
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    os.environ.setdefault('MASTER_PORT', '29500')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['LOCAL_RANK'] = str(local_rank)
    os.environ['RANK'] = str(proc_id)
    dist.init_process_group(backend=distributed_backend())


def is_main_process():
    """True on rank 0 of a distributed run and in a single-process run."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wait_for_all_ranks():
    """Barrier of a distributed run (no-op in one process): no rank goes on before rank 0 has written."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_in_sample_order(results):
    """``[(sample index, result), ...]`` of every rank, as one list of results in sample order (on all ranks)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    return [result for _, result in sorted(results, key=lambda r: r[0])]
