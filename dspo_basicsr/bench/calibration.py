"""Measurements behind ``scripts/bench_calibration.py``: what the feature cache and MAD feature reuse save.

1. Rank-calibration epoch time with the frozen backbone's outputs cached vs recomputed every epoch, with a
   ViT-B/32-sized CLIP backbone (randomly initialised: the cost, not the weights, matters here).
2. MAD selection backbone passes and time with features reused across method pairs vs per pair.

Both are measured in one run on the same data, and reported as ratios.
"""
import os
import random
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

from dspo_basicsr.bench.timer import time_call

__all__ = ['VIT_B32_CONFIG', 'bench_feature_cache', 'bench_mad_reuse']

# OpenAI CLIP ViT-B/32 shapes (151 M parameters); the backbone of LIQE.
VIT_B32_CONFIG = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                      context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12)


def _model_options(paths, models_dir, clip_path, cache, backend, device):
    return {
        'name': 'bench', 'model_type': 'RankCalibrationModel', 'num_gpu': 1 if device == 'cuda' else 0,
        'is_train': True, 'dist': False,
        'network_g': {'type': 'RankCalibratedIQAArch', 'hidden_dim': 128,
                      'backbone': {'type': 'CLIPQualityArch', 'load_path': clip_path}},
        'feature_cache': {'enabled': cache, 'backend': backend, 'lmdb_path': os.path.join(models_dir, 'cache.lmdb')},
        'path': {'models': models_dir, 'pretrain_network_g': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-4}, 'scheduler': {'type': 'MultiStepLR', 'milestones': [10**6],
                                                                         'gamma': 0.5},
                  'fidelity_opt': {'type': 'FidelityLoss'}, 'lambda2': 1.0},
    }


def _run_epoch(model, loader, epoch):
    random.seed(0)  # the same groups in every epoch and for both models: after epoch 0 all inputs are cached

    def one_epoch():
        for batch in loader:
            model.feed_data(batch)
            model.optimize_parameters(epoch)
    return time_call(one_epoch, model.device)


def bench_feature_cache(epochs=4, methods=4, images=8, group_size=4, batch_size=4, backend='memory', device='cpu',
                        work_dir=None, log=print):
    """Epoch time of RankCalibrationModel with and without the backbone feature cache.

    Returns:
        dict: ``uncached`` (median epoch seconds after the first), ``cached_first`` (the epoch that fills the
        cache), ``cached`` (median of the epochs with no backbone pass), ``speedup`` (uncached / cached),
        backbone passes of each.
    """
    from dspo_basicsr.archs.clip_quality_arch import CLIPQualityArch
    from dspo_basicsr.data.sr_method_group_dataset import SRMethodGroupDataset
    from dspo_basicsr.demo.biqa import TRUE_SCORES, make_biqa_demo_data
    from dspo_basicsr.models.rank_calibration_model import RankCalibrationModel

    work_dir = work_dir or tempfile.mkdtemp(prefix='bench_calibration_')
    paths = make_biqa_demo_data(os.path.join(work_dir, 'data'), num_images=images, size=96, num_mos=images,
                                num_val_pairs=2, bootstrap_samples=20)
    clip_path = os.path.join(work_dir, 'vit_b32_random.pth')
    torch.manual_seed(0)
    torch.save(CLIPQualityArch(**VIT_B32_CONFIG).clip.state_dict(), clip_path)
    dataset = SRMethodGroupDataset({
        'name': 'bench', 'phase': 'train', 'dataroot': paths['sr'], 'ranking_json': paths['ranking'],
        'methods': list(TRUE_SCORES)[:methods], 'group_size': group_size,
        'mos': {'meta_file': paths['mos'], 'dataroot': os.path.dirname(paths['mos'])}})
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=dataset.collate_fn)
    results = {'images_per_epoch': len(dataset) * (2 * group_size + 2), 'iterations_per_epoch': len(loader)}
    for cache in (False, True):
        models_dir = os.path.join(work_dir, 'cached' if cache else 'uncached')
        os.makedirs(models_dir, exist_ok=True)
        model = RankCalibrationModel(_model_options(paths, models_dir, clip_path, cache, backend, device))
        times, passes = [], []
        for epoch in range(epochs):
            before = model.backbone_passes
            times.append(_run_epoch(model, loader, epoch))
            passes.append(model.backbone_passes - before)
        label = 'cached' if cache else 'uncached'
        log(f'  {label:>8}: epoch seconds {", ".join(f"{t:.3f}" for t in times)}; '
            f'backbone passes per epoch {passes}')
        # medians: the machine may be shared, and the first epoch carries one-time start-up costs
        if cache:
            steady = [t for t, p in zip(times, passes) if p == 0]
            results.update(cached_first=times[0], cached=float(np.median(steady)), cached_passes=model.backbone_passes)
            model.feature_cache.close()
        else:
            results.update(uncached=float(np.median(times[1:] or times)), uncached_passes=model.backbone_passes)
    results['speedup'] = results['uncached'] / results['cached']
    return results


def bench_mad_reuse(methods=5, images=8, size=96, k=3, device='cpu', work_dir=None):
    """MAD selection with D1 features reused across pairs vs recomputed per pair (VGG16-sized backbones).

    Returns:
        dict: per mode (``reuse``, ``per_pair``): backbone passes (``d1``, ``d2``) and seconds; ``speedup``.
    """
    import cv2
    import torch.nn.functional as F

    from dspo_basicsr.ranking.mad import FeatureDistance, VGGStructureTextureNet, mad_select, structure_texture_distance

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = VGGStructureTextureNet().to(device)     # DISTS-sized D1 backbone, random weights
    semantic = VGGStructureTextureNet().to(device)
    scenes = [rng.random((size, size, 3)).astype(np.float32) for _ in range(images)]
    method_names = [f'method{i}' for i in range(methods)]
    outputs = {(m, f'im{j}'): torch.from_numpy(cv2.GaussianBlur(s, (0, 0), 0.3 + 0.4 * i)).permute(2, 0, 1)[None]
               for i, m in enumerate(method_names) for j, s in enumerate(scenes)}
    lr = {f'im{j}': F.interpolate(torch.from_numpy(s).permute(2, 0, 1)[None], scale_factor=0.25, mode='area')
          for j, s in enumerate(scenes)}
    results = {}
    for mode, reuse in (('reuse', True), ('per_pair', False)):
        d1 = FeatureDistance(lambda x: net(x.to(device)), structure_texture_distance, 'DISTS-like')
        d2 = FeatureDistance(lambda x: F.normalize(semantic(x.to(device))[-1].mean([2, 3]), dim=1)[0],
                             lambda a, b: 1 - torch.dot(a, b).item(), 'VGG16')
        result = mad_select(list(lr), method_names, lambda m, name: outputs[(m, name)], lambda name: lr[name], d1, d2,
                            k=k, reuse_features=reuse, progress=False)
        results[mode] = {'d1': result.passes['d1'], 'd2': result.passes['d2'], 'seconds': result.seconds,
                         'selections': result.selections}
    results['same_selection'] = results['reuse'].pop('selections') == results['per_pair'].pop('selections')
    results['speedup'] = results['per_pair']['seconds'] / results['reuse']['seconds']
    return results
