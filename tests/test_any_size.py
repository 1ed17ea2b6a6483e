"""LQ images of any size: every framework samples them at the official scripts' sizes and returns exactly
scale x the input, aligned with it (issue 23, item 1), with the scripts' resampling and RAM inputs (item 7)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspo_basicsr.archs.addsr_arch import AddSRArch
from dspo_basicsr.archs.diffusion_sr_base import resize_images
from dspo_basicsr.demo.tiny_arch import TinyAddSRArch, TinyControlSD2Arch, TinyOSEDiffArch, TinySeeSRArch

SD_LIKE = {'vae_config': {'block_out_channels': (16, 32, 32, 32)}}  # four VAE levels: SD's latent factor 8
# odd, non-square, tiny (below the process size and below one latent pixel) and large (above it)
SIZES = ((9, 9), (9, 8), (13, 21), (1, 3), (70, 45))
FRAMEWORKS = {
    'controlsd2': lambda: TinyControlSD2Arch(**SD_LIKE, sampler='ddim'),
    'seesr': lambda: TinySeeSRArch(**SD_LIKE),
    'addsr': lambda: TinyAddSRArch(**SD_LIKE),
    'osediff': lambda: TinyOSEDiffArch(**SD_LIKE),
}


def psnr(a, b):
    return (10 * torch.log10(1 / F.mse_loss(a, b))).item()


def upstream_process_size(width, height, scale, process_size):
    """The sampled (width, height) of ``test_seesr.py`` / ``test_addsr.py`` / ``test_osediff.py``, in PIL's order."""
    if width < process_size // scale or height < process_size // scale:
        ratio = (process_size // scale) / min(width, height)
        width, height = int(ratio * width), int(ratio * height)
    width, height = width * scale, height * scale
    return width // 8 * 8, height // 8 * 8


@pytest.mark.parametrize('name', sorted(FRAMEWORKS))
def test_every_framework_samples_any_size_to_exactly_scale_times_the_lq(name):
    arch = FRAMEWORKS[name]().eval()
    assert arch.vae_scale_factor == 8
    for height, width in SIZES:
        lq = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * width))
        out = arch.sample(lq, steps=2, generator=torch.Generator().manual_seed(0), process_size=64)
        assert out.shape == (1, 3, 4 * height, 4 * width), (name, height, width)
        assert torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1


def test_process_sizes_equal_the_official_scripts():
    arch = TinyControlSD2Arch(**SD_LIKE)
    for height, width in ((9, 9), (9, 8), (13, 21), (1, 3), (70, 45), (127, 129), (300, 451)):
        for process_size in (None, 64, 512):
            h, w = arch.process_lq_size(height, width, process_size)
            expected_w, expected_h = upstream_process_size(width, height, 4, process_size or 0)
            assert (4 * h, 4 * w) == (max(8, expected_h), max(8, expected_w)), (height, width, process_size)


class IdentitySR(TinyControlSD2Arch):
    """A framework whose "SR" is the bicubic upsampling of the LQ it is given: shows the geometry of ``sample``."""

    def sample_images(self, lq, prompts, negatives, **kwargs):
        return self.upsample_lq(lq)


def edge_lq(height, width):
    """An LQ with a vertical and a horizontal step at odd positions: (1, 3, height, width) in [0, 1]."""
    lq = torch.full((1, 3, height, width), 0.2)
    lq[:, :, :, width // 2 + 1:] = 0.8
    lq[:, 1, height // 3:, :] = 0.6
    return lq


def test_outputs_are_aligned_with_the_input_and_a_shift_or_stretch_would_fail():
    arch = IdentitySR(**SD_LIKE).eval()
    for height, width in ((9, 9), (9, 8), (13, 21), (70, 45)):
        lq = edge_lq(height, width)
        reference = resize_images(lq, (4 * height, 4 * width))
        out = arch.sample(lq, process_size=64)
        assert out.shape == reference.shape
        aligned = psnr(out, reference)
        # what misalignment looks like: the output shifted by one LQ pixel, or the floored LQ stretched
        # (the OSEDiff behaviour this replaces: latent floored, decoded image stretched to the output size)
        shifted = torch.roll(out, shifts=4, dims=3)
        floored = resize_images(arch.upsample_lq(lq[:, :, :height // 2 * 2, :width // 2 * 2]), reference.shape[2:])
        assert aligned > 30, (height, width, aligned)
        assert psnr(shifted, reference) < aligned - 10
        if (height % 2, width % 2) != (0, 0) and min(height, width) >= 9:
            assert psnr(floored, reference) < aligned - 5, (height, width)


def test_resizes_use_pils_bicubic_filter():
    from PIL import Image
    smooth = F.avg_pool2d(torch.rand(1, 3, 30, 46, generator=torch.Generator().manual_seed(0)), 3, 1)  # 28 x 44
    lq = (smooth * 255).round() / 255
    array = (lq[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for size in ((112, 176), (15, 22), (40, 40)):  # x4, shrinking (antialiased), non-uniform
        pil = Image.fromarray(array).resize((size[1], size[0]), Image.BICUBIC)
        pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
        ours = resize_images(lq, size)
        torch_bicubic = F.interpolate(lq, size=size, mode='bicubic', align_corners=False).clamp(0, 1)
        assert (ours - pil).abs().max() <= 2 / 255, size  # PIL rounds to uint8 after each of its two passes
        assert (torch_bicubic - pil).abs().max() > 3 / 255, size


def test_seesr_and_addsr_embed_the_lq_as_read_and_addsr_re_embeds_bicubically():
    for arch in (TinySeeSRArch(**SD_LIKE).eval(), TinyAddSRArch(**SD_LIKE).eval()):
        seen = []
        real = arch.image_embeddings

        def record(images, ram_embeds=None, resize_mode='bilinear', real=real, seen=seen):
            if ram_embeds is None:
                seen.append((tuple(images.shape[2:]), resize_mode))
            return real(images, ram_embeds, resize_mode)
        arch.image_embeddings = record
        arch.sample(torch.rand(1, 3, 9, 13), steps=2, generator=torch.Generator().manual_seed(0), process_size=64)
        assert seen[0] == ((9, 13), 'bilinear')  # test_seesr.py / test_addsr.py: the image as opened
        if isinstance(arch, AddSRArch):  # PSR: the refined image at the process size, resized bicubically
            assert seen[1:] == [((64, 88), 'bicubic')]  # 9 x 13 -> 16 x 22, x4
        else:
            assert len(seen) == 1


def test_osediff_tags_the_processed_input_and_seesr_the_lq_as_read():
    for arch, expected in ((TinyOSEDiffArch(**SD_LIKE).eval(), (16, 22)), (TinySeeSRArch(**SD_LIKE).eval(), (9, 13))):
        seen = []
        real = arch.image_tags

        def record(lq, real=real, seen=seen):
            seen.append(tuple(lq.shape[2:]))
            return real(lq)
        arch.image_tags = record
        arch.sample(torch.rand(1, 3, 9, 13), steps=1, generator=torch.Generator().manual_seed(0), process_size=64,
                    prompt_source='tags')
        assert seen == [expected]
