"""VAE tiling with the official scripts' thresholds (issue 23, item 3): below them nothing is tiled."""
import torch

from dspo_basicsr.demo.tiny_arch import TinyAddSRArch, TinyControlSD2Arch

SD_LIKE = {'vae_config': {'block_out_channels': (16, 32, 32, 32)}}


def test_images_below_the_thresholds_are_encoded_and_decoded_untiled():
    arch = TinyControlSD2Arch(**SD_LIKE).eval()
    image = torch.rand(1, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(1, 4, 30, 20, generator=torch.Generator().manual_seed(1))
    plain = arch.encode_images(image), arch.decode_latents(latents)
    with arch.vae_tiling(True):
        tiled = arch.encode_images(image), arch.decode_latents(latents)
        # diffusers' own threshold (the tiny VAE's sample_size 64) would have tiled this image
        assert arch.vae.use_tiling and arch.vae.tile_sample_min_size == 64
    assert torch.equal(plain[0], tiled[0]) and torch.equal(plain[1], tiled[1])


def test_images_above_the_thresholds_are_tiled_and_addsr_never_tiles_its_encoder():
    arch = TinyControlSD2Arch(**SD_LIKE).eval()
    arch.vae_encoder_tile_size, arch.vae_decoder_tile_size = 16, 2  # thresholds 64 px and 24 latent pixels
    image = torch.rand(1, 3, 40, 88, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(1, 4, 8, 27, generator=torch.Generator().manual_seed(1))
    plain = arch.encode_images(image), arch.decode_latents(latents)
    with arch.vae_tiling(True):
        tiled = arch.encode_images(image), arch.decode_latents(latents)
    assert tiled[0].shape == plain[0].shape and not torch.equal(plain[0], tiled[0])
    assert tiled[1].shape == plain[1].shape and not torch.equal(plain[1], tiled[1])
    addsr = TinyAddSRArch(**SD_LIKE).eval()
    addsr.vae_decoder_tile_size = 2
    with addsr.vae_tiling(True):
        assert torch.equal(addsr.encode_images(image), TinyAddSRArch(**SD_LIKE).eval().encode_images(image))
