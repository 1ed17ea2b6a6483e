"""DSPOModel: preference fine-tuning of a diffusion SR framework (DSPO, Diffusion-DPO, SFT).

The model orchestrates; formulas live in :mod:`dspo_basicsr.losses.preference_loss`. One training step:
VAE-encode the candidates of each LQ image, draw one timestep and one noise per LQ (shared by its
candidates and by policy and reference), compute the condition once per LQ, push all candidates through
the policy in one call (and through the frozen reference without gradient), turn predictions into
per-pixel errors and hand them to the objective chosen by ``train.preference_opt.type``.
"""
import math
import os
from collections import OrderedDict

import torch
from tqdm import tqdm

from dspo_basicsr.archs.diffusion_sr_base import join_negative_prompts, repeat_condition
from dspo_basicsr.losses.preference_loss import (
    DEFAULT_BETA,
    PreferenceBatch,
    dspo_logits,
    instance_coverage,
    preference_statistics,
)

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY


class NonFiniteLossError(RuntimeError):
    """Training produced too many non-finite losses in a row."""


def _gather_images(candidates, index):
    """candidates (B, K, 3, H, W), index (B, J) -> (B, J, 3, H, W)."""
    b, _, c, h, w = candidates.shape
    return candidates.gather(1, index.view(b, -1, 1, 1, 1).expand(-1, -1, c, h, w))


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
        val.sample: ``steps``, ``cfg``, ``seed``, ``prompt``, ``negative_prompt``, ``sampler`` for SR validation.
        val.preference_timesteps: timesteps at which a preference validation set is scored.
    """

    def __init__(self, opt):
        BaseModel.__init__(self, opt)
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
        """Sum of every weight of the reference's frozen copies (logged, to compare runs and resumes)."""
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

    def encode_candidates(self, index, generator=None):
        """VAE latents of the chosen candidates: index (B, J) -> (B*J, C, h, w), candidate-major per LQ."""
        images = _gather_images(self.candidates, index).flatten(0, 1)
        return self.bare.encode_images(images, sample_posterior=self.is_train, generator=generator)

    def preference_condition(self, repeats):
        """The condition of each LQ image, computed once and repeated over its candidates."""
        bare = self.bare
        negatives = None
        if getattr(self, 'feedback_scale', None):
            negatives = [join_negative_prompts(bare.default_negative_prompt, n) for n in self.negative_prompts]
        return repeat_condition(bare.condition(self.lq, self.prompts, negatives, **self.extras), repeats)

    def denoising_errors(self, index, with_reference=True, generator=None, timesteps=None, latents=None, cond=None):
        """Per-pixel denoising errors of the chosen candidates, for the policy and the reference.

        Args:
            index (Tensor): (B, J) candidate indices per LQ image.
            with_reference (bool): Also run the frozen reference.
            generator (torch.Generator | None): For the noise (and timesteps when not given).
            timesteps (Tensor | None): (B,) fixed timesteps; drawn from ``timestep_range`` when None.
            latents (Tensor | None): Precomputed :meth:`encode_candidates` output.
            cond (dict | None): Precomputed :meth:`preference_condition` output.

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

        if scale:
            err_theta = errors(bare.guided_prediction(x_t, t, cond, scale, predict=self.net_g))
        else:
            err_theta = errors(self.net_g(x_t, t, cond))
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

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad(set_to_none=True)
        result = self.preference_loss()
        loss = result.loss
        if not self._finite_everywhere(loss):
            self._skip_update(current_iter, 'loss')
            return
        loss.backward()
        max_norm = self.opt['train'].get('grad_clip') or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        if not torch.isfinite(grad_norm):
            self._skip_update(current_iter, 'gradient')
            return
        self.optimizer_g.step()
        self.nonfinite_in_row = 0
        log = OrderedDict([(self.cri_pref.log_key, loss.detach())])
        log.update(self.training_statistics(result))
        log['grad_norm'] = grad_norm.detach()
        self.log_dict = self.reduce_loss_dict(log)

    # ------------------------------------------------------------------ sampling validation
    def test(self):
        sample_opt = self.opt.get('val', {}).get('sample', {}) or {}
        generator = torch.Generator(device=self.device).manual_seed(int(sample_opt.get('seed', 0)))
        bare = self.bare
        bare.eval()
        self.output = bare.sample(
            self.lq, prompt=sample_opt.get('prompt', ''), negative_prompt=sample_opt.get('negative_prompt'),
            steps=sample_opt.get('steps'), cfg=sample_opt.get('cfg'), generator=generator,
            sampler=sample_opt.get('sampler'))
        bare.train(self.is_train)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
        if isinstance(dataloader.dataset, PreferenceLMDBDataset):
            self.preference_validation(dataloader, current_iter, tb_logger)
        else:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)

    @torch.no_grad()
    def preference_validation(self, dataloader, current_iter, tb_logger):
        """Implicit accuracy of the DSPO logits on a preference set, at fixed timesteps and noise.

        Logs ``implicit_acc`` (share of paired instances where the policy prefers the preferred candidate
        more than the reference does; 0.5 = no preference learned) and ``logit_mean``.
        """
        val_opt = self.opt['val']
        dataset_name = dataloader.dataset.opt['name']
        timesteps = val_opt.get('preference_timesteps', [100, 300, 500, 700, 900])
        beta = getattr(getattr(self, 'cri_pref', None), 'beta', DEFAULT_BETA)
        generator = torch.Generator(device=self.device).manual_seed(int(val_opt.get('preference_seed', 0)))
        saved_scale, self.feedback_scale = getattr(self, 'feedback_scale', None), None
        self.bare.eval()
        all_logits = []
        for data in tqdm(dataloader, desc=f'preference validation {dataset_name}', leave=False,
                         disable=not val_opt.get('pbar', False)):
            self.feed_data(data)
            index = self._all_candidates()
            coverage = instance_coverage(self.seg, self.win.shape[1], self.bare.vae_scale_factor)
            latents, cond = self.encode_candidates(index), self.preference_condition(index.shape[1])
            for step in timesteps:
                t = torch.full((self.lq.shape[0],), int(step), device=self.device, dtype=torch.long)
                err_theta, err_ref = self.denoising_errors(index, generator=generator, timesteps=t, latents=latents,
                                                           cond=cond)
                logits, _, paired = dspo_logits(err_theta, err_ref, coverage, self.win, self.lose, beta)
                all_logits.append(logits[paired])
        self.bare.train(self.is_train)
        self.feedback_scale = saved_scale
        logits = torch.cat(all_logits) if all_logits else torch.zeros(0)
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
        self.save_network(self.net_g, 'net_g', current_iter)
        self.save_training_state(epoch, current_iter)

    def save_network(self, net, net_label, current_iter, param_key='params'):
        """Save only the trained parameters (never the reference), refusing non-finite values."""
        state = {k: v.cpu() for k, v in self.get_bare_model(net).trainable_state_dict().items()}
        broken = [k for k, v in state.items() if not torch.isfinite(v).all()]
        label = 'latest' if current_iter == -1 else current_iter
        if broken:
            raise NonFiniteLossError(f'refusing to save {net_label} at iteration {label}: non-finite values in '
                                     f'{broken[:3]}; earlier checkpoints are kept.')
        path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        tmp = path + '.tmp'
        torch.save({param_key: state}, tmp)
        os.replace(tmp, path)

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Load trained parameters saved by :meth:`save_network` into the freshly built framework."""
        if not os.path.isfile(load_path):
            raise FileNotFoundError(f"path.pretrain_network_g: checkpoint '{load_path}' does not exist.")
        state = torch.load(load_path, map_location='cpu', weights_only=True)
        if param_key in state:
            state = state[param_key]
        get_root_logger().info(f'Loading trained parameters of {type(self.get_bare_model(net)).__name__} '
                               f'from {load_path} [{param_key}].')
        self.get_bare_model(net).load_trainable_state_dict(state, source=f"checkpoint '{load_path}'")
