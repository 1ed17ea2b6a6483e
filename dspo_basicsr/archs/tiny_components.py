"""Tiny, randomly initialised Stable Diffusion components for tests and the CPU demo.

They are the same diffusers / transformers classes as the released models, only small, so every code
path (building, saving in the released folder layout, loading back) is the real one. diffusers and
transformers are imported on use, so importing the arch files (to fill BasicSR's registry) does not.
"""

TINY_TEXT_DIM = 32
TINY_MAX_LENGTH = 16


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
        vocab_size=len(_byte_level_vocab()), hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TINY_MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _byte_level_vocab():
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ['<|startoftext|>', '<|endoftext|>'] + alphabet + [c + '</w>' for c in alphabet]
    return {token: i for i, token in enumerate(tokens)}


def tiny_tokenizer():
    """A character-level CLIP tokenizer (no merges), so tiny models need no downloaded vocabulary."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=_byte_level_vocab(), merges=[], model_max_length=TINY_MAX_LENGTH)


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
