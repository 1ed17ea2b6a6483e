"""Precomputed candidate latents: each candidate's VAE posterior stored in the preference set (issue 22).

Training then never runs the VAE encoder on the N candidates of a step (diffusers' and verl's "cache latents"):
``PreferenceLMDBDataset`` reads the posterior and ``DSPOModel`` draws the training latent from it with its
generator, which gives exactly the latent that encoding would have drawn (``DiffusionSRArch.latents_from_posterior``).
The format is in ``dspo_basicsr/data/preference_set.py`` and docs/preference_lmdb.md.
"""
import dataclasses

import numpy as np
import torch

from dspo_basicsr.data.preference_set import CANDIDATE_LATENTS_KEY

__all__ = ['candidate_latents_record', 'samples_with_candidate_latents']


def candidate_latents_record(framework):
    """The ``candidate_latents`` meta record of latents written by ``framework``'s VAE (digest, f, scaling)."""
    return {'vae_digest': framework.vae_digest(), 'vae_scale_factor': int(framework.vae_scale_factor),
            'scaling_factor': float(framework.vae.config.scaling_factor)}


@torch.no_grad()
def samples_with_candidate_latents(store, framework, device='cpu', chunk=4, done=()):
    """The samples of a preference set with their candidates' VAE posteriors added.

    Args:
        store (PreferenceLMDB): The source set.
        framework (DiffusionSRArch): The framework that will train on the set (its VAE, precision and
            ``encode_posterior`` are the ones training would use), already on ``device``.
        device (str | torch.device): Where the VAE runs.
        chunk (int): Candidates encoded per VAE call (bounds the encoder's memory).
        done (Iterable[str]): Ids already written by an interrupted run (:func:`resumable_ids` of the
            destination): yielded as they are, not encoded, for the writer to skip.

    Yields:
        PreferenceSample: With ``extras['candidate_latents']`` float32 (N, 2, C, H/f, W/f) (mean, std) and
        ``meta['candidate_latents']`` the record of :func:`candidate_latents_record`.
    """
    record = candidate_latents_record(framework)
    done = set(done)
    for sid in store.ids():
        sample = store[sid]
        if sid in done:
            yield sample
            continue
        images = torch.from_numpy(np.stack(sample.candidates)).permute(0, 3, 1, 2).float().div(255)  # (N, 3, H, W)
        posteriors = []
        for part in images.split(chunk):
            mean, std = framework.encode_posterior(part.to(device))
            posteriors.append(torch.stack([mean, std], dim=1).float().cpu())  # (n, 2, C, h, w)
        latents = torch.cat(posteriors).numpy()
        extras = dict(sample.extras or {}, **{CANDIDATE_LATENTS_KEY: latents})
        yield dataclasses.replace(sample, extras=extras, meta=dict(sample.meta, **{CANDIDATE_LATENTS_KEY: record}))
