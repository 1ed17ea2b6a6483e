"""What basicsr 1.4.2 needs on today's torch / torchvision, and the helpers our pipeline shares.

:func:`apply` runs on ``import dspo_basicsr`` and is idempotent. It patches no BasicSR class: the base model
behaviour (rank-0 atomic checkpoints, exact-resume states, any optimizer, DDP on CPU) is
:class:`dspo_basicsr.models.base_model.DSPOBaseModel`, and the train loop (experiment lock, resume selection,
resumable sampler, epochs that reach ``total_iter``, dataset ``collate_fn``, graceful stops) is
:mod:`dspo_basicsr.train`. A BasicSR ``SRModel`` trained with ``basicsr.train`` writes the same bytes with
and without ``import dspo_basicsr`` (``tests/test_train_pipeline.py``).

Still applied by :func:`apply` (moving them is open work):
    * ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17) is aliased to its
      successor before basicsr is imported (basicsr 1.4.2 does not import without it).
    * BasicSR's option reader uses a safe, ordered YAML loader (a Python tag is an error), and ``--force_yml``
      values are read as YAML literals (1.4.2 ``eval``s them): ``basicsr test`` still runs BasicSR's
      ``parse_options``.
    * ``--launcher pytorch|slurm`` uses nccl with CUDA and gloo without, and the process's ``LOCAL_RANK``.
    * A registry lookup that fails names the registry and the closest registered names.
    * A dataset that defines ``collate_fn`` gets it in BasicSR's data loaders (``basicsr test``).
    * ``calculate_niqe`` refuses images under :data:`NIQE_MIN_SIZE` px with a message (1.4.2's SVD fails).

Helpers used by the models and :mod:`dspo_basicsr.train`: :func:`atomic_torch_save`, :func:`rng_states`,
:func:`newest_usable_state` / :func:`load_resume_state` (``--auto_resume`` takes the newest state whose own
file and network files load and names in one line the newer ones it skipped).
"""
import collections
import difflib
import os
import random
import sys

import yaml

_applied = False


class SafeOrderedLoader(yaml.SafeLoader):
    """PyYAML's safe loader returning ``OrderedDict`` mappings, as BasicSR's option code expects."""


def _construct_ordered_mapping(loader, node):
    loader.flatten_mapping(node)
    return collections.OrderedDict(loader.construct_pairs(node))


SafeOrderedLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_ordered_mapping)


class OrderedDumper(yaml.SafeDumper):
    """Safe dumper writing ``OrderedDict`` as a plain mapping."""


OrderedDumper.add_representer(
    collections.OrderedDict, lambda dumper, data: dumper.represent_dict(data.items()))


def safe_ordered_yaml():
    """Replacement of ``basicsr.utils.options.ordered_yaml``: (Loader, Dumper), both safe."""
    return SafeOrderedLoader, OrderedDumper


def _alias_functional_tensor():
    if 'torchvision.transforms.functional_tensor' in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision still has it)
    except ImportError:
        from torchvision.transforms import _functional_tensor
        sys.modules['torchvision.transforms.functional_tensor'] = _functional_tensor


def training_device():
    """The device this process trains on: its CUDA device when CUDA is present, else the CPU."""
    import torch
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


class ResumeStateError(RuntimeError):
    """No training state of an experiment can be resumed from; the message names every file and why."""


def atomic_torch_save(obj, path):
    """``torch.save`` to a temporary name next to ``path``, flushed to disk, then renamed to ``path``.

    A kill during the write leaves the temporary file, never a truncated ``path``.
    """
    import torch
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def rng_states():
    """This process's RNG states (Python, NumPy, torch CPU, every CUDA device), as weights-only-loadable values."""
    import numpy as np
    import torch
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {'python': [version, list(internal), gauss],
              'numpy': {'name': name, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                        'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
              'torch': torch.get_rng_state(), 'cuda': []}
    if torch.cuda.is_available():
        states['cuda'] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states):
    """Restore what :func:`rng_states` returned."""
    import numpy as np
    import torch
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    n = states['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    torch.set_rng_state(states['torch'].cpu())
    if states['cuda'] and torch.cuda.is_available() and len(states['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states['cuda'])


def _all_rng_states():
    """Every rank's :func:`rng_states`, in rank order (gathered on all ranks)."""
    import torch.distributed as dist
    own = rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)  # transport only; what is stored is tensors and plain values
    return gathered


def _network_files(opt, resume_iter):
    """The network files ``check_resume`` will load for a state of iteration ``resume_iter``."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    return [os.path.join(opt['path']['models'], f"net_{key[len('network_'):]}_{resume_iter}.pth")
            for key in opt if key.startswith('network_') and key not in ignored]


def _why_unloadable(path):
    import torch
    if not os.path.isfile(path):
        return 'missing'
    if os.path.getsize(path) == 0:
        return 'empty'
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a truncated zip, a bare EOFError, a refused pickle: all mean "cannot resume"
        return f'unreadable ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else "truncated"})'
    return None


def newest_usable_state(opt, state_dir):
    """The newest ``<iter>.state`` in ``state_dir`` whose file and network files load.

    Returns:
        tuple[str | None, list[str]]: The state path (None when the folder has no states), and one
        ``'file: why'`` entry for each newer file skipped.

    Raises:
        ResumeStateError: There are states, but none can be resumed from.
    """
    import torch
    names = [n for n in os.listdir(state_dir) if n.endswith('.state')] if os.path.isdir(state_dir) else []
    iters = sorted((int(float(n[:-len('.state')])) for n in names if n[:-len('.state')].isdigit()), reverse=True)
    skipped = []
    for it in iters:
        path = os.path.join(state_dir, f'{it}.state')
        why = _why_unloadable(path)
        if why is None:
            state = torch.load(path, map_location='cpu', weights_only=True)
            if not isinstance(state, dict) or 'iter' not in state:
                why = 'not a training state'
        if why is not None:
            skipped.append(f'{os.path.basename(path)}: {why}')
            continue
        bad = [(f, _why_unloadable(f)) for f in _network_files(opt, it)]
        bad = [f'{os.path.basename(f)}: {w}' for f, w in bad if w is not None]
        if bad:
            skipped.extend(bad)
            continue
        return path, skipped
    if iters:
        raise ResumeStateError(
            f"--auto_resume: no training state in {state_dir} can be resumed from ({'; '.join(skipped[:6])}"
            f"{f'; and {len(skipped) - 6} more' if len(skipped) > 6 else ''}). Move the folder away to start "
            'afresh, or set path.resume_state to a state you trust.')
    return None, skipped


def load_resume_state(opt):
    """Device-aware, weights-only ``basicsr.train.load_resume_state`` with a fallback (used by our pipeline).

    With ``--auto_resume`` the newest state that loads, together with its network files, is taken; newer
    ones that do not are named in one printed line.
    """
    import torch

    from basicsr.utils import check_resume

    resume_state_path = None
    if opt['auto_resume']:
        state_dir = os.path.join('experiments', opt['name'], 'training_states')
        resume_state_path, skipped = newest_usable_state(opt, state_dir)
        if resume_state_path is not None:
            opt['path']['resume_state'] = resume_state_path
            if skipped and opt.get('rank', 0) == 0:
                print(f'auto_resume: skipped {", ".join(skipped)}; resuming from {resume_state_path}.', flush=True)
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']
        why = _why_unloadable(resume_state_path)
        if why is not None:
            raise ResumeStateError(f"path.resume_state '{resume_state_path}' is {why}; point it to a complete "
                                   'state, or use --auto_resume to take the newest one that loads.')

    if resume_state_path is None:
        return None
    resume_state = torch.load(resume_state_path, map_location=training_device(), weights_only=True)
    check_resume(opt, resume_state['iter'])
    return resume_state


#: BasicSR's NIQE fits a Gaussian to 96-px block features of the image and of its half; below this side
#: there are too few blocks and its SVD does not converge (basicsr/metrics/niqe.py, block_size_h=96)
NIQE_MIN_SIZE = 192


def _niqe_with_min_size(calculate_niqe):
    def calculate(img, crop_border, input_order='HWC', convert_to='y', **kwargs):
        h, w = (img.shape[:2] if input_order == 'HWC' else img.shape[1:3])
        h, w = h - 2 * crop_border, w - 2 * crop_border
        if min(h, w) < NIQE_MIN_SIZE:
            raise ValueError(f'calculate_niqe needs images of at least {NIQE_MIN_SIZE}x{NIQE_MIN_SIZE} px after '
                             f'crop_border, got {h}x{w}; validate on larger images or drop niqe from val.metrics.')
        return calculate_niqe(img, crop_border, input_order=input_order, convert_to=convert_to, **kwargs)

    import functools
    return functools.update_wrapper(calculate, calculate_niqe)  # still BasicSR's metric (name, module, doc)


def _postprocess_yml_value(value):
    """``--force_yml`` values as YAML literals (``1e-4``, ``[1, 2]``, ``~``, ``true``), never evaluated."""
    parsed = yaml.load(value, Loader=SafeOrderedLoader) if value.strip() else value
    if isinstance(parsed, str):
        try:  # YAML 1.1 reads 1e-4 as a string; an option value of that form means the number
            return float(parsed) if parsed.strip().lower() not in ('nan', 'inf', '-inf', 'infinity') else parsed
        except ValueError:
            return parsed
    return parsed


def _distributed_backend():
    import torch
    return 'nccl' if torch.cuda.is_available() else 'gloo'


def _init_dist_pytorch(backend=None, **kwargs):
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=_distributed_backend(), **kwargs)


def _init_dist_slurm(backend=None, port=None):
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
    dist.init_process_group(backend=_distributed_backend())


def _registry_get(self, name, suffix='basicsr'):
    obj = self._obj_map.get(name)
    if obj is None and suffix:
        obj = self._obj_map.get(f'{name}_{suffix}')
    if obj is None:
        close = difflib.get_close_matches(str(name), list(self._obj_map), n=5, cutoff=0.5)
        hint = f" Closest registered names: {', '.join(close)}." if close else ''
        raise KeyError(f"No object named '{name}' found in the '{self._name}' registry.{hint} "
                       f"Check the 'type' in the option file, or import the module that registers it.")
    return obj


def _with_dataset_collate(build_dataloader):
    def build(dataset, dataset_opt, *args, **kwargs):
        loader = build_dataloader(dataset, dataset_opt, *args, **kwargs)
        collate_fn = getattr(dataset, 'collate_fn', None)
        if collate_fn is not None:
            loader.collate_fn = collate_fn
        return loader

    build.__wrapped__ = build_dataloader
    return build


def apply():
    """Apply every adaptation once. Safe to call repeatedly."""
    global _applied
    if _applied:
        return
    _alias_functional_tensor()

    import basicsr.data
    import basicsr.test
    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options as options
    from basicsr.utils.registry import Registry

    options.ordered_yaml = safe_ordered_yaml
    dist_util._init_dist_pytorch = _init_dist_pytorch
    dist_util._init_dist_slurm = _init_dist_slurm
    options._postprocess_yml_value = _postprocess_yml_value
    import basicsr.metrics
    from basicsr.utils.registry import METRIC_REGISTRY
    niqe = _niqe_with_min_size(METRIC_REGISTRY._obj_map['calculate_niqe'])
    METRIC_REGISTRY._obj_map['calculate_niqe'] = basicsr.metrics.calculate_niqe = niqe
    Registry.get = _registry_get
    build = _with_dataset_collate(basicsr.data.build_dataloader)
    for module in (basicsr.data, basicsr.train, basicsr.test):
        module.build_dataloader = build
    _applied = True
