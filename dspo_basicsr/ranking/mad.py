"""MAD-competition selection of images for 2AFC tests between SR methods.

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment" picks, for every
pair of SR methods (i, j), the K test images on which the two methods differ most while the picked
images stay diverse (Wang & Simoncelli's MAd competition, greedy form):

    x_k = argmax_{x not yet selected}  D1(f_i(x), f_j(x)) + lambda * D2(x, S_k),   S_k = {x_1 .. x_{k-1}}

D1 is a perceptual distance between the two SR outputs (DISTS by default); D2(x, S) = min_{s in S}
d2(x, s) is a semantic distance of the LR input to the images already selected (1 - cosine of VGG16
features by default), 0 for the first pick.

Cost: the D1 backbone runs once per (image, method) and the features of the N outputs of an image are
reused for all N(N-1)/2 pairs; D2 features run once per image. That is O(N) backbone passes per image
instead of O(N^2) for a per-pair loop (``reuse_features=False`` keeps that loop for benchmarking).
"""
import csv
import itertools
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

__all__ = ['FeatureDistance', 'structure_texture_distance', 'VGGStructureTextureNet', 'default_perceptual_distance',
           'default_semantic_distance', 'MADResult', 'mad_select', 'list_method_images', 'write_mad_csv',
           'contact_sheet', 'write_contact_sheets', 'folder_loaders', 'run_mad_selection', 'DISTS_WEIGHTS',
           'VGG16_WEIGHTS']

DISTS_WEIGHTS = 'DISTS_weights-f5e65c96.pth'   # pyiqa's file, in $TORCH_HOME/hub/pyiqa
VGG16_WEIGHTS = 'vgg16-397923af.pth'           # torchvision's ImageNet VGG16, in $TORCH_HOME/hub/checkpoints


class FeatureDistance:
    """A distance computed from per-image features, with a count of backbone passes.

    Args:
        extractor (callable): (1, 3, H, W) RGB in [0, 1] -> features (any structure).
        distance (callable): (features_a, features_b) -> float, larger = more different.
        name (str): For logs.
    """

    def __init__(self, extractor, distance, name='distance'):
        self.extractor = extractor
        self.distance_fn = distance
        self.name = name
        self.passes = 0

    @torch.no_grad()
    def features(self, x):
        self.passes += 1
        return self.extractor(x)

    def distance(self, features_a, features_b):
        return float(self.distance_fn(features_a, features_b))


def structure_texture_distance(feats0, feats1, alpha=None, beta=None, eps=1e-6):
    """DISTS' structure/texture distance between two feature pyramids (Ding et al., TPAMI 2020).

    Args:
        feats0, feats1 (list[Tensor]): Per stage (1, C_k, h_k, w_k), same shapes.
        alpha, beta (list[Tensor], optional): Per stage (1, C_k, 1, 1) weights, summing to 1 together;
            uniform when None.

    Returns:
        float: 1 - (texture similarity + structure similarity), 0 for identical inputs.
    """
    if alpha is None:
        total = 2 * sum(f.shape[1] for f in feats0)
        alpha = [torch.full((1, f.shape[1], 1, 1), 1 / total, device=f.device) for f in feats0]
        beta = alpha
    similarity = 0.0
    for f0, f1, a, b in zip(feats0, feats1, alpha, beta):
        m0, m1 = f0.mean([2, 3], keepdim=True), f1.mean([2, 3], keepdim=True)
        texture = (2 * m0 * m1 + eps) / (m0 ** 2 + m1 ** 2 + eps)
        v0, v1 = ((f0 - m0) ** 2).mean([2, 3], keepdim=True), ((f1 - m1) ** 2).mean([2, 3], keepdim=True)
        cov = (f0 * f1).mean([2, 3], keepdim=True) - m0 * m1
        structure = (2 * cov + eps) / (v0 + v1 + eps)
        similarity = similarity + (a * texture).sum() + (b * structure).sum()
    return float(1 - similarity)


class VGGStructureTextureNet(nn.Module):
    """VGG16 feature pyramid (DISTS' stages, max-pool instead of L2 pooling) for a DISTS-like D1.

    Args:
        vgg_state (dict, optional): torchvision ``vgg16`` state dict; random weights when None (benchmarks).
    """

    def __init__(self, vgg_state=None):
        super().__init__()
        from torchvision.models import vgg16
        vgg = vgg16()
        if vgg_state is not None:
            vgg.load_state_dict(vgg_state)
        layers = vgg.features
        self.stages = nn.ModuleList([layers[0:4], layers[4:9], layers[9:16], layers[16:23], layers[23:30]])
        self.register_buffer('mean', torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def forward(self, x):
        """(1, 3, H, W) -> [x, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]."""
        feats, h = [x], (x - self.mean) / self.std
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats


def _weights_file(store, name):
    folder = os.path.join(torch.hub.get_dir(), store)
    return os.path.join(folder, name)


def _require(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what}: expected the weight file {path!r}, which does not exist. Nothing is '
                                'downloaded at run time: copy the file there (TORCH_HOME sets the root), or pass '
                                'your own distance.')


def default_perceptual_distance(device='cpu'):
    """D1 = DISTS (pyiqa's weights) between two SR outputs. Needs both weight files locally."""
    dists_path = _weights_file('pyiqa', DISTS_WEIGHTS)
    vgg_path = _weights_file('checkpoints', VGG16_WEIGHTS)
    _require(vgg_path, 'DISTS (D1) backbone, torchvision VGG16')
    _require(dists_path, 'DISTS (D1) weights')
    from pyiqa.archs.dists_arch import DISTS

    from dspo_basicsr.archs.clip_quality_arch import read_state_dict
    net = DISTS(pretrained=False)  # VGG16 from the local torchvision file; alpha/beta loaded below
    state = read_state_dict(dists_path, 'DISTS (D1) weights')
    if 'alpha' not in state or 'beta' not in state:
        raise KeyError(f'{dists_path!r} holds no DISTS alpha/beta weights (keys: {list(state)[:6]}).')
    net.load_state_dict(state, strict=False)
    net = net.to(device).eval()
    w_sum = net.alpha.sum() + net.beta.sum()
    alpha = torch.split(net.alpha / w_sum, net.chns, dim=1)
    beta = torch.split(net.beta / w_sum, net.chns, dim=1)
    return FeatureDistance(lambda x: net.forward_once(x.to(device)),
                           lambda f0, f1: structure_texture_distance(f0, f1, alpha, beta), name='DISTS')


def default_semantic_distance(device='cpu'):
    """D2 = 1 - cosine of globally pooled VGG16 relu5_3 features of the LR inputs (torchvision weights)."""
    vgg_path = _weights_file('checkpoints', VGG16_WEIGHTS)
    _require(vgg_path, 'semantic distance (D2), torchvision VGG16')
    net = VGGStructureTextureNet(torch.load(vgg_path, map_location='cpu', weights_only=True)).to(device)
    return FeatureDistance(lambda x: F.normalize(net(x.to(device))[-1].mean([2, 3]), dim=1)[0],
                           lambda a, b: 1 - torch.dot(a, b).item(), name='VGG16')


@dataclass
class MADResult:
    """Selected images per method pair.

    Attributes:
        methods (list[str]): N method names.
        images (list[str]): M image names.
        d1 (np.ndarray): (M, N, N) perceptual distance between the outputs of methods i and j on each image.
        selections (dict): ``(i, j) -> list of (image index, d1, d2 term)`` in selection order.
        passes (dict): Backbone passes: ``d1`` and ``d2``.
        seconds (float): Wall time of feature extraction and selection.
    """
    methods: list
    images: list
    d1: np.ndarray
    selections: dict = field(default_factory=dict)
    passes: dict = field(default_factory=dict)
    seconds: float = 0.0


def _greedy(d1_values, d2_matrix, k, lam):
    """Greedy MAD pick: d1_values (M,), d2_matrix (M, M) pairwise semantic distances."""
    selected, picked = [], []
    diversity = np.zeros(len(d1_values))            # D2(x, S): 0 while S is empty
    available = np.ones(len(d1_values), dtype=bool)
    for _ in range(min(k, len(d1_values))):
        score = np.where(available, d1_values + lam * diversity, -np.inf)
        best = int(np.argmax(score))
        selected.append(best)
        picked.append((best, float(d1_values[best]), float(diversity[best])))
        available[best] = False
        new = d2_matrix[best]
        diversity = new if len(selected) == 1 else np.minimum(diversity, new)
    return picked


def mad_select(images, methods, load_sr, load_lr, d1, d2, k=5, lam=1.0, reuse_features=True, progress=True):
    """MAD-competition selection for every method pair.

    Args:
        images (list[str]): M image names.
        methods (list[str]): N method names.
        load_sr (callable): (method, image) -> (1, 3, H, W) RGB in [0, 1], the SR output.
        load_lr (callable): image -> (1, 3, h, w) RGB in [0, 1], the LR input.
        d1 (FeatureDistance): Perceptual distance between SR outputs.
        d2 (FeatureDistance): Semantic distance between LR inputs.
        k (int): Images selected per pair.
        lam (float): Weight of the diversity term D2.
        reuse_features (bool): Compute D1 features once per (image, method) and reuse them across pairs
            (O(N) passes per image). False recomputes them for every pair (O(N^2); for benchmarks).
        progress (bool): Show a tqdm bar.

    Returns:
        MADResult
    """
    if len(methods) < 2:
        raise ValueError(f'MAD selection needs at least two methods, got {methods}.')
    start = time.perf_counter()
    passes_before = (d1.passes, d2.passes)
    pairs = list(itertools.combinations(range(len(methods)), 2))
    n_img = len(images)
    d1_values = np.zeros((n_img, len(methods), len(methods)))
    for m, name in enumerate(tqdm(images, desc='MAD features', unit='image', disable=not progress)):
        if reuse_features:
            feats = [d1.features(load_sr(method, name)) for method in methods]   # N passes for this image
            for i, j in pairs:
                d1_values[m, i, j] = d1_values[m, j, i] = d1.distance(feats[i], feats[j])
        else:
            for i, j in pairs:                                                # 2 passes for every pair
                value = d1.distance(d1.features(load_sr(methods[i], name)), d1.features(load_sr(methods[j], name)))
                d1_values[m, i, j] = d1_values[m, j, i] = value

    def semantic_matrix():
        feats = [d2.features(load_lr(name)) for name in images]
        return np.array([[d2.distance(a, b) for b in feats] for a in feats])   # (M, M)

    shared = semantic_matrix() if reuse_features else None
    selections = {}
    for i, j in pairs:
        matrix = shared if reuse_features else semantic_matrix()
        selections[(i, j)] = _greedy(d1_values[:, i, j], matrix, k, lam)
    return MADResult(methods=list(methods), images=list(images), d1=d1_values, selections=selections,
                     passes={'d1': d1.passes - passes_before[0], 'd2': d2.passes - passes_before[1]},
                     seconds=time.perf_counter() - start)


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def list_method_images(sr_root, methods=None, lr_root=None):
    """Image names present for every method (and in ``lr_root`` when given).

    Returns:
        tuple: (methods, images, files) where ``files[method][image]`` and ``files[None][image]`` (LR) are paths.
    """
    methods = methods or sorted(d for d in os.listdir(sr_root) if os.path.isdir(os.path.join(sr_root, d)))
    files, common = {}, None
    roots = [(m, os.path.join(sr_root, m)) for m in methods] + ([(None, lr_root)] if lr_root else [])
    for key, folder in roots:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'MAD selection: folder {folder!r} does not exist.')
        names = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in os.listdir(folder)
                 if f.lower().endswith(IMAGE_EXTENSIONS)}
        files[key] = names
        common = set(names) if common is None else common & set(names)
    if not common:
        raise ValueError(f'MAD selection: no image name is shared by all method folders under {sr_root!r}'
                         f'{" and " + repr(lr_root) if lr_root else ""}.')
    return list(methods), sorted(common), files


def write_mad_csv(result, path, files=None):
    """One row per selected (pair, image), ready for a 2AFC test.

    Columns: ``pair, group, rank, image, method_a, method_b, image_a, image_b, d1, d2`` (``group`` is the
    method pair; ``image_a``/``image_b`` are the SR files when ``files`` is given).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['pair', 'group', 'rank', 'image', 'method_a', 'method_b', 'image_a', 'image_b', 'd1', 'd2'])
        for (i, j), picks in result.selections.items():
            a, b = result.methods[i], result.methods[j]
            for rank, (m, d1_value, d2_value) in enumerate(picks):
                name = result.images[m]
                paths = (files[a][name], files[b][name]) if files else ('', '')
                writer.writerow([f'{a}_vs_{b}_{rank:02d}', f'{a}_vs_{b}', rank, name, a, b, *paths,
                                 f'{d1_value:.6f}', f'{d2_value:.6f}'])


def _to_uint8(x):
    return (x[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()[..., ::-1] * 255).round().astype(np.uint8)


def contact_sheet(rows, labels=('LR', 'A', 'B')):
    """Stack rows of (LR, SR_a, SR_b) images into one BGR uint8 sheet; the LR is upscaled (nearest) to SR size.

    Args:
        rows (list[tuple[Tensor]]): Per selected image, three (1, 3, H, W) tensors in [0, 1].

    Returns:
        np.ndarray: (rows * (H + 16), 3 * W, 3) BGR uint8.
    """
    lines = []
    for lr, sr_a, sr_b in rows:
        h, w = sr_a.shape[-2:]
        lr = F.interpolate(lr, size=(h, w), mode='nearest')
        tiles = []
        for tile, label in zip((lr, sr_a, sr_b[..., :h, :w]), labels):
            img = np.ascontiguousarray(_to_uint8(tile))
            header = np.full((16, img.shape[1], 3), 255, np.uint8)
            cv2.putText(header, label[:max(1, img.shape[1] // 7)], (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                        (0, 0, 0), 1)
            tiles.append(np.concatenate([header, img], axis=0))
        lines.append(np.concatenate(tiles, axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)


def write_contact_sheets(result, load_sr, load_lr, out_dir):
    """One PNG per method pair (``<a>_vs_<b>.png``): its selected images, LR | method a | method b per row."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (i, j), picks in result.selections.items():
        a, b = result.methods[i], result.methods[j]
        rows = [(load_lr(result.images[m]), load_sr(a, result.images[m]), load_sr(b, result.images[m]))
                for m, _, _ in picks]
        path = os.path.join(out_dir, f'{a}_vs_{b}.png')
        cv2.imwrite(path, contact_sheet(rows, labels=('LR', a, b)))
        written.append(path)
    return written


def folder_loaders(files, crop_size=None):
    """``(load_sr, load_lr)`` reading the files found by :func:`list_method_images` as (1, 3, H, W) tensors."""
    from dspo_basicsr.data.iqa_list_dataset import read_rgb

    def load_sr(method, image):
        return read_rgb(files[method][image], crop_size)[None]

    def load_lr(image):
        return read_rgb(files[None][image])[None]

    return load_sr, load_lr


def run_mad_selection(sr_root, lr_root, out_dir, k=5, lam=1.0, methods=None, d1=None, d2=None, device='cpu',
                      reuse_features=True):
    """Select MAD pairs from folders and write ``mad_pairs.csv`` plus one contact sheet per pair.

    Args:
        sr_root (str): ``sr_root/<method>/<image>.png``.
        lr_root (str): ``lr_root/<image>.png``, the LR inputs (for D2 and the sheets).
        out_dir (str): Output folder.
        d1, d2 (FeatureDistance, optional): Defaults: DISTS and VGG16 features from local weights.

    Returns:
        MADResult
    """
    methods, images, files = list_method_images(sr_root, methods, lr_root)
    d1 = d1 or default_perceptual_distance(device)
    d2 = d2 or default_semantic_distance(device)
    load_sr, load_lr = folder_loaders(files)
    result = mad_select(images, methods, load_sr, load_lr, d1, d2, k=k, lam=lam, reuse_features=reuse_features)
    write_mad_csv(result, os.path.join(out_dir, 'mad_pairs.csv'), files)
    write_contact_sheets(result, load_sr, load_lr, os.path.join(out_dir, 'contact_sheets'))
    return result
