"""Synthetic inputs for the benchmark scripts (``scripts/bench_*.py``)."""
import tempfile

import torch

from dspo_basicsr.losses.preference_loss import DEFAULT_BETA

#: A ControlSD2 UNet that is small enough for a CPU but not trivial (about 10 M parameters with ControlNet).
BENCH_UNET = dict(
    block_out_channels=(64, 128, 128), layers_per_block=2, attention_head_dim=(4, 8, 8), norm_num_groups=32,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'))


def bench_dspo_opt(device, preference='DSPOLoss', trainable='controlnet'):
    """Options of an in-process DSPOModel on the benchmark framework (no data sets needed)."""
    folder = tempfile.mkdtemp(prefix='dspo_bench_')
    return {
        'name': 'bench', 'model_type': 'DSPOModel', 'scale': 4, 'is_train': True, 'dist': False, 'rank': 0,
        'world_size': 1, 'num_gpu': 1 if device.type == 'cuda' else 0, 'auto_resume': False,
        'network_g': {'type': 'TinyControlSD2Arch', 'seed': 0, 'unet_config': BENCH_UNET, 'scale': 4,
                      'trainable': trainable},
        'path': {'pretrain_network_g': None, 'models': folder, 'training_states': folder},
        'train': {'optim_g': {'type': 'AdamW', 'lr': 1e-5}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [10**6],
                                                                           'gamma': 0.5},
                  'total_iter': 10, 'preference_opt': {'type': preference, 'beta': DEFAULT_BETA}},
    }


def synthetic_preference_batch(batch, num_candidates, num_instances, size, device, scale=4, seed=0):
    """A collated training batch: random candidates, a label map of ``num_instances`` vertical stripes.

    Returns:
        dict: as :class:`~dspo_basicsr.data.preference_lmdb_dataset.PreferenceLMDBDataset` batches it.
    """
    g = torch.Generator().manual_seed(seed)
    columns = torch.arange(size) * num_instances // size
    seg = columns.expand(batch, size, size).contiguous()
    win = torch.randint(0, num_candidates, (batch, num_instances), generator=g)
    lose = (win + 1 + torch.randint(0, num_candidates - 1, (batch, num_instances), generator=g)) % num_candidates
    return {
        'lq': torch.rand(batch, 3, size // scale, size // scale, generator=g).to(device),
        'candidates': torch.rand(batch, num_candidates, 3, size, size, generator=g).to(device),
        'seg': seg.to(device), 'win': win.to(device), 'lose': lose.to(device),
        'pair': torch.stack([win[:, 0], lose[:, 0]], dim=1).to(device),
        'prompt': ['a photo'] * batch, 'negative_prompt': [''] * batch,
    }
