"""DSPOModel: preference fine-tuning of a diffusion SR framework (DSPO, Diffusion-DPO, SFT).

The model orchestrates; formulas live in :mod:`dspo_basicsr.losses.preference_loss`. One training step:
VAE-encode the candidates of each LQ image, draw one timestep and one noise per LQ (shared by its
candidates and by policy and reference), compute the condition once per LQ, push all candidates through
the policy in one call (and through the frozen reference without gradient), turn predictions into
per-pixel errors and hand them to the objective chosen by ``train.preference_opt.type``.

What is not the step has a module of its own: gradient accumulation and its files
(:mod:`~dspo_basicsr.models.accumulation`), image validation (:mod:`~dspo_basicsr.models.image_validation`),
preference validation (:mod:`~dspo_basicsr.models.preference_validation`).
"""
import contextlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dspo_basicsr.archs.diffusion_sr_base import join_negative_prompts, repeat_condition, sample_with_options
from dspo_basicsr.archs.sampling_protocols import SAMPLING_PROTOCOLS, resolve_sample_options
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA, PreferenceBatch, instance_coverage
from dspo_basicsr.metrics.metric_table import MissingWeightsError
from dspo_basicsr.metrics.pyiqa_metric import check_metric_weights
from dspo_basicsr.models.accumulation import GradientAccumulation
from dspo_basicsr.models.base_model import DSPOBaseModel
from dspo_basicsr.models.candidate_images import gather_images
from dspo_basicsr.models.image_validation import validate_images
from dspo_basicsr.models.preference_validation import PreferenceValidationSettings, validate_preferences
from dspo_basicsr.models.run_summary import summary_due, write_training_curves, write_validation_summary
from dspo_basicsr.models.trainable_ema import EMA_SCHEDULES, TrainableEMA, ema_decay_at
from dspo_basicsr.utils.atomic_write import atomic_torch_save
from dspo_basicsr.utils.checkpoint import read_checkpoint
from dspo_basicsr.utils.distributed import is_main_process, wait_for_all_ranks
from dspo_basicsr.utils.option_schema import (
    BASICSR_MODEL_OPTIONS,
    REQUIRED,
    Option,
    timestep_range_in_schedule,
    timesteps_in_schedule,
)

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY


class NonFiniteLossError(RuntimeError):
    """Training produced too many non-finite losses in a row."""


def _below_one(value, opt, block):
    return None if value < 1 else 'a number in [0, 1)'


def _divides_total_iter(value, opt, block):
    total_iter = (opt.get('train') or {}).get('total_iter')
    if isinstance(total_iter, (int, float)) and total_iter % value:
        return (f'a divisor of train.total_iter ({total_iter}, which counts micro-batches: make it a multiple of '
                'train.accumulate_grad_batches so the last update is applied)')
    return None


@dataclass
class DiffusionInputOverrides:
    """Rows of the (B*J) stack whose noisy latent and regression target are given instead of derived.

    :meth:`DSPOModel.denoising_errors` noises every image's latent with its LQ's noise; these rows take
    ``noisy_latents`` and ``target`` as they are (Diffusion-DRO's online negatives: a lagged copy's trajectory
    latent and its own prediction there).

    Attributes:
        rows (Tensor): (N,) long rows of the flattened stack, ``b * J + j``.
        noisy_latents (Tensor): (N, C, h, w) x_t of those rows.
        target (Tensor): (N, C, h, w) their regression targets.
    """

    rows: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor


@MODEL_REGISTRY.register()
class DSPOModel(DSPOBaseModel, SRModel):
    """Preference fine-tuning of a registered diffusion SR framework (``network_g``).

    Its options are :attr:`option_schema` (BasicSR's plus the ones below; the table is in ``docs/options.md``).
    ``train.accumulate_grad_batches`` = k: each micro-batch's loss is scaled by 1/k, the scheduler, warm-up,
    clipping and the non-finite guard act once per update, and the logs average the k micro-batches.
    ``total_iter``, ``print_freq``, ``save_checkpoint_freq`` and ``val_freq`` count micro-batches; scheduler
    milestones and ``warmup_iter`` count updates.
    """

    #: every option this model reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = BASICSR_MODEL_OPTIONS.extend(
        Option('train.preference_opt', 'dict', REQUIRED, 'the objective (type: DSPOLoss | DiffusionDPOLoss | '
               'DiffusionSFTLoss | DiffusionDROLoss) and its arguments', typed='loss'),
        Option('train.preference_opt.beta', 'number', DEFAULT_BETA, 'KL weight beta of the objective', gt=0,
               read_by='the loss'),
        Option('train.preference_opt.loss_weight', 'number', 1.0, 'weight of the objective', read_by='the loss'),
        Option('train.timestep_range', 'list', None, '[low, high) of the training timesteps (~: the whole schedule)',
               check=timestep_range_in_schedule),
        Option('train.feedback_guidance_scale', 'number', None, "s of the user-description feedback (the paper's "
               "M2): predictions eps(neg) + s (eps(prompt) - eps(neg)) with the sample's negative prompt (~: off)"),
        Option('train.reference_dtype', 'str', None, 'run the frozen reference at this precision (~: as the policy)',
               choices=('bfloat16', 'float16', 'float32')),
        Option('train.grad_clip', 'number', None, 'max gradient norm (~: no clipping)', gt=0),
        Option('train.max_nonfinite_steps', 'int', 10, 'stop after this many non-finite losses in a row', ge=1),
        Option('train.accumulate_grad_batches', 'int', 1, 'k: micro-batches (iterations) per optimizer update',
               ge=1, check=_divides_total_iter),
        Option('train.ema_decay', 'number', 0, 'EMA of the trained parameters (net_g_ema, saved as params_ema next to '
               'params, used by validation and by basicsr test); 0: none', ge=0, check=_below_one),
        Option('train.ema_schedule', 'str', 'constant', "constant: ema_decay at every update (BasicSR's); diffusers: "
               "min(ema_decay, n / (9 + n)) at the n-th update (diffusers' EMAModel)", choices=EMA_SCHEDULES),
        Option('train.prompt_dropout', 'number', 0, "probability that a training sample's prompt is replaced by the "
               'empty prompt (policy and reference see the same condition)', ge=0, le=1),
        Option('path.param_key_g', 'str', None, 'the key of the weights in the checkpoint (~: params when training; '
               'in basicsr test params_ema when the checkpoint has it, else params)'),
        Option('val.sample', 'dict', {}, 'SR sampling of image validation sets (DiffusionSRArch.sample)'),
        Option('val.sample.protocol', 'str', None, "a framework's official test protocol by name "
               '(archs/sampling_protocols.py); keys set beside it override it', choices=tuple(SAMPLING_PROTOCOLS),
               read_by='resolve_sample_options'),
        Option('val.sample.steps', 'int', None, "sampler steps (~: the framework's default)", ge=1,
               read_by='sample_with_options'),
        Option('val.sample.guidance_scale', 'number', None, "guidance scale (~: the framework's default)",
               read_by='sample_with_options'),
        Option('val.sample.seed', 'int', 0, 'seed of the sampling noise'),
        Option('val.sample.prompt', 'str', '', 'the user prompt', read_by='sample_with_options'),
        Option('val.sample.negative_prompt', 'str', None, "negative prompt (~: the framework's default)",
               read_by='sample_with_options'),
        Option('val.sample.sampler', 'str', None, "sampler (~: the framework's)", choices=('ddpm', 'ddim'),
               read_by='sample_with_options'),
        Option('val.sample.prompt_source', 'str', 'prompt', 'prompt: the prompt as given; tags: tagger tags first',
               choices=('prompt', 'tags'), read_by='sample_with_options'),
        Option('val.sample.color_fix', 'str', 'none', 'colour correction against the upsampled LQ',
               choices=('adain', 'wavelet', 'none'), read_by='sample_with_options'),
        Option('val.sample.process_size', 'int', None, 'an LQ with a side below process_size / scale is resized up '
               'first (~: never)', ge=1, read_by='sample_with_options'),
        Option('val.sample.tile_size', 'int', None, 'latent tile size (~: no tiling)', ge=1,
               read_by='sample_with_options'),
        Option('val.sample.tile_overlap', 'int', 4, 'overlap of latent tiles', ge=0, read_by='sample_with_options'),
        Option('val.sample.vae_tile', 'bool', False, "diffusers' tiled VAE", read_by='sample_with_options'),
        Option('val.preference_timesteps', 'list', [100, 300, 500, 700, 900], 'timesteps at which a preference '
               'validation set is scored', check=timesteps_in_schedule),
        Option('val.preference_seed', 'int', 0, 'seed of its latents and noise (sample i uses seed + i)'),
        Option('val.preference_beta', 'number', None, "beta of its logits (~: the training loss's, else 8000)",
               gt=0),
        Option('val.summary', 'str', 'end', 'when an image validation set also gets visualization/summary_<iter>.png '
               'and training_curves.png (false or ~: never)', choices=('end', 'every'), also=(False,), nullable=True,
               read_by='run_summary'),
    )

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        # The current batch (feed_data): None until one is fed, and where the batch has no such field.
        self.lq = self.gt = self.output = None
        self.extras = {}
        self.has_candidates = False
        self.candidates = self.candidate_latents = self.seg = self.win = self.lose = self.pair = self.scores = None
        self.prompts = self.negative_prompts = None
        # What training sets up (init_training_settings); these values hold in basicsr test.
        self.cri_pref = None
        self.feedback_scale = None  # train.feedback_guidance_scale
        self.prompt_dropout = 0
        self.timestep_range = None
        self.max_nonfinite = self.option_schema.value(opt, 'train.max_nonfinite_steps')
        self.max_grad_norm = math.inf
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.updates_applied = 0  # the train pipeline fails a run that skipped every update
        self.accumulation = GradientAccumulation(1)
        self.log_dict = OrderedDict()  # filled at the end of each window; empty until the first update
        self.trainable_params, self.optimizer_g = [], None
        self.ema_decay, self.ema_schedule = 0, 'constant'
        self.net_g_ema = None
        # Validation's results (BasicSR's names), and checks done once.
        self.metric_results, self.best_metric_results = {}, {}
        self._vae_digest = None
        self._posterior_checked = False
        try:  # before anything is built or trained: every missing weight file of every metric, in the log too
            check_metric_weights((opt.get('val') or {}).get('metrics'))
        except MissingWeightsError as err:
            get_root_logger().error(str(err))
            raise
        net = build_network(opt['network_g']).to(self.device)
        # The reference is taken from the pretrained source before any fine-tuned weight is loaded, so a
        # resumed run gets the same reference as the first one, never the resumed policy.
        reference_dtype = self.option_schema.value(opt, 'train.reference_dtype') if self.is_train else None
        self.net_ref = net.build_reference(getattr(torch, reference_dtype) if reference_dtype else None).to(self.device)
        get_root_logger().info(f'Reference model: frozen copies of {sorted(self.net_ref.copies) or "nothing"} '
                               f'(LoRA adapters disabled on shared parts), checksum {self.reference_checksum():.12e}.')
        load_path = opt['path'].get('pretrain_network_g')
        if load_path is not None:
            # training loads the policy's own weights; basicsr test the EMA when the checkpoint has it (~)
            param_key = self.option_schema.value(opt, 'path.param_key_g') or ('params' if self.is_train else None)
            self.load_network(net, load_path, self.option_schema.value(opt, 'path.strict_load_g'), param_key)
        self.net_g = self.model_to_device(net)
        self.print_network(self.net_g)
        if self.is_train:
            self.init_training_settings()

    def reference_checksum(self):
        """Sum of every weight of the reference's frozen copies (logged, to compare runs and resumes); NaN on
        ``meta`` (the GPU planner's shapes-only build)."""
        if any(v.is_meta for v in self.net_ref.state_dict().values()):
            return math.nan
        return float(sum(v.double().sum() for v in self.net_ref.state_dict().values()))

    # ------------------------------------------------------------------ setup
    def init_training_settings(self):
        train_opt = self.opt['train']
        self.net_g.train()
        option = self.option_schema.value  # the value in the file, checked, or the declared default
        self.setup_ema(option(self.opt, 'train.ema_decay'), option(self.opt, 'train.ema_schedule'))
        self.prompt_dropout = option(self.opt, 'train.prompt_dropout')
        self.cri_pref = build_loss(train_opt['preference_opt']).to(self.device)
        needed = getattr(self.cri_pref, 'model_type', 'DSPOModel')
        if needed not in {cls.__name__ for cls in type(self).__mro__}:
            raise ValueError(f"train.preference_opt.type {train_opt['preference_opt']['type']} is not handled by "
                             f'model_type {type(self).__name__}; use {needed} (model_type: {needed}).')
        self.feedback_scale = option(self.opt, 'train.feedback_guidance_scale')
        schedule = [0, self.bare.noise_scheduler.config.num_train_timesteps]
        low, high = option(self.opt, 'train.timestep_range') or schedule
        self.timestep_range = (int(low), int(high))
        self.max_grad_norm = option(self.opt, 'train.grad_clip') or math.inf
        self.accumulation = GradientAccumulation(option(self.opt, 'train.accumulate_grad_batches'))
        self.setup_optimizers()
        self.setup_schedulers()

    def setup_ema(self, decay, schedule='constant'):
        """``net_g_ema``: the EMA of the trained parameters (:class:`TrainableEMA`) when ``decay`` > 0.

        It starts at the policy's weights, or at ``params_ema`` of ``path.pretrain_network_g`` when that
        checkpoint has it (as BasicSR's SRModel does), which makes a resume exact.
        """
        if not 0 <= decay < 1:
            raise ValueError(f'train.ema_decay must lie in [0, 1) (0: no EMA), got {decay}.')
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"train.ema_schedule '{schedule}' is unknown; choose one of {EMA_SCHEDULES}.")
        self.ema_decay, self.ema_schedule = decay, schedule
        if decay == 0:
            return
        self.net_g_ema = TrainableEMA(self.bare)
        load_path = self.opt['path'].get('pretrain_network_g')
        if load_path is not None:
            saved = read_checkpoint(load_path, what='path.pretrain_network_g', unwrap=())
            if isinstance(saved.get('params_ema'), dict):
                self.net_g_ema.load_trainable_state_dict(saved['params_ema'], source=f"checkpoint '{load_path}'")
                get_root_logger().info(f'EMA of the trained parameters loaded from {load_path} [params_ema].')

    def ema_weights(self):
        """Context in which the policy runs with its EMA weights (nothing happens without ``train.ema_decay``)."""
        if self.net_g_ema is None:
            return contextlib.nullcontext()
        return self.net_g_ema.swapped_into(self.bare)

    def setup_optimizers(self):
        optim_opt = dict(self.opt['train']['optim_g'])
        self.trainable_params = [p for p in self.bare.parameters() if p.requires_grad]
        if not self.trainable_params:
            raise ValueError(f"network_g has nothing to train (trainable: {self.bare.trainable}).")
        self.optimizer_g = self.get_optimizer(optim_opt.pop('type'), self.trainable_params, **optim_opt)
        self.optimizers.append(self.optimizer_g)

    @property
    def bare(self):
        """The framework without its DDP / DataParallel wrapper."""
        return self.get_bare_model(self.net_g)

    @property
    def accumulate(self):
        """k of ``train.accumulate_grad_batches``: micro-batches (iterations) per optimizer update (1 in test)."""
        return self.accumulation.k

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        """Take a batch: a preference batch (candidates, labels, prompts) or an image batch (lq [, gt])."""
        self.lq = data['lq'].to(self.device)
        self.gt = data['gt'].to(self.device) if 'gt' in data else None
        self.extras = {name: value.to(self.device) for name, value in data.get('extras', {}).items()}
        self.has_candidates = 'candidates' in data
        self.candidates = self.candidate_latents = self.seg = self.win = self.lose = self.pair = self.scores = None
        self.prompts = self.negative_prompts = None
        if self.has_candidates:
            self.candidates = data['candidates'].to(self.device)
            self.seg = data['seg'].to(self.device)
            self.win = data['win'].to(self.device)
            self.lose = data['lose'].to(self.device)
            self.pair = data['pair'].to(self.device)
            self.scores = data['scores'].to(self.device) if 'scores' in data else None
            self.prompts = list(data['prompt'])
            self.negative_prompts = list(data['negative_prompt'])
            if 'candidate_latents' in data:  # (B, K, 2, C, h, w) stored posteriors: no VAE encoding of candidates
                self.check_candidate_latents_vae(data['candidate_latents_vae'])
                self.candidate_latents = data['candidate_latents'].to(self.device)

    def check_candidate_latents_vae(self, digests):
        """Refuse candidate latents written by another VAE than network_g's (digests: one per sample)."""
        if self._vae_digest is None:
            self._vae_digest = self.bare.vae_digest()
        other = sorted({d for d in digests if d != self._vae_digest})
        if other:
            raise ValueError(f"the preference set's candidate latents were written by another VAE (digest "
                             f'{other[0][:12]}..., network_g\'s VAE: {self._vae_digest[:12]}...); rewrite them with '
                             'scripts/add_candidate_latents.py and this option file, or set '
                             'use_candidate_latents: false in the dataset options.')

    # ------------------------------------------------------------------ the step
    def all_candidates(self):
        """(B, K) indices of every candidate of each LQ image."""
        b, k = self.candidates.shape[:2]
        return torch.arange(k, device=self.device).expand(b, k)

    def preference_batch(self):
        """What the objective reads of the current batch besides the errors (:class:`PreferenceBatch`)."""
        return PreferenceBatch(
            coverage=instance_coverage(self.seg, self.win.shape[1], self.bare.vae_scale_factor), win=self.win,
            lose=self.lose, pair=self.pair, num_candidates=self.candidates.shape[1],
            scores=self.scores)

    def encode_candidates(self, index, generator=None, sample_posterior=None):
        """VAE latents of the chosen candidates: index (B, J) -> (B*J, C, h, w), candidate-major per LQ.

        The posterior is sampled in training (``sample_posterior`` None: ``is_train``), from ``generator``.
        With precomputed candidate latents in the batch the stored posterior is used and the VAE does not run.
        """
        sample = self.is_train if sample_posterior is None else sample_posterior
        stored = self.candidate_latents
        if stored is not None:
            # (B, K, 2, C, h, w) -> (B, J, 2, C, h, w): the chosen candidates' posteriors
            posterior = gather_images(stored, index)
            mean, std = posterior.flatten(0, 1).unbind(1)  # each (B*J, C, h, w)
            if sample and not self._posterior_checked:
                self.check_posterior_noise(posterior=(mean, std))
            return self.bare.latents_from_posterior(mean, std, sample, generator)
        images = gather_images(self.candidates, index).flatten(0, 1)
        if sample and not self._posterior_checked:
            self.check_posterior_noise(images)
        return self.bare.encode_images(images, sample_posterior=sample, generator=generator)

    #: posterior_noise_ratio above which the first posterior-sampled batch is reported (SD's VAE: far below)
    max_posterior_noise_ratio = 0.1

    def check_posterior_noise(self, images=None, posterior=None):
        """Warn once when the VAE posterior noise swamps the candidates' latents (a random or mode-trained VAE).

        Args:
            images (Tensor | None): Candidates (N, 3, H, W), or ``posterior`` their stored (mean, std).

        Returns:
            float: :meth:`~dspo_basicsr.archs.diffusion_sr_base.DiffusionSRArch.posterior_noise_ratio` of ``images``.
        """
        self._posterior_checked = True
        probe = images if images is not None else posterior[0]
        if probe.is_meta:  # the GPU planner: shapes only, nothing to measure
            return math.nan
        ratio = self.bare.posterior_noise_ratio(images, posterior)
        if ratio > self.max_posterior_noise_ratio:
            get_root_logger().warning(
                f"network_g's VAE posterior noise is {ratio:.2f} x the spread of the candidates' latents; "
                'DSPOModel encodes candidates with a posterior sample, so training latents are mostly noise and the '
                "preferences barely show. Use a VAE with a nearly deterministic posterior, as SD's (for a demo VAE: "
                'dspo_basicsr.demo.dspo.set_posterior_std).')
        return ratio

    def preference_condition(self, repeats, feedback=True):
        """The condition of each LQ image, computed once and repeated over its candidates.

        With ``feedback`` and ``train.feedback_guidance_scale`` set it holds the samples' negative prompts too.
        """
        bare = self.bare
        negatives = None
        if feedback and self.feedback_scale:
            negatives = [join_negative_prompts(bare.default_negative_prompt, n) for n in self.negative_prompts]
        return repeat_condition(bare.condition(self.lq, self.prompts, negatives, **self.extras), repeats)

    def denoising_errors(self, index=None, with_reference=True, generator=None, timesteps=None, latents=None,
                         cond=None, policy=None, feedback=True, overrides=None):
        """Per-pixel denoising errors of J images per LQ input, for the policy and the reference.

        Args:
            index (Tensor | None): (B, J) candidate indices per LQ image, encoded with :meth:`encode_candidates`;
                None when ``latents`` are given.
            with_reference (bool): Also run the frozen reference.
            generator (torch.Generator | None): For the noise (and timesteps when not given).
            timesteps (Tensor | None): (B,) fixed timesteps; drawn from ``timestep_range`` when None.
            latents (Tensor | None): (B, J, C, h, w) latents of the images to score (candidates, GT, ...).
            cond (dict | None): Precomputed :meth:`preference_condition` output.
            policy (nn.Module | None): The policy to call; ``net_g`` (the DDP wrapper in training) when None.
            feedback (bool): Predict with the user-description feedback guidance of
                ``train.feedback_guidance_scale`` when it is set (training); False: plain predictions.
            overrides (DiffusionInputOverrides | None): Rows whose noisy latent and target are given.

        Returns:
            tuple[Tensor, Tensor | None]: err_theta, err_ref, each (B, J, h, w).
        """
        bare = self.bare
        if latents is None:
            if index is None:
                raise ValueError('denoising_errors needs the candidates to score (index) or their latents.')
            latents = self.encode_candidates(index, generator).unflatten(0, index.shape)
        b, j, c, h, w = latents.shape
        latents = latents.flatten(0, 1)  # (B, J, C, h, w) -> (B*J, C, h, w), candidate-major per LQ
        cond = self.preference_condition(j, feedback) if cond is None else cond
        # One noise and one timestep per LQ image, shared by its J candidates and by both networks.
        noise = torch.randn((b, c, h, w), generator=generator, device=self.device).repeat_interleave(j, 0)
        if timesteps is None:
            timesteps = bare.training_timesteps(b, *self.timestep_range, generator=generator)
        t = timesteps.repeat_interleave(j)
        x_t, target = bare.diffusion_inputs(latents, noise, t, cond)
        if overrides is not None:
            x_t = x_t.index_copy(0, overrides.rows, overrides.noisy_latents.to(x_t.dtype))
            target = target.index_copy(0, overrides.rows, overrides.target.to(target.dtype))
        scale = self.feedback_scale if feedback else None

        def errors(prediction):
            return (prediction.float() - target.float()).pow(2).mean(dim=1).view(b, j, h, w)

        policy = self.net_g if policy is None else policy
        if scale:
            err_theta = errors(bare.guided_prediction(x_t, t, cond, scale, predict=policy))
        else:
            err_theta = errors(policy(x_t, t, cond))
        err_ref = None
        if with_reference:
            with torch.no_grad():
                ref = self.net_ref.guided_prediction(x_t, t, cond, scale) if scale else \
                    self.net_ref.predict_noise(x_t, t, cond)
                err_ref = errors(ref)
        return err_theta, err_ref

    def preference_loss(self):
        """The objective's :class:`~dspo_basicsr.losses.preference_loss.PreferenceResult` on the current batch.

        The objective says which candidates go through the networks (``columns``) and returns the loss with
        the logits, mask and errors it used; the model logs those as they are.
        """
        cri = self.cri_pref
        batch = self.preference_batch()
        err_theta, err_ref = self.denoising_errors(cri.columns(batch), with_reference=cri.needs_reference)
        return cri(err_theta, err_ref, batch)

    def training_statistics(self, result):
        """What is logged next to the loss: the objective's own statistics (a hook for subclasses)."""
        return result.statistics()

    def _finite_everywhere(self, value):
        if value.is_meta:  # the GPU planner runs the step on shapes only: take the finite path
            return True
        finite = torch.isfinite(value.detach()).all().float()
        if self.opt['dist']:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_update(self, current_iter, what):
        self.optimizer_g.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        get_root_logger().warning(f'iter {current_iter}: non-finite {what}, update skipped '
                                  f'({self.nonfinite_in_row} in a row, {self.nonfinite_total} in total).')
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f'{self.nonfinite_in_row} non-finite {what}s in a row (train.max_nonfinite_steps = '
                f'{self.max_nonfinite}); stopping. The last saved checkpoint holds finite weights. Lower the '
                'learning rate or beta, or check the preference set for broken samples.')

    def update_learning_rate(self, current_iter, warmup_iter=-1):
        """BasicSR's schedule, advanced once per optimizer update (at the first micro-batch of a window)."""
        if self.accumulation.starts_update(current_iter):
            super().update_learning_rate(self.accumulation.update_index(current_iter) + 1, warmup_iter)

    def _gradient_sync(self, enabled):
        """DDP averages gradients only on the last micro-batch of a window; earlier ones run in ``no_sync``."""
        if enabled or not isinstance(self.net_g, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.net_g.no_sync()

    def optimize_parameters(self, current_iter):
        k = self.accumulate
        window, fresh = self.accumulation.open(current_iter)
        if fresh:
            self.optimizer_g.zero_grad(set_to_none=True)
        last = self.accumulation.ends_update(current_iter)
        self.drop_prompts()
        if window.finite:  # agreed by all ranks, so they skip the rest of a broken window together
            with self._gradient_sync(last):
                result = self.preference_loss()
                loss = result.loss
                if self._finite_everywhere(loss):
                    (loss / k).backward()
                    window.add(OrderedDict([(self.cri_pref.log_key, loss.detach()),
                                            *self.training_statistics(result).items()]))
                else:
                    window.finite = False
        if not last:
            return
        self.accumulation.close()
        if not window.finite:
            self._skip_update(current_iter, 'loss')
            return
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, self.max_grad_norm)
        if not grad_norm.is_meta and not torch.isfinite(grad_norm):
            self._skip_update(current_iter, 'gradient')
            return
        self.optimizer_g.step()
        self.updates_applied += 1
        if self.net_g_ema is not None:  # the update's number comes from the iteration, so a resume continues it
            update_number = self.accumulation.update_index(current_iter) + 1
            self.net_g_ema.update(self.bare, ema_decay_at(self.ema_decay, update_number, self.ema_schedule))
        self.nonfinite_in_row = 0
        log = window.mean()
        log['grad_norm'] = grad_norm.detach()
        self.log_dict = self.reduce_loss_dict(log)

    def drop_prompts(self):
        """Replace each sample's prompt by the empty prompt with probability ``train.prompt_dropout``.

        For this training step only, for the policy and the reference alike (and, in Diffusion-DRO, for the
        lagged copy's online samples), as Diffusion-DRO's ``train.py`` does (``encode_prompt``,
        ``--random_drop_prompt_probability`` 0.2). Negative prompts and image conditions are kept.
        """
        p = self.prompt_dropout
        if p > 0:  # no draw at 0, so runs without dropout keep their random stream
            dropped = (torch.rand(len(self.prompts)) < p).tolist()
            self.prompts = ['' if drop else prompt for drop, prompt in zip(dropped, self.prompts)]

    def reduce_loss_dict(self, loss_dict):
        """BasicSR's averaging over ranks to floats; NaN for the ``meta`` tensors of the GPU planner's step."""
        if any(torch.is_tensor(v) and v.is_meta for v in loss_dict.values()):
            return OrderedDict((key, math.nan) for key in loss_dict)
        return super().reduce_loss_dict(loss_dict)

    # ------------------------------------------------------------------ resume inside an accumulation window
    def accumulation_window_path(self, current_iter):
        """This rank's file of the accumulation window left open at ``current_iter``, next to ``{iter}.state``."""
        return GradientAccumulation.window_path(self.opt['path']['training_states'], current_iter,
                                                self.opt.get('rank', 0))

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        current_iter = int(resume_state['iter'])
        self.accumulation.resume(current_iter, self.accumulation_window_path(current_iter),
                                 dict(self.bare.named_parameters()), self.device)

    # ------------------------------------------------------------------ validation
    def test(self):
        sample_opt = resolve_sample_options(self.opt.get('val', {}).get('sample'))  # a protocol preset expanded
        seed = sample_opt.get('seed', self.option_schema.value(self.opt, 'val.sample.seed'))
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        bare = self.bare
        bare.eval()
        # The official test scripts' inference settings (docs/frameworks.md): tag prompts, colour fix, tiling.
        self.output = sample_with_options(bare, self.lq, sample_opt, generator)
        bare.train(self.is_train)

    def get_current_visuals(self):
        """SRModel's visuals (``lq``, ``result`` and ``gt`` when the batch has one), on the CPU."""
        visuals = OrderedDict(lq=self.lq.detach().cpu(), result=self.output.detach().cpu())
        if self.gt is not None:
            visuals['gt'] = self.gt.detach().cpu()
        return visuals

    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Every rank validates its share of the set; rank 0 logs the gathered result (see below)."""
        self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """Validation on a preference set (implicit accuracy) or an image set (SR samples and metrics).

        Under a distributed launcher rank r takes samples r, r + W, ... and rank 0 reduces the results in
        sample order, so the numbers are those of one process; the bare network is used (no DDP collective
        outside training) and every rank leaves together.
        """
        from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
        with self.ema_weights():  # BasicSR validates the EMA network when there is one
            if isinstance(dataloader.dataset, PreferenceLMDBDataset):
                self.preference_validation(dataloader, current_iter, tb_logger)
            else:
                self.image_validation(dataloader, current_iter, tb_logger, save_img)
                if get_dist_info()[0] == 0 and summary_due(self.opt, current_iter):
                    write_validation_summary(self, dataloader, current_iter)
                    write_training_curves(self.opt)
        wait_for_all_ranks()

    def image_validation(self, dataloader, current_iter, tb_logger, save_img):
        """SRModel's validation (sampling, saved PNGs, ``val.metrics``), split over the ranks
        (:func:`~dspo_basicsr.models.image_validation.validate_images`); rank 0 logs the means."""
        show = self.option_schema.value(self.opt, 'val.pbar')
        results = validate_images(self, dataloader, current_iter, save_img, show)
        if results is not None:
            self._log_validation_results(dataloader.dataset.opt['name'], results, current_iter, tb_logger,
                                         better={name: o.get('better', 'higher')
                                                 for name, o in self.opt['val']['metrics'].items()})

    def preference_validation(self, dataloader, current_iter, tb_logger):
        """Implicit accuracy of the DSPO logits on a preference set, at fixed timesteps, latents and noise
        (:mod:`~dspo_basicsr.models.preference_validation`); rank 0 logs ``implicit_acc`` and ``logit_mean``.

        beta (it scales ``logit_mean``, not ``implicit_acc``) is the training loss's, or
        ``val.preference_beta`` (in ``basicsr test``, where there is no training loss).
        """
        option = self.option_schema.value
        settings = PreferenceValidationSettings.for_objective(
            self.cri_pref, timesteps=option(self.opt, 'val.preference_timesteps'),
            seed=option(self.opt, 'val.preference_seed'), beta=option(self.opt, 'val.preference_beta'))
        results = validate_preferences(self, dataloader, settings, option(self.opt, 'val.pbar'))
        if results is not None:
            self._log_validation_results(dataloader.dataset.opt['name'], results, current_iter, tb_logger,
                                         better={name: 'higher' for name in results})

    def _log_validation_results(self, dataset_name, results, current_iter, tb_logger, better):
        """BasicSR's bookkeeping of one validation: ``metric_results``, the best values so far, the log lines."""
        self.metric_results = results
        records = self.best_metric_results.setdefault(dataset_name, {})
        for name in results:
            worst = float('-inf') if better[name] == 'higher' else float('inf')
            records.setdefault(name, dict(better=better[name], val=worst, iter=-1))
            self._update_best_metric_result(dataset_name, name, results[name], current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch, current_iter):
        """Rank 0 writes ``net_g_<iter>.pth`` and ``<iter>.state``; every rank leaves once both are complete."""
        if self.net_g_ema is not None:  # BasicSR's layout: one file, params and params_ema
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        if current_iter != -1:  # this rank's gradients of an unfinished window
            self.accumulation.save(self.accumulation_window_path(current_iter), dict(self.bare.named_parameters()))
        self.save_training_state(epoch, current_iter)  # ends at a barrier (utils.distributed)

    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Save only the trained parameters (never the reference), refusing non-finite values.

        ``net`` and ``param_key`` may be lists, as in BasicSR (``[net_g, net_g_ema]``, ``['params', 'params_ema']``).
        """
        nets, keys = (net, param_key) if isinstance(net, list) else ([net], [param_key])
        label = 'latest' if current_iter == -1 else current_iter
        saved = {}
        for one, key in zip(nets, keys):
            state = {k: v.cpu() for k, v in self.get_bare_model(one).trainable_state_dict().items()}
            broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
            if broken:
                raise NonFiniteLossError(f'refusing to save {net_label} [{key}] at iteration {label}: non-finite '
                                         f'values in {broken[:3]}; earlier checkpoints are kept.')
            saved[key] = state
        if is_main_process():  # every rank holds the same weights; one writes, the others wait in save()
            atomic_torch_save(saved, os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load trained parameters saved by :meth:`save_network` into the freshly built framework.

        ``param_key`` None takes ``params_ema`` when the checkpoint has it (a run with ``train.ema_decay``),
        else ``params``.
        """
        if not os.path.isfile(load_path):
            raise FileNotFoundError(f"path.pretrain_network_g: checkpoint '{load_path}' does not exist.")
        if param_key is None:
            saved = read_checkpoint(load_path, what='path.pretrain_network_g', unwrap=())
            param_key = 'params_ema' if isinstance(saved.get('params_ema'), dict) else 'params'
        state = read_checkpoint(load_path, what='path.pretrain_network_g', unwrap=(param_key,))
        get_root_logger().info(f'Loading trained parameters of {type(self.get_bare_model(net)).__name__} '
                               f'from {load_path} [{param_key}].')
        self.get_bare_model(net).load_trainable_state_dict(state, source=f"checkpoint '{load_path}'")
