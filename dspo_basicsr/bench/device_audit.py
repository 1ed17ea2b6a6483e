"""CUDA device audit without a GPU: the training step's forward part on fake CUDA tensors.

PyTorch's ``FakeTensorMode`` gives tensors a device (here ``cuda``) and shapes but no storage, needs no GPU,
and raises ``FakeTensorDeviceMismatchError`` where a CPU tensor (other than a 0-dim scalar) meets a CUDA one,
which on a real GPU is a crash (or, for a random generator on the wrong device, a silent difference). The
audit builds a framework on the CPU as training does, moves its networks (policy, and the reference's frozen
copies) to fake ``cuda``, and runs DSPOModel's own forward part of a step on a fake-CUDA batch: candidate
encoding, the condition, noising, policy and reference predictions (feedback guidance when on), instance
errors and the loss (:meth:`DSPOModel.preference_loss`).

Not covered: the backward pass (it needs a CUDA context), validation sampling (its timestep loop compares
tensors, which fake tensors cannot, and CUDA generators need a device) and ``mixed_precision`` (CUDA autocast
switches itself off without a CUDA runtime, and the bf16 frozen weights then meet float32 inputs).
"""
import torch

__all__ = ['audit_training_forward']


def _fake_cuda(mode, tensor):
    fake = mode.from_tensor(tensor)
    with mode:
        return fake.to('cuda')


def _to_fake_cuda(mode, module):
    """Replace every parameter and buffer of ``module`` by a fake CUDA tensor (``Module.to`` cannot move fake
    parameters: it swaps tensors, which fake ones refuse)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(_fake_cuda(mode, param.detach()),
                                                           requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = _fake_cuda(mode, buffer)


def audit_training_forward(model, batch):
    """Run ``model``'s forward part of a training step on fake CUDA tensors; raise on any device mismatch.

    Args:
        model (DSPOModel): A model built on the CPU (``num_gpu: 0``); its networks are moved to fake CUDA in place
            (use it for nothing else afterwards).
        batch (dict): A CPU training batch as the preference dataset collates it.

    Returns:
        PreferenceResult: the objective's result, whose tensors are fake and on ``cuda``.

    Raises:
        torch._subclasses.fake_tensor.FakeTensorDeviceMismatchError: a CPU tensor met a CUDA one.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    # Real CPU tensors the code creates (schedules, constants) enter as fake CPU tensors, so mixing them
    # with CUDA ones is reported, not hidden.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake_cuda(mode, model.net_g)
    for copy in model.net_ref.copies.values():
        _to_fake_cuda(mode, copy)
    model.device = torch.device('cuda')  # BaseModel's device, where feed_data moves the batch
    model._posterior_checked = True  # the posterior check reads values (.item()), which fake tensors have not
    fake_batch = {k: _fake_cuda(mode, v) if torch.is_tensor(v) else v for k, v in batch.items()}
    if 'extras' in batch:
        fake_batch['extras'] = {k: _fake_cuda(mode, v) for k, v in batch['extras'].items()}
    with mode:
        model.feed_data(fake_batch)
        return model.preference_loss()
