"""BasicSR losses (DSPO, Diffusion-DPO, SFT, Diffusion-DRO, fidelity).

Every `*_loss.py` file in this folder is imported here, which registers its classes in BasicSR's registry.
"""
import os

from dspo_basicsr.registration import import_modules_with_suffix

_modules = import_modules_with_suffix(__name__, os.path.dirname(os.path.abspath(__file__)), '_loss.py')

from dspo_basicsr.losses.fidelity_loss import fidelity_loss  # noqa: E402
from dspo_basicsr.losses.preference_loss import (  # noqa: E402
    DEFAULT_BETA,
    PreferenceBatch,
    PreferenceResult,
    diffusion_dpo_logits,
    diffusion_dpo_loss,
    diffusion_dro_differences,
    diffusion_dro_loss,
    diffusion_sft_loss,
    dspo_logits,
    dspo_loss,
    dspo_pair_logits,
    dspo_pair_loss,
    hierarchical_weights,
    implicit_accuracy,
    instance_coverage,
    instance_error,
    pick_candidates,
    preference_statistics,
    top_bottom_pairs,
)

__all__ = [
    'DEFAULT_BETA', 'PreferenceBatch', 'PreferenceResult', 'diffusion_dpo_logits', 'diffusion_dpo_loss',
    'diffusion_dro_differences', 'diffusion_dro_loss', 'diffusion_sft_loss', 'dspo_logits', 'dspo_loss',
    'dspo_pair_logits', 'dspo_pair_loss', 'fidelity_loss', 'hierarchical_weights', 'implicit_accuracy',
    'instance_coverage', 'instance_error', 'pick_candidates', 'preference_statistics', 'top_bottom_pairs',
]
