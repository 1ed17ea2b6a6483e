"""Online instance-level group preference training (beyond the papers): DSPO on groups sampled from the policy.

GDPO-SR (Joyies/GDPO) trains one-step SR online: a group of samples per LQ from the current policy, rewards from
IQA metrics, advantages within the group. This model combines that with DSPO's instance level: on an online step
each LQ of the batch is super-resolved G times by the current policy (the framework's sampler from its start
point, a short schedule of ``train.online.steps``), every candidate is scored inside every stored instance by PSNR
against the GT (the metric scorer of the demo set's labels), and DSPO's instance objective is trained on the
group's best / worst candidate per instance (or ``top_bottom`` / ``hierarchical`` pairs from the score table,
whatever ``train.preference_opt`` asks). Other steps train on the stored candidates, so ``share`` sets the mix.

Each rank samples the LQs of its own batch from a generator seeded by (``manual_seed``, iteration, rank), so a
resumed run samples the groups it would have sampled and no state beyond DSPOModel's is saved.
"""
import os

import cv2
import numpy as np
import torch

from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
from dspo_basicsr.models.dspo_model import DSPOModel
from dspo_basicsr.utils.option_schema import Option

from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import MODEL_REGISTRY


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


def group_labels(scores):
    """Best / worst candidate of each instance from (B, M, G) scores: (win, lose), both -1 where unscored or tied."""
    filled = torch.nan_to_num(scores, nan=-float('inf'))
    win, lose = filled.argmax(-1), torch.nan_to_num(scores, nan=float('inf')).argmin(-1)
    none = torch.isnan(scores).any(-1) | (win == lose)
    return win.masked_fill(none, -1), lose.masked_fill(none, -1)


@MODEL_REGISTRY.register()
class OnlineGroupModel(DSPOModel):
    """DSPOModel whose preference pairs come, on online steps, from groups sampled from the current policy.

    Options (``train.online``): ``group_size`` (G candidates per LQ), ``steps`` (sampler steps of the group),
    ``share`` (fraction of iterations that train on online groups; the others on the stored candidates) and
    ``sheet_freq`` (a contact sheet of a group every N iterations; 0: none). The set must store GTs.
    """

    #: DSPOModel's options and ``train.online`` (checked at start; defaults read from here)
    option_schema = DSPOModel.option_schema.extend(
        Option('train.online', 'dict', {}, 'online group sampling from the current policy'),
        Option('train.online.group_size', 'int', 4, 'G: samples per LQ from the current policy', ge=2),
        Option('train.online.steps', 'int', 4, 'sampler steps of each group sample (the other settings: val.sample)',
               ge=1),
        Option('train.online.share', 'number', 1.0, 'fraction of iterations trained on online groups (the others on '
               'the stored candidates)', ge=0, le=1),
        Option('train.online.sheet_freq', 'int', 0, 'a contact sheet of a group every N iterations (0: none)', ge=0),
    )

    def init_training_settings(self):
        super().init_training_settings()
        self.online_opt = self.option_schema.section(self.opt, 'train.online')  # checked, defaults filled in
        self.online_sample = dict(self.opt.get('val', {}).get('sample') or {}, steps=self.online_opt['steps'])

    def is_online_step(self, current_iter):
        """Whether iteration ``current_iter`` trains on an online group: ``share`` of the iterations, spread evenly."""
        share = float(self.online_opt['share'])
        return int(current_iter * share) > int((current_iter - 1) * share)

    @torch.no_grad()
    def sample_group(self, current_iter):
        """Replace the batch's candidates with G policy samples per LQ and relabel its instances by PSNR."""
        if self.gt is None:
            raise ValueError('OnlineGroupModel scores its online samples against the GT: the preference set must '
                             'store ground truths (the demo set does); no GT came with this batch.')
        rank, _ = get_dist_info()
        generator = torch.Generator().manual_seed(int(self.opt.get('manual_seed') or 0) * 1_000_003
                                                  + current_iter * 1009 + rank)
        group = int(self.online_opt['group_size'])
        was_training = self.bare.training
        self.bare.eval()
        samples = []
        for b in range(self.lq.shape[0]):
            options = dict(self.online_sample, prompt=self.prompts[b])
            sr = sample_with_options(self.bare, self.lq[b:b + 1].expand(group, -1, -1, -1), options, generator)
            samples.append(sr.clamp(0, 1).to(self.device))
        self.bare.train(was_training)
        candidates = torch.stack(samples)  # (B, G, 3, H, W)
        scores = instance_psnr(candidates, self.gt, self.seg, self.win.shape[1])
        self.candidates = candidates
        self.win, self.lose = group_labels(scores)
        whole = 10 * torch.log10(1.0 / ((candidates - self.gt[:, None])**2).mean((2, 3, 4)).clamp_min(1e-10))
        self.pair = torch.stack([whole.argmax(1), whole.argmin(1)], 1)
        self.scores = scores
        self.group_rewards = scores
        return candidates, scores

    def optimize_parameters(self, current_iter):
        online = self.has_candidates and self.is_online_step(current_iter)
        if online:
            _, scores = self.sample_group(current_iter)
            sheet_freq = int(self.online_opt['sheet_freq'])
            if sheet_freq and current_iter % sheet_freq == 0 and get_dist_info()[0] == 0:
                self.write_contact_sheet(current_iter)
        super().optimize_parameters(current_iter)
        if online and self.log_dict:
            mean = torch.nanmean(scores, -1)
            spread = torch.nan_to_num(scores.nan_to_num(-1e9).amax(-1) - scores.nan_to_num(1e9).amin(-1), nan=0.0)
            valid = ~torch.isnan(mean)
            self.log_dict['online_psnr'] = float(mean[valid].mean()) if valid.any() else float('nan')
            self.log_dict['online_spread'] = float(spread[valid].mean()) if valid.any() else float('nan')

    def write_contact_sheet(self, current_iter):
        """``visualization/online_groups/group_<iter>.png``: GT then the G samples of the batch's first LQ, each
        captioned with its mean instance PSNR and how many instances it wins / loses."""
        folder = os.path.join(self.opt['path'].get('visualization') or self.opt['path']['experiments_root'],
                              'online_groups')
        os.makedirs(folder, exist_ok=True)
        tiles = [('GT', self.gt[0])]
        for g in range(self.candidates.shape[1]):
            psnr = torch.nanmean(self.group_rewards[0, :, g]).item()
            wins, losses = int((self.win[0] == g).sum()), int((self.lose[0] == g).sum())
            tiles.append((f'{psnr:.1f}dB +{wins}-{losses}', self.candidates[0, g]))
        images = []
        for caption, image in tiles:
            array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            array = cv2.resize(array, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
            band = np.full((14, array.shape[1], 3), 255, np.uint8)
            cv2.putText(band, caption, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            images.append(np.concatenate([array, band], 0))
        sheet = np.concatenate(images, 1)
        cv2.imwrite(os.path.join(folder, f'group_{current_iter:06d}.png'), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
