"""OSEDiff: one-step diffusion SR from the LQ image's VAE latent, with LoRA on the UNet and VAE encoder.

Paper: Wu et al., "One-Step Effective Diffusion Network for Real-World Image Super-Resolution", NeurIPS 2024
(https://github.com/cswry/OSEDiff). Fine-tuned with DSPO in "DSPO: Direct Semantic Preference Optimization
for Real-World Image Super-Resolution".

Forward (OSEDiff's ``OSEDiff_test``): the bicubic x4 LQ in [-1, 1] goes through the VAE encoder with OSEDiff's
LoRA; its latent z_L is the UNet input at t = 999 (text prompt: DAPE tags); the prediction gives
x0 = (z_L - sqrt(1 - a) eps) / sqrt(a) (a = alphas_cumprod[999]), decoded by the original SD VAE decoder.

Preference likelihood at the operating point (docs/extending.md, the framework interface;
``likelihood_point: operating_point``):
x_t = z_L, t = 999 and, for a candidate with latent z_c, the target is the noise that maps z_c to z_L,
``eps_c = (z_L - sqrt(a) z_c) / sqrt(1 - a)``. Then ``|eps_hat - eps_c|^2 = a / (1 - a) * |x0_hat - z_c|^2``:
DSPO with ``beta`` on these errors is DSPO on x0-space errors with the equivalent
``beta_x0 = beta * a / (1 - a)``; for SD2's schedule a = 0.004660 at t = 999, so beta = 8000 is
beta_x0 = 37.46 (:func:`equivalent_x0_beta`). ``likelihood_point: noise`` instead noises the candidate latent at
random t like the multi-step frameworks.

Checkpoint layout (local paths only):
    pretrained_model_path/  SD2.1-base folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)
    osediff_path            OSEDiff's ``osediff.pkl``: a dict of plain values and tensors, read with
                            ``torch.load(weights_only=True)`` and refused if it holds anything else:
                            ``rank_unet``, ``rank_vae`` (int), ``unet_lora_encoder_modules``,
                            ``unet_lora_decoder_modules``, ``unet_lora_others_modules``,
                            ``vae_lora_encoder_modules`` (lists of module names), ``state_dict_unet`` (every
                            LoRA parameter of the adapters ``default_encoder`` / ``default_decoder`` /
                            ``default_others`` and ``conv_in``), ``state_dict_vae`` (LoRA of
                            ``default_encoder``). Every key is checked; the LoRA is merged into the weights
                            (as OSEDiff's ``merge_and_unload_lora``), so the base network is OSEDiff itself.
    ram_path / dape_path    RAM and DAPE (:mod:`dspo_basicsr.archs.ram_arch`), only for ``prompt_source: tags``:
                            ``test_osediff.py`` prompts with DAPE's tags of the bicubic x4 LQ, ``f"{tags}, {prompt},"``.
Weights licence: OSEDiff's LoRA is released with its repository (Apache-2.0, check there); Stable Diffusion
2.1 weights are under the CreativeML Open RAIL++-M licence.

What DSPO trains: a new LoRA (adapter ``dspo``) on the UNet (``trainable: unet_lora``); the reference is the
same network with that adapter disabled, so it costs no memory.
"""
import copy

import torch

from dspo_basicsr.archs.control_sd2_arch import load_sd_components
from dspo_basicsr.archs.diffusion_sr_base import DEFAULT_LORA_TARGETS, DiffusionSRArch, check_state_dict_matches
from dspo_basicsr.archs.precision import LowPrecisionFrozenPartsMixin
from dspo_basicsr.utils.checkpoint import read_checkpoint

from basicsr.utils.registry import ARCH_REGISTRY

OSEDIFF_TIMESTEP = 999
OSEDIFF_UNET_ADAPTERS = (('default_encoder', 'unet_lora_encoder_modules'),
                         ('default_decoder', 'unet_lora_decoder_modules'),
                         ('default_others', 'unet_lora_others_modules'))
# peft's LoraConfig default lora_alpha, which OSEDiff's LoraConfig(r=rank, ...) used.
OSEDIFF_LORA_ALPHA = 8
_REQUIRED = {'rank_unet': int, 'rank_vae': int, 'unet_lora_encoder_modules': list, 'unet_lora_decoder_modules': list,
             'unet_lora_others_modules': list, 'vae_lora_encoder_modules': list, 'state_dict_unet': dict,
             'state_dict_vae': dict}
_UNET_PATTERNS = ('to_k', 'to_q', 'to_v', 'to_out.0', 'conv', 'conv1', 'conv2', 'conv_in', 'conv_shortcut', 'conv_out',
                  'proj_out', 'proj_in', 'ff.net.2', 'ff.net.0.proj')
_VAE_PATTERNS = ('conv1', 'conv2', 'conv_in', 'conv_shortcut', 'conv', 'conv_out', 'to_k', 'to_q', 'to_v', 'to_out.0')


def equivalent_x0_beta(beta, alpha_cumprod):
    """beta of the x0-space errors equivalent to ``beta`` on operating-point noise errors: beta a / (1 - a)."""
    return beta * alpha_cumprod / (1 - alpha_cumprod)


def _check_plain(value, path, where='osediff_path'):
    """Refuse anything but tensors, str-keyed dicts, lists/tuples and plain scalars (recursively)."""
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"OSEDiff LoRA file '{path}': {where} has a non-string key {key!r}; refusing it.")
            _check_plain(item, path, f'{where}[{key!r}]')
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, path, f'{where}[{i}]')
        return
    raise ValueError(f"OSEDiff LoRA file '{path}': {where} is a {type(value).__name__}, not a tensor or plain value; "
                     'refusing the file.')


def read_osediff_lora(path):
    """Read OSEDiff's released LoRA file without unpickling objects and check its fields.

    Returns:
        dict: the file's dict (see the module docstring).
    """
    state = read_checkpoint(path, "OSEDiff LoRA (OSEDiff's osediff.pkl)", unwrap=())
    if not isinstance(state, dict):
        raise ValueError(f"OSEDiff LoRA file '{path}' is a {type(state).__name__}, expected a dict.")
    _check_plain(state, path)
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise KeyError(f"OSEDiff LoRA file '{path}': key '{key}' is missing or not a {kind.__name__}.")
    for key in ('state_dict_unet', 'state_dict_vae'):
        broken = [k for k, v in state[key].items() if not isinstance(v, torch.Tensor)]
        if broken:
            raise ValueError(f"OSEDiff LoRA file '{path}': '{key}' entry '{broken[0]}' is not a tensor.")
    return state


def osediff_lora_targets(model, patterns, scope):
    """Module names OSEDiff puts LoRA on: weights (not norms or biases) whose names hold a pattern.

    Args:
        scope (callable): name -> group key (e.g. encoder / decoder / others), or None to skip the name.

    Returns:
        dict[str, list[str]]: module names per group.
    """
    groups = {}
    for name, _ in model.named_parameters():
        if 'bias' in name or 'norm' in name or not name.endswith('.weight'):
            continue
        if any(p in name for p in patterns):
            group = scope(name)
            if group is not None:
                groups.setdefault(group, []).append(name[:-len('.weight')])
    return groups


def _unet_scope(name):
    if 'down_blocks' in name or 'conv_in' in name:
        return 'unet_lora_encoder_modules'
    if 'up_blocks' in name or 'conv_out' in name:
        return 'unet_lora_decoder_modules'
    return 'unet_lora_others_modules'


def _vae_scope(name):
    # OSEDiff's ``initialize_vae`` (``osediff.py``): the encoder's layers and ``quant_conv`` (not ``post_quant_conv``);
    # it appends ``quant_conv`` once per pattern, a repetition peft ignores.
    return 'vae_lora_encoder_modules' if name.startswith('encoder.') or name == 'quant_conv.weight' else None


def inject_osediff_adapters(unet, vae, lora):
    """Add OSEDiff's LoRA adapters (peft) to a UNet and a VAE, as OSEDiff's ``load_ckpt`` does."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model
    with warnings.catch_warnings():
        # Several adapters on one network is what OSEDiff does; peft warns about it from the second one on.
        warnings.filterwarnings('ignore', message='Already found a `peft_config` attribute')
        for adapter, key in OSEDIFF_UNET_ADAPTERS:
            if lora[key]:
                config = LoraConfig(r=lora['rank_unet'], lora_alpha=OSEDIFF_LORA_ALPHA, init_lora_weights='gaussian',
                                    target_modules=list(lora[key]))
                inject_adapter_in_model(config, unet, adapter_name=adapter)
        if lora['vae_lora_encoder_modules']:
            config = LoraConfig(r=lora['rank_vae'], lora_alpha=OSEDIFF_LORA_ALPHA, init_lora_weights='gaussian',
                                target_modules=list(lora['vae_lora_encoder_modules']))
            inject_adapter_in_model(config, vae, adapter_name='default_encoder')


def _load_named(model, state, select, source):
    params = {n: p for n, p in model.named_parameters() if select(n)}
    check_state_dict_matches(params, state, source, 'the network with OSEDiff adapters',
                             hint="Check that the SD folder is SD2.1-base and the file is OSEDiff's osediff.pkl.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merge_and_unload_adapters(model):
    """Merge every peft LoRA adapter of ``model`` into its base layers and remove the adapter layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=list(module.lora_A.keys()))
            parent_name, _, child = name.rpartition('.')
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if 'peft_config' in model.__dict__:  # peft's record of the injected adapters, now merged away
        del model.__dict__['peft_config']
    return model


def load_osediff_lora(unet, vae, path):
    """Load OSEDiff's LoRA into a UNet and (a copy of) the VAE, merged. Returns (unet, lq_vae)."""
    lora = read_osediff_lora(path)
    lq_vae = copy.deepcopy(vae)
    inject_osediff_adapters(unet, lq_vae, lora)
    _load_named(unet, lora['state_dict_unet'], lambda n: 'lora' in n or 'conv_in' in n,
                f"OSEDiff LoRA file '{path}' [state_dict_unet]")
    _load_named(lq_vae, lora['state_dict_vae'], lambda n: 'lora' in n, f"OSEDiff LoRA file '{path}' [state_dict_vae]")
    return merge_and_unload_adapters(unet), merge_and_unload_adapters(lq_vae)


def save_osediff_lora(unet, vae, path, rank_unet=4, rank_vae=4, seed=0):
    """Write a random OSEDiff LoRA file for the given (plain) UNet and VAE, in OSEDiff's released format.

    LoRA B matrices are random (not zero) so that loading them changes the network measurably.
    """
    unet, vae = copy.deepcopy(unet), copy.deepcopy(vae)
    groups = osediff_lora_targets(unet, _UNET_PATTERNS, _unet_scope)
    groups.update(osediff_lora_targets(vae, _VAE_PATTERNS, _vae_scope))
    lora = {'rank_unet': rank_unet, 'rank_vae': rank_vae}
    for _, key in OSEDIFF_UNET_ADAPTERS + ((None, 'vae_lora_encoder_modules'),):
        lora[key] = groups.get(key, [])
    inject_osediff_adapters(unet, vae, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae):
            for name, p in model.named_parameters():
                if 'lora_' in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    lora['state_dict_unet'] = {k: v.clone() for k, v in unet.state_dict().items() if 'lora' in k or 'conv_in' in k}
    lora['state_dict_vae'] = {k: v.clone() for k, v in vae.state_dict().items() if 'lora' in k}
    torch.save(lora, path)
    return path


@ARCH_REGISTRY.register()
class OSEDiffArch(LowPrecisionFrozenPartsMixin, DiffusionSRArch):
    """OSEDiff one-step SR as a DSPO framework.

    Args:
        pretrained_model_path (str | None): SD2.1-base folder (diffusers layout).
        osediff_path (str | None): OSEDiff's LoRA file (``osediff.pkl``); None keeps the plain SD weights
            (only for tests of the plumbing).
        scale (int): SR factor. Default: 4.
        trainable (str | list[str]): ``unet_lora`` (default) or ``unet``.
        likelihood_point (str): Where the preference likelihood is taken in training: ``operating_point``
            (x_t = LQ latent, t = 999, where sampling starts; default) or ``noise`` (noised candidate latents at
            random timesteps, as the multi-step frameworks).
        lora_rank, lora_alpha, lora_target_modules: the DSPO LoRA (see :class:`DiffusionSRArch`).
        default_guidance_scale (float): Guidance scale of :meth:`sample` (OSEDiff: 1, none).
        mixed_precision (str | None): ``bf16``: frozen weights in bf16, networks under autocast, LoRA in float32.
        gradient_checkpointing (bool): Recompute the trained UNet's activations (LoRA'd or full) in the backward
            pass. Default: False.
        components (dict | None): Built SD components (and, optionally, a RAM tagger ``ram``) instead of
            ``pretrained_model_path`` (Python callers; the demo's tiny types).
    """

    default_steps = 1

    def __init__(self, pretrained_model_path=None, osediff_path=None, scale=4, trainable='unet_lora',
                 likelihood_point='operating_point', lora_rank=4, lora_alpha=None,
                 lora_target_modules=DEFAULT_LORA_TARGETS, default_guidance_scale=1.0, mixed_precision=None,
                 ram_path=None,
                 dape_path=None, gradient_checkpointing=False, components=None):
        if components is None:
            if not pretrained_model_path:
                raise ValueError('OSEDiffArch needs pretrained_model_path (an SD2.1-base folder); tiny random '
                                 'networks are type: TinyOSEDiffArch (dspo_basicsr/demo/tiny_arch.py).')
            components = load_sd_components(pretrained_model_path)
        components = dict(components)
        ram = components.pop('ram', None)
        if likelihood_point not in ('operating_point', 'noise'):
            raise ValueError(f"likelihood_point must be 'operating_point' or 'noise', got {likelihood_point!r}.")
        if osediff_path:
            components['unet'], lq_vae = load_osediff_lora(components['unet'], components['vae'], osediff_path)
        else:
            lq_vae = copy.deepcopy(components['vae'])
        super().__init__(**components, scale=scale, trainable=trainable, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_target_modules=lora_target_modules)
        # The LQ encoder carries OSEDiff's VAE-encoder LoRA; candidates are encoded by the original encoder,
        # the inverse of the (original) decoder that renders the output.
        self.lq_vae = lq_vae
        if ram_path:
            ram = self.load_ram(ram_path, dape_path, tagging=True)
        self.ram = ram
        self.likelihood_point = likelihood_point
        self.default_guidance_scale = default_guidance_scale
        self.setup_trainable()
        self.setup_mixed_precision(mixed_precision)
        self.setup_gradient_checkpointing(gradient_checkpointing)

    # ------------------------------------------------------------------ operating point
    @property
    def operating_alpha(self):
        """alphas_cumprod at t = 999 (a scalar tensor)."""
        return self.noise_scheduler.alphas_cumprod[OSEDIFF_TIMESTEP]

    @torch.no_grad()
    def lq_latents(self, lq, generator=None):
        """LQ (B, 3, h, w) in [0, 1] -> z_L (B, C, h*s/f, w*s/f): OSEDiff's encoder on the bicubic x s LQ
        (the posterior mode, or a sample drawn with ``generator`` when one is given)."""
        images = self.upsample_lq(lq) * 2 - 1
        with self.autocast(), self.vae_part(self.lq_vae, 'encoder'):
            dist = self.lq_vae.encode(images).latent_dist
            latents = (dist.sample(generator) if generator is not None else dist.mode()) \
                * self.lq_vae.config.scaling_factor
        return latents.float()

    def condition(self, lq, prompts, negative_prompts=None, generator=None, **extras):
        """LQ (B, 3, h, w) and B prompts -> ``lq_latents`` (B, C, h', w'), ``prompt_embeds`` (B, L, D)
        and, with negative prompts, ``negative_prompt_embeds`` (B, L, D)."""
        cond = {'lq_latents': self.lq_latents(lq, generator), 'prompt_embeds': self.encode_prompts(prompts)}
        if negative_prompts is not None:
            cond['negative_prompt_embeds'] = self.encode_prompts(negative_prompts)
        return cond

    def predict_noise(self, x_t, t, cond):
        """(N, C, h, w) latents and (N,) timesteps -> (N, C, h, w) noise (or v) prediction."""
        with self.autocast():
            return self.unet(x_t, t, encoder_hidden_states=cond['prompt_embeds'], return_dict=False)[0].float()

    def training_timesteps(self, batch, low, high, generator=None):
        """t = 999 for every sample at the operating point; uniform in [low, high) in ``noise`` mode."""
        if self.likelihood_point == 'operating_point':
            return torch.full((batch,), OSEDIFF_TIMESTEP, device=self.device, dtype=torch.long)
        return super().training_timesteps(batch, low, high, generator)

    def diffusion_inputs(self, latents, noise, t, cond):
        """Operating point: x_t = z_L and the target noise implied by each candidate latent z_c (N, C, h, w):
        ``eps_c = (z_L - sqrt(a_t) z_c) / sqrt(1 - a_t)`` (``noise`` is not used). ``noise`` mode: as the base."""
        if self.likelihood_point != 'operating_point':
            return super().diffusion_inputs(latents, noise, t, cond)
        x_t = cond['lq_latents'].to(latents.dtype)  # (N, C, h, w), repeated per candidate by the condition
        if x_t.shape != latents.shape:
            raise ValueError(f'LQ latents {tuple(x_t.shape)} and candidate latents {tuple(latents.shape)} differ; '
                             'the candidates must be scale x the LQ size.')
        alpha = self.noise_scheduler.alphas_cumprod.to(latents.device)[t].float().view(-1, 1, 1, 1)
        implied_noise = (x_t - alpha.sqrt() * latents) / (1 - alpha).sqrt()
        if self.noise_scheduler.config.prediction_type == 'v_prediction':
            return x_t, alpha.sqrt() * implied_noise - (1 - alpha).sqrt() * latents
        return x_t, implied_noise

    #: ``test_osediff.py`` tags the input after its process-size and multiple-of-8 resizes
    tags_processed_input = True

    def image_tags(self, lq):
        """DAPE tags of the bicubic x s LQ, the image ``test_osediff.py`` tags."""
        return super().image_tags(self.upsample_lq(lq))

    @torch.no_grad()
    def sample_images(self, lq, prompts, negatives, steps=None, guidance_scale=None, generator=None, sampler=None,
                      tiling=None, extras=None, noise_timestep=0):
        """One step: LQ (B, 3, h, w) in [0, 1] -> SR (B, 3, h*s, w*s) in [0, 1]; ``steps``/``sampler`` ignored.

        As ``OSEDiff_test.forward``, the LQ latent is sampled from the (LoRA) VAE encoder's posterior
        (``latent_dist.sample()``, here with the generator); training keeps its mode (a fixed operating point).
        ``noise_timestep`` s > 0 first noises that latent with the training schedule,
        ``z = sqrt(a_s) z_L + sqrt(1 - a_s) eps``, as GDPO-SR draws a diverse group for one LQ (Joyies/GDPO
        ``GDPOSR/modelfile/GDPOSR.py``, ``GDPOReference``; ``--time_step_noise 250`` in
        ``scripts/train/train_GDPOSR.sh``); the step is then taken from ``z``.
        """
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        cond = self.condition(lq, prompts, negatives if guidance_scale != 1 else None, generator=generator)
        z_lq = cond['lq_latents']
        if noise_timestep:
            noise = torch.randn(z_lq.shape, generator=generator, device=generator.device if generator else None)
            s = torch.full((z_lq.shape[0],), int(noise_timestep), dtype=torch.long, device=z_lq.device)
            z_lq = cond['lq_latents'] = self.add_noise(z_lq, noise.to(z_lq.device, z_lq.dtype), s)
        t = torch.full((lq.shape[0],), OSEDIFF_TIMESTEP, device=self.device, dtype=torch.long)
        eps = self.tiled_prediction(lambda x, c: self.guided_prediction(x, t, c, guidance_scale), z_lq, cond, tiling)
        alpha = self.operating_alpha.to(self.device).float()
        if self.noise_scheduler.config.prediction_type == 'v_prediction':
            x0 = alpha.sqrt() * z_lq - (1 - alpha).sqrt() * eps
        else:
            x0 = (z_lq - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return self.decode_latents(x0)
