"""Preference validation: implicit accuracy of the DSPO logits on a held-out preference set.

Every sample is scored at fixed timesteps (``val.preference_timesteps``) with VAE latents and noise drawn from
a generator seeded with ``val.preference_seed + i`` for sample i, so the same weights give the same numbers
in training, at the end, in ``basicsr test`` and on any number of ranks. The logits are DSPO's
(:func:`~dspo_basicsr.losses.preference_loss.dspo_logits`) on the stored pair of every instance, without the
user-description feedback guidance of training; ``implicit_acc`` is the share of paired instances where the
policy prefers the preferred candidate more than the reference does (0.5 = no preference learned).
"""
from dataclasses import dataclass

import torch

from dspo_basicsr.losses.preference_loss import DEFAULT_BETA, dspo_logits, instance_coverage, logit_statistics
from dspo_basicsr.models.validation_share import validation_share
from dspo_basicsr.utils.distributed import gather_in_sample_order

from basicsr.utils.dist_util import get_dist_info


@dataclass
class PreferenceValidationSettings:
    """How a preference set is scored.

    Attributes:
        timesteps (list[int]): ``val.preference_timesteps``.
        seed (int): ``val.preference_seed``; sample i uses ``seed + i``.
        beta (float): beta of the logits (scales ``logit_mean``, not ``implicit_acc``).
        instance_reduction (str): ``mean`` or ``sum`` of the errors inside an instance (the logits' scale).
    """

    timesteps: list
    seed: int
    beta: float
    instance_reduction: str = 'mean'

    @classmethod
    def for_objective(cls, loss, timesteps, seed, beta=None):
        """Settings whose beta and instance error follow the training objective ``loss``.

        Args:
            loss (nn.Module | None): the training objective (``train.preference_opt``); None in ``basicsr test``.
            timesteps (list[int]): ``val.preference_timesteps``.
            seed (int): ``val.preference_seed``.
            beta (float | None): ``val.preference_beta``; None: the objective's ``beta`` (DSPO, Diffusion-DPO),
                else :data:`DEFAULT_BETA`. The instance error is the objective's ``instance_error`` (DSPO), else
                ``mean``.
        """
        return cls(timesteps=[int(t) for t in timesteps], seed=int(seed),
                   beta=float(beta or getattr(loss, 'beta', DEFAULT_BETA)),
                   instance_reduction=getattr(loss, 'instance_error', 'mean'))


@torch.no_grad()
def sample_logits(model, generator, settings):
    """DSPO logits of the paired instances of the batch ``model`` was fed (one sample), at every timestep.

    The policy runs without its DDP wrapper (no collective outside training) and without feedback guidance.

    Args:
        model (DSPOModel): fed with one preference sample.
        generator (torch.Generator): seeded for this sample; draws the VAE latents, then each timestep's noise.
        settings (PreferenceValidationSettings): timesteps, beta, instance reduction.

    Returns:
        Tensor: (T * N,) the logits of the N paired instances at each of the T timesteps, timestep-major.
    """
    bare = model.bare
    index = model.all_candidates()  # (1, K)
    coverage = instance_coverage(model.seg, model.win.shape[1], bare.vae_scale_factor)
    latents = model.encode_candidates(index, generator, sample_posterior=True).unflatten(0, index.shape)
    cond = model.preference_condition(index.shape[1], feedback=False)
    logits = []
    for step in settings.timesteps:
        t = torch.full((index.shape[0],), step, device=model.device, dtype=torch.long)
        err_theta, err_ref = model.denoising_errors(latents=latents, cond=cond, generator=generator, timesteps=t,
                                                    policy=bare, feedback=False)
        step_logits, _, paired = dspo_logits(err_theta, err_ref, coverage, model.win, model.lose, settings.beta,
                                             settings.instance_reduction)
        logits.append(step_logits[paired].cpu())
    return torch.cat(logits)


def validate_preferences(model, dataloader, settings, show_progress=False):
    """Score this rank's share of a preference set; rank 0 gathers the logits in sample order.

    Args:
        model (DSPOModel): the policy (with the weights to validate) and its frozen reference.
        dataloader: The preference set's validation loader.
        settings (PreferenceValidationSettings): how to score.
        show_progress (bool): A progress bar on rank 0.

    Returns:
        dict[str, float] | None: ``implicit_acc`` and ``logit_mean`` (:func:`logit_statistics`) on rank 0,
        None on the other ranks.
    """
    generator = torch.Generator(device=model.device)
    bare = model.bare
    bare.eval()
    per_sample = []
    for i, data in validation_share(dataloader, f"preference validation {dataloader.dataset.opt['name']}",
                                    show_progress):
        generator.manual_seed(settings.seed + i)
        model.feed_data(data)
        per_sample.append((i, sample_logits(model, generator, settings)))
    bare.train(model.is_train)
    per_sample = gather_in_sample_order(per_sample)
    if get_dist_info()[0] != 0:
        return None
    logits = torch.cat(per_sample) if per_sample else torch.zeros(0)
    return {name: value.item() for name, value in logit_statistics(logits).items()}
