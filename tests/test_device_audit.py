"""The CUDA device audit (dspo_basicsr.bench.device_audit): each tiny framework's training forward on fake CUDA."""
import pytest
import torch

from dspo_basicsr.bench.device_audit import audit_training_forward
from dspo_basicsr.bench.dspo_step import synthetic_preference_batch
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA


def tiny_model(arch, feedback=None, **network):
    import dspo_basicsr  # noqa: F401

    from basicsr.models import build_model
    train = {'optim_g': {'type': 'AdamW', 'lr': 1e-5}, 'total_iter': 1,
             'scheduler': {'type': 'MultiStepLR', 'milestones': [10], 'gamma': 0.5},
             'preference_opt': {'type': 'DSPOLoss', 'beta': DEFAULT_BETA}}
    if feedback:
        train['feedback_guidance_scale'] = feedback
    return build_model({
        'name': 'audit', 'model_type': 'DSPOModel', 'scale': 4, 'num_gpu': 0, 'is_train': True, 'dist': False,
        'rank': 0, 'world_size': 1, 'auto_resume': False,
        'network_g': dict({'type': 'Tiny' + arch, 'scale': 4}, **network),
        'path': {'pretrain_network_g': None, 'models': '/nonexistent', 'training_states': '/nonexistent'},
        'train': train})


def batch_for(model):
    batch = synthetic_preference_batch(1, 2, 4, 64, 'cpu')
    if type(model.bare).__name__ in ('TinySeeSRArch', 'TinyAddSRArch'):
        batch['extras'] = {'ram_embeds': torch.randn(1, 17, model.bare.image_embed_dim)}
    return batch


@pytest.mark.parametrize('arch, feedback, network', [
    ('ControlSD2Arch', None, {}),
    ('ControlSD2Arch', 5.5, {'trainable': 'unet_lora'}),
    ('SeeSRArch', 5.5, {}),  # not mixed_precision: CUDA autocast switches itself off without a CUDA runtime
    ('AddSRArch', None, {}),
    ('OSEDiffArch', 1.5, {'trainable': 'unet_lora'}),
])
def test_training_forward_creates_every_tensor_on_the_cuda_device(arch, feedback, network):
    model = tiny_model(arch, feedback, **network)
    result = audit_training_forward(model, batch_for(model))
    assert result.loss.device.type == 'cuda'
    assert result.logits.device.type == 'cuda'


def test_the_audit_fails_on_a_cpu_tensor_in_the_step(monkeypatch):
    """A tensor left on the CPU (here: the timesteps) is reported as a device mismatch."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError
    model = tiny_model('ControlSD2Arch')
    monkeypatch.setattr(type(model.bare), 'training_timesteps',
                        lambda self, batch, low, high, generator=None: torch.randint(low, high, (batch,)))
    with pytest.raises(FakeTensorDeviceMismatchError):
        audit_training_forward(model, batch_for(model))
