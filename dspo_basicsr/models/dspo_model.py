"""DSPOModel: preference fine-tuning of a diffusion SR framework (DSPO, Diffusion-DPO, SFT).

The model orchestrates; formulas live in :mod:`dspo_basicsr.losses.preference_loss`. One training step:
VAE-encode the candidates of each LQ image, draw one timestep and one noise per LQ (shared by its
candidates and by policy and reference), compute the condition once per LQ, push all candidates through
the policy in one call (and through the frozen reference without gradient), turn predictions into
per-pixel errors and hand them to the objective chosen by ``train.preference_opt.type``.
"""
import contextlib
import math
import os
from collections import OrderedDict

import torch
from tqdm import tqdm

from dspo_basicsr.archs.diffusion_sr_base import join_negative_prompts, repeat_condition, sample_with_options
from dspo_basicsr.compat import atomic_torch_save, gather_in_sample_order, is_main_process, wait_for_all_ranks
from dspo_basicsr.losses.preference_loss import (
    DEFAULT_BETA,
    PreferenceBatch,
    dspo_logits,
    instance_coverage,
    preference_statistics,
)
from dspo_basicsr.metrics.metric_table import MissingWeightsError
from dspo_basicsr.metrics.pyiqa_metric import check_metric_weights
from dspo_basicsr.models.run_summary import summary_due, write_training_curves, write_validation_summary
from dspo_basicsr.utils.checkpoint import read_checkpoint

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, imwrite, tensor2img
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY


class NonFiniteLossError(RuntimeError):
    """Training produced too many non-finite losses in a row."""


def _gather_images(candidates, index):
    """candidates (B, K, 3, H, W), index (B, J) -> (B, J, 3, H, W)."""
    b, _, c, h, w = candidates.shape
    return candidates.gather(1, index.view(b, -1, 1, 1, 1).expand(-1, -1, c, h, w))


class AccumulationWindow:
    """The micro-batches of one optimizer update so far: whether all were finite, and their summed logs."""

    def __init__(self, finite=True, count=0, sums=None):
        self.finite, self.count, self.sums = finite, count, sums if sums is not None else OrderedDict()

    def add(self, log):
        for key, value in log.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.count += 1

    def mean(self):
        return OrderedDict((key, value / self.count) for key, value in self.sums.items())


@MODEL_REGISTRY.register()
class DSPOModel(SRModel):
    """Preference fine-tuning of a registered diffusion SR framework (``network_g``).

    Option keys beyond BasicSR's (all optional):
        train.preference_opt: the objective, ``DSPOLoss`` | ``DiffusionDPOLoss`` | ``DiffusionSFTLoss``.
        train.timestep_range: [low, high) of the training timesteps. Default: the whole schedule.
        train.feedback_guidance_scale: s of the user-description feedback (the paper's M2); when set,
            policy and reference predictions are ``eps(neg) + s (eps(prompt) - eps(neg))`` with the
            sample's negative prompt appended to the framework's default. Default: off.
        train.reference_dtype: ``bfloat16`` / ``float16`` to run the frozen reference at lower precision.
        train.grad_clip: max gradient norm. Default: none.
        train.max_nonfinite_steps: stop after this many non-finite losses in a row. Default: 10.
        train.accumulate_grad_batches: k, micro-batches (BasicSR iterations) per optimizer update; each
            micro-batch's loss is scaled by 1/k, the scheduler, warm-up, clipping and the non-finite guard act
            once per update, and the logs average the k micro-batches. ``total_iter``, ``print_freq``,
            ``save_checkpoint_freq`` and ``val_freq`` count micro-batches; scheduler milestones and
            ``warmup_iter`` count updates. Default: 1.
        val.sample: ``steps``, ``cfg``, ``seed``, ``prompt``, ``negative_prompt``, ``sampler`` for SR validation,
            and ``prompt_source`` (``prompt`` | ``tags``), ``color_fix`` (``adain`` | ``wavelet`` | ``none``),
            ``process_size``, ``tile_size``, ``tile_overlap``, ``vae_tile`` (see ``DiffusionSRArch.sample``).
        val.preference_timesteps: timesteps at which a preference validation set is scored.
        val.preference_seed: seed of its latents and noise (sample i uses seed + i). Default: 0.
        val.preference_beta: beta of its logits. Default: the training loss's, else 8000.
        val.summary: ``end`` (default), ``every`` or ``false``: when an image validation set also gets
            ``visualization/summary_<iter>.png`` (LQ | reference | current | GT) and ``training_curves.png``.
    """

    #: option keys this model reads beyond BasicSR's, by section (checked at start: dspo_basicsr.option_check)
    known_options = {
        'train': ('preference_opt', 'timestep_range', 'feedback_guidance_scale', 'reference_dtype', 'grad_clip',
                  'max_nonfinite_steps', 'accumulate_grad_batches'),
        'val': ('sample', 'preference_timesteps', 'preference_seed', 'preference_beta'),
        'val.sample': ('steps', 'cfg', 'seed', 'prompt', 'negative_prompt', 'sampler', 'color_fix', 'tile_size',
                       'tile_overlap', 'vae_tile', 'process_size', 'prompt_source', 'start_timestep'),
    }

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
        try:  # before anything is built or trained: every missing weight file of every metric, in the log too
            check_metric_weights((opt.get('val') or {}).get('metrics'))
        except MissingWeightsError as err:
            get_root_logger().error(str(err))
            raise
        net = build_network(opt['network_g']).to(self.device)
        # The reference is taken from the pretrained source before any fine-tuned weight is loaded, so a
        # resumed run gets the same reference as the first one, never the resumed policy.
        reference_dtype = opt.get('train', {}).get('reference_dtype') if self.is_train else None
        self.net_ref = net.build_reference(getattr(torch, reference_dtype) if reference_dtype else None).to(self.device)
        get_root_logger().info(f'Reference model: frozen copies of {sorted(self.net_ref.copies) or "nothing"} '
                               f'(LoRA adapters disabled on shared parts), checksum {self.reference_checksum():.12e}.')
        load_path = opt['path'].get('pretrain_network_g')
        if load_path is not None:
            self.load_network(net, load_path, opt['path'].get('strict_load_g', True),
                              opt['path'].get('param_key_g', 'params'))
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
        if train_opt.get('ema_decay', 0) > 0:
            raise ValueError('train.ema_decay is not supported by DSPOModel; remove it from the option file.')
        self.net_g.train()
        self.cri_pref = build_loss(train_opt['preference_opt']).to(self.device)
        needed = getattr(self.cri_pref, 'model_type', 'DSPOModel')
        if needed not in {cls.__name__ for cls in type(self).__mro__}:
            raise ValueError(f"train.preference_opt.type {train_opt['preference_opt']['type']} is not handled by "
                             f'model_type {type(self).__name__}; use {needed} (model_type: {needed}).')
        self.feedback_scale = train_opt.get('feedback_guidance_scale')
        low, high = train_opt.get('timestep_range', [0, self.bare.noise_scheduler.config.num_train_timesteps])
        self.timestep_range = (int(low), int(high))
        self.max_nonfinite = int(train_opt.get('max_nonfinite_steps', 10))
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.accumulate = int(train_opt.get('accumulate_grad_batches', 1))
        if self.accumulate < 1:
            raise ValueError(f'train.accumulate_grad_batches must be at least 1, got {self.accumulate}.')
        total_iter = int(train_opt.get('total_iter', 0))
        if total_iter % self.accumulate:
            raise ValueError(f'train.total_iter ({total_iter}) counts micro-batches; make it a multiple of '
                             f'train.accumulate_grad_batches ({self.accumulate}) so the last update is applied.')
        self.window = None
        self.log_dict = OrderedDict()  # filled at the end of each window; empty until the first update
        self.setup_optimizers()
        self.setup_schedulers()

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

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)
        self.extras = {name: value.to(self.device) for name, value in data.get('extras', {}).items()}
        self.has_candidates = 'candidates' in data
        if self.has_candidates:
            self.candidates = data['candidates'].to(self.device)
            self.seg = data['seg'].to(self.device)
            self.win = data['win'].to(self.device)
            self.lose = data['lose'].to(self.device)
            self.pair = data['pair'].to(self.device)
            self.scores = data['scores'].to(self.device) if 'scores' in data else None
            self.prompts = list(data['prompt'])
            self.negative_prompts = list(data['negative_prompt'])

    # ------------------------------------------------------------------ the step
    def _all_candidates(self):
        """(B, K) indices of every candidate of each LQ image."""
        b, k = self.candidates.shape[:2]
        return torch.arange(k, device=self.device).expand(b, k)

    def preference_batch(self):
        """What the objective reads of the current batch besides the errors (:class:`PreferenceBatch`)."""
        return PreferenceBatch(
            coverage=instance_coverage(self.seg, self.win.shape[1], self.bare.vae_scale_factor), win=self.win,
            lose=self.lose, pair=self.pair, num_candidates=self.candidates.shape[1],
            scores=getattr(self, 'scores', None))

    def encode_candidates(self, index, generator=None, sample_posterior=None):
        """VAE latents of the chosen candidates: index (B, J) -> (B*J, C, h, w), candidate-major per LQ.

        The posterior is sampled in training (``sample_posterior`` None: ``is_train``), from ``generator``.
        """
        images = _gather_images(self.candidates, index).flatten(0, 1)
        sample = self.is_train if sample_posterior is None else sample_posterior
        if sample and not getattr(self, '_posterior_checked', False):
            self.check_posterior_noise(images)
        return self.bare.encode_images(images, sample_posterior=sample, generator=generator)

    #: posterior_noise_ratio above which the first posterior-sampled batch is reported (SD's VAE: far below)
    max_posterior_noise_ratio = 0.1

    def check_posterior_noise(self, images):
        """Warn once when the VAE posterior noise swamps the candidates' latents (a random or mode-trained VAE).

        Returns:
            float: :meth:`~dspo_basicsr.archs.diffusion_sr_base.DiffusionSRArch.posterior_noise_ratio` of ``images``.
        """
        self._posterior_checked = True
        if images.is_meta:  # the GPU planner: shapes only, nothing to measure
            return math.nan
        ratio = self.bare.posterior_noise_ratio(images)
        if ratio > self.max_posterior_noise_ratio:
            get_root_logger().warning(
                f"network_g's VAE posterior noise is {ratio:.2f} x the spread of the candidates' latents; "
                'DSPOModel encodes candidates with a posterior sample, so training latents are mostly noise and the '
                "preferences barely show. Use a VAE with a nearly deterministic posterior, as SD's (for a demo VAE: "
                'dspo_basicsr.demo.dspo.set_posterior_std).')
        return ratio

    def preference_condition(self, repeats):
        """The condition of each LQ image, computed once and repeated over its candidates."""
        bare = self.bare
        negatives = None
        if getattr(self, 'feedback_scale', None):
            negatives = [join_negative_prompts(bare.default_negative_prompt, n) for n in self.negative_prompts]
        return repeat_condition(bare.condition(self.lq, self.prompts, negatives, **self.extras), repeats)

    def denoising_errors(self, index, with_reference=True, generator=None, timesteps=None, latents=None, cond=None,
                         policy=None):
        """Per-pixel denoising errors of the chosen candidates, for the policy and the reference.

        Args:
            index (Tensor): (B, J) candidate indices per LQ image.
            with_reference (bool): Also run the frozen reference.
            generator (torch.Generator | None): For the noise (and timesteps when not given).
            timesteps (Tensor | None): (B,) fixed timesteps; drawn from ``timestep_range`` when None.
            latents (Tensor | None): Precomputed :meth:`encode_candidates` output.
            cond (dict | None): Precomputed :meth:`preference_condition` output.
            policy (nn.Module | None): The policy to call; ``net_g`` (the DDP wrapper in training) when None.

        Returns:
            tuple[Tensor, Tensor | None]: err_theta, err_ref, each (B, J, h, w).
        """
        bare = self.bare
        b, j = index.shape
        latents = self.encode_candidates(index, generator) if latents is None else latents  # (B*J, C, h, w)
        cond = self.preference_condition(j) if cond is None else cond
        _, c, h, w = latents.shape
        # One noise and one timestep per LQ image, shared by its J candidates and by both networks.
        noise = torch.randn((b, c, h, w), generator=generator, device=self.device).repeat_interleave(j, 0)
        if timesteps is None:
            timesteps = bare.training_timesteps(b, *self.timestep_range, generator=generator)
        t = timesteps.repeat_interleave(j)
        x_t, target = self.diffusion_inputs(latents, noise, t, cond)
        scale = getattr(self, 'feedback_scale', None)

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

    def diffusion_inputs(self, latents, noise, t, cond):
        """Noisy latents and regression targets (each (B*J, C, h, w)) for :meth:`denoising_errors`.

        The framework's own :meth:`diffusion_inputs`; a hook for subclasses that take some rows elsewhere
        (Diffusion-DRO's online negatives come from a sampling trajectory).
        """
        return self.bare.diffusion_inputs(latents, noise, t, cond)

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
        k = getattr(self, 'accumulate', 1)
        if (current_iter - 1) % k == 0:
            super().update_learning_rate((current_iter - 1) // k + 1, warmup_iter)

    def _gradient_sync(self, enabled):
        """DDP averages gradients only on the last micro-batch of a window; earlier ones run in ``no_sync``."""
        if enabled or not isinstance(self.net_g, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.net_g.no_sync()

    def optimize_parameters(self, current_iter):
        k = self.accumulate
        position = (current_iter - 1) % k
        if position == 0 or self.window is None:
            self.optimizer_g.zero_grad(set_to_none=True)
            self.window = AccumulationWindow()
        window = self.window
        last = position == k - 1
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
        self.window = None
        if not window.finite:
            self._skip_update(current_iter, 'loss')
            return
        max_norm = self.opt['train'].get('grad_clip') or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        if not grad_norm.is_meta and not torch.isfinite(grad_norm):
            self._skip_update(current_iter, 'gradient')
            return
        self.optimizer_g.step()
        self.nonfinite_in_row = 0
        log = window.mean()
        log['grad_norm'] = grad_norm.detach()
        self.log_dict = self.reduce_loss_dict(log)

    def reduce_loss_dict(self, loss_dict):
        """BasicSR's averaging over ranks to floats; NaN for the ``meta`` tensors of the GPU planner's step."""
        if any(torch.is_tensor(v) and v.is_meta for v in loss_dict.values()):
            return OrderedDict((key, math.nan) for key in loss_dict)
        return super().reduce_loss_dict(loss_dict)

    def _window_path(self, current_iter):
        rank = self.opt.get('rank', 0)
        return os.path.join(self.opt['path']['training_states'], f'{current_iter}.window_rank{rank}.pth')

    def save_accumulation_window(self, current_iter):
        """Save this rank's gradients of an unfinished accumulation window next to ``{iter}.state``.

        A checkpoint can fall inside a window (``save_checkpoint_freq`` counts micro-batches); the resumed run
        then continues the window with these gradients instead of applying a part of it on its own.
        """
        if self.window is None or current_iter == -1:
            return
        names = dict(self.bare.named_parameters())
        state = {'grads': {name: p.grad.detach().cpu() for name, p in names.items()
                           if p.requires_grad and p.grad is not None},
                 'logs': {key: value.cpu() for key, value in self.window.sums.items()},
                 'count': self.window.count, 'finite': self.window.finite}
        path = self._window_path(current_iter)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path + '.tmp')
        os.replace(path + '.tmp', path)

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        current_iter = int(resume_state['iter'])
        if current_iter % self.accumulate == 0:
            return
        path = self._window_path(current_iter)
        if not os.path.isfile(path):
            get_root_logger().warning(
                f'resuming at iteration {current_iter}, inside an accumulation window of '
                f'{self.accumulate} micro-batches, but {path} is missing; that window is applied with only the '
                'micro-batches still to come.')
            return
        state = read_checkpoint(path, what='accumulation window', unwrap=())
        names = dict(self.bare.named_parameters())
        for name, grad in state['grads'].items():
            names[name].grad = grad.to(names[name].device, names[name].dtype)
        self.window = AccumulationWindow(finite=bool(state['finite']), count=int(state['count']),
                                         sums=OrderedDict((k, v.to(self.device)) for k, v in state['logs'].items()))

    # ------------------------------------------------------------------ sampling validation
    def test(self):
        sample_opt = self.opt.get('val', {}).get('sample', {}) or {}
        generator = torch.Generator(device=self.device).manual_seed(int(sample_opt.get('seed', 0)))
        bare = self.bare
        bare.eval()
        # The official test scripts' inference settings (docs/frameworks.md): tag prompts, colour fix, tiling.
        self.output = sample_with_options(bare, self.lq, sample_opt, generator)
        bare.train(self.is_train)

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
        if isinstance(dataloader.dataset, PreferenceLMDBDataset):
            self.preference_validation(dataloader, current_iter, tb_logger)
        else:
            self.image_validation(dataloader, current_iter, tb_logger, save_img)
            if get_dist_info()[0] == 0 and summary_due(self.opt, current_iter):
                write_validation_summary(self, dataloader, current_iter)
                write_training_curves(self.opt)
        wait_for_all_ranks()

    def _my_share(self, dataloader, desc):
        """(sample index, collated batch of that one sample) for this rank's share of the set."""
        rank, world = get_dist_info()
        dataset = dataloader.dataset
        show = bool(self.opt['val'].get('pbar', False)) and rank == 0
        for i in tqdm(range(rank, len(dataset), world), desc=desc, leave=False, disable=not show):
            yield i, dataloader.collate_fn([dataset[i]])

    @torch.no_grad()
    def image_validation(self, dataloader, current_iter, tb_logger, save_img):
        """SRModel's validation (sampling, saved PNGs, ``val.metrics``), split over the ranks."""
        dataset_name = dataloader.dataset.opt['name']
        metrics = self.opt['val'].get('metrics') or {}
        per_image = []
        for i, val_data in self._my_share(dataloader, f'validation {dataset_name}'):
            img_name = os.path.splitext(os.path.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            self.test()
            visuals = self.get_current_visuals()
            metric_data = {'img': tensor2img([visuals['result']])}
            if 'gt' in visuals:
                metric_data['img2'] = tensor2img([visuals['gt']])
                del self.gt
            del self.lq, self.output
            if save_img:
                if self.opt['is_train']:
                    path = os.path.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
                else:
                    suffix = self.opt['val'].get('suffix') or self.opt['name']
                    path = os.path.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')
                imwrite(metric_data['img'], path)
            per_image.append((i, {name: float(calculate_metric(metric_data, o)) for name, o in metrics.items()}))
        per_image = gather_in_sample_order(per_image)
        if not metrics or get_dist_info()[0] != 0:
            return
        self._initialize_best_metric_results(dataset_name)
        self.metric_results = {name: sum(m[name] for m in per_image) / max(len(per_image), 1) for name in metrics}
        for name, value in self.metric_results.items():
            self._update_best_metric_result(dataset_name, name, value, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    @torch.no_grad()
    def preference_validation(self, dataloader, current_iter, tb_logger):
        """Implicit accuracy of the DSPO logits on a preference set, at fixed timesteps, latents and noise.

        Sample i draws its VAE latents and noise from a generator seeded with ``val.preference_seed + i``,
        so the same weights give the same numbers in training, at the end, in ``basicsr test`` and on any
        number of ranks. Logs ``implicit_acc`` (share of paired instances where the policy prefers the
        preferred candidate more than the reference does; 0.5 = no preference learned) and ``logit_mean``.
        """
        val_opt = self.opt['val']
        dataset_name = dataloader.dataset.opt['name']
        timesteps = val_opt.get('preference_timesteps', [100, 300, 500, 700, 900])
        # beta scales logit_mean (not implicit_acc): the training loss's, or val.preference_beta in basicsr test
        beta = float(val_opt.get('preference_beta') or getattr(getattr(self, 'cri_pref', None), 'beta', DEFAULT_BETA))
        seed = int(val_opt.get('preference_seed', 0))
        generator = torch.Generator(device=self.device)
        saved_scale, self.feedback_scale = getattr(self, 'feedback_scale', None), None
        bare = self.bare
        bare.eval()
        per_sample = []
        for i, data in self._my_share(dataloader, f'preference validation {dataset_name}'):
            generator.manual_seed(seed + i)
            self.feed_data(data)
            index = self._all_candidates()
            coverage = instance_coverage(self.seg, self.win.shape[1], bare.vae_scale_factor)
            latents = self.encode_candidates(index, generator, sample_posterior=True)
            cond = self.preference_condition(index.shape[1])
            sample_logits = []
            for step in timesteps:
                t = torch.full((self.lq.shape[0],), int(step), device=self.device, dtype=torch.long)
                err_theta, err_ref = self.denoising_errors(index, generator=generator, timesteps=t, latents=latents,
                                                           cond=cond, policy=bare)
                logits, _, paired = dspo_logits(err_theta, err_ref, coverage, self.win, self.lose, beta)
                sample_logits.append(logits[paired].cpu())
            per_sample.append((i, torch.cat(sample_logits)))
        bare.train(self.is_train)
        self.feedback_scale = saved_scale
        per_sample = gather_in_sample_order(per_sample)
        if get_dist_info()[0] != 0:
            return
        logits = torch.cat(per_sample) if per_sample else torch.zeros(0)
        stats = preference_statistics(logits, torch.ones_like(logits, dtype=torch.bool), logits, logits, logits, logits)
        self.metric_results = {'implicit_acc': stats['implicit_acc'].item(), 'logit_mean': stats['logit_mean'].item()}
        if not hasattr(self, 'best_metric_results'):
            self.best_metric_results = {}
        self.best_metric_results.setdefault(dataset_name, {
            'implicit_acc': dict(better='higher', val=float('-inf'), iter=-1),
            'logit_mean': dict(better='higher', val=float('-inf'), iter=-1)})
        for name, value in self.metric_results.items():
            self._update_best_metric_result(dataset_name, name, value, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        # SRModel's validation of an image set starts its metric table afresh when this is absent.
        del self.metric_results

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch, current_iter):
        """Rank 0 writes ``net_g_<iter>.pth`` and ``<iter>.state``; every rank leaves once both are complete."""
        self.save_network(self.net_g, 'net_g', current_iter)
        self.save_accumulation_window(current_iter)  # this rank's gradients of an unfinished window
        self.save_training_state(epoch, current_iter)  # ends at a barrier (dspo_basicsr.compat)

    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Save only the trained parameters (never the reference), refusing non-finite values."""
        state = {k: v.cpu() for k, v in self.get_bare_model(net).trainable_state_dict().items()}
        broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
        label = 'latest' if current_iter == -1 else current_iter
        if broken:
            raise NonFiniteLossError(f'refusing to save {net_label} at iteration {label}: non-finite values in '
                                     f'{broken[:3]}; earlier checkpoints are kept.')
        if is_main_process():  # every rank holds the same weights; one writes, the others wait in save()
            atomic_torch_save({param_key: state}, os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load trained parameters saved by :meth:`save_network` into the freshly built framework."""
        if not os.path.isfile(load_path):
            raise FileNotFoundError(f"path.pretrain_network_g: checkpoint '{load_path}' does not exist.")
        state = read_checkpoint(load_path, what='path.pretrain_network_g', unwrap=(param_key,))
        get_root_logger().info(f'Loading trained parameters of {type(self.get_bare_model(net)).__name__} '
                               f'from {load_path} [{param_key}].')
        self.get_bare_model(net).load_trainable_state_dict(state, source=f"checkpoint '{load_path}'")
