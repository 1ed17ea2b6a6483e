"""dspo_basicsr: preference fine-tuning (DSPO, Diffusion-DPO, SFT, Diffusion-DRO) of diffusion SR models.

Importing the package adapts basicsr 1.4.2 (:mod:`dspo_basicsr.compat`) and registers every arch,
dataset, loss, metric and model of the plugin in BasicSR's registries.
"""
from dspo_basicsr import compat

compat.apply()

from dspo_basicsr import archs, data, losses, metrics, models  # noqa: E402,F401  (registration)
from dspo_basicsr.demo import tiny_arch  # noqa: E402,F401  (registers the demo's Tiny*Arch frameworks)
from dspo_basicsr.version import __version__  # noqa: E402,F401
