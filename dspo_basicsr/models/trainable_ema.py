"""EMA of the trained parameters of a diffusion SR framework: BasicSR's ``net_g_ema`` without copying frozen parts.

BasicSR's ``SRModel`` keeps ``net_g_ema``, a whole second network, and updates it with
``ema = decay * ema + (1 - decay) * param`` after every optimizer step (``basicsr/models/base_model.py``
``model_ema``). A diffusion SR framework trains a ControlNet, LoRA adapters or a UNet next to gigabytes of
frozen networks, so only the trained parameters are averaged here; to sample with the average, the EMA
weights are swapped into the policy (storages exchanged, nothing copied) and swapped back afterwards.

Two decay schedules (``train.ema_schedule``): ``constant`` (BasicSR: ``ema_decay`` at every update) and
``diffusers`` (``diffusers.training_utils.EMAModel``'s default, which Diffusion-DRO's ``train.py`` uses:
0 at the first update, then ``min(ema_decay, n / (9 + n))`` at the n-th).
"""
import contextlib

import torch

from dspo_basicsr.utils.checkpoint import check_state_dict_matches

#: values of ``train.ema_schedule``
EMA_SCHEDULES = ('constant', 'diffusers')


def ema_decay_at(decay, update, schedule='constant'):
    """The decay applied at the ``update``-th optimizer update (1-based) under ``schedule`` (:data:`EMA_SCHEDULES`).

    ``diffusers`` follows ``EMAModel.get_decay`` with its defaults (no warm-up power, ``update_after_step`` 0):
    ``step = n - 1``; 0 when ``step`` is 0, else ``min(decay, (1 + step) / (10 + step))``.
    """
    if schedule == 'constant':
        return decay
    if schedule != 'diffusers':
        raise ValueError(f"train.ema_schedule '{schedule}' is unknown; choose one of {EMA_SCHEDULES}.")
    step = update - 1
    return 0.0 if step <= 0 else min(decay, (1 + step) / (10 + step))


def _trained_parameters(framework):
    return {name: p for name, p in framework.named_parameters() if p.requires_grad}


class TrainableEMA:
    """The exponential moving average of a framework's trained parameters.

    Args:
        framework (DiffusionSRArch): The policy (bare, without its DDP wrapper); the average starts at its
            current trained weights.

    Attributes:
        state (dict[str, Tensor]): The averaged weights, by full parameter name (``trainable_state_dict``'s keys).
    """

    def __init__(self, framework):
        self.state = {name: p.detach().clone() for name, p in _trained_parameters(framework).items()}

    @torch.no_grad()
    def update(self, framework, decay):
        """``ema = decay * ema + (1 - decay) * param`` for every trained parameter (BasicSR's ``model_ema``)."""
        for name, param in _trained_parameters(framework).items():
            self.state[name].mul_(decay).add_(param.detach(), alpha=1 - decay)

    def trainable_state_dict(self):
        """The averaged weights, keyed as the framework's :meth:`trainable_state_dict` (what a checkpoint holds)."""
        return dict(self.state)

    @torch.no_grad()
    def load_trainable_state_dict(self, state_dict, source='checkpoint'):
        """Load averaged weights saved by :meth:`trainable_state_dict`, checking every key and shape."""
        check_state_dict_matches(self.state, state_dict, source, 'the EMA of the trained parameters (params_ema)')
        for name, value in state_dict.items():
            self.state[name].copy_(value)

    def swapped_into(self, framework):
        """Inside the block, ``framework`` runs with the averaged weights (storages exchanged, not copied)."""
        return parameters_swapped(framework, _trained_parameters(framework), self.state, 'the EMA')


@contextlib.contextmanager
def parameters_swapped(framework, params, state, holder):
    """Inside the block, the trained parameters ``params`` of ``framework`` hold the tensors of ``state``.

    The storages are exchanged, not copied, and exchanged back on exit (also after an error), so a copy of the
    trained weights (an EMA, a lagged policy) costs no second copy while it runs.

    Args:
        framework (nn.Module): The network whose parameters are swapped.
        params (dict[str, Parameter]): Its trained parameters by name.
        state (dict[str, Tensor]): The tensors to run with, by the same names (exchanged in place).
        holder (str): What holds ``state``, for the error message.
    """
    if set(params) != set(state):
        raise KeyError(f'{holder} holds {len(state)} parameters but {type(framework).__name__} trains '
                       f'{len(params)}; they must be the same set.')

    def exchange():
        for name, param in params.items():
            param.data, state[name] = state[name], param.data

    exchange()
    try:
        yield framework
    finally:
        exchange()
