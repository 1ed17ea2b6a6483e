"""AddSR: SeeSR's networks distilled (adversarial diffusion distillation) to a 4-step sampler.

Paper: Xie et al., "AddSR: Accelerating Diffusion-based Blind Super-Resolution with Adversarial Diffusion
Distillation", 2024 (https://github.com/NJU-PCALab/AddSR). Fine-tuned with DSPO in "DSPO: Direct Semantic
Preference Optimization for Real-World Image Super-Resolution".

Sampler (AddSR's ``pipeline_addsr``): timesteps 999, 749, 499, 249; the start is the LQ latent noised to
t = 999 (``start_point: lr``); at each step the network predicts x0, and the next step starts from x0
re-noised with fresh noise to the next timestep. Prediction-based self-refinement (PSR): from the second step
on, the ControlNet condition is ``w * decode(x0_prev) + (1 - w) * LQ_up`` and the RAM embeddings are recomputed
from that refined image. ``psr_weight`` w = 0.4: AddSR's paper and ``test_addsr.py`` name a ``--PSR_weight``
argument, but the script never passes it to the pipeline, so the released numbers come from the pipeline
default ``PSR_weight=0.4`` (``pipelines/pipeline_addsr.py``, ``__call__``). The start latent is sampled from
the VAE posterior (``latent_dist.sample()``) as upstream, with the generator. No classifier-free guidance by
default (AddSR's ``guidance_scale`` 0).

Checkpoint layout: SeeSR's (``addsr_model_path/unet`` and ``addsr_model_path/controlnet``, config +
safetensors), loaded strictly (a key that AddSR's release adds or lacks relative to SeeSR's layout is named in
the error), plus the SD2-base folder and RAM / DAPE files as for SeeSR.
Weights licence: AddSR's weights are released with its repository (check the terms there); derived from
Stable Diffusion 2 (CreativeML Open RAIL++-M licence).
"""
import torch

from dspo_basicsr.archs.seesr_arch import SeeSRArch

from basicsr.utils.registry import ARCH_REGISTRY

ADDSR_TIMESTEPS = (999, 749, 499, 249)


@ARCH_REGISTRY.register()
class AddSRArch(SeeSRArch):
    """SeeSR layout with AddSR's 4-step sampler and prediction-based self-refinement.

    Args:
        addsr_model_path (str | None): Folder with AddSR's ``unet/`` and ``controlnet/`` (SeeSR layout).
        seesr_model_path (str | None): Accepted as an alias of ``addsr_model_path``.
        psr_weight (float): w of the self-refinement blend. Default: 0.4 (see the module docstring).
        timesteps (list[int]): The timesteps the sampler visits, the first one its start (with
            ``start_point: lr`` the LQ latent is noised to it). Default: [999, 749, 499, 249].
        Other arguments: see :class:`SeeSRArch` (``default_guidance_scale`` defaults to 1: no guidance;
        ``added_prompt``
        to AddSR's "clean, high-resolution, 8k, extremely detailed, best quality, sharp").
    """

    #: ``pipeline_addsr.py`` ``_init_tiled_vae`` hooks only the decoder (the encoder's hook is commented out)
    vae_encoder_tile_size = None

    def __init__(self, addsr_model_path=None, seesr_model_path=None, psr_weight=0.4,
                 timesteps=ADDSR_TIMESTEPS, default_guidance_scale=1.0, added_prompt=None, **kwargs):
        if added_prompt is None:
            added_prompt = 'clean, high-resolution, 8k, extremely detailed, best quality, sharp'
        if 'start_timestep' in kwargs:
            raise ValueError('AddSRArch starts at the first of its timesteps; set timesteps, not start_timestep.')
        timesteps = [int(t) for t in timesteps]
        super().__init__(seesr_model_path=addsr_model_path or seesr_model_path,
                         default_guidance_scale=default_guidance_scale, added_prompt=added_prompt,
                         start_timestep=timesteps[0], **kwargs)
        self.psr_weight = float(psr_weight)
        self.timesteps = timesteps
        self.default_steps = len(self.timesteps)

    def predicted_x0(self, x_t, eps, t):
        """x0 implied by a noise (or v) prediction at timesteps t (N,): (N, C, h, w)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
        if self.noise_scheduler.config.prediction_type == 'v_prediction':
            return alphas.sqrt() * x_t - (1 - alphas).sqrt() * eps
        return (x_t - (1 - alphas).sqrt() * eps) / alphas.sqrt()

    @torch.no_grad()
    def sample_images(self, lq, prompts, negatives, steps=None, guidance_scale=None, generator=None, sampler=None,
                      tiling=None, extras=None):
        """AddSR sampling of LQ images (B, 3, h, w) in [0, 1] -> (B, 3, h*s, w*s) in [0, 1].

        ``steps`` (if given) takes the first ``steps`` of ``timesteps``; ``sampler`` is ignored.
        The PSR re-embedding resizes the refined image bicubically to RAM's input, as ``pipeline_addsr.py``
        (``F.interpolate(image, size=(384, 384), mode='bicubic')``).
        """
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        timesteps = self.timesteps[:steps] if steps else self.timesteps
        cond = self.condition(lq, prompts, negatives if guidance_scale != 1 else None, **(extras or {}))
        lq_up = cond['control_image']
        b = lq.shape[0]
        first = torch.full((b,), timesteps[0], device=self.device, dtype=torch.long)
        noise = self.initial_noise(lq, generator)
        latents = noise
        if self.start_point == 'lr':
            lq_latents = self.encode_images(lq_up, sample_posterior=True, generator=generator)
            latents = self.noise_scheduler.add_noise(lq_latents, noise, first)
        x0 = None
        for i, step in enumerate(timesteps):
            t = torch.full((b,), step, device=self.device, dtype=torch.long)
            if x0 is not None:  # prediction-based self-refinement of the ControlNet condition (and RAM embeddings)
                refined = self.psr_weight * self.decode_latents(x0) + (1 - self.psr_weight) * lq_up
                cond = dict(cond, control_image=refined)
                if self.ram is not None:
                    cond['image_embeds'] = self.image_embeddings(refined, resize_mode='bicubic')
            eps = self.tiled_prediction(lambda x, c, t=t: self.guided_prediction(x, t, c, guidance_scale), latents,
                                        cond, tiling)
            x0 = self.predicted_x0(latents, eps, t)
            if i + 1 < len(timesteps):
                next_t = torch.full((b,), timesteps[i + 1], device=self.device, dtype=torch.long)
                latents = self.noise_scheduler.add_noise(x0, self.initial_noise(lq, generator), next_t)
        return self.decode_latents(x0)
