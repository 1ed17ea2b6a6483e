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
import contextlib
import csv
import itertools
import os
import tempfile
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dspo_basicsr.utils.checkpoint import read_checkpoint
from dspo_basicsr.utils.distributed import DataShard

__all__ = ['FeatureDistance', 'structure_texture_distance', 'VGGStructureTextureNet', 'default_perceptual_distance',
           'default_semantic_distance', 'MADResult', 'mad_select', 'list_method_images', 'write_mad_csv',
           'contact_sheet', 'write_contact_sheets', 'folder_loaders', 'run_mad_selection', 'DISTS_WEIGHTS',
           'VGG16_WEIGHTS', 'D1_CHOICES', 'D2_CHOICES', 'build_distances', 'l1_distance', 'thumbnail_distance']

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


def _check_weight_files(needed):
    """Raise one FileNotFoundError naming every missing file of ``needed`` [(what, path, flag)]."""
    missing = [(what, path, flag) for what, path, flag in needed if not os.path.isfile(path)]
    if missing:
        lines = '\n'.join(f'  - {what}: {path} (or pass {flag} PATH)' for what, path, flag in missing)
        raise FileNotFoundError(
            f'MAD selection needs weight files that are not on this machine, and nothing is downloaded at run '
            f'time:\n{lines}\nCopy them there (TORCH_HOME sets the root), pass their paths, or choose distances '
            'without weights (--d1 l1 --d2 thumbnail).')


def _require(path, what):
    _check_weight_files([(what, path, 'the weight path')])


@contextlib.contextmanager
def _torch_hub_with_vgg16(vgg_path):
    """A torch hub folder where torchvision finds ``vgg_path`` as its ImageNet VGG16 (pyiqa's DISTS builds
    ``vgg16(weights='IMAGENET1K_V1')`` itself, which reads only the hub folder)."""
    default = _weights_file('checkpoints', VGG16_WEIGHTS)
    if os.path.abspath(vgg_path) == os.path.abspath(default):
        yield
        return
    # the unset state, not get_dir()'s resolved path: set_dir(that path) would pin it and hide later TORCH_HOME
    previous = torch.hub._hub_dir
    with tempfile.TemporaryDirectory() as hub:
        os.makedirs(os.path.join(hub, 'checkpoints'))
        os.symlink(os.path.abspath(vgg_path), os.path.join(hub, 'checkpoints', VGG16_WEIGHTS))
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def default_perceptual_distance(device='cpu', dists_weights=None, vgg16_weights=None):
    """D1 = DISTS (pyiqa's weights) between two SR outputs. Needs both weight files locally.

    Args:
        dists_weights (str, optional): DISTS alpha/beta file (default ``$TORCH_HOME/hub/pyiqa/`` + DISTS_WEIGHTS).
        vgg16_weights (str, optional): torchvision VGG16 file (default ``$TORCH_HOME/hub/checkpoints/`` +
            VGG16_WEIGHTS).
    """
    dists_path = dists_weights or _weights_file('pyiqa', DISTS_WEIGHTS)
    vgg_path = vgg16_weights or _weights_file('checkpoints', VGG16_WEIGHTS)
    _check_weight_files([('DISTS (D1) backbone, torchvision VGG16', vgg_path, '--vgg16-weights'),
                         ('DISTS (D1) weights', dists_path, '--dists-weights')])
    from pyiqa.archs.dists_arch import DISTS
    with _torch_hub_with_vgg16(vgg_path):
        net = DISTS(pretrained=False)  # VGG16 from the local torchvision file; alpha/beta loaded below
    state = read_checkpoint(dists_path, 'DISTS (D1) weights')
    if 'alpha' not in state or 'beta' not in state:
        raise KeyError(f'{dists_path!r} holds no DISTS alpha/beta weights (keys: {list(state)[:6]}).')
    net.load_state_dict(state, strict=False)
    net = net.to(device).eval()
    w_sum = net.alpha.sum() + net.beta.sum()
    alpha = torch.split(net.alpha / w_sum, net.chns, dim=1)
    beta = torch.split(net.beta / w_sum, net.chns, dim=1)
    return FeatureDistance(lambda x: net.forward_once(x.to(device)),
                           lambda f0, f1: structure_texture_distance(f0, f1, alpha, beta), name='DISTS')


def default_semantic_distance(device='cpu', vgg16_weights=None):
    """D2 = 1 - cosine of globally pooled VGG16 relu5_3 features of the LR inputs (torchvision weights)."""
    vgg_path = vgg16_weights or _weights_file('checkpoints', VGG16_WEIGHTS)
    _check_weight_files([('semantic distance (D2), torchvision VGG16', vgg_path, '--vgg16-weights')])
    net = VGGStructureTextureNet(read_checkpoint(vgg_path, 'torchvision VGG16 weights', unwrap=())).to(device)
    return FeatureDistance(lambda x: F.normalize(net(x.to(device))[-1].mean([2, 3]), dim=1)[0],
                           lambda a, b: 1 - torch.dot(a, b).item(), name='VGG16')


def l1_distance():
    """D1 without weights: mean absolute difference of the two SR outputs (a baseline, and for offline runs)."""
    return FeatureDistance(lambda x: x.float(), lambda a, b: (a - b[..., :a.shape[-2], :a.shape[-1]]).abs().mean(),
                           name='L1')


def thumbnail_distance(size=8):
    """D2 without weights: 1 - cosine of centred ``size`` x ``size`` colour thumbnails of the LR inputs."""
    def features(x):
        thumb = F.adaptive_avg_pool2d(x.float(), size).flatten()
        return F.normalize(thumb - thumb.mean(), dim=0)
    return FeatureDistance(features, lambda a, b: 1 - torch.dot(a, b).item(), name='thumbnail')


D1_CHOICES = ('dists', 'vgg', 'l1')
D2_CHOICES = ('vgg', 'thumbnail')


def build_distances(d1='dists', d2='vgg', dists_weights=None, vgg16_weights=None, device='cpu'):
    """The (D1, D2) distances by name, every missing weight file of both reported in one error.

    Args:
        d1 (str | None): 'dists' (pyiqa DISTS), 'vgg' (VGG16 structure/texture, uniform weights; VGG16 file
            only) or 'l1' (no weights); None builds none (returned as None).
        d2 (str | None): 'vgg' (VGG16 features of the LR) or 'thumbnail' (no weights); None builds none.
        dists_weights, vgg16_weights (str, optional): Weight files instead of the ``$TORCH_HOME`` defaults.
    """
    if d1 not in D1_CHOICES + (None,) or d2 not in D2_CHOICES + (None,):
        raise ValueError(f'unknown distance: --d1 is one of {D1_CHOICES}, --d2 one of {D2_CHOICES}; got {d1!r}, '
                         f'{d2!r}.')
    vgg_path = vgg16_weights or _weights_file('checkpoints', VGG16_WEIGHTS)
    needed = []
    if d1 == 'dists':
        needed.append(('DISTS (D1) weights', dists_weights or _weights_file('pyiqa', DISTS_WEIGHTS),
                       '--dists-weights'))
    if d1 in ('dists', 'vgg') or d2 == 'vgg':
        needed.append(('torchvision VGG16 (D1/D2 backbone)', vgg_path, '--vgg16-weights'))
    _check_weight_files(needed)
    if d1 == 'dists':
        dist1 = default_perceptual_distance(device, dists_weights, vgg_path)
    elif d1 == 'vgg':
        net = VGGStructureTextureNet(read_checkpoint(vgg_path, 'torchvision VGG16 weights', unwrap=())).to(device)
        dist1 = FeatureDistance(lambda x: net(x.to(device)), structure_texture_distance, name='VGG16 DISTS-like')
    elif d1 == 'l1':
        dist1 = l1_distance()
    else:
        dist1 = None
    dist2 = default_semantic_distance(device, vgg_path) if d2 == 'vgg' else thumbnail_distance() if d2 else None
    return dist1, dist2


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


def mad_select(images, methods, load_sr, load_lr, d1, d2, k=5, lam=1.0, reuse_features=True, progress=True,
               shard=None):
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
        shard (DataShard, optional): Under ``--launcher pytorch|slurm`` (:mod:`dspo_basicsr.utils.distributed`)
            rank r runs the D1 backbone on images r, r + W, ... and the ranks sum their rows, so every rank
            ends with the whole table (D2, one pass per LR image, runs on every rank).

    Returns:
        MADResult
    """
    shard = shard or DataShard()
    if shard.array:
        raise ValueError('MAD selection needs the D1 table of every image in one place: run it under torchrun or one '
                         'srun step (--launcher pytorch|slurm), not as a slurm job array.')
    if len(methods) < 2:
        raise ValueError(f'MAD selection needs at least two methods, got {methods}.')
    start = time.perf_counter()
    passes_before = (d1.passes, d2.passes)
    pairs = list(itertools.combinations(range(len(methods)), 2))
    n_img = len(images)
    d1_values = np.zeros((n_img, len(methods), len(methods)))
    mine = shard.take(range(n_img))
    for m in tqdm(mine, desc='MAD features', unit='image', disable=not progress or not shard.is_main):
        name = images[m]
        if reuse_features:
            feats = [d1.features(load_sr(method, name)) for method in methods]   # N passes for this image
            for i, j in pairs:
                d1_values[m, i, j] = d1_values[m, j, i] = d1.distance(feats[i], feats[j])
        else:
            for i, j in pairs:                                                # 2 passes for every pair
                value = d1.distance(d1.features(load_sr(methods[i], name)), d1.features(load_sr(methods[j], name)))
                d1_values[m, i, j] = d1_values[m, j, i] = value
    if shard.distributed:   # each rank filled its own rows: the sum is the whole table
        import torch.distributed as dist
        table = torch.from_numpy(d1_values)
        dist.all_reduce(table)
        d1_values = table.numpy()

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


def _text_strip(text, width, height=16):
    strip = np.full((height, width, 3), 255, np.uint8)
    cv2.putText(strip, text[:max(1, width // 7)], (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    return strip


def contact_sheet(rows, labels=('LR', 'A', 'B'), captions=None):
    """Stack rows of (LR, SR_a, SR_b) images into one BGR uint8 sheet; the LR is upscaled (nearest) to SR size.

    Args:
        rows (list[tuple[Tensor]]): Per selected image, three (1, 3, H, W) tensors in [0, 1].
        labels (tuple[str]): The three column labels, above every tile.
        captions (list[str], optional): One line per row above it (e.g. the image name and its D1 / D2).

    Returns:
        np.ndarray: (rows * (H + 16 [+ 16 with captions]), 3 * W, 3) BGR uint8.
    """
    lines = []
    for r, (lr, sr_a, sr_b) in enumerate(rows):
        h, w = sr_a.shape[-2:]
        lr = F.interpolate(lr, size=(h, w), mode='nearest')
        tiles = []
        for tile, label in zip((lr, sr_a, sr_b[..., :h, :w]), labels):
            img = np.ascontiguousarray(_to_uint8(tile))
            tiles.append(np.concatenate([_text_strip(label, img.shape[1]), img], axis=0))
        line = np.concatenate(tiles, axis=1)
        if captions is not None:
            line = np.concatenate([_text_strip(captions[r], line.shape[1]), line], axis=0)
        lines.append(line)
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)


def write_contact_sheets(result, load_sr, load_lr, out_dir):
    """One PNG per method pair (``<a>_vs_<b>.png``): its selected images, LR | method a | method b per row,
    each row captioned with the image name and its D1 and D2 terms."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for (i, j), picks in result.selections.items():
        a, b = result.methods[i], result.methods[j]
        rows = [(load_lr(result.images[m]), load_sr(a, result.images[m]), load_sr(b, result.images[m]))
                for m, _, _ in picks]
        captions = [f'{result.images[m]}  D1 {d1:.3f}  D2 {d2:.3f}' for m, d1, d2 in picks]
        path = os.path.join(out_dir, f'{a}_vs_{b}.png')
        cv2.imwrite(path, contact_sheet(rows, labels=('LR', a, b), captions=captions))
        written.append(path)
    return written


def folder_loaders(files, crop_size=None):
    """``(load_sr, load_lr)`` reading the files found by :func:`list_method_images` as (1, 3, H, W) tensors."""
    from dspo_basicsr.utils.image_io import read_rgb

    def load_sr(method, image):
        return read_rgb(files[method][image], crop_size)[None]

    def load_lr(image):
        return read_rgb(files[None][image])[None]

    return load_sr, load_lr


def run_mad_selection(sr_root, lr_root, out_dir, k=5, lam=1.0, methods=None, d1=None, d2=None, device='cpu',
                      reuse_features=True, dists_weights=None, vgg16_weights=None, shard=None):
    """Select MAD pairs from folders and write ``mad_pairs.csv`` plus one contact sheet per pair.

    Args:
        sr_root (str): ``sr_root/<method>/<image>.png``.
        lr_root (str): ``lr_root/<image>.png``, the LR inputs (for D2 and the sheets).
        out_dir (str): Output folder.
        d1, d2 (FeatureDistance | str, optional): Distances, or their names for :func:`build_distances`
            (default 'dists' and 'vgg', from local weights).
        dists_weights, vgg16_weights (str, optional): Weight files for named distances.
        shard (DataShard, optional): Split the D1 feature pass over the ranks (see :func:`mad_select`); rank 0
            writes the outputs.

    Returns:
        MADResult
    """
    shard = shard or DataShard()
    device = shard.device(device)
    methods, images, files = list_method_images(sr_root, methods, lr_root)
    built = build_distances(None if isinstance(d1, FeatureDistance) else d1 or 'dists',
                            None if isinstance(d2, FeatureDistance) else d2 or 'vgg',
                            dists_weights, vgg16_weights, device)
    d1, d2 = built[0] or d1, built[1] or d2
    load_sr, load_lr = folder_loaders(files)
    result = mad_select(images, methods, load_sr, load_lr, d1, d2, k=k, lam=lam, reuse_features=reuse_features,
                        shard=shard)
    if shard.is_main:
        write_mad_csv(result, os.path.join(out_dir, 'mad_pairs.csv'), files)
        write_contact_sheets(result, load_sr, load_lr, os.path.join(out_dir, 'contact_sheets'))
    shard.barrier()
    return result
