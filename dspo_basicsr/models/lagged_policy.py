"""A lagged copy of the policy that samples: when it is due for a refresh, and how a resume gets it back exactly.

Online preference methods sample from a copy of the policy that is re-synced every K optimizer updates:
Diffusion-DRO's lagged policy (basiclab/DiffusionDRO ``train.py``, ``--buffer_update_steps``) and the sampling copy
of :class:`~dspo_basicsr.models.online_group_model.OnlineGroupModel`. The copy itself is
:class:`LaggedPolicy` (a snapshot of the trainable weights, swapped into the framework to sample); this module
holds it and what both models share around it:

* :func:`refresh_due`: the refresh rule, counted in optimizer updates (with ``train.accumulate_grad_batches`` k,
  every ``K * k`` iterations, at the start of a window);
* :func:`lagged_policy_state` / :func:`restore_lagged_policy`: the snapshot as plain tensors and numbers, saved
  next to ``{iter}.state`` so that a resumed run samples with the very weights the interrupted one had.
"""
from dspo_basicsr.models.trainable_ema import parameters_swapped

__all__ = ['LaggedPolicy', 'refresh_due', 'lagged_policy_state', 'restore_lagged_policy']


class LaggedPolicy:
    """A lagged copy of a framework's policy: a detached snapshot of its trainable parameters.

    Attributes:
        state (dict[str, Tensor] | None): The snapshot, by parameter name (None before the first sync).
        version (int): How many times it was synced (0 before the first sync).
        synced_iter (int | None): The training iteration of the last sync.
    """

    def __init__(self):
        self.state = None
        self.version = 0
        self.synced_iter = None

    def sync(self, framework, current_iter):
        """Copy the framework's current trainable weights into the snapshot."""
        self.state = {name: value.detach().clone() for name, value in framework.trainable_state_dict().items()}
        self.version += 1
        self.synced_iter = current_iter

    def swapped_into(self, framework):
        """Inside the block, ``framework`` runs with the lagged weights (storages exchanged, not copied)."""
        if self.state is None:
            raise RuntimeError('the lagged copy has not been synced yet; call sync(framework, iteration) first.')
        params = {name: p for name, p in framework.named_parameters() if p.requires_grad}
        return parameters_swapped(framework, params, self.state, 'the lagged copy')


def refresh_due(lagged, current_iter, refresh_every, accumulate=1):
    """Whether ``lagged`` must be (re-)synced before iteration ``current_iter`` samples with it.

    Args:
        lagged (LaggedPolicy): The copy (never synced: due).
        current_iter (int): The iteration about to run (1-based, as BasicSR counts).
        refresh_every (int): K, optimizer updates between syncs.
        accumulate (int): Micro-batches per optimizer update (``train.accumulate_grad_batches``).

    Returns:
        bool: True when the copy is missing or was synced ``refresh_every`` or more optimizer updates ago.
    """
    if lagged.state is None:
        return True
    updates_since = (current_iter - 1) // accumulate - (lagged.synced_iter - 1) // accumulate
    return updates_since >= refresh_every


def lagged_policy_state(lagged):
    """``{'state': {name: tensor on the CPU}, 'version': int, 'synced_iter': int}`` of a synced copy."""
    if lagged.state is None:
        raise RuntimeError('the lagged copy has not been synced yet: nothing to save.')
    return {'state': {name: value.detach().cpu() for name, value in lagged.state.items()},
            'version': int(lagged.version), 'synced_iter': int(lagged.synced_iter)}


def restore_lagged_policy(lagged, saved, framework, source):
    """Put a :func:`lagged_policy_state` back into ``lagged``, on the framework's devices and dtypes.

    Raises:
        ValueError: The saved names are not the framework's trainable parameters (another ``trainable``
            setting or another network); the message names ``source``.
    """
    names = {name: p for name, p in framework.named_parameters() if p.requires_grad}
    state = saved['state']
    if set(state) != set(names):
        missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise ValueError(f"{source}: the saved sampling copy does not match network_g's trainable parameters "
                         f'(missing {missing[:3]}, unexpected {extra[:3]}); resume with the option file that '
                         'wrote it, or start afresh.')
    lagged.state = {name: value.to(names[name].device, names[name].dtype) for name, value in state.items()}
    lagged.version = int(saved['version'])
    lagged.synced_iter = int(saved['synced_iter'])
