"""Helpers of the preference-data chain tests: generated images, a fake framework, the chain YAML."""
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml

SCALE = 4


def make_image_folders(root, num=3, size=32, scale=SCALE, seed=0):
    """``root/gt`` and ``root/lq`` with ``num`` generated images (shapes on gradients), LQ = area-downscaled GT.

    Returns:
        tuple[str, str]: The LQ and GT folders.
    """
    rng = np.random.default_rng(seed)
    lq_dir, gt_dir = os.path.join(root, 'lq'), os.path.join(root, 'gt')
    os.makedirs(lq_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(num):
        gt = np.stack([yy * 200, xx * 200, (1 - yy) * 150], axis=-1).astype(np.uint8)
        for _ in range(3):
            centre = tuple(int(v) for v in rng.integers(4, size - 4, size=2))
            colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
            cv2.circle(gt, centre, int(rng.integers(3, size // 3)), colour, -1)
        lq = cv2.resize(gt, (size // scale, size // scale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(gt_dir, f'img{i}.png'), gt[..., ::-1])
        cv2.imwrite(os.path.join(lq_dir, f'img{i}.png'), lq[..., ::-1])
    return lq_dir, gt_dir


class FakeFramework:
    """The ``sample`` interface of the framework archs: bicubic upscaling plus seeded noise scaled by 1/guidance_scale.

    Counts its calls; raises KeyboardInterrupt at call ``interrupt_at`` (1-based) to simulate Ctrl-C.
    """

    scale = SCALE
    default_steps = 2
    default_guidance_scale = 2.0

    def __init__(self, interrupt_at=None):
        self.calls = []
        self.interrupt_at = interrupt_at

    def sample(self, lq, prompt, negative_prompt=None, steps=None, guidance_scale=None, generator=None):
        self.calls.append({'shape': tuple(lq.shape), 'prompt': prompt, 'negative_prompt': negative_prompt,
                           'steps': steps, 'guidance_scale': guidance_scale})
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        sr = F.interpolate(lq, scale_factor=self.scale, mode='bicubic', align_corners=False)
        noise = torch.randn(sr.shape, generator=generator)
        return (sr + noise * 0.2 / (guidance_scale or 1.0)).clamp(0, 1)


def make_segmented_work(root, num, n_segments, min_area):
    """A work folder after the candidate (FakeFramework, 3 kept of 3 settings) and SLIC segment steps."""
    from dspo_basicsr.preference.candidates import expand_settings_grid
    from dspo_basicsr.preference.pipeline import WorkFolder, discover_inputs, run_candidate_step, run_segment_step
    from dspo_basicsr.preference.segmentation import SLICSegmenter

    lq_dir, gt_dir = make_image_folders(os.path.join(str(root), 'data'), num=num, size=32)
    work = WorkFolder(os.path.join(str(root), 'work'))
    run_candidate_step(work, discover_inputs(lq_dir, gt_dir), FakeFramework(),
                       expand_settings_grid({'guidance_scale': [1.0, 4.0]},
                                            {'steps': 2, 'guidance_scale': 0.5, 'seed': 0}),
                       num_keep=3,
                       metrics={'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}, progress=False)
    run_segment_step(work, SLICSegmenter(n_segments=n_segments), min_area=min_area, progress=False)
    return work


def tiny_control_sd2_network(scale=SCALE):
    """``network_g``-style option of the real ControlSD2Arch with tiny random components."""
    return {'type': 'TinyControlSD2Arch', 'scale': scale}


def write_chain_yaml(path, network=None, segmenter=None, feedback=None):
    """The chain option file the scripts read (yaml.safe_load)."""
    opt = {
        'framework': {'network': network or tiny_control_sd2_network()},
        'sampling': {'default': {'steps': 2, 'guidance_scale': 2.0, 'seed': 0},
                     'grid': {'guidance_scale': [1.0, 3.0], 'seed': [1]}, 'num_keep': 2, 'prompt': 'a photo',
                     'negative_prompt': 'blurry'},
        'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
                    'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': True}},
        'segmenter': segmenter or {'type': 'SLIC', 'n_segments': 6},
        'segmentation': {'min_area': 16, 'uncovered': 'background', 'source': 'auto'},
        'scorer': {'type': 'metric', 'min_crop': 16,
                   'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}},
        'scoring': {'top_k': 3},
    }
    if feedback:
        opt['feedback'] = feedback
    with open(path, 'w', encoding='utf-8') as handle:
        yaml.safe_dump(opt, handle, sort_keys=False)
    return str(path)
