"""SeeSR: SD2-base UNet and ControlNet with image cross-attention fed by RAM image embeddings.

Paper: Wu et al., "SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution", CVPR 2024
(https://github.com/cswry/SeeSR). Fine-tuned with DSPO in "DSPO: Direct Semantic Preference Optimization
for Real-World Image Super-Resolution" (the paper's headline SeeSR + DSPO run).

Architecture: every text cross-attention transformer of the UNet and of the ControlNet
(``..._blocks.N.attentions.M`` and ``mid_block.attentions.0``) is followed by an image cross-attention
transformer of the same shape, ``..._blocks.N.image_attentions.M``, whose keys and values come from RAM image
embeddings (B, 145, 512) instead of the text embeddings. It is built on the installed diffusers by composing
its own ``Transformer2DModel`` blocks into stock ``UNet2DConditionModel`` / ``ControlNetModel`` instances
(no fork of diffusers, :mod:`.image_cross_attention`): the image embeddings travel in ``cross_attention_kwargs``.

Checkpoint layout (loaded from local folders only, every key checked):
    seesr_model_path/  unet/        config.json ("use_image_cross_attention": true)
                                    + diffusion_pytorch_model.safetensors (or .bin, or sharded with an index)
                       controlnet/  the same files
    pretrained_model_path/          SD2-base (stable-diffusion-2-base): vae/ text_encoder/ tokenizer/ scheduler/
    ram_path / dape_path            RAM ``ram_swin_large_14m.pth`` and SeeSR's ``DAPE.pth``
                                    (see :mod:`dspo_basicsr.archs.ram_arch`).
Weights licence: SeeSR's weights are released with its repository (Apache-2.0 code; check the weights'
terms there); they are derived from Stable Diffusion 2 (CreativeML Open RAIL++-M licence).
"""
import json
import os

import torch

from dspo_basicsr.archs.control_sd2_arch import load_sd_components
from dspo_basicsr.archs.diffusion_sr_base import DEFAULT_LORA_TARGETS, DiffusionSRArch
from dspo_basicsr.archs.image_cross_attention import (  # noqa: F401  (re-exported)
    IMAGE_EMBEDS_KEY,
    SEESR_IMAGE_DIM,
    add_image_cross_attention,
    image_kwargs,
)
from dspo_basicsr.archs.precision import LowPrecisionFrozenPartsMixin
from dspo_basicsr.utils.checkpoint import load_state_dict_strictly, missing_weights_error, read_checkpoint

from basicsr.utils.registry import ARCH_REGISTRY

SEESR_IMAGE_TOKENS = 145
SD2_BASE_UNET_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'sd2_base_unet.json')
WEIGHT_NAMES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
WEIGHTS_HINT = 'Check that the folder holds the released SeeSR/AddSR weights and that its config.json matches them.'


def strip_seesr_config(config):
    """A UNet / ControlNet config without diffusers' private keys and SeeSR's image cross-attention keys (what
    stock diffusers classes accept)."""
    return {k: v for k, v in config.items() if not k.startswith('_')
            and k not in ('use_image_cross_attention', 'image_cross_attention_dim')}


def build_seesr_unet(config):
    """SeeSR UNet from a UNet config dict (SeeSR's ``unet/config.json`` or an SD2-base one)."""
    from diffusers import UNet2DConditionModel
    dim = config.get('image_cross_attention_dim', SEESR_IMAGE_DIM)
    return add_image_cross_attention(UNet2DConditionModel.from_config(strip_seesr_config(config)), dim)


def build_seesr_controlnet(config):
    """SeeSR ControlNet from a ControlNet config dict (SeeSR's ``controlnet/config.json``)."""
    from diffusers import ControlNetModel
    dim = config.get('image_cross_attention_dim', SEESR_IMAGE_DIM)
    return add_image_cross_attention(ControlNetModel.from_config(strip_seesr_config(config)), dim)


def seesr_networks_on_meta(unet_config_path=SD2_BASE_UNET_CONFIG):
    """SeeSR's UNet and ControlNet on the ``meta`` device (no memory), from an SD2-base UNet config.

    Returns:
        tuple[UNet2DConditionModel, ControlNetModel]: Structure and parameter shapes only.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel
    with open(unet_config_path, encoding='utf-8') as f:
        config = json.load(f)
    with torch.device('meta'):
        base = UNet2DConditionModel.from_config(strip_seesr_config(config))
        controlnet = add_image_cross_attention(ControlNetModel.from_unet(base, load_weights_from_unet=False))
        unet = add_image_cross_attention(base)
    return unet, controlnet


# ---------------------------------------------------------------------------- strict folder loading
def _read_weights(folder):
    """The state dict of a diffusers model folder (safetensors, .bin or sharded), read without pickle."""
    index = os.path.join(folder, 'diffusion_pytorch_model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index, encoding='utf-8') as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        state = {}
        for shard in shards:
            state.update(read_checkpoint(os.path.join(folder, shard), f'SeeSR weight shard of {index}', unwrap=()))
        return state, index
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_checkpoint(path, 'SeeSR weights', unwrap=()), path
    raise missing_weights_error(folder, f'{WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]})', 'SeeSR weights')


def load_seesr_network(folder, kind):
    """Load SeeSR's released ``unet/`` or ``controlnet/`` folder strictly (every key must match).

    Args:
        folder (str): The component folder (config.json + weights).
        kind (str): ``unet`` or ``controlnet``.

    Returns:
        UNet2DConditionModel | ControlNetModel: With image cross-attention, in float32, on the CPU.
    """
    config_path = os.path.join(folder, 'config.json')
    if not os.path.isfile(config_path):
        raise missing_weights_error(folder, 'config.json', f'SeeSR {kind} (the released unet/ and controlnet/ folders)')
    with open(config_path, encoding='utf-8') as f:
        config = json.load(f)
    state, source = _read_weights(folder)
    with torch.device('meta'):
        model = build_seesr_unet(config) if kind == 'unet' else build_seesr_controlnet(config)
    load_state_dict_strictly(model, {k: v.float() for k, v in state.items()}, f"SeeSR {kind} weights '{source}'",
                             f'{type(model).__name__} with SeeSR image cross-attention', hint=WEIGHTS_HINT)
    return model


def save_seesr_networks(folder, unet, controlnet):
    """Write ``folder/unet`` and ``folder/controlnet`` in SeeSR's released layout (safetensors + config)."""
    unet.save_pretrained(os.path.join(folder, 'unet'), safe_serialization=True)
    controlnet.save_pretrained(os.path.join(folder, 'controlnet'), safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------- the framework
@ARCH_REGISTRY.register()
class SeeSRArch(LowPrecisionFrozenPartsMixin, DiffusionSRArch):
    """SeeSR: LQ into the ControlNet, tag prompt into text cross-attention, RAM embeddings into image
    cross-attention; DDPM sampling with classifier-free guidance started from the noised LQ latent.

    Args:
        pretrained_model_path (str | None): SD2-base folder (vae/, text_encoder/, tokenizer/, scheduler/).
        seesr_model_path (str | None): Folder with SeeSR's ``unet/`` and ``controlnet/``.
        ram_path (str | None): RAM ``ram_swin_large_14m.pth``: the image embedder used when a batch has no
            precomputed ``ram_embeds`` (always at sampling time). None: precomputed embeddings are required.
        dape_path (str | None): SeeSR's ``DAPE.pth`` (degradation-aware RAM, applied on top of ``ram_path``).
        scale (int): SR factor. Default: 4.
        trainable (str | list[str]): ``controlnet`` (default), ``unet_lora``, ``unet``, ``controlnet_lora``, or a list.
        conditioning_scale (float): Multiplier of the ControlNet residuals. Default: 1.
        added_prompt (str): Appended to every prompt at sampling (``test_seesr.py``'s ``--added_prompt``:
            "clean, high-resolution, 8k"; the gradio demo's longer suffix is not the test protocol).
        start_point (str): ``lr`` (SeeSR's LR-embedding start: the LQ latent, sampled from the VAE posterior with
            the generator, noised to ``start_timestep``) or ``noise``.
        start_timestep (int): Where ``start_point: lr`` noises to; sampler timesteps after it are skipped. Default:
            999 (``pipeline_seesr.py``, ``start_steps=999``; the 50-step DDPM schedule itself starts at 981).
        ram_tagging (bool): Load RAM's tagging head with ``ram_path`` (for ``prompt_source: tags``). Default: True.
        lora_rank, lora_alpha, lora_target_modules, sampler: see :class:`DiffusionSRArch`.
        default_steps (int): 50. default_guidance_scale (float): 5.5 (``test_seesr.py --guidance_scale``).
        mixed_precision (str | None): ``bf16`` (or ``fp16``): frozen networks stored in that precision and every
            network run under autocast; trained parameters stay float32. Default: None (float32).
        gradient_checkpointing (bool): Recompute the activations of the UNet, ControlNet and any other trained
            network in the backward pass (``DiffusionSRArch.setup_gradient_checkpointing``). Default: False.
        default_negative_prompt (str | None): Replaces SeeSR's "dotted, noise, blur, lowres, smooth"; a sample's
            own negative prompt (user-description feedback) is appended to it.
        components (dict | None): Built networks (SD components plus ``controlnet`` and, optionally, a RAM
            embedder ``ram``) instead of the folders (Python callers; the demo's tiny types).
    """

    default_negative_prompt = 'dotted, noise, blur, lowres, smooth'

    def __init__(self, pretrained_model_path=None, seesr_model_path=None, ram_path=None, dape_path=None, scale=4,
                 trainable='controlnet', conditioning_scale=1.0, added_prompt=None,
                 start_point='lr', start_timestep=999, ram_tagging=True,
                 lora_rank=4, lora_alpha=None, lora_target_modules=DEFAULT_LORA_TARGETS, sampler='ddpm',
                 prediction_type=None, default_steps=50, default_guidance_scale=5.5, default_negative_prompt=None,
                 mixed_precision=None, gradient_checkpointing=False, components=None):
        if components is None:
            components = self.load_components(pretrained_model_path, seesr_model_path)
        components = dict(components)
        ram = components.pop('ram', None)
        if prediction_type:
            from diffusers import DDPMScheduler
            components['noise_scheduler'] = DDPMScheduler.from_config(
                components['noise_scheduler'].config, prediction_type=prediction_type)
        controlnet = components.pop('controlnet')
        super().__init__(**components, scale=scale, trainable=trainable, lora_rank=lora_rank, lora_alpha=lora_alpha,
                         lora_target_modules=lora_target_modules, sampler=sampler)
        self.controlnet = controlnet
        self.default_steps, self.default_guidance_scale = default_steps, default_guidance_scale
        self.conditioning_scale = conditioning_scale
        if default_negative_prompt is not None:
            self.default_negative_prompt = default_negative_prompt
        self.added_prompt = 'clean, high-resolution, 8k' if added_prompt is None else added_prompt
        self.set_sampling_start(start_point, start_timestep)
        self.image_embed_dim = self.unet.config.get('image_cross_attention_dim', SEESR_IMAGE_DIM)
        self.ram = ram
        if ram_path:
            self.ram = self.load_ram(ram_path, dape_path, tagging=ram_tagging, embed_dim=self.image_embed_dim)
        self.setup_trainable()
        self.setup_mixed_precision(mixed_precision)
        self.setup_gradient_checkpointing(gradient_checkpointing)

    @classmethod
    def load_components(cls, pretrained_model_path, seesr_model_path):
        """The SD2-base components of ``pretrained_model_path`` with SeeSR's ``unet`` and ``controlnet``."""
        if not (pretrained_model_path and seesr_model_path):
            raise ValueError(f'{cls.__name__} needs pretrained_model_path (an SD2-base folder) and the folder with '
                             f"the released unet/ and controlnet/; tiny random networks are type: Tiny{cls.__name__} "
                             '(dspo_basicsr/demo/tiny_arch.py).')
        components = load_sd_components(pretrained_model_path, unet_class=_NoUNet)
        components['unet'] = load_seesr_network(os.path.join(seesr_model_path, 'unet'), 'unet')
        components['controlnet'] = load_seesr_network(os.path.join(seesr_model_path, 'controlnet'), 'controlnet')
        return components

    # ------------------------------------------------------------------ condition and prediction
    def image_embeddings(self, lq, ram_embeds=None, resize_mode='bilinear'):
        """RAM image embeddings (B, 145, 512): the precomputed ones when given, else from the RAM embedder
        (``resize_mode``: how RAM's input is resized to 384 x 384, see :meth:`RAMImageEmbedder.preprocess`)."""
        if ram_embeds is not None:
            if (ram_embeds.ndim != 3 or ram_embeds.shape[0] != lq.shape[0]
                    or ram_embeds.shape[2] != self.image_embed_dim):
                raise ValueError(f'ram_embeds has shape {tuple(ram_embeds.shape)}; expected ({lq.shape[0]}, L, '
                                 f'{self.image_embed_dim}) (RAM: L = 145). Recompute them with '
                                 'scripts/add_ram_embeddings.py.')
            return ram_embeds.to(self.device, torch.float32)
        if self.ram is None:
            raise ValueError(f'{type(self).__name__} has no RAM embedder (network_g.ram_path) and the batch has no '
                             "precomputed 'ram_embeds': set ram_path, or add embeddings to the preference set with "
                             'scripts/add_ram_embeddings.py.')
        with torch.no_grad(), self.autocast():
            return self.ram(lq, resize_mode=resize_mode).float()

    def condition(self, lq, prompts, negative_prompts=None, ram_embeds=None, **extras):
        """LQ (B, 3, h, w) in [0, 1] and B prompts -> condition dict (computed once per LQ).

        Args:
            ram_embeds (Tensor | None): Precomputed RAM embeddings (B, 145, 512) from the preference set.

        Returns:
            dict: ``control_image`` (B, 3, h*s, w*s), ``image_embeds`` (B, 145, 512), ``prompt_embeds``
            (B, L, D) and, with negative prompts, ``negative_prompt_embeds`` (B, L, D).
        """
        cond = {'control_image': self.upsample_lq(lq), 'image_embeds': self.image_embeddings(lq, ram_embeds),
                'prompt_embeds': self.encode_prompts(prompts)}
        if negative_prompts is not None:
            cond['negative_prompt_embeds'] = self.encode_prompts(negative_prompts)
        return cond

    def predict_noise(self, x_t, t, cond):
        """(N, C, h, w) noisy latents and (N,) timesteps -> (N, C, h, w) noise (or v) prediction."""
        kwargs = image_kwargs(cond['image_embeds'])
        with self.autocast():
            down, mid = self.controlnet(
                x_t, t, encoder_hidden_states=cond['prompt_embeds'], controlnet_cond=cond['control_image'],
                conditioning_scale=self.conditioning_scale, cross_attention_kwargs=kwargs, return_dict=False)
            eps = self.unet(
                x_t, t, encoder_hidden_states=cond['prompt_embeds'], down_block_additional_residuals=down,
                mid_block_additional_residual=mid, cross_attention_kwargs=kwargs, return_dict=False)[0]
        return eps.float()

    # ------------------------------------------------------------------ sampling
    def compose_prompt(self, prompt):
        return ', '.join(p for p in (prompt.strip(), self.added_prompt) if p)

    def compose_tag_prompt(self, tags, prompt):
        """``test_seesr.py`` / ``test_addsr.py``: ``f"{tags}, {prompt},"`` then ``+= added_prompt`` (no space)."""
        return super().compose_tag_prompt(tags, prompt) + self.added_prompt

    def sampling_extras(self, lq):
        """RAM embeddings of the LQ as read, before the process-size resize: ``test_seesr.py`` and ``test_addsr.py``
        embed the image they open (``get_validation_prompt``)."""
        return {'ram_embeds': self.image_embeddings(lq)}

    def initial_latents(self, lq, scheduler, generator=None):
        """Start of sampling: pure noise, or (``start_point: lr``) the LQ latent noised to ``start_timestep``.

        As ``pipeline_seesr.py``: the noise is drawn first (``prepare_latents``), then the LQ latent is sampled
        from the VAE posterior (``latent_dist.sample()``; here with the same generator) and noised to t = 999.
        """
        noise = self.initial_noise(lq, generator)
        if self.start_point == 'noise':
            return noise * scheduler.init_noise_sigma
        lq_latents = self.encode_images(self.upsample_lq(lq), sample_posterior=True, generator=generator)
        t = torch.full((lq.shape[0],), self.start_timestep, device=self.device, dtype=torch.long)
        return self.noise_scheduler.add_noise(lq_latents, noise, t)


class _NoUNet:
    """Stand-in for the SD2 folder's UNet: SeeSR's own ``unet/`` replaces it, so it is never read."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        return None
