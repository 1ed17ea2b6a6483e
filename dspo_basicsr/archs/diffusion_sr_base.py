"""What every diffusion SR framework shares: latents, prompts, noise schedule, guidance, sampling, LoRA.

A framework subclass (``ControlSD2Arch``, ``SeeSRArch``, ...) adds its networks and two methods:
``condition(lq, prompts, negative_prompts)`` (computed once per LQ image) and
``predict_noise(x_t, t, cond)``. ``forward`` is ``predict_noise``, so that DistributedDataParallel
sees the policy's trainable computation.

Conditions are dicts of batch-first tensors; by convention the text embeddings are under
``prompt_embeds`` and, when a negative prompt was given, ``negative_prompt_embeds``.
"""
import contextlib
import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
from dspo_basicsr.utils.checkpoint import check_state_dict_matches, missing_weights_error  # noqa: F401  (re-exported)

DEFAULT_LORA_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out.0')
# The keyword arguments of DiffusionSRArch.sample beyond steps / guidance_scale / sampler: the official test protocol.
SAMPLE_PROTOCOL_KEYS = ('prompt_source', 'color_fix', 'process_size', 'tile_size', 'tile_overlap', 'vae_tile')


def sample_protocol(options):
    """The protocol keyword arguments of :meth:`DiffusionSRArch.sample` set in ``options`` (e.g. ``val.sample``)."""
    options = resolve_sample_options(options)
    return {k: options[k] for k in SAMPLE_PROTOCOL_KEYS if options.get(k) is not None}


def sample_with_options(framework, lq, options, generator=None, **framework_options):
    """``framework.sample(lq)`` with the settings of a ``val.sample`` block: prompt, negative prompt, steps,
    guidance, sampler and the protocol keys (colour fix, tag prompts, tiling), as DSPOModel's validation samples;
    ``framework_options`` go to the framework's ``sample_images`` (e.g. OSEDiffArch's ``noise_timestep``)."""
    options = resolve_sample_options(options)
    return framework.sample(
        lq, prompt=options.get('prompt', ''), negative_prompt=options.get('negative_prompt'),
        steps=options.get('steps'), guidance_scale=options.get('guidance_scale'), generator=generator,
        sampler=options.get('sampler'), framework_options=framework_options,
        **sample_protocol(options))


def check_component_folder(path, subfolder, what):
    """Raise :func:`missing_weights_error` unless ``path/subfolder`` holds a config and weights."""
    folder = os.path.join(path, subfolder) if subfolder else path
    config = os.path.join(folder, 'config.json')
    if not os.path.isfile(config):
        raise missing_weights_error(path, os.path.join(subfolder, 'config.json') if subfolder else 'config.json', what)
    names = os.listdir(folder)
    if not any(n.endswith(('.safetensors', '.bin')) for n in names):
        expected = os.path.join(subfolder, 'diffusion_pytorch_model.safetensors') if subfolder else \
            'diffusion_pytorch_model.safetensors'
        raise missing_weights_error(path, expected, what)


def resize_images(images, size):
    """Images (B, C, h, w) in [0, 1] resized to ``size`` (H, W) with PIL's bicubic filter, which the official test
    scripts use (``PIL.Image.resize``: a = -0.5, antialiased when shrinking; torch's ``antialias=True`` bicubic is
    that filter), clamped to [0, 1]; returned as is when already that size."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)


def tile_starts(length, tile, overlap):
    """Offsets of tiles of size ``tile`` every ``tile - overlap`` along ``length``, the last flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, max(1, tile - overlap)))
    return starts + [length - tile]


def gaussian_tile_weights(height, width, device=None):
    """(height, width) Gaussian blending weights of a tile, variance 0.01 in tile-size units (SeeSR's
    ``pipeline_seesr.py`` ``_gaussian_weights``, centred at (n - 1) / 2 on both axes)."""
    def axis(n):
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - (n - 1) / 2) ** 2) / (n * n) / (2 * 0.01)) / math.sqrt(2 * math.pi * 0.01)
    return torch.outer(axis(height), axis(width)).float().to(device)


def crop_condition(value, latent_size, top, left, tile):
    """The window of a spatial condition tensor (N, C, h * k, w * k) matching latent window (top, left, tile);
    other values (text and RAM embeddings) are returned whole."""
    if not torch.is_tensor(value) or value.ndim != 4:
        return value
    k = value.shape[2] // latent_size[0]
    if k < 1 or value.shape[2] != k * latent_size[0] or value.shape[3] != k * latent_size[1]:
        return value
    return value[:, :, top * k:(top + tile) * k, left * k:(left + tile) * k]


def repeat_condition(cond, repeats):
    """Repeat every tensor of a condition ``repeats`` times along the batch: (B, ...) -> (B*repeats, ...)."""
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in cond.items()}


def join_negative_prompts(default, extra):
    """The framework's default negative prompt followed by a sample's own negative prompt, if any."""
    parts = [p.strip() for p in (default, extra) if p and p.strip()]
    return ', '.join(parts)


class DiffusionSRArch(nn.Module):
    """Base class of the latent-diffusion SR frameworks.

    Args:
        unet (nn.Module): Denoising UNet (diffusers ``UNet2DConditionModel`` or a subclass).
        vae (nn.Module): ``AutoencoderKL``.
        text_encoder (nn.Module): CLIP text model.
        tokenizer: CLIP tokenizer.
        noise_scheduler (DDPMScheduler): Training noise schedule.
        scale (int): SR factor of the framework's input LQ images.
        trainable (str | list[str]): What trains: submodule names (full fine-tuning, e.g. ``controlnet``,
            ``unet``) and ``<submodule>_lora`` for LoRA adapters on that submodule (e.g. ``unet_lora``).
        lora_rank (int): LoRA rank.
        lora_alpha (float | None): LoRA alpha; defaults to the rank.
        lora_target_modules (list[str]): Module names that get LoRA adapters.
        sampler (str): ``ddpm`` or ``ddim`` for :meth:`sample`.
    """

    default_negative_prompt = ''
    default_steps = 50
    default_guidance_scale = 5.5
    #: ``sample`` takes a list of generators, one per image (candidate batches: each row equals its own sample)
    accepts_generator_list = True
    #: Where :meth:`sample` starts (docs/frameworks.md, "Where sampling starts"): ``noise`` (pure noise) or
    #: ``lr`` (the bicubic LQ's latent noised to ``start_timestep``; the sampler's timesteps after it are skipped).
    start_point = 'noise'
    start_timestep = None

    def __init__(self, unet, vae, text_encoder, tokenizer, noise_scheduler, scale=4, trainable='controlnet',
                 lora_rank=4, lora_alpha=None, lora_target_modules=DEFAULT_LORA_TARGETS, sampler='ddpm'):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.scale = scale
        self.sampler = sampler
        self.trainable = [trainable] if isinstance(trainable, str) else list(trainable)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_target_modules = list(lora_target_modules)
        self.register_buffer('_device_probe', torch.zeros(()), persistent=False)

    # ---------------------------------------------------------------- trainable parts and reference
    def setup_trainable(self):
        """Freeze everything, then unfreeze the ``trainable`` parts (adding LoRA adapters where asked).

        Subclasses call this at the end of ``__init__``, once all submodules exist.
        """
        self.requires_grad_(False)
        for name in self.trainable:
            base = name[:-len('_lora')] if name.endswith('_lora') else name
            module = getattr(self, base, None)
            if not isinstance(module, nn.Module):
                raise ValueError(f"trainable part '{name}': {type(self).__name__} has no submodule '{base}'.")
            if name.endswith('_lora'):
                self._add_lora(module)
            else:
                module.requires_grad_(True)

    def _add_lora(self, module):
        from peft import LoraConfig, inject_adapter_in_model
        config = LoraConfig(
            r=self.lora_rank, lora_alpha=self.lora_alpha, init_lora_weights='gaussian',
            target_modules=self.lora_target_modules)
        inject_adapter_in_model(config, module, adapter_name='dspo')
        for name, param in module.named_parameters():
            if 'lora_' in name:
                param.requires_grad_(True)

    #: Networks of the denoising path: the gradient of the loss flows back through them to any trained part
    #: (a trained ControlNet's residuals go through the frozen UNet), so their activations are kept for backward.
    denoising_modules = ('unet', 'controlnet')

    def setup_gradient_checkpointing(self, enabled):
        """Recompute activations in the backward pass instead of keeping them (less memory, ~30% more time).

        Call after ``setup_trainable``. Checkpointed: every trained network (full or LoRA) and every denoising
        network (the UNet also when only the ControlNet trains: the ControlNet's gradient passes through it).
        diffusers' non-reentrant checkpointing carries gradients to LoRA weights inside a frozen network; a
        network that no gradient reaches (the ControlNet when only the UNet's LoRA trains) records nothing.
        The VAE and text encoder run without gradients and are left alone.

        Returns:
            list[str]: The submodules now checkpointed.
        """
        if not enabled:
            return []
        names = []
        for name, module in self.named_children():
            trains = any(p.requires_grad for p in module.parameters())
            if (trains or name in self.denoising_modules) and hasattr(module, 'enable_gradient_checkpointing'):
                module.enable_gradient_checkpointing()
                names.append(name)
        return names

    @property
    def full_trainable_modules(self):
        """Names of the submodules fine-tuned in full (they need a frozen copy as reference)."""
        return [name for name in self.trainable if not name.endswith('_lora')]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the base model: every LoRA adapter of this framework is switched off inside the block."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        layers = [m for m in self.modules() if isinstance(m, BaseTunerLayer)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def trainable_state_dict(self):
        """Only the trained parameters (what a checkpoint holds), detached, by full parameter name."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict, source='checkpoint'):
        """Load trained parameters saved by :meth:`trainable_state_dict`, checking every key.

        Raises:
            KeyError: a trained parameter is missing, or the checkpoint has a key that does not train here.
            ValueError: a shape differs.
        """
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        check_state_dict_matches(params, state_dict, source,
                                 f'the trainable parameters of {type(self).__name__} (trainable: {self.trainable})')
        with torch.no_grad():
            for name, value in state_dict.items():
                params[name].copy_(value)

    def build_reference(self, dtype=None):
        """The frozen reference model for DPO-style objectives. Call before any training step.

        It shares every frozen part with this policy, holds frozen copies of the fully fine-tuned parts,
        and runs the shared networks with LoRA adapters disabled, so LoRA fine-tuning costs no extra memory.
        """
        return FrozenReference(self, dtype)

    # ---------------------------------------------------------------- latents and prompts
    @property
    def device(self):
        return self._device_probe.device

    @property
    def vae_scale_factor(self):
        return 2**(len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_posterior(self, images):
        """Images in [0, 1] (N, 3, H, W) -> the VAE's latent posterior: mean and std, each (N, C, H/f, W/f), unscaled.

        What a preference set stores as precomputed candidate latents (:mod:`dspo_basicsr.data.candidate_latents`).
        """
        with self.vae_part(self.vae, 'encoder'):  # untiled below the official tiling threshold
            dist = self.vae.encode(images * 2 - 1).latent_dist
        return dist.mean, dist.std

    def latents_from_posterior(self, mean, std, sample_posterior=False, generator=None):
        """Scaled latents (N, C, h, w) from a posterior: its mode, or a sample drawn from ``generator``.

        The sample is diffusers' ``DiagonalGaussianDistribution.sample``: ``mean + std * randn_tensor(...)``, so
        a stored posterior gives exactly the latents that encoding the images would give with the same generator.
        """
        from diffusers.utils.torch_utils import randn_tensor
        latents = mean
        if sample_posterior:
            latents = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images, sample_posterior=False, generator=None):
        """Images in [0, 1] (N, 3, H, W) -> scaled latents (N, C, H/f, W/f)."""
        return self.latents_from_posterior(*self.encode_posterior(images), sample_posterior, generator)

    @torch.no_grad()
    def vae_digest(self):
        """SHA-256 (hex) of the VAE's class, config, and every weight's name, dtype, shape and bytes.

        Stored with precomputed candidate latents, so latents written by another VAE (or precision) are refused.
        A VAE on the ``meta`` device (the memory planner) has no bytes: its digest covers names, dtypes and shapes.
        """
        import hashlib
        import json
        digest = hashlib.sha256(type(self.vae).__name__.encode())
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith('_')}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, value in sorted(self.vae.state_dict().items()):
            digest.update(f'{name}:{value.dtype}:{tuple(value.shape)}'.encode())
            if value.is_meta or not value.numel():
                continue
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def posterior_noise_ratio(self, images=None, posterior=None):
        """Spread of posterior samples around the mode over the spread of the mode latents.

        SD's VAE is nearly deterministic (a ratio far below 1); a random or mode-trained tiny VAE keeps a posterior std
        as large as its latents (ratio 1 or more), and then every posterior-sampled training latent is noise.

        Args:
            images (Tensor | None): (N, 3, H, W) in [0, 1], encoded here.
            posterior (tuple[Tensor, Tensor] | None): Or their stored posterior (mean, std), each (N, C, h, w).
        """
        mean, std = self.encode_posterior(images) if posterior is None else posterior
        mode = self.latents_from_posterior(mean, std)
        sampled = self.latents_from_posterior(mean, std, True, torch.Generator(device=mean.device).manual_seed(0))
        return ((sampled - mode).std() / mode.std().clamp_min(1e-12)).item()

    @torch.no_grad()
    def decode_latents(self, latents):
        """Scaled latents (N, C, h, w) -> images in [0, 1] (N, 3, h*f, w*f)."""
        with self.vae_part(self.vae, 'decoder'):
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """List of N strings -> text embeddings (N, L, D) from the frozen text encoder."""
        ids = self.tokenizer(
            list(prompts), padding='max_length', max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors='pt').input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    # ---------------------------------------------------------------- diffusion
    def add_noise(self, latents, noise, t):
        return self.noise_scheduler.add_noise(latents, noise, t)

    def training_target(self, latents, noise, t):
        """What ``predict_noise`` is trained to output: the noise, or v for v-prediction schedules."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == 'epsilon':
            return noise
        if kind == 'v_prediction':
            return self.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction_type '{kind}' (epsilon or v_prediction).")

    def training_timesteps(self, batch, low, high, generator=None):
        """(batch,) timesteps at which preference likelihoods are taken, uniform in [low, high)."""
        return torch.randint(low, high, (batch,), generator=generator, device=self.device)

    def diffusion_inputs(self, latents, noise, t, cond):
        """Noisy latents and the regression target for candidate latents (N, C, h, w).

        Multi-step frameworks noise the candidate's latent: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` with
        target ``eps`` (or v). One-step frameworks override this to evaluate at their operating point.
        """
        return self.add_noise(latents, noise, t), self.training_target(latents, noise, t)

    def forward(self, x_t, t, cond):
        return self.predict_noise(x_t, t, cond)

    def condition(self, lq, prompts, negative_prompts=None, **extras):
        """Condition of each LQ image; ``extras`` are precomputed per-sample tensors of the preference set
        (e.g. RAM image embeddings) that a framework may use instead of computing them."""
        raise NotImplementedError

    def predict_noise(self, x_t, t, cond):
        raise NotImplementedError

    def guided_prediction(self, x_t, t, cond, guidance_scale, predict=None):
        """Classifier-free guidance ``eps(neg) + s (eps(prompt) - eps(neg))`` in one batched call.

        Args:
            x_t (Tensor): (N, C, h, w) noisy latents.
            t (Tensor): (N,) timesteps.
            cond (dict): condition holding ``negative_prompt_embeds``.
            guidance_scale (float): s; 1 (or no negative embeddings) means no guidance.
            predict (callable, optional): noise predictor with ``predict_noise``'s signature (e.g. the
                reference's); defaults to this framework's own.
        """
        predict = predict or self.predict_noise
        if guidance_scale == 1 or 'negative_prompt_embeds' not in cond:
            return predict(x_t, t, {k: v for k, v in cond.items() if k != 'negative_prompt_embeds'})
        text_keys = ('prompt_embeds', 'negative_prompt_embeds')
        doubled = {k: torch.cat([v, v]) for k, v in cond.items() if k not in text_keys}
        doubled['prompt_embeds'] = torch.cat([cond['negative_prompt_embeds'], cond['prompt_embeds']])
        eps_negative, eps_prompt = predict(torch.cat([x_t, x_t]), torch.cat([t, t]), doubled).chunk(2)
        return eps_negative + guidance_scale * (eps_prompt - eps_negative)

    def _sampling_scheduler(self, sampler):
        from diffusers import DDIMScheduler, DDPMScheduler
        kind = sampler or self.sampler
        classes = {'ddpm': DDPMScheduler, 'ddim': DDIMScheduler}
        if kind not in classes:
            raise ValueError(f"unknown sampler '{kind}': choose one of {sorted(classes)}.")
        return classes[kind].from_config(self.noise_scheduler.config)

    @staticmethod
    def _as_list(value, batch):
        if value is None or isinstance(value, str):
            return [value or ''] * batch
        if len(value) != batch:
            raise ValueError(f'got {len(value)} prompts for a batch of {batch} images.')
        return list(value)

    def _prompt_lists(self, batch, prompt, negative_prompt):
        negatives = [join_negative_prompts(self.default_negative_prompt, n)
                     for n in self._as_list(negative_prompt, batch)]
        return [self.compose_prompt(p) for p in self._as_list(prompt, batch)], negatives

    def compose_prompt(self, prompt):
        """The prompt sampled with for a user / data-set prompt (frameworks may append a suffix)."""
        return prompt

    def compose_tag_prompt(self, tags, prompt):
        """The prompt of the official test scripts from RAM tags and the user prompt: ``f"{tags}, {prompt},"``
        (cswry/SeeSR ``test_seesr.py`` and cswry/OSEDiff ``test_osediff.py``, ``get_validation_prompt``)."""
        return f'{tags}, {prompt},'

    def image_tags(self, lq):
        """RAM (DAPE) tags of LQ images (B, 3, h, w) in [0, 1]: B strings "tag, tag, ..."."""
        ram = getattr(self, 'ram', None)
        if ram is None or not getattr(ram, 'tagging', False):
            raise ValueError(f"prompt_source 'tags' needs RAM's tagging head, but {type(self).__name__} has none: set "
                             'network_g.ram_path (ram_swin_large_14m.pth, and dape_path for DAPE), or use '
                             "prompt_source: prompt.")
        autocast = getattr(self, 'autocast', contextlib.nullcontext)  # frozen RAM in bf16 under mixed precision
        with torch.no_grad(), autocast():
            return ram.tags(lq.to(self.device))

    def sampling_prompts(self, lq, prompt=None, negative_prompt=None, prompt_source='prompt'):
        """Prompts and negative prompts of a batch of LQ images (B, 3, h, w).

        Args:
            prompt_source (str): ``prompt`` (the given prompt, with the framework's suffix) or ``tags`` (the
                official test scripts' prompt: RAM / DAPE tags of the LQ, then ``prompt``; see
                :meth:`compose_tag_prompt`).
        """
        prompt_source = prompt_source or 'prompt'
        if prompt_source not in ('prompt', 'tags'):
            raise ValueError(f"prompt_source must be 'prompt' or 'tags', got {prompt_source!r}.")
        prompts, negatives = self._prompt_lists(lq.shape[0], prompt, negative_prompt)
        if prompt_source == 'tags':
            users = self._as_list(prompt, lq.shape[0])
            prompts = [self.compose_tag_prompt(t, u) for t, u in zip(self.image_tags(lq), users)]
        return prompts, negatives

    @torch.no_grad()
    def sample(self, lq, prompt=None, negative_prompt=None, steps=None, guidance_scale=None, generator=None,
               sampler=None, prompt_source='prompt', color_fix='none', process_size=None, tile_size=None,
               tile_overlap=4, vae_tile=False, framework_options=None):
        """Super-resolve LQ images of any size by sampling the diffusion model, as the official test scripts do.

        The LQ is resized to :meth:`process_lq_size` (short side up to ``process_size / scale``, then to the
        latent grid), sampled, colour-fixed, and the output resized back to exactly ``scale`` x the LQ size:
        both resizes stretch the whole image, so the output stays aligned with the input.

        Args:
            lq (Tensor): (B, 3, h, w) low-quality images in [0, 1], any h, w >= 1.
            prompt (str | list[str] | None): Text prompt(s).
            negative_prompt (str | list[str] | None): Appended to the framework's default negative prompt.
            steps (int | None): Sampling steps (framework default if None).
            guidance_scale (float | None): Classifier-free guidance scale (``default_guidance_scale`` if None).
            generator (torch.Generator | list[torch.Generator] | None): Seeded generator for reproducible
                samples, or one per image (each image's noise then equals its batch-of-one draw).
            sampler (str | None): ``ddpm`` or ``ddim`` (framework default if None).
            prompt_source (str): ``prompt`` or ``tags`` (see :meth:`sampling_prompts`).
            color_fix (str): ``adain``, ``wavelet`` or ``none``, against the bicubic-upsampled LQ
                (:mod:`dspo_basicsr.archs.color_fix`).
            process_size (int | None): An LQ whose shorter side is below ``process_size / scale`` is first resized
                so that it is that long (the test scripts' 512); see :meth:`process_lq_size`.
            tile_size (int | None): Latent tile size: a latent larger than tile_size^2 is denoised in overlapping
                tiles blended with Gaussian weights (SeeSR / OSEDiff: 96, AddSR: 320). None: no tiling.
            tile_overlap (int): Overlap of latent tiles (SeeSR / AddSR: 4, OSEDiff: 32).
            vae_tile (bool): Encode and decode large images in tiles, above the official scripts' thresholds
                (:meth:`vae_part`).
            framework_options (dict | None): Keyword arguments only this framework's :meth:`sample_images` takes
                (OSEDiffArch: ``noise_timestep``).

        Returns:
            Tensor: (B, 3, h*scale, w*scale) SR images in [0, 1].
        """
        from dspo_basicsr.archs.color_fix import color_fix as apply_color_fix
        lq_in = self.resize_to_process_size(lq, process_size)
        tagged = lq_in if self.tags_processed_input else lq
        prompts, negatives = self.sampling_prompts(tagged, prompt, negative_prompt, prompt_source)
        tiling = (int(tile_size), int(tile_overlap)) if tile_size else None
        with self.vae_tiling(vae_tile):
            sr = self.sample_images(lq_in, prompts, negatives, steps=steps, guidance_scale=guidance_scale,
                                    generator=generator, sampler=sampler, tiling=tiling,
                                    extras=self.sampling_extras(lq), **(framework_options or {}))
        processed = (lq_in.shape[2] * self.scale, lq_in.shape[3] * self.scale)
        if tuple(sr.shape[2:]) != processed:
            raise RuntimeError(f'{type(self).__name__}.sample_images gave {tuple(sr.shape[2:])} for an LQ of '
                               f'{tuple(lq_in.shape[2:])}; expected {processed} (scale {self.scale}).')
        sr = apply_color_fix(sr, self.upsample_lq(lq_in), color_fix)
        return resize_images(sr, (lq.shape[2] * self.scale, lq.shape[3] * self.scale))

    #: tags are taken from the LQ after the process-size resize (OSEDiff's ``test_osediff.py``) instead of from the
    #: LQ as read (SeeSR's ``test_seesr.py``, AddSR's ``test_addsr.py``)
    tags_processed_input = False

    def sampling_extras(self, lq):
        """Per-image condition inputs :meth:`sample` computes from the LQ as read (before the process-size resize)
        and passes to :meth:`condition` (SeeSR: RAM embeddings); none by default."""
        return {}

    def sample_images(self, lq, prompts, negatives, steps=None, guidance_scale=None, generator=None, sampler=None,
                      tiling=None, extras=None):
        """The framework's sampler on prepared prompts: DDPM / DDIM with guidance from :meth:`initial_latents`.

        ``lq`` (B, 3, h, w) has sizes on the latent grid (:meth:`process_lq_size`); ``extras`` are keyword
        arguments of :meth:`condition` (:meth:`sampling_extras`). With ``start_point: lr`` the sampler's
        timesteps after ``start_timestep`` are skipped (SeeSR's ``pipeline_seesr.py`` skips ``t > start_steps``).
        """
        steps = steps or self.default_steps
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        cond = self.condition(lq, prompts, negatives if guidance_scale != 1 else None, **(extras or {}))
        scheduler = self._sampling_scheduler(sampler)
        # the timesteps stay on the CPU for a meta-device framework (the GPU planner): the loop compares them
        scheduler.set_timesteps(steps, device='cpu' if self.device.type == 'meta' else self.device)
        if self.start_point == 'lr':
            kept = scheduler.timesteps[scheduler.timesteps <= self.start_timestep]
            if len(kept) == 0:
                raise ValueError(f'start_timestep {self.start_timestep} is before every timestep of the {steps}-step '
                                 f'sampler (the last is {int(scheduler.timesteps[-1])}); raise start_timestep.')
            scheduler.timesteps = kept
        latents = self.initial_latents(lq, scheduler, generator)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            t_batch = t.expand(latents.shape[0]).to(self.device)
            eps = self.tiled_prediction(
                lambda x, c, t_batch=t_batch: self.guided_prediction(x, t_batch, c, guidance_scale), model_input,
                cond, tiling)
            latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        return self.decode_latents(latents)

    def load_ram(self, ram_path, dape_path=None, tagging=False, embed_dim=512):
        """The RAM image embedder / tagger of ``ram_path`` (RAM's ``ram_swin_large_14m.pth``, plus SeeSR's DAPE)."""
        from dspo_basicsr.archs.ram_arch import RAMImageEmbedder
        return RAMImageEmbedder(ram_path=ram_path, dape_path=dape_path, embed_dim=embed_dim, tagging=tagging)

    def set_sampling_start(self, start_point, start_timestep):
        """Check and keep where :meth:`sample` starts: ``noise``, or ``lr`` and the timestep the LQ latent is noised to.

        Raises:
            ValueError: Another start point, or ``lr`` without a timestep of the noise schedule.
        """
        if start_point not in ('lr', 'noise'):
            raise ValueError(f"start_point must be 'lr' (the LQ latent) or 'noise', got {start_point!r}.")
        if start_point == 'lr' and (isinstance(start_timestep, bool) or not isinstance(start_timestep, int)
                                    or not 0 <= start_timestep < self.noise_scheduler.config.num_train_timesteps):
            raise ValueError(f'start_point lr needs start_timestep: an integer timestep of the noise schedule '
                             f'(SeeSR: 999), got {start_timestep!r}.')
        self.start_point = start_point
        self.start_timestep = start_timestep

    @property
    def lq_size_step(self):
        """LQ sizes are multiples of this, so that ``scale`` x the LQ is a multiple of the latent factor."""
        return self.vae_scale_factor // math.gcd(self.vae_scale_factor, self.scale)

    def process_lq_size(self, height, width, process_size=None):
        """The (height, width) an LQ of ``height`` x ``width`` is sampled at, as the official test scripts.

        ``test_seesr.py``, ``test_addsr.py`` and ``test_osediff.py``: an image whose shorter side is below
        ``process_size // scale`` is resized to ``int(ratio * side)`` with ``ratio = (process_size // scale) /
        shorter side``; then its ``scale`` x upsampling is cut down to a multiple of 8 (``size // 8 * 8``).
        Here the LQ itself is resized, to the multiple of :attr:`lq_size_step` that gives the same upsampled
        size (at least one step).
        """
        if process_size and min(height, width) < process_size // self.scale:
            ratio = (process_size // self.scale) / min(height, width)
            height, width = int(ratio * height), int(ratio * width)
        step = self.lq_size_step
        return max(step, height // step * step), max(step, width // step * step)

    def resize_to_process_size(self, lq, process_size=None):
        """LQ (B, 3, h, w) resized (:func:`resize_images`) to :meth:`process_lq_size`; unchanged if it is that size."""
        return resize_images(lq, self.process_lq_size(lq.shape[2], lq.shape[3], process_size))

    #: VAE tiling sizes of the official scripts: encoder tiles in image pixels (``--vae_encoder_tiled_size``
    #: 1024; None: the encoder is never tiled, as AddSR), decoder tiles in latent pixels (224)
    vae_encoder_tile_size = 1024
    vae_decoder_tile_size = 224

    @contextlib.contextmanager
    def vae_tiling(self, enabled):
        """Inside the block the VAE encodes / decodes large images in tiles (diffusers' ``enable_tiling``) when
        ``enabled``, with the official scripts' thresholds (:meth:`vae_part`)."""
        vaes = [m for m in (self.vae, getattr(self, 'lq_vae', None)) if m is not None]
        if not enabled:
            yield
            return
        for vae in vaes:
            vae.enable_tiling()
        try:
            yield
        finally:
            for vae in vaes:
                vae.disable_tiling()

    @contextlib.contextmanager
    def vae_part(self, vae, part):
        """Set a tiling ``vae``'s tile sizes for its ``encoder`` or ``decoder`` inside the block.

        SeeSR's / OSEDiff's ``vaehook.py`` (``VAEHook``) leaves an image untiled when its longer side is at most
        ``tile + 2 * pad`` (pad 32 image pixels for the encoder, 11 latent pixels for the decoder) and otherwise
        runs padded tiles of about that extent. diffusers tiles above ``tile_sample_min_size`` /
        ``tile_latent_min_size`` with tiles of that size, so both are set to ``tile + 2 * pad``, rounded down to a
        multiple of 4 latent pixels (diffusers' 25 % overlap gives a wrong output size otherwise): encoder 1088
        px (upstream's threshold), decoder 244 latent pixels (upstream: 246). Within the tiles the algorithm stays
        diffusers' (GroupNorm statistics per tile, 25 % blended overlaps), where ``VAEHook`` shares GroupNorm
        statistics over the whole image.
        """
        if not getattr(vae, 'use_tiling', False):
            yield
            return
        f = self.vae_scale_factor
        saved = vae.tile_sample_min_size, vae.tile_latent_min_size
        if part == 'encoder':
            if self.vae_encoder_tile_size is None:
                vae.use_tiling = False
            else:
                extent = (self.vae_encoder_tile_size + 2 * 32) // f // 4 * 4  # latent pixels
                vae.tile_sample_min_size, vae.tile_latent_min_size = extent * f, extent
        else:
            extent = (self.vae_decoder_tile_size + 2 * 11) // 4 * 4
            vae.tile_sample_min_size, vae.tile_latent_min_size = extent * f, extent
        try:
            yield
        finally:
            vae.tile_sample_min_size, vae.tile_latent_min_size = saved
            vae.use_tiling = True

    def tiled_prediction(self, predict, x_t, cond, tiling):
        """``predict(x_t, cond)`` over overlapping latent tiles blended with Gaussian weights.

        Follows SeeSR's ``pipeline_seesr.py`` (and OSEDiff's ``osediff.py``): a latent of at most tile^2 pixels
        is predicted whole; otherwise tiles of ``tile`` x ``tile`` start every ``tile - overlap`` pixels (the last
        one flush with the border), every spatial condition (ControlNet image, LQ latent) is cut to the same
        window, the non-spatial ones (text, RAM embeddings) are shared, and the tile predictions are averaged
        with the weights of :func:`gaussian_tile_weights`.

        Args:
            predict (callable): (N, C, th, tw) latents and a condition -> (N, C, th, tw).
            x_t (Tensor): (N, C, h, w).
            cond (dict): Condition of the whole image.
            tiling (tuple[int, int] | None): (tile size, overlap) in latent pixels.
        """
        h, w = x_t.shape[2:]
        if not tiling or h * w <= tiling[0] ** 2:
            return predict(x_t, cond)
        tile, overlap = min(tiling[0], h, w), tiling[1]
        weights = gaussian_tile_weights(tile, tile, x_t.device)  # (tile, tile)
        total = torch.zeros_like(x_t)
        contributors = torch.zeros_like(x_t)
        for top in tile_starts(h, tile, overlap):
            for left in tile_starts(w, tile, overlap):
                window = {k: crop_condition(v, x_t.shape[2:], top, left, tile) for k, v in cond.items()}
                out = predict(x_t[:, :, top:top + tile, left:left + tile], window)
                total[:, :, top:top + tile, left:left + tile] += out * weights
                contributors[:, :, top:top + tile, left:left + tile] += weights
        return total / contributors

    def initial_noise(self, lq, generator=None):
        """Standard normal latents (B, C, h*s/f, w*s/f) for the SR size of ``lq``, from ``generator``."""
        if isinstance(generator, (list, tuple)):  # one generator per image, as diffusers' randn_tensor
            return torch.cat([self.initial_noise(lq[i:i + 1], g) for i, g in enumerate(generator)])
        f = self.vae_scale_factor
        shape = (lq.shape[0], self.unet.config.in_channels,
                 lq.shape[2] * self.scale // f, lq.shape[3] * self.scale // f)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else self.device)
        return noise.to(self.device)

    def initial_latents(self, lq, scheduler, generator=None):
        """Where :meth:`sample` starts: pure noise scaled for ``scheduler``, or (``start_point: lr``) the bicubic
        LQ's latent (the posterior mode) noised to the first of ``scheduler.timesteps`` (SDEdit-style start)."""
        noise = self.initial_noise(lq, generator)
        if self.start_point == 'noise':
            return noise * scheduler.init_noise_sigma
        t = scheduler.timesteps[:1].expand(lq.shape[0])
        return scheduler.add_noise(self.encode_images(self.upsample_lq(lq)), noise, t)

    def upsample_lq(self, lq):
        """LQ (B, 3, h, w) -> bicubic (B, 3, h*scale, w*scale) in [0, 1], the ControlNet input."""
        return F.interpolate(lq, scale_factor=self.scale, mode='bicubic', align_corners=False).clamp(0, 1)


class FrozenReference:
    """The frozen reference ``p_ref`` of a framework (see :meth:`DiffusionSRArch.build_reference`).

    Args:
        policy (DiffusionSRArch): The framework being fine-tuned, before its first update.
        dtype (torch.dtype | None): Run the reference in this precision (autocast), e.g. bf16 on GPU.
    """

    def __init__(self, policy, dtype=None):
        self.policy = policy
        self.dtype = dtype
        self.copies = {}
        for name in policy.full_trainable_modules:
            frozen = copy.deepcopy(getattr(policy, name)).requires_grad_(False).eval()
            self.copies[name] = frozen.to(dtype) if dtype is not None else frozen

    def to(self, device):
        self.copies = {name: module.to(device) for name, module in self.copies.items()}
        return self

    def state_dict(self):
        """Weights of the frozen copies, by the policy's parameter names (for checks, never saved)."""
        return {f'{name}.{k}': v for name, module in self.copies.items() for k, v in module.state_dict().items()}

    @contextlib.contextmanager
    def _as_reference(self):
        originals = {name: self.policy._modules[name] for name in self.copies}
        self.policy._modules.update(self.copies)
        try:
            with self.policy.adapters_disabled():
                yield
        finally:
            self.policy._modules.update(originals)

    def sampling(self):
        """Context in which the policy's own methods (e.g. ``sample``) run as the reference."""
        return self._as_reference()

    @torch.no_grad()
    def predict_noise(self, x_t, t, cond):
        """Reference noise prediction, same signature as the policy's ``predict_noise``."""
        autocast = (torch.autocast(x_t.device.type, dtype=self.dtype)
                    if self.dtype is not None and x_t.device.type != 'meta' else contextlib.nullcontext())
        with self._as_reference(), autocast:
            return self.policy.predict_noise(x_t, t, cond).float()

    def guided_prediction(self, x_t, t, cond, guidance_scale):
        """Reference prediction with classifier-free guidance (user-description feedback)."""
        return self.policy.guided_prediction(x_t, t, cond, guidance_scale, predict=self.predict_noise)
