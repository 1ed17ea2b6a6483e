"""dspo_basicsr: preference fine-tuning (DSPO, Diffusion-DPO, SFT, Diffusion-DRO) of diffusion SR models.

Importing the package applies the import shims basicsr 1.4.2 needs (:mod:`dspo_basicsr.compat`) and registers
every arch, dataset, loss, metric and model of the plugin in BasicSR's registries; it replaces nothing of BasicSR.
"""
from dspo_basicsr import compat

compat.apply()

from dspo_basicsr import archs, data, losses, metrics, models  # noqa: E402,F401  (registration)
from dspo_basicsr.demo import tiny_arch  # noqa: E402,F401  (registers the demo's Tiny*Arch frameworks)
from dspo_basicsr.version import __version__  # noqa: E402,F401
