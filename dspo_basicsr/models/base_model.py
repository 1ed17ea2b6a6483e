"""The base model class of our models, and what our train pipeline gives BasicSR's own models.

BasicSR 1.4.2's ``BaseModel`` writes checkpoints in place on every rank, keeps no RNG state, knows only the
Adam optimizer and wraps DDP with CUDA ``device_ids``. :class:`DSPOBaseModel` overrides those four methods
(the writer, the ranks and the RNG states come from :mod:`dspo_basicsr.utils`); DSPOModel, DiffusionDROModel and
RankCalibrationModel derive from it, and ``dspo_basicsr.train.build_model`` puts it in front of a BasicSR
model class (e.g. ``SRModel``) for runs of the ``basicsr`` command, without changing BasicSR's classes.
"""
import os

from dspo_basicsr.utils.atomic_write import atomic_torch_save
from dspo_basicsr.utils.distributed import is_main_process, wait_for_all_ranks
from dspo_basicsr.utils.rng import all_rng_states

from basicsr.models.base_model import BaseModel


class DSPOBaseModel(BaseModel):
    """``BaseModel`` with rank-0 atomic checkpoints, exact-resume states, any optimizer, DDP on CPU."""

    def model_to_device(self, net):
        """Move to ``self.device``; under DDP wrap with CUDA ``device_ids`` only on CUDA (none on CPU)."""
        import torch
        from torch.nn.parallel import DataParallel, DistributedDataParallel
        net = net.to(self.device)
        if self.opt['dist']:
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(net, device_ids=device_ids,
                                          find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` optimizer or ``AdamW8bit`` (:func:`dspo_basicsr.utils.optimizers.build_optimizer`)."""
        from dspo_basicsr.utils.optimizers import build_optimizer
        return build_optimizer(optim_type, params, lr, **kwargs)

    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's file layout, written by rank 0 only and atomically (1.4.2 writes in place on every rank)."""
        if not is_main_process():
            return
        label = 'latest' if current_iter == -1 else current_iter
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys.')
        save_dict = {}
        for one, key in zip(nets, keys):
            state = self.get_bare_model(one).state_dict()
            save_dict[key] = {(k[7:] if k.startswith('module.') else k): v.cpu() for k, v in state.items()}
        atomic_torch_save(save_dict, os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def save_training_state(self, epoch, current_iter):
        """``{iter}.state`` with every rank's RNG states; rank 0 writes atomically, every rank waits for it."""
        if current_iter != -1:
            rngs = all_rng_states()  # collective: every rank takes part
            if is_main_process():
                state = {'epoch': epoch, 'iter': current_iter,
                         'optimizers': [o.state_dict() for o in self.optimizers],
                         'schedulers': [s.state_dict() for s in self.schedulers],
                         'rng': rngs, 'world_size': len(rngs),
                         'batch_size_per_gpu': int(self.opt['datasets']['train'].get('batch_size_per_gpu', 1))}
                atomic_torch_save(state, os.path.join(self.opt['path']['training_states'], f'{current_iter}.state'))
        wait_for_all_ranks()


def with_plugin_base(model_class):
    """``model_class`` itself when it derives from :class:`DSPOBaseModel`, else a subclass of it that does."""
    if issubclass(model_class, DSPOBaseModel):
        return model_class
    return type(model_class.__name__, (DSPOBaseModel, model_class),
                {'__module__': model_class.__module__, '__doc__': model_class.__doc__})
