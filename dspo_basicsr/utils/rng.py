"""The random states of a process (Python, NumPy, torch CPU and CUDA), stored in training states for exact resume."""
import random

__all__ = ['rng_states', 'set_rng_states', 'all_rng_states']


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


def all_rng_states():
    """Every rank's :func:`rng_states`, in rank order (gathered on all ranks; a collective under DDP)."""
    import torch.distributed as dist
    own = rng_states()
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)  # transport only; what is stored is tensors and plain values
    return gathered
