"""DiffusionDROModel: Diffusion-DRO fine-tuning with expert images and offline or online negatives.

Diffusion-DRO (Wu et al., "Ranking-based Preference Optimization for Diffusion Models from Implicit User
Feedback", arXiv:2510.18353) ranks the denoising error of an *expert* image below that of a *negative*
image, relative to the frozen reference (:func:`~dspo_basicsr.losses.preference_loss.diffusion_dro_loss`).
This model chooses the two images; everything else (timesteps, shared noise, one condition per LQ, batched
policy and reference calls, checkpoints, validation) is :class:`DSPOModel`'s.

- expert: the preferred candidate (the image pair's winner, or each instance's winner at instance level)
  or the ground truth;
- negative: the offline dispreferred candidate, or an online sample of a lagged copy of the policy for
  the same LQ input (a share ``online_ratio`` of the batch's samples, drawn at random each step). For an
  online negative the noisy latent is the lagged copy's own trajectory latent at a trajectory timestep, and
  the target is the copy's own prediction there; the expert of that LQ is noised at the same timestep.

The lagged copy is re-synced to the policy every ``refresh_every`` optimizer updates (with
``train.accumulate_grad_batches`` k: every ``refresh_every * k`` iterations, at the start of a window, as
Diffusion-DRO's ``--buffer_update_steps`` counts its micro-steps), and the replay buffer is
emptied then (its samples belong to the older copy). It is never saved: on resume it is rebuilt at the
first step from the resumed policy (pretrained frozen parts + the trainable weights of the checkpoint), so
the lag restarts at the resume point, and the buffer starts empty.
"""
from dataclasses import replace

import torch

from dspo_basicsr.archs.diffusion_sr_base import DiffusionSRArch, join_negative_prompts
from dspo_basicsr.losses.preference_loss import DiffusionDROLoss, instance_coverage
from dspo_basicsr.models.candidate_images import gather_images
from dspo_basicsr.models.dspo_model import DiffusionInputOverrides, DSPOModel
from dspo_basicsr.models.lagged_policy import LaggedPolicy, refresh_due
from dspo_basicsr.models.online_negatives import (
    SAMPLERS,
    OnlineNegative,
    OnlineNegativeBuffer,
    negative_key,
    sample_trajectory,
    trajectory_timesteps,
)
from dspo_basicsr.utils.option_schema import Option

from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class DiffusionDROModel(DSPOModel):
    """:class:`DSPOModel` plus the Diffusion-DRO objective (``train.preference_opt.type: DiffusionDROLoss``).

    Its options are DSPOModel's plus ``train.dro`` (:attr:`option_schema`; the table is in ``docs/options.md``).
    With any other preference loss the model behaves as DSPOModel.
    """

    #: DSPOModel's options plus the lagged copy's and its replay buffer's (``train.dro``)
    option_schema = DSPOModel.option_schema.extend(
        Option('train.dro', 'dict', {}, 'Diffusion-DRO: the expert, the online negatives and their lagged copy'),
        Option('train.dro.expert', 'str', 'preferred', 'preferred: the preferred candidate; gt: the ground truth '
               '(the set must store it)', choices=('preferred', 'gt')),
        Option('train.dro.online_ratio', 'number', 0.5, "share of each batch's samples whose negative is online "
               '(0: offline only, 1: online only)', ge=0, le=1),
        Option('train.dro.buffer_size', 'int', 64, 'replay buffer entries (one per LQ input)', ge=1),
        Option('train.dro.refresh_every', 'int', 100, 'K: optimizer updates between syncs of the lagged copy '
               '(the buffer is emptied then)', ge=1),
        Option('train.dro.sampler_steps', 'int', 10, "steps of the lagged copy's sampler", ge=1),
        Option('train.dro.sampler', 'str', 'ddim', "the lagged copy's sampler (Diffusion-DRO's authors: dpmsolver++, "
               '20 steps)', choices=tuple(SAMPLERS)),
        Option('train.dro.perturb_timesteps', 'bool', False, 'each online trajectory on its own shifted timesteps '
               "(the authors': true)"),
        Option('train.dro.guidance_scale', 'number', 1.0, "guidance scale of the lagged copy's sampling (~: the "
               "framework's default)", nullable=True),
        Option('train.dro.seed', 'int', 0, "seed of the online choices and of the lagged copy's sampling noise"),
    )

    def __init__(self, opt):
        # Set before DSPOModel.__init__, which ends with init_training_settings (training only).
        self.dro_opt = None
        self.ranking = False  # train.preference_opt is Diffusion-DRO (else the model is DSPOModel)
        self.online_ratio = 0.0
        self.refresh_every = None
        self.negative_buffer = None
        self.lagged = None
        self.dro_generator = None
        self.online_timesteps = None
        self.sids = None
        self.online_share = None  # the batch's share of online negatives, logged
        super().__init__(opt)

    def init_training_settings(self):
        super().init_training_settings()
        self.dro_opt = self.option_schema.section(self.opt, 'train.dro')  # checked, defaults filled in
        self.ranking = isinstance(self.cri_pref, DiffusionDROLoss)
        if not self.ranking:
            return
        self.online_ratio = float(self.dro_opt['online_ratio'])
        self.refresh_every = self.dro_opt['refresh_every']
        self.negative_buffer = OnlineNegativeBuffer(self.dro_opt['buffer_size'])
        self.lagged = LaggedPolicy()
        self.dro_generator = torch.Generator(device=self.device).manual_seed(
            int(self.dro_opt['seed']) + int(self.opt.get('rank', 0)))
        if self.online_ratio > 0:
            self._check_online_sampling()

    def _check_online_sampling(self):
        bare = self.bare
        if type(bare).diffusion_inputs is not DiffusionSRArch.diffusion_inputs:
            raise ValueError(f'{type(bare).__name__} takes its preference likelihood at its own operating point '
                             '(a one-step framework), so it has no sampling trajectory for online negatives; set '
                             'train.dro.online_ratio to 0.')
        steps = trajectory_timesteps(bare, self.dro_opt['sampler'], int(self.dro_opt['sampler_steps']))
        low, high = self.timestep_range
        self.online_timesteps = steps[(steps >= low) & (steps < high)]
        if len(self.online_timesteps) == 0:
            raise ValueError(f"train.dro: the {self.dro_opt['sampler_steps']}-step {self.dro_opt['sampler']} "
                             f'trajectory visits timesteps {steps.tolist()}, none inside train.timestep_range '
                             f'[{low}, {high}); widen the range or change train.dro.sampler_steps.')

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        super().feed_data(data)
        self.sids = list(data.get('sid', [str(i) for i in range(self.lq.shape[0])]))

    # ------------------------------------------------------------------ the lagged copy and its buffer
    def refresh_lagged_policy(self, current_iter):
        """Sync the lagged copy to the policy when it is missing or ``refresh_every`` optimizer updates old."""
        lagged = self.lagged
        if not refresh_due(lagged, current_iter, self.refresh_every, self.accumulate):
            return False
        first = lagged.state is None
        buffer = self.negative_buffer
        lagged.sync(self.bare, current_iter)
        get_root_logger().info(
            f'iter {current_iter}: lagged copy {"built from the current policy" if first else "re-synced"} '
            f'(version {lagged.version}); online-negative buffer emptied ({len(buffer)} entries; '
            f'{buffer.generated} samples generated and {buffer.reused} reused so far).')
        buffer.clear()
        return True

    @property
    def online_guidance_scale(self):
        """Guidance scale of the lagged copy's sampling (``train.dro.guidance_scale``; ``~``: the framework's
        default)."""
        scale = self.dro_opt['guidance_scale']
        return float(self.bare.default_guidance_scale if scale is None else scale)

    def _online_condition(self, rows):
        """Condition of the LQ inputs ``rows`` for the lagged copy's sampling (with negatives when guided)."""
        bare = self.bare
        prompts = [self.prompts[i] for i in rows]
        needs_negative = self.online_guidance_scale != 1 or bool(self.feedback_scale)
        negatives = [join_negative_prompts(bare.default_negative_prompt, self.negative_prompts[i]) for i in rows] \
            if needs_negative else None
        extras = {name: value[rows] for name, value in self.extras.items()}
        return bare.condition(self.lq[rows], prompts, negatives, **extras)

    def online_negatives(self, rows):
        """Online negatives of the batch's LQ inputs ``rows``: from the buffer, or sampled by the lagged copy now.

        Returns:
            list[OnlineNegative]: one per row, in order.
        """
        keys = [negative_key(self.sids[i], self.lq[i]) for i in rows]
        found = {key: self.negative_buffer.get(key) for key in dict.fromkeys(keys) if key in self.negative_buffer}
        first_row = {}
        for i, key in zip(rows, keys):
            first_row.setdefault(key, i)
        missing = [i for key, i in first_row.items() if key not in found]  # one sample per distinct LQ input
        if missing:
            bare = self.bare
            f = bare.vae_scale_factor
            shape = (len(missing), bare.vae.config.latent_channels, self.lq.shape[2] * bare.scale // f,
                     self.lq.shape[3] * bare.scale // f)
            cond = self._online_condition(missing)
            was_training = bare.training
            bare.eval()
            with self.lagged.swapped_into(bare):
                trajectory = sample_trajectory(
                    bare, cond, shape, int(self.dro_opt['sampler_steps']), self.dro_opt['sampler'],
                    self.online_guidance_scale, self.feedback_scale, self.dro_generator,
                    perturb_timesteps=bool(self.dro_opt['perturb_timesteps']))
            bare.train(was_training)
            for n, i in enumerate(missing):
                key = keys[rows.index(i)]
                timesteps = trajectory['timesteps']
                self.negative_buffer.put(key, OnlineNegative(
                    trajectory['latents'][:, n], trajectory['predictions'][:, n],
                    timesteps[n] if timesteps.ndim == 2 else timesteps,
                    trajectory['final'][n], self.lagged.version))
                found[key] = self.negative_buffer.entries[key]
        return [found[key] for key in keys]

    # ------------------------------------------------------------------ the step
    def optimize_parameters(self, current_iter):
        if self.ranking and self.online_ratio > 0:
            self.refresh_lagged_policy(current_iter)
        super().optimize_parameters(current_iter)

    def preference_loss(self):
        if not self.ranking:
            return super().preference_loss()
        return self.ranking_loss()

    def _expert_images(self):
        if self.dro_opt['expert'] == 'gt':
            if self.gt is None:
                raise ValueError("train.dro.expert is 'gt' but the preference set stores no ground truth "
                                 "('{sid}/gt'); use expert: preferred or rebuild the set with GT images.")
            return self.gt
        return None

    def _encode(self, images):
        """Images (N, 3, H, W) -> posterior-sampled latents (N, C, h, w), as DSPOModel encodes candidates."""
        return self.bare.encode_images(images, sample_posterior=True)

    def _instance_table(self, online, gt):
        """Instance level: columns = K candidates [+ GT] [+ online negative].

        Returns:
            tuple: latents (B, J, C, h, w), expert and negative (B, M) indices into J, the online column or None.
        """
        b, k = self.candidates.shape[:2]
        coverage = instance_coverage(self.seg, self.win.shape[1], self.bare.vae_scale_factor)
        exists = coverage.sum(dim=(2, 3)) > 0  # (B, M); padded instances have no area
        if self.candidate_latents is not None:  # stored posteriors: only the GT is encoded
            latents = self.encode_candidates(self.all_candidates(), sample_posterior=True).unflatten(0, (b, k))
            if gt is not None:
                latents = torch.cat([latents, self._encode(gt)[:, None]], dim=1)  # (B, K + 1, C, h, w)
        else:
            images = self.candidates if gt is None else torch.cat([self.candidates, gt[:, None]], dim=1)
            latents = self._encode(images.flatten(0, 1)).unflatten(0, (b, images.shape[1]))  # (B, K[+1], C, h, w)
        expert = self.win if gt is None else torch.where(exists, k, -1)
        negative = self.lose.clone()
        online_column = None
        if online.any():
            online_column = latents.shape[1]
            # A placeholder column: its rows of online samples get the trajectory latents (DiffusionInputOverrides).
            latents = torch.cat([latents, torch.zeros_like(latents[:, :1])], dim=1)
            negative[online] = torch.where(exists[online], online_column, -1)
        return latents, expert, negative, online_column

    def _image_table(self, online, gt):
        """Image level: columns = [expert, negative]; indices (B,), -1 where a sample has no such image.

        Returns:
            tuple: latents (B, 2, C, h, w), expert and negative (B,) indices into the 2 columns, the online column 1.
        """
        b = self.candidates.shape[0]
        pair = self.pair.clamp_min(0)
        if self.candidate_latents is not None:  # stored posteriors: no encoding of candidates
            expert_latents = self.encode_candidates(pair[:, :1], sample_posterior=True) if gt is None else \
                self._encode(gt)
            negative_latents = self.encode_candidates(pair[:, 1:], sample_posterior=True)
            negative_latents[online] = 0  # online rows: placeholders (DiffusionInputOverrides)
        else:
            pair_images = gather_images(self.candidates, pair)  # (B, 2, 3, H, W)
            expert_latents = self._encode(pair_images[:, 0] if gt is None else gt)
            negative_latents = torch.zeros_like(expert_latents)  # online rows: placeholders (overrides)
            if (~online).any():
                negative_latents[~online] = self._encode(pair_images[:, 1][~online])
        latents = torch.stack([expert_latents, negative_latents], dim=1)  # (B, 2, C, h, w)
        expert = torch.zeros(b, dtype=torch.long, device=self.device) if gt is not None else \
            torch.where(self.pair[:, 0] >= 0, 0, -1)
        negative = torch.where(online | (self.pair[:, 1] >= 0), 1, -1)
        return latents, expert, negative, 1

    def ranking_loss(self):
        """Diffusion-DRO's :class:`~dspo_basicsr.losses.preference_loss.PreferenceResult` on the current batch.

        The candidates' latents are noised as in DSPO (one timestep and one noise per LQ); for samples with an
        online negative, the timestep is one of the lagged trajectory's, and the negative's noisy latent and
        target are that trajectory's latent and the lagged copy's prediction there.
        """
        cri = self.cri_pref
        b = self.candidates.shape[0]
        device = self.device
        online = torch.rand(b, generator=self.dro_generator, device=device) < self.online_ratio
        timesteps = self.bare.training_timesteps(b, *self.timestep_range)
        table = self._instance_table if cri.instance_level else self._image_table
        column_latents, expert, negative, online_column = table(online, self._expert_images())
        j = column_latents.shape[1]
        overrides = None
        rows = online.nonzero().flatten().tolist()
        if rows:
            entries = self.online_negatives(rows)
            draws = torch.randint(len(self.online_timesteps), (len(rows),), generator=self.dro_generator, device=device)
            # The d-th of each trajectory's timesteps in the range (its own ones when they are perturbed).
            low, high = self.timestep_range
            valid = [((e.timesteps >= low) & (e.timesteps < high)).nonzero().flatten() for e in entries]
            if any(len(v) == 0 for v in valid):
                raise ValueError(f'train.dro: an online trajectory visits no timestep inside train.timestep_range '
                                 f'[{low}, {high}) (perturbed timesteps); widen the range.')
            steps = [int(v[min(int(d), len(v) - 1)]) for v, d in zip(valid, draws)]
            picks = [int(e.timesteps[st]) for e, st in zip(entries, steps)]
            timesteps[online] = torch.tensor(picks, device=device, dtype=timesteps.dtype)
            flat_rows = torch.tensor([row * j + online_column for row in rows], device=device)
            overrides = DiffusionInputOverrides(flat_rows, torch.stack([e.latents[s] for e, s in zip(entries, steps)]),
                                                torch.stack([e.predictions[s] for e, s in zip(entries, steps)]))
        cond = self.preference_condition(j)
        err_theta, err_ref = self.denoising_errors(latents=column_latents, timesteps=timesteps, cond=cond,
                                                   overrides=overrides)
        self.online_share = online.float().mean()
        return cri(err_theta, err_ref, replace(self.preference_batch(), expert=expert, negative=negative))

    def training_statistics(self, result):
        stats = super().training_statistics(result)
        if self.ranking:
            stats['online_share'] = self.online_share
        return stats
