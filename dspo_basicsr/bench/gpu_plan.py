"""Real-size memory and FLOP plan of one DSPO training step and one validation sample, without a GPU.

The framework of an option file's ``network_g`` is built at its released size on the ``meta`` device (shapes,
no storage, no weights read) and one real :class:`~dspo_basicsr.models.dspo_model.DSPOModel` step runs on it:
``feed_data`` and ``optimize_parameters`` (candidate encoding, condition, policy and reference predictions,
feedback guidance when on, the objective, backward, clipping, the optimizer step), then one validation sample
through ``sample_with_options``. They are the training code's own functions; the only substitution is where
weights would be read from disk (:func:`real_size_loaders`): there the released networks are built from their
configurations instead (SD2-base: ``archs/configs/sd2_base_unet.json``, the SD2 VAE and OpenCLIP-H text
encoder below; SeeSR's UNet and ControlNet with image cross-attention).

Torch's own tools measure the step:

* ``torch.distributed._tools.mem_tracker.MemTracker``: peak memory split into parameters, gradients, optimizer
  state and activations (plus buffers and temporaries), measured on the second step, when the optimizer state
  exists (it is created lazily by the first).
* ``torch.utils.flop_counter.FlopCounterMode``: FLOPs of the first step, split by :class:`PhaseFlopCounter`
  into policy forward, reference forward, backward, VAE and the condition (text encoder), and of the
  validation sample into denoiser and VAE.

A lower bound of the step time on a GPU is FLOPs / its dense bf16 tensor-core peak (:data:`GPU_PEAK_BF16_TFLOPS`);
real steps are slower (kernels below peak, memory-bound ops, fp32 parts), so it is a floor, not an estimate.

What CUDA does differently from ``meta`` (autocast, the fused attention kernel) is emulated by
:class:`CudaOnMeta`. Known limits: allocator fragmentation, the CUDA context and cuBLAS workspaces are not in
the figures (count roughly 1-2 GB more on a real card); autocast is emulated for the functions diffusers'
networks call (``CudaOnMeta.LOW`` / ``HIGH``), not for every op CUDA autocast lists; RAM (SeeSR's and AddSR's
validation tagger / embedder) is not built, so their validation sample is not planned; only objectives without
data-dependent shapes run (tested with DSPO; SFT's loss indexes by a mask and does not).
"""
import contextlib
import copy
import json
import math
from collections import OrderedDict
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dspo_basicsr.bench.dspo_step import synthetic_preference_batch
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA

__all__ = ['GPU_PEAK_BF16_TFLOPS', 'PhaseFlopCounter', 'plan_step', 'apply_overrides', 'format_plan',
           'real_size_loaders', 'MATRIX_FRAMEWORKS', 'plan_matrix', 'matrix_markdown']

#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' datasheets:
#: H100 SXM5 and H200 SXM: 989 (NVIDIA H100 datasheet and H200 product brief: "BF16 Tensor Core 1,979 TFLOPS*",
#: * with sparsity, so 989.5 dense); A100 SXM4: 312 (NVIDIA A100 datasheet, "BF16 Tensor Core 312 | 624*");
#: RTX 4090: 165.2 (NVIDIA Ada Lovelace architecture whitepaper v1.01, appendix table: "Peak BF16 Tensor TFLOPS
#: with FP32 Accumulate 165.2/330.4").
GPU_PEAK_BF16_TFLOPS = OrderedDict([('H100 SXM', 989.5), ('H200 SXM', 989.5), ('A100 SXM', 312.0),
                                    ('RTX 4090', 165.2)])

#: Stable Diffusion 2 VAE (AutoencoderKL; stabilityai/stable-diffusion-2-base ``vae/config.json``).
SD2_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                      layers_per_block=2, down_block_types=('DownEncoderBlock2D',) * 4,
                      up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=32, sample_size=768,
                      scaling_factor=0.18215)
#: SD2's OpenCLIP ViT-H/14 text transformer as diffusers' CLIPTextModel holds it (``text_encoder/config.json``:
#: 23 layers, width 1024, 77 tokens).
SD2_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, max_position_embeddings=77, hidden_act='gelu', projection_dim=512,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
#: SeeSR's RAM image embeddings per LQ image (tokens, width): precomputed in the preference set.
RAM_EMBEDS_SHAPE = (145, 512)


# ---------------------------------------------------------------------------- building at real size on meta
def sd2_components(unet_class=None):
    """SD2-base components at released size on the current default device (``meta`` inside the planner).

    The tokenizer is a byte-level CLIP tokenizer of 77 tokens (the real vocabulary is a download; the token
    count, not the vocabulary, sets the text encoder's cost).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dspo_basicsr.archs.seesr_arch import SD2_BASE_UNET_CONFIG, strip_seesr_config
    from dspo_basicsr.demo.tiny_components import byte_level_vocab, tiny_noise_scheduler
    with open(SD2_BASE_UNET_CONFIG, encoding='utf-8') as f:
        unet_config = strip_seesr_config(json.load(f))
    unet = None if unet_class is not None and not hasattr(unet_class, 'from_config') else \
        UNet2DConditionModel.from_config(unet_config)
    return dict(unet=unet, vae=AutoencoderKL(**SD2_VAE_CONFIG),
                text_encoder=CLIPTextModel(CLIPTextConfig(**SD2_TEXT_CONFIG)),
                tokenizer=CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77),
                noise_scheduler=tiny_noise_scheduler())


def seesr_network(folder, kind):
    """SeeSR's ``unet`` or ``controlnet`` at released size (SD2-base + image cross-attention), no weights."""
    from dspo_basicsr.archs.seesr_arch import seesr_networks_on_meta
    unet, controlnet = seesr_networks_on_meta()
    return unet if kind == 'unet' else controlnet


@contextlib.contextmanager
def real_size_loaders():
    """Inside the block the frameworks' weight loaders build the released networks from their configurations
    on the default device instead of reading files (the planner runs it under ``torch.device('meta')``)."""
    patches = [mock.patch('dspo_basicsr.archs.control_sd2_arch.load_sd_components', lambda path, unet_class=None:
                          sd2_components(unet_class)),
               mock.patch('dspo_basicsr.archs.seesr_arch.load_sd_components', lambda path, unet_class=None:
                          sd2_components(unet_class)),
               mock.patch('dspo_basicsr.archs.osediff_arch.load_sd_components', lambda path, unet_class=None:
                          sd2_components(unet_class)),
               mock.patch('dspo_basicsr.archs.seesr_arch.load_seesr_network', seesr_network)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def planned_network_options(network_opt, real_size):
    """``network_g`` as the planner builds it: no RAM checkpoint (embeddings come precomputed with the batch),
    no LoRA file of OSEDiff (its rank-4 adapters are a rounding error), no ControlNet folder (initialised
    from the UNet, the same shapes); at real size a demo ``Tiny*Arch`` is planned as its released framework."""
    opt = {k: v for k, v in network_opt.items() if k not in ('ram_path', 'dape_path', 'osediff_path',
                                                             'controlnet_path')}
    if real_size:
        from dspo_basicsr.demo.tiny_arch import TINY_FRAMEWORKS
        released = {tiny.__name__: name for name, tiny in TINY_FRAMEWORKS.items()}
        if opt.get('type') in released:
            opt['type'] = released[opt['type']]
            for key in ('seed', 'unet_config', 'vae_config', 'random_ram'):
                opt.pop(key, None)
        for key in ('pretrained_model_path', 'seesr_model_path', 'addsr_model_path'):
            if key in network_opt or key == 'pretrained_model_path':
                opt[key] = f'<planned {key}>'
    return opt


def _meta_model_class(model_class):
    """``model_class`` whose ``device`` is ``meta`` whatever BasicSR's base class assigns (cuda / cpu)."""
    return type(f'Planned{model_class.__name__}', (model_class,), {
        'device': property(lambda self: torch.device('meta'), lambda self, value: None)})


def apply_overrides(opt, overrides):
    """Set dotted keys in a nested option dict, as ``--force_yml``: ``['train.optim_g.type=AdamW8bit', ...]``.

    Values are read as YAML by the safe loader (``true``, ``null``, ``[a, b]``); a number that YAML 1.1 leaves a
    string (``1e-5``, BasicSR files write ``!!float 1e-5``) is read as a float.
    """
    import yaml
    for item in overrides or ():
        if '=' not in item:
            raise ValueError(f"--set {item!r}: expected dotted.key=value (e.g. network_g.gradient_checkpointing=true).")
        key, value = item.split('=', 1)
        node = opt
        *parents, leaf = key.strip().split('.')
        for part in parents:
            node = node.setdefault(part, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[leaf] = parsed
    return opt


def training_options(opt, real_size=True):
    """A DSPOModel option dict for the plan: the file's network and training sections, no data sets, no logs."""
    train = copy.deepcopy(opt.get('train') or {})
    train.setdefault('optim_g', {'type': 'AdamW', 'lr': 5e-6})
    train.setdefault('preference_opt', {'type': 'DSPOLoss', 'beta': DEFAULT_BETA})
    train.setdefault('scheduler', {'type': 'MultiStepLR', 'milestones': [10**6], 'gamma': 0.5})
    train['total_iter'] = int(train.get('accumulate_grad_batches', 1))
    train.pop('ema_decay', None)
    return {
        'name': 'gpu_plan', 'model_type': opt.get('model_type', 'DSPOModel'), 'scale': opt.get('scale', 4),
        'num_gpu': 0, 'is_train': True, 'dist': False, 'rank': 0, 'world_size': 1, 'auto_resume': False,
        'network_g': planned_network_options(opt['network_g'], real_size),
        'path': {'pretrain_network_g': None, 'models': '/nonexistent', 'training_states': '/nonexistent'},
        'train': train, 'val': {'sample': copy.deepcopy((opt.get('val') or {}).get('sample') or {})},
    }


# ---------------------------------------------------------------------------- CUDA's kernels on meta
class CudaOnMeta(torch.overrides.TorchFunctionMode):
    """What CUDA does differently from the ``meta`` device in a training step: autocast and fused attention.

    Attention: ``F.scaled_dot_product_attention`` without a mask runs as PyTorch's memory-efficient kernel
    (``aten._scaled_dot_product_efficient_attention``), which CUDA picks for these shapes and which keeps no
    (L x L) attention matrix for backward; on meta the call would take the math path, which does.

    ``dtype`` (``torch.autocast('cuda', dtype)``; None: no autocast), applied above autograd as autocast is:
    the floating inputs of matrix products, convolutions and attention are cast to ``dtype`` (so backward
    saves the low-precision copies, as on CUDA), and normalisations and softmax run in float32 (CUDA
    autocast's float32 list); other ops follow type promotion. A torch-function mode is switched off while
    it handles a call, so ``Tensor.backward`` runs with the mode pushed again: gradient checkpointing's
    recomputation in the backward pass then casts as the forward did.
    """

    LOW = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.mm, torch.bmm,
           torch.baddbmm, torch.addmm, F.scaled_dot_product_attention, torch.Tensor.__matmul__, torch.Tensor.matmul,
           torch.Tensor.bmm, torch.Tensor.mm}
    HIGH = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax}

    def __init__(self, dtype=None):
        super().__init__()
        self.dtype = dtype

    def fused_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        **kwargs):
        if attn_mask is not None or kwargs.get('enable_gqa'):
            return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                  **kwargs)
        if self.dtype is not None:
            query, key, value = (t.to(self.dtype) for t in (query, key, value))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, grad, dropout_p, is_causal, scale=scale)[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.fused_attention(*args, **kwargs)
        if func is torch.Tensor.backward:
            from torch.autograd.graph import _engine_run_backward
            loss = args[0]
            gradient = args[1] if len(args) > 1 else kwargs.get('gradient')
            with self:
                _engine_run_backward((loss,), (torch.ones_like(loss) if gradient is None else gradient,), False, False,
                                     (), allow_unreachable=True, accumulate_grad=True)
            return None
        target = None if self.dtype is None else self.dtype if func in self.LOW else \
            torch.float32 if func in self.HIGH else None
        if target is not None:
            def cast(value):
                return value.to(target) if torch.is_tensor(value) and value.is_floating_point() else value
            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------- FLOPs by phase
class PhaseFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` that also sums FLOPs by phase of a DSPO step.

    Phase of an op: ``backward`` inside autograd's backward pass; ``vae`` / ``condition`` inside the VAE /
    text encoder or RAM modules; ``reference forward`` when gradients are off (the frozen reference runs under
    ``no_grad``); else ``policy forward``.
    """

    def __init__(self, framework):
        super().__init__(display=False)
        self.phase_flops = OrderedDict((p, 0) for p in ('policy forward', 'reference forward', 'backward', 'vae',
                                                        'condition'))
        self._inside = []
        self._hooks = []
        for name in ('vae', 'lq_vae', 'text_encoder', 'ram'):
            module = getattr(framework, name, None)
            if not isinstance(module, torch.nn.Module):
                continue
            phase = 'vae' if 'vae' in name else 'condition'
            # the VAE is used through .encode / .decode, which do not call its forward: hook its parts
            for part in module.children() if phase == 'vae' else (module,):
                self._hooks.append(part.register_forward_pre_hook(partial(self._enter, phase)))
                self._hooks.append(part.register_forward_hook(self._leave))

    def _enter(self, phase, module, args):
        self._inside.append(phase)

    def _leave(self, module, args, output):
        self._inside.pop()  # a forward hook returning a value would replace the module's output

    def remove_hooks(self):
        for hook in self._hooks:
            hook.remove()

    def _phase(self):
        if torch._C._current_graph_task_id() != -1:
            return 'backward'
        if self._inside:
            return self._inside[-1]
        return 'policy forward' if torch.is_grad_enabled() else 'reference forward'

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.get_total_flops()
        result = super()._count_flops(func_packet, out, args, kwargs)
        self.phase_flops[self._phase()] += self.get_total_flops() - before
        return result


# ---------------------------------------------------------------------------- the plan
def _under(mode, function):
    def call(*args, **kwargs):
        with mode:
            return function(*args, **kwargs)
    return call


def planned_autocast(framework):
    """:class:`CudaOnMeta` with autocast at the framework's ``mixed_precision`` dtype (those frameworks run every
    network under autocast); :func:`plan_step` adds ``train.reference_dtype``'s autocast around the reference."""
    return CudaOnMeta(getattr(framework, 'compute_dtype', None))


class _NoHook:
    def remove(self):
        pass


def memory_tracker(*modules):
    """A ``MemTracker`` for a DSPO step through ``modules`` that have frozen parameters. Two adaptations, both
    about its per-module statistics (the planner reads only the global peak):

    * MemTracker installs a gradient hook on every parameter of a module it enters, which torch refuses for
      a parameter that does not require gradients; such parameters get a no-op handle, so it skips them.
    * It refuses a top-level module entered twice in one tracked region (it takes that for a second
      iteration); a DSPO step calls the shared UNet twice from the top (policy, then reference), so the
      module's statistics start again instead.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepMemTracker(MemTracker):
        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {'Global'}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

    tracker = StepMemTracker()
    for module in modules:
        for param in module.parameters():
            if not param.requires_grad:
                tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    return tracker


def _memory_split(snapshot):
    """MemTracker's per-device snapshot -> bytes by category (parameters, gradients, ...)."""
    totals = OrderedDict((k, 0) for k in ('Parameter', 'Gradient', 'Optstate', 'Activation', 'Temp', 'Buffer',
                                          'Other', 'Total'))
    for per_device in snapshot.values():
        for kind, value in per_device.items():
            name = getattr(kind, 'value', kind)
            name = 'Total' if name == 'Total' else name
            totals[name] = totals.get(name, 0) + int(value)
    names = dict(Parameter='parameters', Gradient='gradients', Optstate='optimizer_state', Activation='activations',
                 Temp='temporaries', Buffer='buffers', Other='inputs', Total='total')
    return OrderedDict((names.get(k, k), v) for k, v in totals.items())


def expected_state_bytes(model):
    """Parameter / gradient / optimizer-state bytes computed by hand from ``numel()`` (for checks).

    Parameters: every parameter of the framework and of the reference's frozen copies at its own dtype;
    gradients: the trainable ones; optimizer state: AdamW's two moments per trainable element at the
    parameter's dtype (plus one 4-byte step count per tensor).
    """
    params = list(model.bare.parameters()) + [p for m in model.net_ref.copies.values() for p in m.parameters()]
    trainable = [p for p in model.bare.parameters() if p.requires_grad]
    return OrderedDict(
        parameters=sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values()),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_state=sum(2 * p.numel() * p.element_size() + 4 for p in trainable))


def eight_bit_state_bytes(params, blocksize=256, min_8bit_size=4096):
    """Bytes of bitsandbytes' ``AdamW8bit`` state for ``params`` (bitsandbytes/optim/optimizer.py,
    ``Optimizer2State.init_state``): a tensor of at least ``min_8bit_size`` elements keeps both moments in uint8
    plus one float32 absmax per block of ``blocksize`` for each; a smaller one keeps float32 moments. Plus the
    4-byte step count per tensor.
    """
    total = 0
    for p in params:
        n = p.numel()
        if n < min_8bit_size:
            total += 2 * 4 * n + 4
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / blocksize) + 4
    return total


def _with_eight_bit_state(memory, adamw_bytes, eight_bit_bytes):
    """A memory split with AdamW's state replaced by the 8-bit optimizer's (same peak otherwise)."""
    memory = OrderedDict(memory)
    delta = eight_bit_bytes - adamw_bytes
    memory['optimizer_state'] += delta
    memory['total'] += delta
    return memory


def plan_step(opt, size=512, candidates=4, batch=1, instances=8, real_size=True, validation=True,
              cached_latents=False):
    """Build ``opt``'s framework on ``meta`` and measure one training step and one validation sample.

    Args:
        opt (dict): Option dict as read from an option file (``network_g``, ``train``, ``val.sample``).
        size (int): Candidate (SR) size in pixels; the LQ is ``size / scale``.
        candidates (int): Candidates per LQ image.
        batch (int): LQ images per step.
        instances (int): Instances of the synthetic label map.
        real_size (bool): Released sizes (True) or the option file's own build (tests: a demo ``Tiny*Arch``).
        validation (bool): Also plan one validation sample.
        cached_latents (bool): The batch carries the candidates' stored VAE posteriors
            (``scripts/add_candidate_latents.py``), so the step runs no VAE encoder on the candidates.

    Returns:
        dict: ``memory`` (bytes by category at the step's peak; gradients are freed before each step, so the
        peak of a step without accumulation may fall before they exist), ``memory_after_step`` (by category after
        the step: parameters, gradients, optimizer state), ``flops`` (by phase and total), ``step_time_floor_s``
        (per GPU), ``validation`` (FLOPs and peak of one sample), ``expected``
        (:func:`expected_state_bytes`), ``settings``.
    """
    import dspo_basicsr  # noqa: F401  (registration)
    from dspo_basicsr.models.dspo_model import DSPOModel
    from dspo_basicsr.utils.optimizers import EIGHT_BIT_OPTIMIZERS
    from dspo_basicsr.utils.registry import registry_get

    from basicsr.utils.registry import MODEL_REGISTRY
    train_opt = training_options(opt, real_size)
    # bitsandbytes' 8-bit kernels cannot run on meta tensors: the step runs AdamW, whose state is then replaced
    # by the 8-bit layout's bytes (eight_bit_state_bytes); everything else is the same step
    optimizer_type = train_opt['train']['optim_g']['type']
    if optimizer_type in EIGHT_BIT_OPTIMIZERS:
        train_opt['train']['optim_g']['type'] = 'AdamW'
    model_class = registry_get(MODEL_REGISTRY, train_opt['model_type'])
    if not issubclass(model_class, DSPOModel):
        raise ValueError(f"model_type {train_opt['model_type']} is not a DSPOModel; the planner plans DSPOModel "
                         'steps (DSPO, Diffusion-DPO, SFT, Diffusion-DRO).')
    loaders = real_size_loaders() if real_size else contextlib.nullcontext()
    with loaders, torch.device('meta'):
        model = _meta_model_class(model_class)(train_opt)
    bare = model.bare
    reference = model.net_ref
    if reference.dtype is not None:  # train.reference_dtype: the reference's own autocast, emulated on meta
        reference.predict_noise = _under(CudaOnMeta(reference.dtype), reference.predict_noise)
    data = synthetic_preference_batch(batch, candidates, instances, size, 'meta', scale=bare.scale)
    from dspo_basicsr.archs.seesr_arch import SeeSRArch
    if isinstance(bare, SeeSRArch):  # SeeSR and AddSR (and their demo Tiny*Arch types)
        dim = getattr(bare, 'image_embed_dim', RAM_EMBEDS_SHAPE[1])
        data['extras'] = {'ram_embeds': torch.empty(batch, RAM_EMBEDS_SHAPE[0], dim, device='meta')}
    if cached_latents:  # (B, K, 2, C, h, w): posterior mean and std per candidate, as the dataset gives them
        factor, channels = bare.vae_scale_factor, bare.vae.config.latent_channels
        data['candidate_latents'] = torch.empty(batch, candidates, 2, channels, size // factor, size // factor,
                                                device='meta')
        data['candidate_latents_vae'] = [bare.vae_digest()] * batch
    iteration = iter(range(1, 10**6))

    def step():
        model.feed_data(data)
        for _ in range(model.accumulate):
            model.optimize_parameters(next(iteration))

    autocast = planned_autocast(bare)
    counter = PhaseFlopCounter(bare)
    try:
        with counter, autocast:
            step()  # creates the optimizer state
    finally:
        counter.remove_hooks()
    tracker = memory_tracker(model.net_g, *model.net_ref.copies.values())
    tracker.track_external(model.net_g, *model.net_ref.copies.values(), model.optimizer_g,
                           *[v for v in data.values() if torch.is_tensor(v)])
    with tracker, planned_autocast(bare):
        step()
        after_step = _memory_split(tracker.get_tracker_snapshot('current'))
    memory = _memory_split(tracker.get_tracker_snapshot('peak'))
    if optimizer_type in EIGHT_BIT_OPTIMIZERS:
        adamw = after_step['optimizer_state']
        eight_bit = eight_bit_state_bytes(model.trainable_params)
        memory = _with_eight_bit_state(memory, adamw, eight_bit)
        after_step = _with_eight_bit_state(after_step, adamw, eight_bit)
    flops = OrderedDict((k, int(v)) for k, v in counter.phase_flops.items())
    flops['total'] = int(counter.get_total_flops())
    result = OrderedDict(
        settings=OrderedDict(framework=bare.__class__.__name__, size=size, candidates=candidates, batch=batch,
                             trainable=list(bare.trainable), feedback_guidance=getattr(model, 'feedback_scale', None),
                             optimizer=optimizer_type,
                             objective=train_opt['train']['preference_opt']['type'],
                             mixed_precision=train_opt['network_g'].get('mixed_precision'),
                             gradient_checkpointing=bool(train_opt['network_g'].get('gradient_checkpointing')),
                             reference_dtype=train_opt['train'].get('reference_dtype'),
                             accumulate_grad_batches=model.accumulate, cached_latents=cached_latents),
        parameters_M=OrderedDict(
            trainable=round(sum(p.numel() for p in bare.parameters() if p.requires_grad) / 1e6, 1),
            frozen=round(sum(p.numel() for p in bare.parameters() if not p.requires_grad) / 1e6, 1),
            reference_copies=round(sum(p.numel() for m in model.net_ref.copies.values()
                                       for p in m.parameters()) / 1e6, 1)),
        memory=memory, memory_after_step=after_step, expected=expected_state_bytes(model), flops=flops,
        step_time_floor_s=OrderedDict((gpu, flops['total'] / (peak * 1e12))
                                      for gpu, peak in GPU_PEAK_BF16_TFLOPS.items()))
    if validation:
        result['validation'] = plan_validation_sample(model, data, train_opt['val']['sample'])
    return result


def plan_validation_sample(model, data, sample_opt):
    """FLOPs (denoiser / VAE) and peak memory of one validation sample of one LQ image with ``val.sample``."""
    from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
    bare = model.bare
    if hasattr(bare, 'image_embeddings') and getattr(bare, 'ram', None) is None:
        return OrderedDict(skipped='sampling needs RAM image embeddings of the LQ; the planner builds no RAM '
                                   '(its Swin-L is not in the step) and a validation sample is not planned')
    lq = data['lq'][:1]
    options = dict(sample_opt, prompt_source='prompt')  # RAM tags need the RAM tagger's weights
    counter = PhaseFlopCounter(bare)
    tracker = memory_tracker(model.net_g, *model.net_ref.copies.values())
    tracker.track_external(model.net_g, lq)
    model.net_g.eval()
    try:
        with counter:
            sample_with_options(bare, lq, options)
        with tracker:
            sample_with_options(bare, lq, options)
    finally:
        counter.remove_hooks()
        model.net_g.train()
    return OrderedDict(flops_denoiser=int(counter.phase_flops['reference forward']),
                       flops_vae=int(counter.phase_flops['vae']), flops_condition=int(counter.phase_flops['condition']),
                       flops_total=int(counter.get_total_flops()),
                       steps=sample_opt.get('steps') or bare.default_steps,
                       peak_bytes=_memory_split(tracker.get_tracker_snapshot('peak'))['total'])


# ---------------------------------------------------------------------------- output
def _gib(value):
    return f'{value / 2**30:.2f}'


def format_plan(plan):
    """A plain-text table of one plan (what ``scripts/plan_gpu.py`` prints)."""
    s = plan['settings']
    lines = [f"{s['framework']}: {s['size']} px, {s['candidates']} candidates x {s['batch']} LQ, trainable "
             f"{'+'.join(s['trainable'])}, feedback guidance {s['feedback_guidance'] or 'off'}, "
             f"{s['optimizer']}, mixed precision {s['mixed_precision'] or 'off'}, gradient checkpointing "
             f"{'on' if s['gradient_checkpointing'] else 'off'}",
             f"parameters (M): trainable {plan['parameters_M']['trainable']}, frozen {plan['parameters_M']['frozen']}, "
             f"reference copies {plan['parameters_M']['reference_copies']}", '',
             'peak memory of the step      GiB']
    for key, value in plan['memory'].items():
        lines.append(f'  {key:<26} {_gib(value):>7}')
    lines += ['', 'FLOPs of the step            TFLOP']
    for key, value in plan['flops'].items():
        lines.append(f'  {key:<26} {value / 1e12:>9.2f}')
    lines += ['', 'step time floor (FLOPs / dense bf16 peak)']
    for gpu, seconds in plan['step_time_floor_s'].items():
        lines.append(f'  {gpu:<26} {seconds:>7.3f} s')
    if 'validation' in plan and 'skipped' in plan['validation']:
        lines += ['', f"validation sample: {plan['validation']['skipped']}"]
    elif 'validation' in plan:
        v = plan['validation']
        lines += ['', f"one validation sample ({v['steps']} steps): {v['flops_total'] / 1e12:.1f} TFLOP "
                      f"(denoiser {v['flops_denoiser'] / 1e12:.1f}, VAE {v['flops_vae'] / 1e12:.1f}), "
                      f"peak {_gib(v['peak_bytes'])} GiB"]
    return '\n'.join(lines)


#: The frameworks of ``--matrix``: (label, option file, what each can train).
MATRIX_FRAMEWORKS = (
    ('SD2 + ControlNet', 'options/dspo_sd21.yml', ('controlnet', 'unet_lora', 'unet')),
    ('SeeSR', 'options/dspo_seesr.yml', ('controlnet', 'unet_lora', 'unet')),
    ('AddSR', 'options/dspo_addsr.yml', ('controlnet', 'unet_lora', 'unet')),
    ('OSEDiff', 'options/dspo_osediff.yml', ('unet_lora', 'unet')),
)


def matrix_cases():
    """The rows of ``--matrix``: every framework x trainable, with 4 candidates, M1 and checkpointing off; the
    default trainable part (first) also with 2 candidates, with M2 and with checkpointing on (a subset of the
    full product, which would take 4 x 2 x 2 x 3 x 2 = 96 plans)."""
    for label, path, trainables in MATRIX_FRAMEWORKS:
        for trainable in trainables:
            yield label, path, dict(candidates=4, feedback=0, trainable=trainable, checkpointing=False)
        first = trainables[0]
        yield label, path, dict(candidates=2, feedback=0, trainable=first, checkpointing=False)
        yield label, path, dict(candidates=4, feedback=5.5, trainable=first, checkpointing=False)
        yield label, path, dict(candidates=4, feedback=0, trainable=first, checkpointing=True)


def plan_matrix(read_options, size=512, overrides=(), cases=None):
    """Plans of :func:`matrix_cases` (``read_options(path)`` reads an option file). Returns a list of (label, case,
    plan)."""
    rows = []
    for label, path, case in cases or matrix_cases():
        opt = read_options(path)
        sets = [f"network_g.trainable={case['trainable']}",
                f"network_g.gradient_checkpointing={str(case['checkpointing']).lower()}",
                f"train.feedback_guidance_scale={case['feedback'] or 'null'}", *overrides]
        apply_overrides(opt, sets)
        try:
            plan = plan_step(opt, size=size, candidates=case['candidates'], validation=False)
        except (TypeError, ValueError) as err:  # e.g. a framework without gradient_checkpointing
            plan = {'error': str(err).splitlines()[0][:120]}
        rows.append((label, case, plan))
    return rows


#: Held by the CUDA context, cuBLAS workspaces and allocator slack beyond the planned tensors (GiB), in "fits".
CUDA_OVERHEAD_GIB = 1.5


def fits_on(peak_bytes, cards=(24, 40, 80)):
    """The smallest card (GiB of memory; a "24 GB" RTX 4090 has 24 GiB) that holds ``peak_bytes`` plus
    :data:`CUDA_OVERHEAD_GIB`, or ``'> 80 GB'``."""
    peak = peak_bytes / 2**30 + CUDA_OVERHEAD_GIB
    return next((f'{gb} GB' for gb in cards if peak <= gb), f'> {cards[-1]} GB')


def matrix_markdown(rows):
    """The markdown table of :func:`plan_matrix` rows (for ``docs/frameworks.md``): parameters, gradients and
    optimizer state as held after the step, activations and the total at the step's peak."""
    head = ('| framework | trainable | K | M2 | ckpt | params GiB | grads GiB | optim GiB | activations GiB | '
            'peak GiB | fits | TFLOP/step | H100 floor s |\n' + '| --- ' * 13 + '|')
    lines = [head]
    for label, case, plan in rows:
        start = (f"| {label} | {case['trainable']} | {case['candidates']} | {'on' if case['feedback'] else 'off'} | "
                 f"{'on' if case['checkpointing'] else 'off'} |")
        if 'error' in plan:
            lines.append(f"{start} n/a: {plan['error'].replace('|', '/')} |" + ' |' * 7)
            continue
        m, held = plan['memory'], plan.get('memory_after_step', plan['memory'])
        lines.append(
            f"{start} {_gib(held['parameters'])} | {_gib(held['gradients'])} | {_gib(held['optimizer_state'])} | "
            f"{_gib(m['activations'] + m['temporaries'])} | {m['total'] / 2**30:.1f} | {fits_on(m['total'])} | "
            f"{plan['flops']['total'] / 1e12:.1f} | {plan['step_time_floor_s']['H100 SXM']:.2f} |")
    return '\n'.join(lines)
