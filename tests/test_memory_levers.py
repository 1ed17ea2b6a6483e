"""The memory levers of issue 22 (docs/frameworks.md, "Memory levers"): each one is an option and does what it says."""
import math

import pytest
import torch

import dspo_basicsr  # noqa: F401
from dspo_basicsr.demo.tiny_arch import TinyAddSRArch, TinyControlSD2Arch, TinyOSEDiffArch, TinySeeSRArch
from dspo_basicsr.utils.optimizers import build_optimizer

FRAMEWORKS = {'sd2': TinyControlSD2Arch, 'seesr': TinySeeSRArch, 'addsr': TinyAddSRArch, 'osediff': TinyOSEDiffArch}
TRAINABLE = [('sd2', 'controlnet'), ('sd2', 'unet_lora'), ('sd2', 'unet'), ('seesr', 'controlnet'),
             ('addsr', 'unet_lora'), ('osediff', 'unet_lora'), ('osediff', 'unet')]


def tiny(framework, **kwargs):
    torch.manual_seed(0)
    return FRAMEWORKS[framework](**kwargs)


def trained_gradients(net, seed=0):
    """Gradients of the trained parameters after one denoising loss on a tiny batch (by parameter name)."""
    gen = torch.Generator().manual_seed(seed)
    lq = torch.rand(1, 3, 8, 8, generator=gen)
    cond = net.condition(lq, ['a photo'])
    latents = net.encode_images(torch.rand(1, 3, 32, 32, generator=gen))
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([500])
    x_t, target = net.diffusion_inputs(latents, noise, t, cond)
    (net(x_t, t, cond) - target).pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('framework,trainable', TRAINABLE)
def test_gradient_checkpointing_covers_the_gradient_path_and_keeps_gradients(framework, trainable):
    plain = tiny(framework, trainable=trainable)
    checkpointed = tiny(framework, trainable=trainable, gradient_checkpointing=True)
    trained = {name for name, m in checkpointed.named_children() if any(p.requires_grad for p in m.parameters())}
    assert trained and all(getattr(checkpointed, name).is_gradient_checkpointing for name in trained)
    assert checkpointed.unet.is_gradient_checkpointing  # on the gradient path of a trained ControlNet too
    assert not any(getattr(checkpointed, name).is_gradient_checkpointing for name in ('vae', 'lq_vae')
                   if hasattr(checkpointed, name))
    expected, got = trained_gradients(plain), trained_gradients(checkpointed)
    assert expected.keys() == got.keys() and expected
    assert any(g.abs().sum() > 0 for g in got.values())  # LoRA gradients reach through the checkpoints
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('framework', sorted(FRAMEWORKS))
def test_every_attention_runs_pytorch_sdpa(framework):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    net = tiny(framework)
    attentions = [m for m in net.modules() if isinstance(m, Attention)]
    assert attentions
    assert all(isinstance(m.processor, AttnProcessor2_0) for m in attentions), \
        {type(m.processor).__name__ for m in attentions}
    assert net.text_encoder.config._attn_implementation == 'sdpa'


@pytest.mark.parametrize('framework,trainable', [('sd2', 'controlnet'), ('sd2', 'unet_lora'), ('seesr', 'controlnet'),
                                                 ('osediff', 'unet_lora')])
def test_bf16_frozen_unet_keeps_trained_parameters_float32(framework, trainable):
    net = tiny(framework, trainable=trainable, mixed_precision='bf16')
    trained = [p for p in net.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    frozen_unet = [p for p in net.unet.parameters() if not p.requires_grad]
    assert frozen_unet and all(p.dtype == torch.bfloat16 for p in frozen_unet)
    grads = trained_gradients(net)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_bf16_framework_predicts_close_to_float32():
    full, half = tiny('sd2'), tiny('sd2', mixed_precision='bf16')
    lq, x_t, t = torch.rand(1, 3, 4, 4), torch.randn(1, 4, 4, 4), torch.tensor([400])
    expected = full(x_t, t, full.condition(lq, ['a photo']))
    got = half(x_t, t, half.condition(lq, ['a photo']))
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 rounding, not another network


def test_adamw8bit_keeps_8bit_moments_and_descends():
    pytest.importorskip('bitsandbytes')
    weight = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: 8-bit state
    bias = torch.nn.Parameter(torch.randn(8))          # < 4096 elements: float32 state (bitsandbytes' min_8bit_size)
    optimizer = build_optimizer('AdamW8bit', [weight, bias], 1e-2, weight_decay=0.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        loss = weight.pow(2).sum() + bias.pow(2).sum()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert optimizer.state[weight]['state1'].dtype == torch.uint8
    assert optimizer.state[weight]['state2'].dtype == torch.uint8
    assert optimizer.state[bias]['state1'].dtype == torch.float32


def test_adamw8bit_state_survives_a_weights_only_checkpoint():
    import io
    pytest.importorskip('bitsandbytes')
    weight = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = build_optimizer('AdamW8bit', [weight], 1e-2)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_optimizer('AdamW8bit', [weight], 1e-2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(resumed.state[weight]['state1'], optimizer.state[weight]['state1'])
    assert resumed.state[weight]['state1'].dtype == torch.uint8


def test_adamw8bit_without_bitsandbytes_is_one_clear_line(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'bitsandbytes', None)  # import bitsandbytes now raises ImportError
    monkeypatch.setitem(sys.modules, 'bitsandbytes.optim', None)
    with pytest.raises(RuntimeError, match=r"'AdamW8bit' needs bitsandbytes.*optim_g.type: AdamW") as info:
        build_optimizer('AdamW8bit', [torch.nn.Parameter(torch.zeros(2))], 1e-3)
    assert '\n' not in str(info.value)


def test_unknown_optimizer_lists_adamw8bit():
    with pytest.raises(ValueError, match='AdamW8bit'):
        build_optimizer('NoSuchAdam', [torch.nn.Parameter(torch.zeros(2))], 1e-3)


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    from dspo_fixtures import make_tiny_preference_set
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('levers_set')))


def test_dspo_model_with_every_lever_keeps_trained_parameters_float32(tiny_set, tmp_path, monkeypatch):
    pytest.importorskip('bitsandbytes')
    from dspo_basicsr.models.dspo_model import DSPOModel

    from dspo_fixtures import in_process_options, preference_batch
    opt = in_process_options(tiny_set, tmp_path)
    opt['network_g'].update(mixed_precision='bf16', gradient_checkpointing=True)
    opt['train']['reference_dtype'] = 'bfloat16'
    opt['train']['optim_g'] = {'type': 'AdamW8bit', 'lr': 1e-3, 'weight_decay': 0.0}
    model = DSPOModel(opt)
    assert type(model.optimizer_g).__name__ == 'AdamW8bit'
    assert all(v.dtype == torch.bfloat16 for v in model.net_ref.state_dict().values())
    assert all(p.dtype == torch.bfloat16 for p in model.bare.unet.parameters())
    assert model.bare.unet.is_gradient_checkpointing and model.bare.controlnet.is_gradient_checkpointing
    set_to_none = []
    zero_grad = model.optimizer_g.zero_grad

    def recorded_zero_grad(set_to_none_arg=None, **kwargs):
        set_to_none.append(kwargs.get('set_to_none', set_to_none_arg))
        zero_grad(**kwargs)

    monkeypatch.setattr(model.optimizer_g, 'zero_grad', recorded_zero_grad)
    before = {n: p.detach().clone() for n, p in model.bare.named_parameters() if p.requires_grad}
    model.feed_data(preference_batch(tiny_set))
    # The bf16 reference computes as the bf16-autocast policy at initialisation: every logit 0, loss ln 2.
    torch.testing.assert_close(model.preference_loss().loss.item(), math.log(2), rtol=0, atol=1e-6)
    model.optimize_parameters(1)
    assert set_to_none == [True]  # gradients freed, not zero-filled, before the step's backward
    trained = {n: p for n, p in model.bare.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
