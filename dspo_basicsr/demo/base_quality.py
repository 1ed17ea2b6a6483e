"""Where a demo base loses PSNR on the held-out crops: bicubic, the VAE round trip, and the sampled base.

The held-out PSNR of a latent diffusion SR model is capped by its VAE: sampling starts from (or is conditioned on)
the latent of the bicubic image and ends in the decoder. :func:`base_quality` measures each stage with the option
file's validation metric, so a change to the demo base (``DEMO_BASE``) shows which stage it moved.
"""
import numpy as np
import torch

__all__ = ['base_quality']


@torch.no_grad()
def base_quality(option_file):
    """Mean held-out PSNR (the option file's ``crop_border``) of each stage of its pretrained ``network_g``.

    Args:
        option_file (str): A demo training option file (``options/demo/dspo_demo.yml``).

    Returns:
        dict: ``bicubic``; ``vae_round_trip_bicubic`` (decode(encode(bicubic))), the same after the sampling
        protocol's ``color_fix`` (``..._color_fixed``), ``vae_round_trip_gt``; ``sampled`` (the base sampling with
        ``val.sample``), in dB, and ``images``, the number of crops.
    """
    from dspo_basicsr.archs.color_fix import color_fix
    from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
    from dspo_basicsr.demo.dspo import held_out_crops, sample_as_validation
    from dspo_basicsr.utils.image_io import to_uint8_rgb
    from dspo_basicsr.utils.options import read_option_file

    from basicsr.archs import build_network
    from basicsr.metrics import calculate_psnr

    opt = read_option_file(option_file)
    sample_opt = resolve_sample_options(opt['val'].get('sample'))  # a protocol preset expanded
    crop_border = opt['val'].get('metrics', {}).get('psnr', {}).get('crop_border', 0)
    framework = build_network(dict(opt['network_g'])).eval()
    stages = {k: [] for k in ('bicubic', 'vae_round_trip_bicubic', 'vae_round_trip_bicubic_color_fixed',
                              'vae_round_trip_gt', 'sampled')}
    for _, gt, lq in held_out_crops(opt, 'demo base quality'):
        gt_tensor = torch.from_numpy(gt).permute(2, 0, 1)[None].float().div(255)
        bicubic = framework.upsample_lq(lq)
        round_trip = framework.decode_latents(framework.encode_images(bicubic))
        sampled = sample_as_validation(framework, lq, sample_opt)
        images = {
            'bicubic': bicubic, 'vae_round_trip_bicubic': round_trip,
            'vae_round_trip_bicubic_color_fixed': color_fix(round_trip, bicubic, sample_opt.get('color_fix', 'none')),
            'vae_round_trip_gt': framework.decode_latents(framework.encode_images(gt_tensor)), 'sampled': sampled}
        for key, image in images.items():
            stages[key].append(calculate_psnr(to_uint8_rgb(image[0]), gt, crop_border=crop_border))
    return dict({key: round(float(np.mean(values)), 4) for key, values in stages.items()},
                images=len(stages['sampled']))
