"""The demo's tiny frameworks: ``Tiny*Arch`` types that hand tiny components to the released framework archs.

The framework archs (:mod:`dspo_basicsr.archs`) load released checkpoints only; test and demo construction lives
here. Each ``Tiny<Framework>Arch`` is its framework with

* tiny random networks (:mod:`~dspo_basicsr.demo.tiny_components`), seeded by ``seed``, when no model folder is
  given (``unet_config`` / ``vae_config`` override the tiny UNet and VAE configs), else the folders loaded by the
  framework's own code (a tiny model saved in the released layout, as the demos do);
* a tiny RAM: ``ram_path`` is read as a tiny RAM checkpoint (RAM's layout, a two-stage Swin), and without it
  SeeSR / AddSR / OSEDiff get a random tiny RAM (``random_ram``) for image embeddings and tag prompts.

Registered on ``import dspo_basicsr``, so an option file says ``type: TinySeeSRArch``; the settings beyond the
tiny ones are the framework's own.
"""
import torch

from dspo_basicsr.archs.addsr_arch import AddSRArch
from dspo_basicsr.archs.control_sd2_arch import ControlSD2Arch
from dspo_basicsr.archs.osediff_arch import OSEDiffArch
from dspo_basicsr.archs.seesr_arch import SeeSRArch
from dspo_basicsr.demo.tiny_components import TINY_IMAGE_DIM

from basicsr.utils.registry import ARCH_REGISTRY

__all__ = ['TinyControlSD2Arch', 'TinySeeSRArch', 'TinyAddSRArch', 'TinyOSEDiffArch', 'TINY_FRAMEWORKS']


def _seeded(seed, build):
    """``build()`` under ``torch.manual_seed(seed)``, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TinyRAMMixin:
    """``ram_path`` names a tiny RAM checkpoint (:func:`~dspo_basicsr.demo.tiny_components.tiny_ram_embedder`)."""

    def load_ram(self, ram_path, dape_path=None, tagging=False, embed_dim=None):
        from dspo_basicsr.demo.tiny_components import tiny_ram_embedder
        return tiny_ram_embedder(ram_path=ram_path, dape_path=dape_path, tagging=tagging)


@ARCH_REGISTRY.register()
class TinyControlSD2Arch(TinyRAMMixin, ControlSD2Arch):
    """:class:`ControlSD2Arch` on tiny random SD2 components (without ``pretrained_model_path``).

    Args:
        seed (int): Seed of the random networks.
        unet_config (dict | None): Overrides of the tiny UNet config (``tiny_unet_config``, e.g. for benchmarks).
        vae_config (dict | None): Arguments of ``tiny_vae_config`` (e.g. four levels for SD's latent factor 8).
        **settings: :class:`ControlSD2Arch`'s.
    """

    def __init__(self, seed=0, unet_config=None, vae_config=None, **settings):
        from dspo_basicsr.demo.tiny_components import tiny_sd_components
        if not settings.get('pretrained_model_path'):
            settings['components'] = _seeded(seed, lambda: tiny_sd_components(unet=unet_config, vae=vae_config))
        super().__init__(**settings)


def _tiny_seesr_components(seed, unet_config, vae_config, random_ram):
    from dspo_basicsr.demo.tiny_components import tiny_ram_embedder, tiny_seesr_networks

    def build():
        components = tiny_seesr_networks(unet=unet_config, vae=vae_config)
        if random_ram:  # the same random tiny RAM that build_tiny_seesr_folders saves
            components['ram'] = tiny_ram_embedder(embed_dim=TINY_IMAGE_DIM, tagging=True)
        return components
    return _seeded(seed, build)


@ARCH_REGISTRY.register()
class TinySeeSRArch(TinyRAMMixin, SeeSRArch):
    """:class:`SeeSRArch` on tiny random networks (without ``pretrained_model_path``).

    Args:
        seed, unet_config, vae_config: see :class:`TinyControlSD2Arch`.
        random_ram (bool): A random tiny RAM embedder (image embeddings and tags); ``ram_path`` replaces it.
        **settings: :class:`SeeSRArch`'s.
    """

    def __init__(self, seed=0, unet_config=None, vae_config=None, random_ram=True, **settings):
        if not settings.get('pretrained_model_path'):
            settings['components'] = _tiny_seesr_components(seed, unet_config, vae_config, random_ram)
        super().__init__(**settings)


@ARCH_REGISTRY.register()
class TinyAddSRArch(TinyRAMMixin, AddSRArch):
    """:class:`AddSRArch` on tiny random networks (SeeSR's, without ``pretrained_model_path``).

    Args:
        seed, unet_config, vae_config, random_ram: see :class:`TinySeeSRArch`.
        **settings: :class:`AddSRArch`'s.
    """

    def __init__(self, seed=0, unet_config=None, vae_config=None, random_ram=True, **settings):
        if not settings.get('pretrained_model_path'):
            settings['components'] = _tiny_seesr_components(seed, unet_config, vae_config, random_ram)
        super().__init__(**settings)


@ARCH_REGISTRY.register()
class TinyOSEDiffArch(TinyRAMMixin, OSEDiffArch):
    """:class:`OSEDiffArch` on tiny random SD components (without ``pretrained_model_path``).

    Args:
        seed, unet_config, vae_config: see :class:`TinyControlSD2Arch`.
        random_ram (bool): A random tiny RAM tagger (for ``prompt_source: tags``) when there is no ``ram_path``.
        **settings: :class:`OSEDiffArch`'s.
    """

    def __init__(self, seed=0, unet_config=None, vae_config=None, random_ram=True, **settings):
        from dspo_basicsr.demo.tiny_components import tiny_ram_embedder, tiny_sd_components
        if not settings.get('pretrained_model_path'):
            def build():
                components = tiny_sd_components(unet=unet_config, vae=vae_config)
                if random_ram and not settings.get('ram_path'):
                    components['ram'] = tiny_ram_embedder(tagging=True)
                return components
            settings['components'] = _seeded(seed, build)
        super().__init__(**settings)


#: framework arch name -> its tiny type
TINY_FRAMEWORKS = {'ControlSD2Arch': TinyControlSD2Arch, 'SeeSRArch': TinySeeSRArch, 'AddSRArch': TinyAddSRArch,
                   'OSEDiffArch': TinyOSEDiffArch}
