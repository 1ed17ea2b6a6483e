"""Online instance-level group preference training (beyond the papers): DSPO on groups sampled from the policy.

GDPO-SR (Joyies/GDPO) trains one-step SR online: a group of samples per LQ, rewards from IQA metrics, advantages
within the group. This model combines that with DSPO's instance level. On an online step each LQ of the batch is
super-resolved G times by the policy, or by a frozen sampling copy of it re-synced every ``refresh_every``
optimizer updates (multi-step frameworks: the framework's sampler from its start point, a short schedule of
``train.online.steps``; the one-step OSEDiff: its start latent noised to ``noise_timestep`` first, as GDPO-SR
does, so that the group is diverse). Every sample is scored inside every stored instance by the reward
(``train.online.reward``: PSNR against the GT by default, or an instance scorer of the data steps, e.g. the BIQA
scorer when the set has no GT), and the model trains on the group either with DSPO's instance objective on each
instance's best / worst sample (or ``top_bottom`` / ``hierarchical`` pairs, whatever ``train.preference_opt``
asks; ``objective: pairs``) or with group-normalised advantages in DSPO's implicit-reward form
(``objective: advantages``, :func:`~dspo_basicsr.losses.group_advantages.group_advantage_loss`). Other steps
train on the stored candidates, so ``share`` sets the mix.

Each rank samples the LQs of its own batch from a generator seeded by (``manual_seed``, iteration, rank), so a
resumed run samples the groups it would have sampled; the sampling copy is saved next to ``{iter}.state``
(``{iter}.sampling_copy.pth``) and restored on resume.
"""
import math
import os

import cv2
import numpy as np
import torch

from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
from dspo_basicsr.losses.group_advantages import group_advantage_loss, group_advantages
from dspo_basicsr.losses.preference_loss import DEFAULT_BETA, PreferenceResult, instance_error, pick_candidates
from dspo_basicsr.models.dspo_model import DSPOModel
from dspo_basicsr.models.lagged_policy import (
    LaggedPolicy,
    lagged_policy_state,
    refresh_due,
    restore_lagged_policy,
)
from dspo_basicsr.utils.atomic_write import atomic_torch_save
from dspo_basicsr.utils.checkpoint import read_checkpoint
from dspo_basicsr.utils.image_io import to_uint8_rgb
from dspo_basicsr.utils.option_schema import Option

from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY

#: ``train.online.reward`` types: ``psnr`` (instance PSNR against the GT, computed on tensors) or an instance
#: scorer of the data steps (:func:`dspo_basicsr.preference.instance_scoring.build_instance_scorer`)
REWARD_TYPES = ('psnr', 'metric', 'biqa')
OBJECTIVES = ('pairs', 'advantages')


def instance_psnr(candidates, gt, seg, num_instances):
    """PSNR (dB) of each candidate inside each instance: (B, G, 3, H, W), (B, 3, H, W) in [0, 1], (B, H, W) ids.

    Returns:
        Tensor: (B, M, G); NaN where instance m covers no pixel of sample b (padding of the batch).
    """
    err = ((candidates - gt[:, None])**2).mean(2)  # (B, G, H, W)
    onehot = torch.nn.functional.one_hot(seg.long().clamp_min(0), num_instances).permute(0, 3, 1, 2).float()
    onehot = onehot * (seg >= 0)[:, None].float()  # (B, M, H, W)
    area = onehot.sum((2, 3))  # (B, M)
    mse = torch.einsum('bghw,bmhw->bmg', err, onehot) / area.clamp_min(1)[..., None]
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return torch.where(area[..., None] > 0, psnr, torch.full_like(psnr, float('nan')))


def scorer_rewards(scorer, candidates, seg, num_instances, lq, gt=None, prompts=None, sids=None):
    """Rewards (B, M, G) of group samples from an instance scorer (``score_instance(context, m)``).

    Args:
        scorer (InstanceScorer): A scorer of :mod:`dspo_basicsr.preference.instance_scoring` whose rows carry
            ``candidate_scores`` (higher is better), e.g. ``metric`` or ``biqa``.
        candidates (Tensor): (B, G, 3, H, W) in [0, 1].
        seg (Tensor): (B, H, W) instance ids, -1 for padding.
        num_instances (int): M.
        lq (Tensor): (B, 3, h, w) in [0, 1].
        gt (Tensor | None): (B, 3, H, W) in [0, 1].

    Returns:
        Tensor: (B, M, G) float; NaN for instances absent from a sample or that the scorer could not score.
    """
    from dspo_basicsr.preference.instance_scoring import InstanceContext, ScorerItemError
    b, g = candidates.shape[:2]
    rewards = torch.full((b, num_instances, g), float('nan'))
    for i in range(b):
        labels = seg[i].cpu().numpy()
        ids = labels.copy()
        ids[ids < 0] = num_instances  # padding pixels: an id no instance row reads
        context = InstanceContext(
            sid=sids[i] if sids else str(i), lq=to_uint8_rgb(lq[i].detach()),
            candidates=[to_uint8_rgb(c.detach()) for c in candidates[i]], seg=ids.astype(np.uint16),
            gt=None if gt is None else to_uint8_rgb(gt[i].detach()), prompt=prompts[i] if prompts else '')
        for m in np.unique(labels[(labels >= 0) & (labels < num_instances)]).tolist():
            try:
                row = scorer.score_instance(context, m)
            except ScorerItemError:
                continue
            values = row.get('candidate_scores')
            if values is None:
                raise ValueError(f"train.online.reward: the '{scorer.name}' scorer returns no candidate_scores, so "
                                 'the group samples cannot be ranked; use psnr, metric or biqa.')
            rewards[i, m] = torch.tensor([math.nan if v is None else float(v) for v in values])
    return rewards.to(candidates.device)


def group_labels(scores):
    """Best / worst candidate of each instance from (B, M, G) scores: (win, lose), both -1 where unscored or tied."""
    filled = torch.nan_to_num(scores, nan=-float('inf'))
    win, lose = filled.argmax(-1), torch.nan_to_num(scores, nan=float('inf')).argmin(-1)
    none = torch.isnan(scores).any(-1) | (win == lose)
    return win.masked_fill(none, -1), lose.masked_fill(none, -1)


@MODEL_REGISTRY.register()
class OnlineGroupModel(DSPOModel):
    """DSPOModel whose training candidates come, on online steps, from groups sampled from the policy.

    Options (``train.online``, :attr:`option_schema`): ``group_size`` (G), ``steps`` (sampler steps of the group),
    ``share`` (fraction of iterations on online groups), ``sheet_freq`` (a contact sheet every N iterations),
    ``reward`` (how a sample is scored inside an instance), ``refresh_every`` (optimizer updates between syncs of
    the sampling copy; 0 or 1: the current policy samples), ``noise_timestep`` (one-step frameworks: the start
    latent's noise) and ``objective`` (``pairs`` or ``advantages``).
    """

    #: DSPOModel's options and ``train.online`` (checked at start; defaults read from here)
    option_schema = DSPOModel.option_schema.extend(
        Option('train.online', 'dict', {}, 'online group sampling from the policy'),
        Option('train.online.group_size', 'int', 4, 'G: samples per LQ from the policy', ge=2),
        Option('train.online.steps', 'int', 4, 'sampler steps of each group sample (the other settings: val.sample)',
               ge=1),
        Option('train.online.share', 'number', 1.0, 'fraction of iterations trained on online groups (the others on '
               'the stored candidates)', ge=0, le=1),
        Option('train.online.sheet_freq', 'int', 0, 'a contact sheet of a group every N iterations (0: none)', ge=0),
        Option('train.online.reward', 'dict', {'type': 'psnr'}, 'reward of a sample inside an instance: {type: psnr} '
               '(against the GT), or an instance scorer block as the data steps take ({type: metric, preset: '
               'fidelity}, {type: biqa, network: ..., checkpoint: ...})',
               check=lambda value, opt, block: None if value.get('type', 'psnr') in REWARD_TYPES else
               f'type one of {", ".join(REWARD_TYPES)}'),
        Option('train.online.refresh_every', 'int', 0, 'K: optimizer updates between syncs of the frozen sampling '
               'copy (0 or 1: the current policy samples)', ge=0),
        Option('train.online.noise_timestep', 'int', 0, "one-step frameworks (OSEDiff): the start latent noised to "
               "this timestep before the step, for a diverse group (GDPO-SR: 250; 0: none)", ge=0),
        Option('train.online.objective', 'str', 'pairs', "pairs: DSPO on each instance's best / worst samples "
               '(train.preference_opt); advantages: group-normalised advantages in the implicit-reward form',
               choices=OBJECTIVES),
    )

    def __init__(self, opt):
        # Set before DSPOModel.__init__, which ends with init_training_settings (training only).
        self.online_opt = self.online_sample = self.reward_scorer = self.sampling_copy = None
        self.refresh_every = self.noise_timestep = 0
        self.advantages = False
        self.online_now = False  # the current update trains on an online group
        self.group_rewards = None  # (B, M, G) rewards of the last sampled group
        super().__init__(opt)

    def init_training_settings(self):
        super().init_training_settings()
        self.online_opt = self.option_schema.section(self.opt, 'train.online')  # checked, defaults filled in
        self.online_sample = dict(self.opt.get('val', {}).get('sample') or {}, steps=self.online_opt['steps'])
        self.reward_scorer = self._build_reward_scorer()
        self.refresh_every = int(self.online_opt['refresh_every'])
        self.sampling_copy = LaggedPolicy() if self.refresh_every > 1 else None
        self.noise_timestep = int(self.online_opt['noise_timestep'])
        if self.noise_timestep and not hasattr(self.bare, 'operating_alpha'):
            raise ValueError(f'train.online.noise_timestep = {self.noise_timestep} noises the start latent of a '
                             f'one-step framework (OSEDiffArch); {type(self.bare).__name__} samples several steps '
                             'from its own noise, so its groups are diverse already: set it to 0.')
        total = self.bare.noise_scheduler.config.num_train_timesteps
        if self.noise_timestep >= total:
            raise ValueError(f'train.online.noise_timestep = {self.noise_timestep} is outside the schedule '
                             f'[0, {total}); GDPO-SR uses 250.')
        self.advantages = self.online_opt['objective'] == 'advantages'

    # ------------------------------------------------------------------ the reward
    @property
    def reward_needs_gt(self):
        """Whether ``train.online.reward`` compares against the GT (psnr, or a metric scorer with a full-reference
        metric)."""
        reward = dict(self.online_opt['reward'])
        kind = reward.get('type', 'psnr')
        if kind == 'psnr':
            return True
        if kind == 'metric':
            from dspo_basicsr.preference.candidates import metric_is_full_reference
            return any(metric_is_full_reference(opt) for opt in self.reward_scorer.metrics.values())
        return False

    def _build_reward_scorer(self):
        """The instance scorer of ``train.online.reward`` (None for psnr), after checking the set stores GTs if the
        reward needs them."""
        reward = dict(self.online_opt['reward'])
        kind = reward.setdefault('type', 'psnr')
        scorer = None
        if kind != 'psnr':
            from dspo_basicsr.preference.instance_scoring import build_instance_scorer
            try:
                scorer = build_instance_scorer(reward)
            except TypeError as err:
                raise ValueError(f'train.online.reward: {err}; see the {kind} scorer in docs/preference_data.md.') \
                    from err
        self.reward_scorer = scorer
        self._check_set_has_gt()
        return scorer

    def _check_set_has_gt(self):
        train = (self.opt.get('datasets') or {}).get('train') or {}
        root = train.get('dataroot')
        if not self.reward_needs_gt or not root or not os.path.isdir(str(root)):
            return
        from dspo_basicsr.data.preference_set import PreferenceLMDB
        header = PreferenceLMDB(str(root)).header
        if header.get('num_with_gt', 0) < header.get('num_samples', 0):
            kind = self.online_opt['reward'].get('type', 'psnr')
            raise ValueError(f"train.online.reward {kind} scores against the GT, but {header.get('num_with_gt', 0)} of "
                             f"the {header.get('num_samples')} samples of {root} store one; use a reward without a GT "
                             '(train.online.reward: {type: biqa, ...}) or a set with ground truths.')

    def group_rewards_of(self, candidates):
        """(B, M, G) reward of each group sample inside each instance of the batch."""
        num_instances = self.win.shape[1]
        needs_gt = self.reward_needs_gt
        if needs_gt and self.gt is None:
            raise ValueError(f"train.online.reward {self.online_opt['reward'].get('type', 'psnr')} scores the online "
                             'samples against the GT, but this batch came without one: use a set that stores ground '
                             'truths or a reward without a GT ({type: biqa, ...}).')
        if self.reward_scorer is None:
            return instance_psnr(candidates, self.gt, self.seg, num_instances)
        return scorer_rewards(self.reward_scorer, candidates, self.seg, num_instances, self.lq,
                              self.gt if needs_gt else None, self.prompts)

    # ------------------------------------------------------------------ the group
    def is_online_step(self, current_iter):
        """Whether iteration ``current_iter`` trains on an online group: ``share`` of the iterations, spread evenly."""
        share = float(self.online_opt['share'])
        return int(current_iter * share) > int((current_iter - 1) * share)

    def refresh_sampling_copy(self, current_iter):
        """Sync the frozen sampling copy to the policy when it is missing or ``refresh_every`` updates old."""
        copy = self.sampling_copy
        if copy is None or not refresh_due(copy, current_iter, self.refresh_every, self.accumulate):
            return False
        copy.sync(self.bare, current_iter)
        get_root_logger().info(f'iter {current_iter}: online sampling copy synced to the policy (version '
                               f'{copy.version}).')
        return True

    def _sampling_policy(self):
        if self.sampling_copy is None:
            import contextlib
            return contextlib.nullcontext()
        return self.sampling_copy.swapped_into(self.bare)

    @torch.no_grad()
    def sample_group(self, current_iter):
        """Replace the batch's candidates with G policy samples per LQ and relabel its instances by the reward."""
        rank, _ = get_dist_info()
        generator = torch.Generator().manual_seed(int(self.opt.get('manual_seed') or 0) * 1_000_003
                                                  + current_iter * 1009 + rank)
        group = int(self.online_opt['group_size'])
        self.refresh_sampling_copy(current_iter)
        was_training = self.bare.training
        self.bare.eval()
        samples = []
        with self._sampling_policy():
            for b in range(self.lq.shape[0]):
                options = dict(self.online_sample, prompt=self.prompts[b])
                lq = self.lq[b:b + 1].expand(group, -1, -1, -1)
                start_noise = {'noise_timestep': self.noise_timestep} if self.noise_timestep else {}
                sr = sample_with_options(self.bare, lq, options, generator, **start_noise)
                samples.append(sr.clamp(0, 1).to(self.device))
        self.bare.train(was_training)
        candidates = torch.stack(samples)  # (B, G, 3, H, W)
        scores = self.group_rewards_of(candidates)
        self.candidates = candidates
        self.candidate_latents = None  # the stored candidates' latents do not belong to the group
        self.win, self.lose = group_labels(scores)
        mean = torch.nanmean(scores, 1).nan_to_num(0.0)  # (B, G): mean reward over the scored instances
        self.pair = torch.stack([mean.argmax(1), mean.argmin(1)], 1)
        self.scores = scores
        self.group_rewards = scores
        return candidates, scores

    # ------------------------------------------------------------------ the objective
    def preference_loss(self):
        """DSPOModel's objective, or with ``objective: advantages`` the group-advantage objective on all G samples."""
        if not (self.advantages and self.online_now):
            return super().preference_loss()
        batch = self.preference_batch()
        index = torch.arange(batch.num_candidates, device=self.device).expand(batch.win.shape[0], -1)
        err_theta, err_ref = self.denoising_errors(index)
        cri = self.cri_pref
        beta = float(getattr(cri, 'beta', DEFAULT_BETA))
        reduction = getattr(cri, 'instance_error', 'mean')
        loss, logits, weights, valid = group_advantage_loss(err_theta, err_ref, batch.coverage, self.scores, beta,
                                                            reduction)
        with torch.no_grad():  # logged like DSPO's: errors of each instance's best (w) and worst (l) sample
            advantages, _ = group_advantages(self.scores)
            best, worst = advantages.argmax(-1), advantages.argmin(-1)
            picked = [pick_candidates(instance_error(e, batch.coverage, reduction), index)
                      for e in (err_theta.detach(), err_ref) for index in (best, worst)]
        return PreferenceResult(loss, valid, logits, weights, *picked).scaled(getattr(cri, 'loss_weight', 1.0))

    def optimize_parameters(self, current_iter):
        online = self.has_candidates and self.is_online_step(current_iter)
        if online:
            _, scores = self.sample_group(current_iter)
            sheet_freq = int(self.online_opt['sheet_freq'])
            if sheet_freq and current_iter % sheet_freq == 0 and get_dist_info()[0] == 0:
                self.write_contact_sheet(current_iter)
        self.online_now = online
        try:
            super().optimize_parameters(current_iter)
        finally:
            self.online_now = False
        if online and self.log_dict:
            mean = torch.nanmean(scores, -1)
            spread = torch.nan_to_num(scores.nan_to_num(-1e9).amax(-1) - scores.nan_to_num(1e9).amin(-1), nan=0.0)
            valid = ~torch.isnan(mean)
            self.log_dict['online_reward'] = float(mean[valid].mean()) if valid.any() else float('nan')
            self.log_dict['online_spread'] = float(spread[valid].mean()) if valid.any() else float('nan')

    # ------------------------------------------------------------------ checkpoints
    def _sampling_copy_path(self, current_iter):
        return os.path.join(self.opt['path']['training_states'], f'{current_iter}.sampling_copy.pth')

    def save(self, epoch, current_iter):
        """DSPOModel's checkpoint, plus the sampling copy (rank 0; every rank holds the same copy)."""
        copy = self.sampling_copy
        if copy is not None and copy.state is not None and current_iter != -1 and get_dist_info()[0] == 0:
            path = self._sampling_copy_path(current_iter)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_torch_save(lagged_policy_state(copy), path)
        super().save(epoch, current_iter)  # ends at a barrier, so the copy is complete before any rank goes on

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if self.sampling_copy is None:
            return
        current_iter = int(resume_state['iter'])
        path = self._sampling_copy_path(current_iter)
        if not os.path.isfile(path):
            get_root_logger().warning(
                f'resuming at iteration {current_iter} without {path}; the sampling copy is rebuilt from the resumed '
                'policy at the next online step, so the groups differ from those of an uninterrupted run.')
            return
        saved = read_checkpoint(path, what='online sampling copy', unwrap=())
        restore_lagged_policy(self.sampling_copy, saved, self.bare, path)

    # ------------------------------------------------------------------ what a user sees
    def write_contact_sheet(self, current_iter):
        """``visualization/online_groups/group_<iter>.png``: GT (when the batch has one) then the G samples of the
        batch's first LQ, each captioned with its mean instance reward and how many instances it wins / loses."""
        folder = os.path.join(self.opt['path'].get('visualization') or self.opt['path']['experiments_root'],
                              'online_groups')
        os.makedirs(folder, exist_ok=True)
        gt = self.gt
        tiles = [('GT', gt[0])] if gt is not None else [('LQ x%d' % self.bare.scale, self.bare.upsample_lq(
            self.lq[:1])[0])]
        for g in range(self.candidates.shape[1]):
            reward = torch.nanmean(self.group_rewards[0, :, g]).item()
            wins, losses = int((self.win[0] == g).sum()), int((self.lose[0] == g).sum())
            tiles.append((f'{reward:.3g} +{wins}-{losses}', self.candidates[0, g]))
        images = []
        for caption, image in tiles:
            array = cv2.resize(to_uint8_rgb(image.detach()), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
            band = np.full((14, array.shape[1], 3), 255, np.uint8)
            cv2.putText(band, caption, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            images.append(np.concatenate([array, band], 0))
        sheet = np.concatenate(images, 1)
        cv2.imwrite(os.path.join(folder, f'group_{current_iter:06d}.png'), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
