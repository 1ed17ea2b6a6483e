"""Tiny, randomly initialised components of the frameworks, for tests and the CPU demos.

They are the same diffusers / transformers / timm classes as the released models, only small, so every code
path (building, saving in the released folder layout, loading back) is the real one. diffusers and
transformers are imported on use. The framework archs never import this module: the demo's ``Tiny*Arch``
types (:mod:`dspo_basicsr.demo.tiny_arch`) build these components and hand them to the frameworks.
"""
import os

import torch

__all__ = ['TINY_CLIP_CONFIG',
           'TINY_TEXT_DIM', 'TINY_MAX_LENGTH', 'TINY_IMAGE_DIM', 'TINY_SWIN', 'TINY_TAGGING_HEAD', 'tiny_unet_config',
           'tiny_vae_config', 'tiny_text_encoder_config', 'byte_level_vocab', 'tiny_tokenizer', 'tiny_noise_scheduler',
           'tiny_sd_components', 'tiny_seesr_networks', 'tiny_ram_embedder', 'build_tiny_control_sd2_folder']

TINY_TEXT_DIM = 32
TINY_MAX_LENGTH = 16
#: the tiny SeeSR's image cross-attention width (its RAM embedder's output width)
TINY_IMAGE_DIM = 24
#: a two-stage Swin of width 16: a 32 x 32 input -> 4 x 4 tokens + 1 = 17 tokens
TINY_SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
#: RAM's tagging head, small: the first 16 tags of RAM's list
TINY_TAGGING_HEAD = dict(num_class=16, hidden=32, heads=2, layers=2, intermediate=64)
#: a randomly initialised CLIP small enough for tests and the CPU demo (CLIPQualityArch; the tokenizer fixes vocab_size)
TINY_CLIP_CONFIG = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                        transformer_layers=1)


def tiny_unet_config(cross_attention_dim=TINY_TEXT_DIM, **overrides):
    """SD2-shaped UNet config (linear projections, cross-attention in the first blocks), tiny widths.

    Args:
        cross_attention_dim (int): Width of the text embeddings.
        **overrides: Any ``UNet2DConditionModel`` option, e.g. wider ``block_out_channels`` for benchmarks.
    """
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True)
    config.update(overrides)
    return config


def tiny_vae_config(block_out_channels=(16, 32, 32), **overrides):
    """AutoencoderKL with 4 latent channels and a latent factor of ``2**(len(block_out_channels) - 1)``.

    Args:
        block_out_channels (tuple[int]): One width per level; the default's three levels give factor 4
            (SD's is 8), two levels give factor 2, which keeps enough detail of a 64 px crop for SR.
        **overrides: Any other ``AutoencoderKL`` option, e.g. ``mid_block_add_attention``.
    """
    levels = len(block_out_channels)
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(block_out_channels),
        layers_per_block=1, down_block_types=('DownEncoderBlock2D',) * levels,
        up_block_types=('UpDecoderBlock2D',) * levels, norm_num_groups=8, sample_size=64)
    config.update(overrides)
    return config


def tiny_text_encoder_config():
    """CLIP text transformer with 2 layers of width 32 over a byte-level vocabulary."""
    return dict(
        vocab_size=len(byte_level_vocab()), hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TINY_MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def byte_level_vocab():
    """CLIP's two special tokens and the byte-level alphabet (with and without the end-of-word mark): a vocabulary
    that needs no download, for tiny tokenizers and the GPU planner's meta-device text encoder."""
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ['<|startoftext|>', '<|endoftext|>'] + alphabet + [c + '</w>' for c in alphabet]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer():
    """A character-level CLIP tokenizer (no merges), so tiny models need no downloaded vocabulary."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=TINY_MAX_LENGTH)


def tiny_noise_scheduler(prediction_type='epsilon'):
    """The SD2 training schedule: 1000 steps, scaled-linear betas from 0.00085 to 0.012."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
        prediction_type=prediction_type, clip_sample=False)


def tiny_sd_components(cross_attention_dim=TINY_TEXT_DIM, unet=None, vae=None):
    """UNet, VAE, text encoder, tokenizer and noise scheduler of a tiny SD2-like model (random weights).

    Args:
        cross_attention_dim (int): Width of the text embeddings.
        unet (dict | None): Overrides of :func:`tiny_unet_config`.
        vae (dict | None): Arguments of :func:`tiny_vae_config`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    return dict(
        unet=UNet2DConditionModel(**tiny_unet_config(cross_attention_dim, **(unet or {}))),
        vae=AutoencoderKL(**tiny_vae_config(**(vae or {}))),
        text_encoder=CLIPTextModel(CLIPTextConfig(**tiny_text_encoder_config())),
        tokenizer=tiny_tokenizer(),
        noise_scheduler=tiny_noise_scheduler())


def tiny_seesr_networks(unet=None, image_cross_attention_dim=TINY_IMAGE_DIM, vae=None):
    """Tiny random SD components plus SeeSR UNet and ControlNet (ControlNet initialised from the UNet).

    Returns:
        dict: unet, vae, text_encoder, tokenizer, noise_scheduler, controlnet.
    """
    from diffusers import ControlNetModel

    from dspo_basicsr.archs.control_sd2_arch import controlnet_embedding_channels
    from dspo_basicsr.archs.image_cross_attention import add_image_cross_attention
    components = tiny_sd_components(unet=unet, vae=vae)
    base = components['unet']
    factor = 2**(len(components['vae'].config.block_out_channels) - 1)
    controlnet = ControlNetModel.from_unet(
        base, conditioning_embedding_out_channels=controlnet_embedding_channels(factor))
    components['unet'] = add_image_cross_attention(base, image_cross_attention_dim)
    components['controlnet'] = add_image_cross_attention(controlnet, image_cross_attention_dim)
    return components


def tiny_ram_embedder(ram_path=None, dape_path=None, embed_dim=None, img_size=32, num_class=None, tagging=False):
    """A tiny RAM image embedder (two-stage Swin, small tagging head): random, or loaded from a tiny RAM checkpoint
    in RAM's layout (:func:`~dspo_basicsr.archs.ram_arch.save_ram_checkpoint`).

    Args:
        ram_path, dape_path (str | None): A tiny RAM checkpoint (and DAPE LoRA) to load; None: random weights.
        embed_dim (int | None): Output width; None: the checkpoint's (``image_proj``), else 512.
        img_size (int): Swin input size.
        num_class (int | None): Tags of the head (the first of RAM's list); None: the checkpoint's, else 16.
        tagging (bool): Build (and load) the tagging head.

    Returns:
        RAMImageEmbedder: Frozen, in eval mode.
    """
    from dspo_basicsr.archs.ram_arch import RAMImageEmbedder
    from dspo_basicsr.utils.checkpoint import read_checkpoint
    if ram_path and (embed_dim is None or (tagging and num_class is None)):
        state = read_checkpoint(ram_path, 'RAM checkpoint')
        embed_dim = embed_dim or state['image_proj.weight'].shape[0]
        if 'label_embed' in state:
            num_class = num_class or state['label_embed'].shape[0]
    head = dict(TINY_TAGGING_HEAD, num_class=num_class or TINY_TAGGING_HEAD['num_class'])
    embedder = RAMImageEmbedder(swin=dict(TINY_SWIN, img_size=img_size), tagging_head=head,
                                embed_dim=embed_dim or 512, tagging=tagging)
    if tagging:  # random label embeddings, so that a tiny random RAM gives different logits per tag
        torch.nn.init.normal_(embedder.label_embed, std=1.0)
    if ram_path:
        embedder.load_ram_checkpoints(ram_path, dape_path)
    elif dape_path:
        raise ValueError('tiny_ram_embedder: dape_path needs ram_path too (DAPE is applied on top of RAM).')
    return embedder


def build_tiny_control_sd2_folder(folder, seed=0):
    """Save a tiny random SD2 + ControlNet in the released layouts: ``folder/`` and ``folder/controlnet``.

    Returns:
        tuple[str, str]: The SD2 folder and the ControlNet folder.
    """
    from diffusers import ControlNetModel

    from dspo_basicsr.archs.control_sd2_arch import controlnet_embedding_channels, save_sd_components
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = tiny_sd_components()
        factor = 2**(len(components['vae'].config.block_out_channels) - 1)
        controlnet = ControlNetModel.from_unet(
            components['unet'], conditioning_embedding_out_channels=controlnet_embedding_channels(factor))
    save_sd_components(folder, components)
    controlnet_folder = os.path.join(folder, 'controlnet')
    controlnet.save_pretrained(controlnet_folder)
    return folder, controlnet_folder
