"""Every adaptation of basicsr 1.4.2 to today's torch / torchvision, to CPU machines and to safe YAML.

basicsr 1.4.2 was written for torch 1.x on CUDA. This module is the one place that adapts it; nothing
else in the project patches basicsr. :func:`apply` is idempotent and runs on ``import dspo_basicsr``.

Adaptations:
    * ``torchvision.transforms.functional_tensor`` (removed in torchvision 0.17) is aliased to its
      successor before basicsr is imported.
    * Option files are read with a safe, ordered YAML loader: a Python tag is an error.
    * ``--auto_resume`` / ``path.resume_state`` load training states on the machine's device, with
      ``weights_only=True``.
    * ``--launcher pytorch|slurm`` uses nccl with CUDA and gloo without, and the process's
      ``LOCAL_RANK`` for its GPU.
    * DistributedDataParallel is built without CUDA ``device_ids`` on CPU.
    * A registry lookup that fails names the registry and the closest registered names.
    * A dataset that defines ``collate_fn`` gets it in BasicSR's data loaders.
    * ``optim_g.type`` may name any ``torch.optim`` optimizer (1.4.2 knows only Adam).
"""
import collections
import difflib
import os
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


def load_resume_state(opt):
    """Device-aware, weights-only replacement of ``basicsr.train.load_resume_state``."""
    import torch

    from basicsr.utils import check_resume, scandir

    resume_state_path = None
    if opt['auto_resume']:
        state_path = os.path.join('experiments', opt['name'], 'training_states')
        if os.path.isdir(state_path):
            states = list(scandir(state_path, suffix='state', recursive=False, full_path=False))
            if states:
                latest = max(float(v.split('.state')[0]) for v in states)
                resume_state_path = os.path.join(state_path, f'{latest:.0f}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']

    if resume_state_path is None:
        return None
    resume_state = torch.load(resume_state_path, map_location=training_device(), weights_only=True)
    check_resume(opt, resume_state['iter'])
    return resume_state


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


def _model_to_device(self, net):
    """``BaseModel.model_to_device`` that wraps DDP with ``device_ids`` only on CUDA."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


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


def _get_optimizer(self, optim_type, params, lr, **kwargs):
    """``BaseModel.get_optimizer`` accepting any optimizer class of ``torch.optim`` by name."""
    import torch
    optimizer_class = getattr(torch.optim, optim_type, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        known = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
                       and c is not torch.optim.Optimizer)
        raise ValueError(f"optimizer type '{optim_type}' is not a torch.optim optimizer; choose one of {known}.")
    return optimizer_class(params, lr, **kwargs)


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
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.registry import Registry

    options.ordered_yaml = safe_ordered_yaml
    basicsr.train.load_resume_state = load_resume_state
    dist_util._init_dist_pytorch = _init_dist_pytorch
    dist_util._init_dist_slurm = _init_dist_slurm
    BaseModel.model_to_device = _model_to_device
    BaseModel.get_optimizer = _get_optimizer
    Registry.get = _registry_get
    build = _with_dataset_collate(basicsr.data.build_dataloader)
    for module in (basicsr.data, basicsr.train, basicsr.test):
        module.build_dataloader = build
    _applied = True
