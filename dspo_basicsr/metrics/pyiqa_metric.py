"""pyiqa (IQA-PyTorch) metrics as BasicSR validation metrics.

Chaofeng Chen and Jiadi Mo, "IQA-PyTorch: PyTorch Toolbox for Image Quality Assessment",
https://github.com/chaofengc/IQA-PyTorch (pyiqa 0.1.16). The facts of each metric (direction, range,
weight files) are in :mod:`dspo_basicsr.metrics.metric_table`.

BasicSR calls a metric as ``METRIC_REGISTRY.get(type)(img=sr, img2=gt, **opts)`` with BGR uint8 HWC
images (``SRModel.nondist_validation``; ``img2`` is absent when the validation set has no ground truth).
The functions here convert them to RGB float tensors (1, 3, H, W) in [0, 1], honour ``crop_border``,
build one pyiqa metric object per (name, device, options) and keep it for the whole run.

Nothing downloads. Before a pyiqa metric is built, the weight files it reads are checked against the
table and every absent one is named with the folder it has to be in; while it is built, any download
that pyiqa, torchvision, timm or pyiqa's CLIP code would start raises the same error instead (the guard
is installed for the duration of that one call only, nothing is patched globally).

Example (``val.metrics`` block of a BasicSR option file)::

    metrics:
      psnr: {type: calculate_psnr, crop_border: 4, test_y_channel: true}
      lpips: {type: calculate_lpips, better: lower}
      musiq: {type: calculate_musiq}
      topiq: {type: calculate_pyiqa, metric: topiq_nr}
"""
import contextlib
import difflib
import os
import threading
from typing import Optional, Union

import numpy as np
import torch

from dspo_basicsr.metrics.metric_table import (
    HUGGINGFACE_URL,
    MissingWeightsError,
    WeightFile,
    missing_pyiqa_weights,
    pyiqa_weights_dir,
    required_weight_files,
)

from basicsr.utils.registry import METRIC_REGISTRY

__all__ = [
    'MissingWeightsError', 'calculate_pyiqa', 'calculate_lpips', 'calculate_dists', 'calculate_musiq',
    'calculate_maniqa', 'calculate_clipiqa', 'calculate_pyiqa_niqe', 'get_pyiqa_metric', 'clear_pyiqa_cache',
    'check_metric_weights',
    'to_pyiqa_tensor'
]

# Option keys BasicSR itself reads from a metric block; they are not options of the pyiqa metric.
_BASICSR_KEYS = ('better', )

_METRICS = {}  # (pyiqa name, device, frozen options) -> pyiqa InferenceModel
_BUILD_LOCK = threading.Lock()  # the download guard swaps module attributes: one build at a time


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _freeze(value):
    """A hashable, order-independent key for an options value."""
    if isinstance(value, dict):
        return tuple(sorted((str(key), _freeze(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _refusal(metric: str, url: str, destination: str) -> MissingWeightsError:
    return MissingWeightsError(
        metric, [f'{os.path.basename(destination)} -> put it in {os.path.dirname(os.path.abspath(destination))} '
                 f'(from {url})'])


@contextlib.contextmanager
def refuse_downloads(metric: str):
    """While building ``metric``: every download pyiqa and the libraries it uses would start raises
    :class:`MissingWeightsError` naming the file and its folder, at once, without any network access.

    Covered: pyiqa's ``load_file_from_url`` (``$TORCH_HOME/hub/pyiqa``), torchvision / ``torch.hub``
    checkpoints (``$TORCH_HOME/hub/checkpoints``), pyiqa's CLIP loader (``$TORCH_HOME/hub/clip``) and
    timm's Hugging Face downloads (local cache only). pyiqa fixes its cache folder when it is imported;
    within the guard it is the one ``$TORCH_HOME`` gives now, the folder the precheck looked in.
    Everything is restored on exit.

    Args:
        metric (str): The pyiqa metric name, for the message.
    """
    import torch.hub
    from pyiqa.archs import clip_model
    from pyiqa.utils import download_util

    def refuse(url, dst, *args, **kwargs):
        raise _refusal(metric, url, dst)

    original_clip_download = clip_model._download

    def clip_download_if_present(url, root):
        target = os.path.join(root, os.path.basename(url))
        if not os.path.isfile(target):
            raise _refusal(metric, url, target)
        return original_clip_download(url, root)

    saved = [(download_util, 'download_url_to_file', download_util.download_url_to_file),
             (download_util, 'DEFAULT_CACHE_DIR', download_util.DEFAULT_CACHE_DIR),
             (torch.hub, 'download_url_to_file', torch.hub.download_url_to_file),
             (clip_model, '_download', original_clip_download)]
    replacements = [refuse, pyiqa_weights_dir(), refuse, clip_download_if_present]
    try:
        from timm.models import _hub as timm_hub
    except ImportError:
        timm_hub = None
    if timm_hub is not None and getattr(timm_hub, 'hf_hub_download', None) is not None:
        original_hf_download = timm_hub.hf_hub_download

        def hf_download_local_only(repo_id, filename, *args, **kwargs):
            from huggingface_hub.errors import LocalEntryNotFoundError
            kwargs['local_files_only'] = True
            try:
                return original_hf_download(repo_id, filename, *args, **kwargs)
            except LocalEntryNotFoundError:
                weight = WeightFile(filename, 'huggingface', HUGGINGFACE_URL.format(repo_id, filename), repo_id)
                raise MissingWeightsError(metric, [weight.placement()]) from None

        saved.append((timm_hub, 'hf_hub_download', original_hf_download))
        replacements.append(hf_download_local_only)

    for (owner, name, _), replacement in zip(saved, replacements):
        setattr(owner, name, replacement)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def get_pyiqa_metric(metric: str, device: Union[str, torch.device, None] = None, **metric_opts):
    """The pyiqa metric object for (name, device, options), built once and cached.

    Args:
        metric (str): A ``pyiqa.create_metric`` name (``pyiqa.list_models()``), e.g. ``'lpips'``.
        device (str | torch.device | None): Where it runs; default CUDA when available, else CPU.
        **metric_opts: Options of the pyiqa architecture (e.g. ``test_y_channel``).

    Returns:
        pyiqa.models.inference_model.InferenceModel: In eval mode.

    Raises:
        KeyError: ``metric`` is not a pyiqa metric (the message suggests close names).
        MissingWeightsError: A weight file is absent; the message names each one and its folder.
    """
    device = torch.device(device) if device is not None else default_device()
    key = (metric, str(device), _freeze(metric_opts))
    if key in _METRICS:
        return _METRICS[key]

    import pyiqa
    from pyiqa.default_model_configs import DEFAULT_CONFIGS
    if metric not in DEFAULT_CONFIGS:
        close = difflib.get_close_matches(metric, list(DEFAULT_CONFIGS), n=5)
        raise KeyError(f'{metric!r} is not a pyiqa metric; close names: {", ".join(close) or "none"} '
                       f'(all names: pyiqa.list_models()).')

    files = required_weight_files(metric, metric_opts)
    if files is not None:
        error = missing_pyiqa_weights(metric, files)
        if error is not None:
            raise error
    with _BUILD_LOCK, refuse_downloads(metric):
        iqa_metric = pyiqa.create_metric(metric, device=device, **metric_opts)
    iqa_metric.eval()
    _METRICS[key] = iqa_metric
    return iqa_metric


#: options of a ``val.metrics`` entry that BasicSR or our wrappers take, not the pyiqa architecture
_WRAPPER_OPTIONS = ('type', 'metric', 'crop_border', 'device', 'input_order', 'better', 'test_y_channel')


def check_metric_weights(metrics_opt, where='val.metrics'):
    """Check the weight files of every pyiqa metric in a ``val.metrics`` block at once, before any work.

    Args:
        metrics_opt (dict | None): ``{name: {type: ..., ...}}`` as in an option file.
        where (str): Where the block comes from, for the message.

    Raises:
        MissingWeightsError: Every absent file of every metric, each line naming the metric.
    """
    from dspo_basicsr.metrics.metric_table import METRIC_TABLE
    by_type = {info.basicsr_type: info.pyiqa_name for info in METRIC_TABLE}
    missing = []
    for name, opt in (metrics_opt or {}).items():
        opt = dict(opt or {})
        kind = opt.get('type')
        pyiqa_name = opt.get('metric', 'lpips') if kind == 'calculate_pyiqa' else by_type.get(kind)
        if not pyiqa_name:
            continue
        files = required_weight_files(pyiqa_name, {k: v for k, v in opt.items() if k not in _WRAPPER_OPTIONS})
        missing += [f'{where}.{name} ({pyiqa_name}): {w.placement()}' for w in files or () if not w.is_present()]
    if missing:
        raise MissingWeightsError(where, missing)


def clear_pyiqa_cache():
    """Forget every cached pyiqa metric object (frees their memory)."""
    _METRICS.clear()


def to_pyiqa_tensor(img, crop_border: int = 0, input_order: str = 'HWC') -> torch.Tensor:
    """A BasicSR image as pyiqa's input: an RGB float tensor (1, 3, H, W) in [0, 1].

    Args:
        img (ndarray | Tensor): BasicSR's convention: BGR, HWC (or CHW with ``input_order='CHW'``), range
            [0, 255] (uint8, or float), or an integer image using its dtype's full range (uint16). A gray
            (H, W) or (H, W, 1) image is repeated to 3 channels. A tensor is taken as RGB in [0, 1], shape
            (N, 3, H, W) or (3, H, W), and passed through.
        crop_border (int): Pixels removed at each edge before the metric (BasicSR's ``crop_border``).
        input_order (str): ``'HWC'`` or ``'CHW'`` for arrays.

    Returns:
        Tensor: (1, 3, H - 2 crop_border, W - 2 crop_border), or (N, 3, ...) for a batched tensor input.
    """
    if torch.is_tensor(img):
        tensor = img.detach().float()
        tensor = tensor.unsqueeze(0) if tensor.dim() == 3 else tensor
        return _crop(tensor, crop_border, dims=(2, 3)).clamp(0, 1)

    array = np.asarray(img)
    if input_order not in ('HWC', 'CHW'):
        raise ValueError(f"input_order must be 'HWC' or 'CHW', got {input_order!r}.")
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and input_order == 'CHW':
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f'Expected a BGR image (H, W, 3) or a gray image (H, W), got shape {array.shape}.')
    array = _crop(array, crop_border, dims=(0, 1))

    if np.issubdtype(array.dtype, np.integer):
        scale = float(np.iinfo(array.dtype).max)
    else:
        scale = 255.0  # BasicSR's float images are in [0, 255]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    else:
        array = array[..., ::-1]  # BGR -> RGB
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / scale)
    return tensor.permute(2, 0, 1).unsqueeze(0).clamp(0, 1)  # (H, W, 3) -> (1, 3, H, W)


def _crop(image, crop_border: int, dims):
    if not crop_border:
        return image
    height, width = image.shape[dims[0]], image.shape[dims[1]]
    if 2 * crop_border >= min(height, width):
        raise ValueError(f'crop_border={crop_border} removes the whole {height}x{width} image.')
    index = [slice(None)] * image.ndim
    index[dims[0]] = slice(crop_border, height - crop_border)
    index[dims[1]] = slice(crop_border, width - crop_border)
    return image[tuple(index)]


@METRIC_REGISTRY.register()
def calculate_pyiqa(img,
                    img2=None,
                    metric: str = 'lpips',
                    crop_border: int = 0,
                    device: Optional[str] = None,
                    input_order: str = 'HWC',
                    **metric_opts) -> float:
    """Any pyiqa metric as a BasicSR metric: ``{type: calculate_pyiqa, metric: NAME, ...}``.

    Args:
        img (ndarray): The restored image, BGR uint8 (H, W, 3) (see :func:`to_pyiqa_tensor`).
        img2 (ndarray | None): The ground truth, same layout and size; required by full-reference metrics,
            ignored by no-reference ones.
        metric (str): The pyiqa name (``pyiqa.list_models()``).
        crop_border (int): Pixels removed at each edge of both images.
        device (str | None): Where the metric runs; default CUDA when available, else CPU.
        input_order (str): ``'HWC'`` or ``'CHW'``.
        **metric_opts: Options of the pyiqa architecture (e.g. ``test_y_channel: true``). BasicSR's own
            ``better`` key is accepted and ignored here.

    Returns:
        float: The score, averaged over the batch (one image in BasicSR validation).

    Raises:
        ValueError: A full-reference metric got no ``img2``, or the two images differ in size.
        MissingWeightsError: The metric's weight files are absent (the message says where they go).
    """
    for key in _BASICSR_KEYS:
        metric_opts.pop(key, None)
    iqa_metric = get_pyiqa_metric(metric, device, **metric_opts)
    target = to_pyiqa_tensor(img, crop_border, input_order)
    with torch.no_grad():
        if iqa_metric.metric_mode == 'FR':
            if img2 is None:
                raise ValueError(f'pyiqa metric {metric!r} is full-reference and needs the ground truth (img2), but '
                                 'none was given: validate on a paired dataset (dataroot_gt) or use a no-reference '
                                 'metric.')
            reference = to_pyiqa_tensor(img2, crop_border, input_order)
            if reference.shape != target.shape:
                raise ValueError(f'pyiqa metric {metric!r}: image {tuple(target.shape[2:])} and ground truth '
                                 f'{tuple(reference.shape[2:])} differ in size.')
            score = iqa_metric(target, reference)
        else:
            score = iqa_metric(target)
    return float(torch.as_tensor(score, dtype=torch.float64).mean())


@METRIC_REGISTRY.register()
def calculate_lpips(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """LPIPS (Zhang et al., CVPR 2018), AlexNet v0.1: full-reference, lower is better, range [0, 1].

    Args: as :func:`calculate_pyiqa`; ``img2`` (the ground truth) is required.
    """
    return calculate_pyiqa(img, img2, 'lpips', crop_border, device, **metric_opts)


@METRIC_REGISTRY.register()
def calculate_dists(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """DISTS (Ding et al., TPAMI 2020): full-reference, lower is better, range [0, 1].

    Args: as :func:`calculate_pyiqa`; ``img2`` (the ground truth) is required.
    """
    return calculate_pyiqa(img, img2, 'dists', crop_border, device, **metric_opts)


@METRIC_REGISTRY.register()
def calculate_musiq(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """MUSIQ (Ke et al., ICCV 2021), KonIQ-10k checkpoint: no-reference, higher is better, about [0, 100].

    Args: as :func:`calculate_pyiqa`; ``img2`` is ignored and may be None.
    """
    return calculate_pyiqa(img, img2, 'musiq', crop_border, device, **metric_opts)


@METRIC_REGISTRY.register()
def calculate_maniqa(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """MANIQA (Yang et al., CVPRW 2022), KonIQ-10k checkpoint: no-reference, higher is better, about [0, 1].

    Args: as :func:`calculate_pyiqa`; ``img2`` is ignored and may be None.
    """
    return calculate_pyiqa(img, img2, 'maniqa', crop_border, device, **metric_opts)


@METRIC_REGISTRY.register()
def calculate_clipiqa(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """CLIP-IQA (Wang et al., AAAI 2023), CLIP RN50: no-reference, higher is better, range [0, 1].

    Args: as :func:`calculate_pyiqa`; ``img2`` is ignored and may be None.
    """
    return calculate_pyiqa(img, img2, 'clipiqa', crop_border, device, **metric_opts)


@METRIC_REGISTRY.register()
def calculate_pyiqa_niqe(img, img2=None, crop_border: int = 0, device: Optional[str] = None, **metric_opts) -> float:
    """NIQE (Mittal et al., IEEE SPL 2013) as pyiqa computes it: no-reference, lower is better.

    BasicSR's own ``calculate_niqe`` needs no download (its parameters ship with basicsr); this one reads
    pyiqa's ``niqe_modelparameters.mat``.

    Args: as :func:`calculate_pyiqa`; ``img2`` is ignored and may be None.
    """
    return calculate_pyiqa(img, img2, 'niqe', crop_border, device, **metric_opts)
