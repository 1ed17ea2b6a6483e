"""Colour correction of a sampled SR image against its LQ input, as the SeeSR / AddSR / OSEDiff test scripts do.

The three official test scripts (cswry/SeeSR ``test_seesr.py``, NJU-PCALab/AddSR ``test_addsr.py``, cswry/OSEDiff
``test_osediff.py``) take ``--align_method`` in {``adain`` (their default), ``wavelet``, ``nofix``} and correct the
output against the LQ image resized to the output size (``utils/wavelet_color_fix.py``, after Li Yi's StableSR
colour fix):
    adain    per image and channel, the output's mean and std are replaced by the LQ's (variance + 1e-5);
    wavelet  the output's high frequencies (5 levels of a dilated 3 x 3 binomial blur, replicate padding) plus
             the LQ's low frequencies.
Both clamp to [0, 1]. ``none`` (``nofix`` upstream) returns the output unchanged.
"""
import torch
import torch.nn.functional as F

COLOR_FIX_METHODS = ('adain', 'wavelet', 'none')
_BINOMIAL = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def _mean_std(images, eps=1e-5):
    flat = images.flatten(2)  # (B, C, H*W)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain_color_fix(output, reference):
    """(B, C, H, W) output with the per-channel mean / std of ``reference`` (B, C, H', W'), in [0, 1]."""
    out_mean, out_std = _mean_std(output)
    ref_mean, ref_std = _mean_std(reference)
    return ((output - out_mean) / out_std * ref_std + ref_mean).clamp(0, 1)


def wavelet_blur(images, radius):
    """The 3 x 3 binomial blur with dilation ``radius`` (replicate padding): (B, C, H, W) -> (B, C, H, W)."""
    channels = images.shape[1]
    kernel = torch.tensor(_BINOMIAL, dtype=images.dtype, device=images.device)[None, None].repeat(channels, 1, 1, 1)
    padded = F.pad(images, (radius,) * 4, mode='replicate')
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_decomposition(images, levels=5):
    """(high, low) frequencies of (B, C, H, W) images: ``high + low == images``."""
    high = torch.zeros_like(images)
    for level in range(levels):
        low = wavelet_blur(images, 2**level)
        high = high + (images - low)
        images = low
    return high, low


def wavelet_color_fix(output, reference):
    """The output's high frequencies plus the low frequencies of ``reference`` (same size), in [0, 1]."""
    if reference.shape != output.shape:
        raise ValueError(f'wavelet colour fix: the reference has shape {tuple(reference.shape)}, the output '
                         f'{tuple(output.shape)}; resize the LQ to the output size first.')
    return (wavelet_decomposition(output)[0] + wavelet_decomposition(reference)[1]).clamp(0, 1)


def color_fix(output, reference, method='adain'):
    """Apply ``method`` (``adain``, ``wavelet`` or ``none`` / None) to SR images (B, 3, H, W) in [0, 1]."""
    method = 'none' if method in (None, False, 'nofix') else method
    if method == 'none':
        return output
    if method == 'adain':
        return adain_color_fix(output, reference)
    if method == 'wavelet':
        return wavelet_color_fix(output, reference)
    raise ValueError(f"color_fix must be one of {list(COLOR_FIX_METHODS)}, got {method!r}.")
