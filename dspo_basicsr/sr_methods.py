"""SR outputs of several methods on the same LR images, for SR-IQA studies (``scripts/run_sr_methods.py``).

"Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment" needs the outputs
of many SR methods on the same LR images, in the layout that ``SRMethodGroupDataset`` and
``scripts/mad_select.py`` read::

    OUT/<method>/<image>.png

Each entry of the methods YAML is either

* a BasicSR network: ``network_g`` (any registered arch: RRDBNet for Real-ESRGAN / BSRGAN weights, SwinIR,
  MSRResNet, EDSR, ...), ``path`` to a BasicSR-style checkpoint and ``param_key`` (``params_ema`` /
  ``params``). It is built and loaded by BasicSR's own ``SRModel`` (``build_network`` and
  ``load_network``: the ``params_ema`` -> ``params`` fallback, the ``module.`` prefix, strict key check);
  ``tile`` / ``tile_pad`` split large images, ``pad_to`` pads to a multiple (SwinIR's window size); or
* one of our diffusion frameworks: ``framework`` (``{network: ..., pretrain_network: ..., param_key: ...}``
  as in the preference-data chain) with ``sampling`` (``steps``, ``guidance_scale``, ``seed``, ``prompt``,
  ``negative_prompt``).

Outputs are written to a temporary name and renamed, so an interrupted run never leaves a partial PNG;
rerunning skips every output already there (resume).
"""
import copy
import os
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from tqdm import tqdm

from dspo_basicsr.utils.checkpoint import read_checkpoint
from dspo_basicsr.utils.distributed import DataShard
from dspo_basicsr.utils.options import plain_options, read_option_file

__all__ = ['IMAGE_EXTENSIONS', 'SRMethodsReport', 'load_methods_file', 'check_method_entries', 'MultiSourceFramework',
           'list_lr_images', 'tiled_forward', 'build_method', 'run_sr_methods']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')
NETWORK_KEYS = {'network_g', 'path', 'param_key', 'strict_load', 'scale', 'tile', 'tile_pad', 'pad_to'}
FRAMEWORK_KEYS = {'framework', 'sampling', 'scale'}


@dataclass
class SRMethodsReport:
    """What a run did: per method, the images written and those already there (skipped)."""
    out_dir: str
    written: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def summary(self):
        lines = [f'{method}: {self.written[method]} written, {self.skipped[method]} already there'
                 for method in self.written]
        return '\n'.join(lines + [f'outputs in {self.out_dir}/<method>/<image>.png'])


def load_methods_file(path):
    """Read the methods YAML: ``methods: {name: entry, ...}`` (order kept), every entry checked.

    Raises:
        OptionFileError: The file is missing, not YAML, or not a mapping (the one option reader's checks).
        ValueError: Naming every bad entry at once (unknown keys, neither ``network_g`` nor ``framework``,
            missing checkpoint files).
    """
    content = plain_options(read_option_file(path, require=()))
    methods = content.get('methods')
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"methods file {path!r} needs a 'methods' mapping: name -> {{network_g, path, param_key}} "
                         'or name -> {framework, sampling}.')
    return check_method_entries(methods, f'methods file {path!r}')


def check_method_entries(methods, where):
    """Check ``{name: entry}`` of a methods YAML (or a chain's ``sources``); one error naming every bad entry.

    Returns:
        dict: ``{name (str): entry (dict)}`` in the given order.
    """
    problems = []
    for name, entry in methods.items():
        entry = entry or {}
        if os.sep in str(name) or str(name) in ('', '.', '..'):
            problems.append(f'{name!r}: a method name is a folder name; it cannot hold {os.sep!r}')
        elif 'network_g' in entry and 'framework' not in entry:
            unknown = sorted(set(entry) - NETWORK_KEYS)
            if unknown:
                problems.append(f'{name}: unknown key(s) {unknown}; known: {sorted(NETWORK_KEYS)}')
            if not entry.get('path'):
                problems.append(f'{name}: no checkpoint path (path: ...)')
            elif not os.path.isfile(entry['path']):
                problems.append(f"{name}: checkpoint {entry['path']!r} does not exist")
        elif 'framework' in entry and 'network_g' not in entry:
            unknown = sorted(set(entry) - FRAMEWORK_KEYS)
            if unknown:
                problems.append(f'{name}: unknown key(s) {unknown}; known: {sorted(FRAMEWORK_KEYS)}')
            weights = (entry['framework'] or {}).get('pretrain_network')
            if weights and not os.path.isfile(weights):
                problems.append(f'{name}: framework.pretrain_network {weights!r} does not exist')
        else:
            problems.append(f'{name}: give either network_g (+ path, param_key) or framework (+ sampling)')
    if problems:
        shown = problems[:8] + ([f'... and {len(problems) - 8} more'] if len(problems) > 8 else [])
        raise ValueError(f'{where}:\n  ' + '\n  '.join(shown))
    return {str(name): dict(entry or {}) for name, entry in methods.items()}


class MultiSourceFramework:
    """Candidates from several models: a framework plus named sources (methods-YAML entries).

    ``sample`` is the framework's, except for a setting with ``source: <name>``, which runs that source
    instead (a BasicSR network ignores the prompt and the sampling options; a framework source uses its own).
    The preference chain's candidate step needs no change: a source is one more setting of the grid.

    Args:
        framework: The chain's diffusion framework (``sample``, ``scale``, ``default_steps``, ...).
        sources (dict): ``{name: callable (1, 3, h, w) -> (1, 3, H, W)}`` (:func:`build_method`).
    """

    def __init__(self, framework, sources):
        self.framework = framework
        self.sources = dict(sources)

    def __getattr__(self, name):          # scale, default_steps, default_guidance_scale, parameters, ...
        if name == 'framework':           # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.framework, name)

    def source_settings(self):
        """One candidate setting per source, appended after the framework's grid."""
        return [{'source': name} for name in self.sources]

    def sample(self, lq, prompt=None, negative_prompt=None, generator=None, source=None, **kwargs):
        if source is None:
            return self.framework.sample(lq, prompt, negative_prompt=negative_prompt, generator=generator, **kwargs)
        if source not in self.sources:
            raise KeyError(f'candidate source {source!r} is not in the sources section ({list(self.sources)}).')
        sr = self.sources[source](lq)
        scale = getattr(self.framework, 'scale', None)
        if scale and tuple(sr.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
            raise ValueError(f'candidate source {source!r} gives {tuple(sr.shape[-2:])} for an LQ of '
                             f'{tuple(lq.shape[-2:])}; the framework upscales x{scale}, so every source must too.')
        return sr.to(lq.device)


def list_lr_images(lr_dir):
    """``{stem: path}`` of the images in ``lr_dir``, sorted; an error when there are none or stems repeat."""
    if not os.path.isdir(lr_dir):
        raise FileNotFoundError(f'LR folder {lr_dir!r} does not exist.')
    images, repeated = {}, []
    for name in sorted(os.listdir(lr_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in images:
            repeated.append(name)
        images[stem] = os.path.join(lr_dir, name)
    if not images:
        raise ValueError(f'LR folder {lr_dir!r} holds no image ({", ".join(IMAGE_EXTENSIONS)}).')
    if repeated:
        raise ValueError(f'LR folder {lr_dir!r} has files with the same name and another extension '
                         f'({repeated[:3]}); outputs are <image>.png, so names must be unique.')
    return images


def _padded_forward(net, x, pad_to):
    """Reflect-pad (B, C, h, w) to a multiple of ``pad_to``, run, crop the output to scale * (h, w)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % pad_to, (-w) % pad_to
    if pad_h or pad_w:
        mode = 'reflect' if pad_h < h and pad_w < w else 'replicate'
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    out = net(x)
    scale = out.shape[-1] // x.shape[-1]
    return out[..., :h * scale, :w * scale]


@torch.no_grad()
def tiled_forward(net, lr, tile=0, tile_pad=16, pad_to=1):
    """Run an SR network on a large image tile by tile (Real-ESRGAN-style overlap, our own code).

    Each tile of ``tile`` x ``tile`` LR pixels is run with ``tile_pad`` extra pixels of context on every
    side (clipped at the border), and only its own region of the output is kept, so tiles do not show
    seams when ``tile_pad`` covers the network's receptive field.

    Args:
        net (nn.Module): (B, 3, h, w) -> (B, 3, s*h, s*w).
        lr (Tensor): (B, 3, h, w) in [0, 1].
        tile (int): Tile side in LR pixels; 0 runs the whole image at once.
        tile_pad (int): Context pixels around each tile.
        pad_to (int): Inputs are padded to a multiple of this (e.g. SwinIR's window size).

    Returns:
        Tensor: (B, 3, s*h, s*w).
    """
    h, w = lr.shape[-2:]
    if not tile or (h <= tile and w <= tile):
        return _padded_forward(net, lr, pad_to)
    out = None
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            in_top, in_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            in_bottom, in_right = min(bottom + tile_pad, h), min(right + tile_pad, w)
            piece = _padded_forward(net, lr[..., in_top:in_bottom, in_left:in_right], pad_to)
            scale = piece.shape[-1] // (in_right - in_left)
            if out is None:
                out = lr.new_zeros(lr.shape[0], piece.shape[1], h * scale, w * scale)
            out[..., top * scale:bottom * scale, left * scale:right * scale] = piece[
                ..., (top - in_top) * scale:(bottom - in_top) * scale,
                (left - in_left) * scale:(right - in_left) * scale]
    return out


def _build_basicsr_network(name, entry, device):
    """The network of an entry, loaded by BasicSR's SRModel (build_network + load_network)."""
    from basicsr.models.sr_model import SRModel

    # check the file first: a short error naming the keys found beats a KeyError inside BasicSR
    state = read_checkpoint(entry['path'], what=f'method {name}: checkpoint', unwrap=())
    param_key = entry.get('param_key', 'params')
    if param_key is not None and param_key not in state and 'params' not in state:
        keys = list(state)[:6]
        raise KeyError(f"method {name}: checkpoint {entry['path']!r} has no {param_key!r} (nor 'params') entry; it "
                       f'holds {keys}. Set param_key to one of its keys, or param_key: ~ for a bare state dict.')
    del state
    opt = {'model_type': 'SRModel', 'is_train': False, 'dist': False, 'num_gpu': 0 if device.type == 'cpu' else 1,
           'network_g': copy.deepcopy(entry['network_g']),
           'path': {'pretrain_network_g': entry['path'], 'param_key_g': param_key,
                    'strict_load_g': entry.get('strict_load', True)}}
    model = SRModel(opt)
    net = model.net_g.to(device).eval()
    tile, tile_pad, pad_to = int(entry.get('tile', 0)), int(entry.get('tile_pad', 16)), int(entry.get('pad_to', 1))
    return lambda lr: tiled_forward(net, lr.to(device), tile, tile_pad, pad_to).clamp(0, 1)


def _build_framework_method(entry, device):
    from dspo_basicsr.archs.diffusion_sr_base import sample_with_options
    from dspo_basicsr.preference.pipeline import build_framework

    framework = build_framework(entry['framework'], device=str(device))
    sampling = dict(entry.get('sampling') or {})

    def run(lr):
        generator = torch.Generator(device='cpu').manual_seed(int(sampling.get('seed', 0)))
        # the sampling keys of val.sample: prompt, steps, guidance and the protocol (process_size, tiling, ...)
        return sample_with_options(framework, lr.to(device), sampling, generator).clamp(0, 1)

    return run


def build_method(name, entry, device='cpu'):
    """A callable (1, 3, h, w) LR in [0, 1] -> (1, 3, H, W) SR in [0, 1] for one methods-YAML entry."""
    device = torch.device(device)
    if 'network_g' in entry:
        return _build_basicsr_network(name, entry, device)
    return _build_framework_method(entry, device)


def _read_lr(path):
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f'cannot read LR image {path!r} (not an image, or damaged).')
    img = np.ascontiguousarray(img[:, :, ::-1], dtype=np.float32) / 255.0       # BGR -> RGB
    return torch.from_numpy(img).permute(2, 0, 1)[None]                        # (H, W, 3) -> (1, 3, H, W)


def _write_png(path, sr):
    img = (sr[0].permute(1, 2, 0).float().cpu().numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
    # a hidden folder: the readers of method folders list image files only, so a leftover is never read
    partial = os.path.join(os.path.dirname(path), '.partial', os.path.basename(path))
    os.makedirs(os.path.dirname(partial), exist_ok=True)
    if not cv2.imwrite(partial, img):
        raise OSError(f'cannot write {partial!r}.')
    os.replace(partial, path)   # a killed run leaves no half-written output under the final name


def run_sr_methods(methods, lr_dir, out_dir, device='cpu', only=None, overwrite=False, progress=True, shard=None):
    """Write ``out_dir/<method>/<image>.png`` for every method and LR image, skipping outputs already there.

    Args:
        methods (dict | str): Entries by method name, or the methods YAML path.
        lr_dir (str): Folder of LR images.
        out_dir (str): Output root.
        device (str): 'cpu' or 'cuda'.
        only (list[str], optional): Run only these methods.
        overwrite (bool): Redo outputs that exist.
        progress (bool): tqdm bars (rank 0 only when sharded).
        shard (DataShard, optional): This process's share under ``--launcher pytorch|slurm``
            (:mod:`dspo_basicsr.utils.distributed`): rank r of W writes the unfinished images r, r + W, ...
            of each method, on GPU ``LOCAL_RANK``.

    Returns:
        SRMethodsReport: this process's counts.
    """
    if isinstance(methods, str):
        methods = load_methods_file(methods)
    if only:
        unknown = [m for m in only if m not in methods]
        if unknown:
            raise KeyError(f'methods {unknown} are not in the methods file; it has {list(methods)}.')
        methods = {m: methods[m] for m in only}
    shard = shard or DataShard()
    device = shard.device(device)
    progress = progress and shard.is_main
    images = list_lr_images(lr_dir)
    report = SRMethodsReport(os.path.abspath(out_dir))
    todo_of = {}
    for name in methods:
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        todo_of[name] = [stem for stem in images
                         if overwrite or not os.path.isfile(os.path.join(folder, f'{stem}.png'))]
    if shard.array:  # job-array tasks start at different times: shard all ids, skip the finished ones
        todo_of = {name: [stem for stem in shard.take(images) if stem in set(todo)] for name, todo in todo_of.items()}
    else:
        todo_of = {name: shard.take(todo) for name, todo in todo_of.items()}
        shard.barrier()  # every rank has listed before any writes
    for name, entry in methods.items():
        folder = os.path.join(out_dir, name)
        todo = todo_of[name]
        report.written[name], report.skipped[name] = 0, len(images) - len(todo)
        if not todo:
            continue
        run = build_method(name, entry, device)
        scale = entry.get('scale')
        for stem in tqdm(todo, desc=name, unit='image', disable=not progress):
            lr = _read_lr(images[stem])
            sr = run(lr)
            if scale and tuple(sr.shape[-2:]) != (lr.shape[-2] * scale, lr.shape[-1] * scale):
                raise ValueError(f'method {name}, image {stem}: output {tuple(sr.shape[-2:])} is not scale {scale} '
                                 f'x the LR {tuple(lr.shape[-2:])}; check network_g (upscale/scale) and scale.')
            _write_png(os.path.join(folder, f'{stem}.png'), sr)
            report.written[name] += 1
        del run   # one method's network in memory at a time
    shard.barrier()
    return report
