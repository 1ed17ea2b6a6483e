"""Stable Diffusion 2.x-base + ControlNet on the LQ image: the "SD2.1" multi-step SR framework.

Paper context: the SD2.1 baseline fine-tuned with DSPO in "DSPO: Direct Semantic Preference Optimization
for Real-World Image Super-Resolution"; ControlNet from Zhang et al., "Adding Conditional Control to
Text-to-Image Diffusion Models", ICCV 2023.

Checkpoint layout (diffusers ``save_pretrained``), loaded from local folders only:
    pretrained_model_path/   unet/ vae/ text_encoder/ tokenizer/ scheduler/   (e.g. stable-diffusion-2-1-base)
    controlnet_path/         config.json + diffusion_pytorch_model.safetensors (optional; otherwise the
                             ControlNet starts as a copy of the UNet encoder with zero convolutions)
Weights licence: Stable Diffusion 2 weights are under the CreativeML Open RAIL++-M licence.
"""
import os

from dspo_basicsr.archs.diffusion_sr_base import DEFAULT_LORA_TARGETS, DiffusionSRArch, check_component_folder
from dspo_basicsr.archs.precision import LowPrecisionFrozenPartsMixin

from basicsr.utils.registry import ARCH_REGISTRY

SD_SUBFOLDERS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')


def load_sd_components(path, unet_class=None):
    """Load an SD2.x-base folder (diffusers layout) from disk only.

    Args:
        path (str): Folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/.
        unet_class (type | None): UNet class to load the ``unet/`` folder with; None: ``UNet2DConditionModel``.

    Returns:
        dict: unet, vae, text_encoder, tokenizer, noise_scheduler.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    unet_class = unet_class or UNet2DConditionModel
    what = f'Stable Diffusion folder {path!r}'
    for sub in ('unet', 'vae', 'text_encoder'):
        check_component_folder(path, sub, what)
    for sub, name in (('tokenizer', 'tokenizer_config.json'), ('scheduler', 'scheduler_config.json')):
        if not os.path.isfile(os.path.join(path, sub, name)):
            raise FileNotFoundError(f"{what}: expected '{sub}/{name}' under '{path}'. Download the released model "
                                    'folder yourself and put it at that path; nothing is downloaded at run time.')
    local = dict(local_files_only=True)
    return dict(
        unet=unet_class.from_pretrained(path, subfolder='unet', **local),
        vae=AutoencoderKL.from_pretrained(path, subfolder='vae', **local),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder='text_encoder', **local),
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder='tokenizer', **local),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder='scheduler', **local))


def save_sd_components(folder, components):
    """Write components in the diffusers folder layout that :func:`load_sd_components` reads."""
    names = dict(noise_scheduler='scheduler')
    for key, component in components.items():
        component.save_pretrained(os.path.join(folder, names.get(key, key)))


def controlnet_embedding_channels(vae_scale_factor):
    """ControlNet conditioning-embedding widths whose downsampling matches the VAE's latent factor."""
    widths = (16, 32, 96, 256, 256)
    return widths[:vae_scale_factor.bit_length()]


@ARCH_REGISTRY.register()
class ControlSD2Arch(LowPrecisionFrozenPartsMixin, DiffusionSRArch):
    """SD2.x-base UNet + ControlNet conditioned on the bicubic-upsampled LQ image, with a text prompt.

    Args:
        pretrained_model_path (str | None): SD2.x-base folder (diffusers layout).
        controlnet_path (str | None): ControlNet folder; None initialises it from the UNet.
        scale (int): SR factor. Default: 4.
        trainable (str | list[str]): ``controlnet`` (default), ``unet_lora``, ``unet``, or a list of them.
        conditioning_scale (float): Multiplier of the ControlNet residuals. Default: 1.
        lora_rank, lora_alpha, lora_target_modules, sampler: see :class:`DiffusionSRArch`.
        prediction_type (str | None): Override the schedule's ``epsilon`` / ``v_prediction``.
        default_steps (int): Sampling steps of :meth:`sample`. Default: 50 (DDPM).
        default_guidance_scale (float): Guidance scale of :meth:`sample`. Default: 5.5.
        ram_path, dape_path (str | None): RAM (+ DAPE) checkpoints of a tagger for ``prompt_source: tags``.
        start_point (str): Where :meth:`sample` starts: ``noise`` (default) or ``lr``: the bicubic LQ's latent
            (posterior mode) noised to the first sampler timestep not after ``start_timestep``, the later ones
            skipped (SDEdit / diffusers img2img: ``strength`` s of N steps starts at the round(s N)-th last one).
        start_timestep (int | None): The timestep ``start_point: lr`` starts at.
        mixed_precision (str | None): ``bf16`` (or ``fp16``): the frozen networks (the UNet when only the
            ControlNet or LoRA trains, VAE, text encoder) stored in that precision and every network run under
            autocast; trained parameters stay float32. Default: None (float32).
        gradient_checkpointing (bool): Recompute the activations of the UNet, ControlNet and any other trained
            network in the backward pass (``DiffusionSRArch.setup_gradient_checkpointing``). Default: False.
        components (dict | None): Built SD components (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
            ``noise_scheduler``) instead of ``pretrained_model_path`` (Python callers; the demo's tiny types).
    """

    def __init__(self, pretrained_model_path=None, controlnet_path=None, scale=4, trainable='controlnet',
                 conditioning_scale=1.0, lora_rank=4, lora_alpha=None, lora_target_modules=DEFAULT_LORA_TARGETS,
                 sampler='ddpm', prediction_type=None, default_steps=50, default_guidance_scale=5.5, ram_path=None,
                 dape_path=None, start_point='noise', start_timestep=None, mixed_precision=None,
                 gradient_checkpointing=False, components=None):
        from diffusers import ControlNetModel, DDPMScheduler
        if components is None:
            if not pretrained_model_path:
                raise ValueError('ControlSD2Arch needs pretrained_model_path (an SD2.x-base folder); tiny random '
                                 'networks are type: TinyControlSD2Arch (dspo_basicsr/demo/tiny_arch.py).')
            components = load_sd_components(pretrained_model_path)
        if prediction_type:
            components['noise_scheduler'] = DDPMScheduler.from_config(
                components['noise_scheduler'].config, prediction_type=prediction_type)
        super().__init__(**components, scale=scale, trainable=trainable, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_target_modules=lora_target_modules, sampler=sampler)
        self.default_steps, self.default_guidance_scale = default_steps, default_guidance_scale
        self.set_sampling_start(start_point, start_timestep)
        self.conditioning_scale = conditioning_scale
        if controlnet_path:
            check_component_folder(controlnet_path, '', f'ControlNet folder {controlnet_path!r}')
            self.controlnet = ControlNetModel.from_pretrained(controlnet_path, local_files_only=True)
        else:
            self.controlnet = ControlNetModel.from_unet(
                self.unet, conditioning_embedding_out_channels=controlnet_embedding_channels(self.vae_scale_factor))
        self.ram = None
        if ram_path:  # only a tagger (tag prompts); this framework has no image cross-attention
            self.ram = self.load_ram(ram_path, dape_path, tagging=True)
        self.setup_trainable()
        self.setup_mixed_precision(mixed_precision)
        self.setup_gradient_checkpointing(gradient_checkpointing)

    def condition(self, lq, prompts, negative_prompts=None, **extras):
        """LQ (B, 3, h, w) in [0, 1] and B prompts -> condition dict (computed once per LQ; no extras used).

        Returns:
            dict: ``control_image`` (B, 3, h*s, w*s), ``prompt_embeds`` (B, L, D) and, with negative
            prompts, ``negative_prompt_embeds`` (B, L, D).
        """
        cond = {'control_image': self.upsample_lq(lq), 'prompt_embeds': self.encode_prompts(prompts)}
        if negative_prompts is not None:
            cond['negative_prompt_embeds'] = self.encode_prompts(negative_prompts)
        return cond

    def predict_noise(self, x_t, t, cond):
        """(N, C, h, w) noisy latents and (N,) timesteps -> (N, C, h, w) noise (or v) prediction."""
        with self.autocast():
            down, mid = self.controlnet(
                x_t, t, encoder_hidden_states=cond['prompt_embeds'], controlnet_cond=cond['control_image'],
                conditioning_scale=self.conditioning_scale, return_dict=False)
            eps = self.unet(
                x_t, t, encoder_hidden_states=cond['prompt_embeds'], down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False)[0]
        return eps.float()
