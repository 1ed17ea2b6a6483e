"""A tiny random SeeSR saved in the released folder layouts, for the tests, the benchmarks and the demos."""
import os

import torch
from diffusers import UNet2DConditionModel

from dspo_basicsr.archs.control_sd2_arch import save_sd_components
from dspo_basicsr.archs.ram_arch import save_dape_checkpoint, save_ram_checkpoint
from dspo_basicsr.archs.seesr_arch import save_seesr_networks, strip_seesr_config
from dspo_basicsr.demo.tiny_components import TINY_IMAGE_DIM, tiny_ram_embedder, tiny_seesr_networks

__all__ = ['build_tiny_seesr_folders']


def build_tiny_seesr_folders(folder, seed=0, ram=True):
    """Save a tiny random SeeSR in the released layouts.

    Writes ``folder/sd2`` (SD2-base layout), ``folder/seesr/{unet,controlnet}`` (SeeSR layout) and, with
    ``ram``, ``folder/ram/ram_tiny.pth`` (RAM checkpoint layout, tiny Swin and tagging head) and
    ``folder/ram/DAPE_tiny.pth`` (LoRA only, as SeeSR's DAPE trainer writes it) for
    :class:`~dspo_basicsr.archs.ram_arch.RAMImageEmbedder`.

    Returns:
        dict: ``pretrained_model_path``, ``seesr_model_path``, ``ram_path`` and ``dape_path`` (or None).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = tiny_seesr_networks()
        embedder = tiny_ram_embedder(embed_dim=TINY_IMAGE_DIM, tagging=True) if ram else None
    unet, controlnet = components.pop('unet'), components.pop('controlnet')
    sd_folder = os.path.join(folder, 'sd2')
    save_sd_components(sd_folder, components)
    unet_plain = UNet2DConditionModel.from_config(strip_seesr_config(unet.config))
    unet_plain.save_pretrained(os.path.join(sd_folder, 'unet'))  # the SD2 folder's own UNet (unused by SeeSR)
    seesr_folder = save_seesr_networks(os.path.join(folder, 'seesr'), unet, controlnet)
    ram_path = dape_path = None
    if ram:
        ram_path = save_ram_checkpoint(embedder, os.path.join(folder, 'ram', 'ram_tiny.pth'))
        dape_path = save_dape_checkpoint(embedder, os.path.join(folder, 'ram', 'DAPE_tiny.pth'), seed=seed)
    return {'pretrained_model_path': sd_folder, 'seesr_model_path': seesr_folder, 'ram_path': ram_path,
            'dape_path': dape_path}
