"""RankCalibrationModel: train the rectifier of a rank-calibrated blind IQA model.

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment". The frozen
backbone q_w scores images; the rectifier maps its features to Q = (1 + |a|) q_w + b and is trained with

    l_total = l_t + lambda2 * l_p

    l_t: fidelity loss between the B-image average Q of two SR methods and the label from their global
         (Thurstone) ranking;
    l_p: fidelity loss between single images of a MOS list and the label from their MOS.

The backbone never changes, so its outputs are cached per image (memory or LMDB): after the first epoch
training runs the rectifier only. Validation reports 2AFC agreement on human pairs and SRCC / PLCC on
MOS lists.

Options: ``RankCalibrationModel.option_schema`` (BasicSR's plus ``feature_cache`` and ``train.fidelity_opt``,
``train.lambda2``; the table is in ``docs/options.md``).
"""
import json
import os
from collections import OrderedDict

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from dspo_basicsr.archs.rank_calibrated_iqa_arch import network_options_path
from dspo_basicsr.data.iqa_list_dataset import TwoAFCPairDataset
from dspo_basicsr.metrics.two_afc import human_ceiling, model_choice, oracle_ceiling, two_afc_score
from dspo_basicsr.models.backbone_feature_cache import BackboneFeatureCache
from dspo_basicsr.models.base_model import DSPOBaseModel
from dspo_basicsr.utils.atomic_write import atomic_json_dump, atomic_torch_save
from dspo_basicsr.utils.option_schema import BASICSR_MODEL_OPTIONS, Option

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import get_dist_info, master_only
from basicsr.utils.registry import MODEL_REGISTRY


@MODEL_REGISTRY.register()
class RankCalibrationModel(DSPOBaseModel):
    """Frozen IQA backbone + trainable rectifier, trained on model rankings and MOS pairs."""

    #: every option this model reads: checked at start (dspo_basicsr.option_check), defaults read from here
    option_schema = BASICSR_MODEL_OPTIONS.extend(
        Option('feature_cache', 'dict', {}, 'cache of the frozen backbone features'),
        Option('feature_cache.enabled', 'bool', True, 'cache the features (after epoch 1 only the rectifier runs)'),
        Option('feature_cache.backend', 'str', 'memory', 'where the cache lives', choices=('memory', 'lmdb')),
        Option('feature_cache.lmdb_path', 'str', None, 'the LMDB folder of backend lmdb'),
        Option('train.fidelity_opt', 'dict', {'type': 'FidelityLoss'}, 'the fidelity loss (type and arguments)',
               typed='loss'),
        Option('train.lambda2', 'number', 1.0, 'lambda2: weight of the MOS term l_p', ge=0),
        drop=('train.ema_decay',))

    def __init__(self, opt):
        super().__init__(opt)
        # Only the rectifier trains, so no DDP wrapper: its few gradients are averaged by hand.
        self.net_g = build_network(opt['network_g']).to(self.device)
        self.print_network(self.net_g)
        load_path = self.opt['path'].get('pretrain_network_g')
        if load_path is not None:
            self.net_g.load_rectifier(load_path)
            get_root_logger().info(f'Loaded rectifier weights from {load_path}.')
        cache_opt = self.option_schema.section(opt, 'feature_cache')  # checked, defaults filled in
        self.feature_cache = None
        if cache_opt['enabled']:
            self.feature_cache = BackboneFeatureCache(
                self.net_g.backbone.feature_dim, backend=cache_opt['backend'],
                lmdb_path=cache_opt['lmdb_path'], backbone_id=json.dumps(opt['network_g'].get('backbone', {}),
                                                                            sort_keys=True))
        self.backbone_passes = 0  # images run through the backbone (the cache keeps this flat after epoch 1)
        if self.is_train:
            self.init_training_settings()

    def init_training_settings(self):
        train_opt = self.opt['train']
        self.net_g.train()
        option = self.option_schema.value  # the value in the file, checked, or the declared default
        self.cri_fidelity = build_loss(option(self.opt, 'train.fidelity_opt')).to(self.device)
        self.lambda2 = float(option(self.opt, 'train.lambda2'))
        optim_opt = dict(train_opt['optim_g'])
        optim_type = optim_opt.pop('type')
        self.optimizer_g = self.get_optimizer(optim_type, list(self.net_g.rectifier.parameters()), **optim_opt)
        self.optimizers.append(self.optimizer_g)
        self.setup_schedulers()

    # ----------------------------------------------------------------------------------------- backbone
    def backbone_features(self, images, keys):
        """Frozen backbone outputs, read from the cache where present.

        Args:
            images (Tensor): (N, 3, H, W) RGB in [0, 1] (any device).
            keys (list[str]): N cache keys (image path + crop).

        Returns:
            tuple: features (N, D) and q (N,) on ``self.device``.
        """
        if self.feature_cache is None:
            self.backbone_passes += len(keys)
            return self.net_g.backbone_outputs(images.to(self.device))
        rows = self.feature_cache.get_many(keys)
        missing = {}  # first index of each absent key: an image repeated in the batch runs once
        for i, row in enumerate(rows):
            if row is None:
                missing.setdefault(keys[i], i)
        if missing:
            features, q = self.net_g.backbone_outputs(images[list(missing.values())].to(self.device))
            self.backbone_passes += len(missing)
            self.feature_cache.put_many(list(missing), features, q)
            rows = self.feature_cache.get_many(keys)
        rows = torch.from_numpy(np.stack(rows)).to(self.device)  # (N, 1 + D): [q, features]
        return rows[:, 1:], rows[:, 0]

    def calibrated_scores(self, images, keys):
        """(N, 3, H, W) images and N keys -> (N,) calibrated quality Q."""
        features, q = self.backbone_features(images, keys)
        return self.net_g.calibrate(features, q)['Q']

    # ----------------------------------------------------------------------------------------- training
    def feed_data(self, data):
        self.data = data

    def compute_losses(self, data):
        """The rank-calibration objective on one batch.

        Args:
            data (dict): A batch of :class:`SRMethodGroupDataset`: ``group_a``/``group_b`` (N, B, 3, H, W),
                ``label`` (N,), ``keys_a``/``keys_b`` (N lists of B keys), optional ``mos_a``/``mos_b``
                (N, 3, H, W), ``mos_label`` (N,), ``mos_key_a``/``mos_key_b`` (N keys).

        Returns:
            OrderedDict: ``l_t``, ``l_p`` and ``l_total`` (scalars; l_p is 0 without MOS pairs).
        """
        n, b = data['group_a'].shape[:2]
        scores = []
        for side in ('a', 'b'):
            keys = [key for group in data[f'keys_{side}'] for key in group]          # N * B keys
            q = self.calibrated_scores(data[f'group_{side}'].flatten(0, 1), keys)   # (N, B, 3, H, W) -> (N*B,)
            scores.append(q.view(n, b).mean(dim=1))                                  # group average, (N,)
        label = torch.as_tensor(data['label'], dtype=torch.float32, device=self.device)
        losses = OrderedDict(l_t=self.cri_fidelity(scores[0], scores[1], label))
        if 'mos_a' in data:
            mos_a = self.calibrated_scores(data['mos_a'], list(data['mos_key_a']))     # (N,)
            mos_b = self.calibrated_scores(data['mos_b'], list(data['mos_key_b']))
            mos_label = torch.as_tensor(data['mos_label'], dtype=torch.float32, device=self.device)
            losses['l_p'] = self.cri_fidelity(mos_a, mos_b, mos_label)
        else:
            losses['l_p'] = torch.zeros((), device=self.device)
        losses['l_total'] = losses['l_t'] + self.lambda2 * losses['l_p']
        return losses

    def optimize_parameters(self, current_iter):
        self.optimizer_g.zero_grad()
        losses = self.compute_losses(self.data)
        if not torch.isfinite(losses['l_total']):
            raise FloatingPointError(
                f'RankCalibrationModel: non-finite loss at iteration {current_iter} '
                f"(l_t={losses['l_t'].item()}, l_p={losses['l_p'].item()}); training stopped before the next "
                'checkpoint. Check the images of this batch and lower optim_g.lr.')
        losses['l_total'].backward()
        if self.opt['dist']:
            world_size = get_dist_info()[1]
            for param in self.net_g.rectifier.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= world_size
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(losses)

    # --------------------------------------------------------------------------------------- validation
    def dist_validation(self, dataloader, current_iter, tb_logger, save_img):
        # validation sets are small and scoring is cheap once features are cached: every rank runs all of it
        self.nondist_validation(dataloader, current_iter, tb_logger, save_img)

    @torch.no_grad()
    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        dataset_name = dataloader.dataset.opt['name']
        use_pbar = self.option_schema.value(self.opt, 'val.pbar')
        self.net_g.eval()
        two_afc = isinstance(dataloader.dataset, TwoAFCPairDataset)  # otherwise a MOS list (IQAListDataset)
        score_a, score_b, fractions, mos = [], [], [], []
        for batch in tqdm(dataloader, desc=f'Validate {dataset_name}', unit='batch', disable=not use_pbar):
            if two_afc:
                score_a.append(self.calibrated_scores(batch['img_a'], list(batch['key_a'])).cpu())
                score_b.append(self.calibrated_scores(batch['img_b'], list(batch['key_b'])).cpu())
                fractions.append(torch.as_tensor(batch['fraction_a']).reshape(-1))
            else:
                score_a.append(self.calibrated_scores(batch['img'], list(batch['key'])).cpu())
                mos.append(torch.as_tensor(batch['score']).reshape(-1))
        self.net_g.train()
        predicted = torch.cat(score_a).double().numpy()
        if two_afc:
            p = torch.cat(fractions).double().numpy()
            choice = model_choice(predicted, torch.cat(score_b).double().numpy())
            self.metric_results = {'2afc': two_afc_score(p, choice)}
            self._ceilings = {'human_ceiling': human_ceiling(p), 'oracle_ceiling': oracle_ceiling(p)}
        else:
            target = torch.cat(mos).double().numpy()
            if len(target) < 3:
                raise ValueError(f'validation set {dataset_name!r} needs at least 3 images for SRCC / PLCC.')
            self.metric_results = {'srcc': float(stats.spearmanr(predicted, target)[0]),
                                   'plcc': float(stats.pearsonr(predicted, target)[0])}
            self._ceilings = {}
        self._initialize_calibration_metrics(dataset_name, list(self.metric_results))
        for metric, value in self.metric_results.items():
            self._update_best_metric_result(dataset_name, metric, value, current_iter)
        self._log_validation_metric_values(current_iter, dataset_name, tb_logger)

    def _initialize_calibration_metrics(self, dataset_name, names):
        """Best-result records for the metrics this validation set reports (all higher-is-better)."""
        if not hasattr(self, 'best_metric_results'):
            self.best_metric_results = {}
        record = self.best_metric_results.setdefault(dataset_name, {})
        for name in names:
            record.setdefault(name, dict(better='higher', val=float('-inf'), iter=-1))

    def _log_validation_metric_values(self, current_iter, dataset_name, tb_logger):
        log_str = f'Validation {dataset_name}\n'
        for metric, value in self.metric_results.items():
            best = self.best_metric_results[dataset_name][metric]
            log_str += f'\t # {metric}: {value:.4f}\tBest: {best["val"]:.4f} @ {best["iter"]} iter\n'
        for name, value in self._ceilings.items():
            log_str += f'\t # {name}: {value:.4f}\n'
        get_root_logger().info(log_str)
        if tb_logger:
            for metric, value in self.metric_results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{metric}', value, current_iter)

    # ----------------------------------------------------------------------------------------- saving
    def save(self, epoch, current_iter):
        self.save_rectifier(current_iter)
        self.save_training_state(epoch, current_iter)

    @master_only
    def save_rectifier(self, current_iter):
        """Write ``net_g_<iter>.pth`` (rectifier weights, ``params``) and ``net_g_<iter>.json`` (options)."""
        label = 'latest' if current_iter == -1 else current_iter
        path = os.path.join(self.opt['path']['models'], f'net_g_{label}.pth')
        state = {k: v.detach().cpu() for k, v in self.net_g.rectifier_state_dict().items()}
        network = json.loads(json.dumps(self.opt['network_g']))
        backbone_path = network.get('backbone', {}).get('load_path')
        if backbone_path and os.path.isfile(backbone_path):
            # absolute, so the metric finds the backbone from any working directory
            network['backbone']['load_path'] = os.path.abspath(backbone_path)
        json_path = network_options_path(path)
        atomic_json_dump({'network_g': network, 'iter': current_iter}, json_path, indent=2)
        atomic_torch_save({'params': state}, path)  # last: a complete .pth always has its .json

    def get_current_visuals(self):
        return OrderedDict()
