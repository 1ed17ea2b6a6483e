"""The facts of every validation metric we register or document, in one table (pyiqa's style).

For each BasicSR metric ``type`` usable in a ``val.metrics`` block: which quantity it computes, whether it
needs the ground truth (full-reference, FR) or not (no-reference, NR), which direction is better (the
value to give BasicSR's ``better`` key so that the best checkpoint is tracked correctly), the score range,
and the weight files it reads. Nothing downloads at run time: every weight file must already lie in the
folder named here, resolved when a metric is built:

* ``pyiqa``: ``$TORCH_HOME/hub/pyiqa`` (pyiqa's ``DEFAULT_CACHE_DIR``; default ``~/.cache/torch/hub/pyiqa``),
* ``torchvision``: ``$TORCH_HOME/hub/checkpoints`` (ImageNet backbones loaded by torchvision),
* ``clip``: ``$TORCH_HOME/hub/clip`` (OpenAI CLIP checkpoints loaded by pyiqa's CLIP code),
* ``huggingface``: the Hugging Face hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``;
  timm backbones),
* ``bundled``: shipped inside an installed package, nothing to place.
* ``option``: a local file the YAML names (e.g. ``model_path`` of a model this project trains).

The score directions and ranges of the pyiqa rows are pyiqa 0.1.16's own (``pyiqa/default_model_configs.py``);
``tests/test_pyiqa_metric.py`` checks that they still agree with the installed pyiqa.

This module imports neither pyiqa nor basicsr, so reading the table is cheap.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

PYIQA_WEIGHTS_URL = 'https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{}'
TORCHVISION_WEIGHTS_URL = 'https://download.pytorch.org/models/{}'
HUGGINGFACE_URL = 'https://huggingface.co/{}/resolve/main/{}'

# Options of pyiqa architectures that select other weight files than the defaults listed in the table.
# When one of them is given, the precheck is skipped and only the download guard applies.
WEIGHT_SELECTING_OPTIONS = frozenset({
    'pretrained', 'pretrained_model_path', 'net', 'version', 'pnet_rand', 'train_dataset', 'backbone',
    'model_type'
})


def torch_hub_dir() -> str:
    """``torch.hub.get_dir()``, resolved now: ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``)."""
    import torch.hub
    return torch.hub.get_dir()


def pyiqa_weights_dir() -> str:
    """The folder pyiqa reads its weight files from: ``$TORCH_HOME/hub/pyiqa``, resolved now."""
    return os.path.join(torch_hub_dir(), 'pyiqa')


def huggingface_cache_dir() -> str:
    """The Hugging Face hub cache that timm reads its pretrained backbones from."""
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


@dataclass(frozen=True)
class WeightFile:
    """One weight file a metric reads, and where it has to be.

    Attributes:
        file_name (str): The file's name, exactly as the loading code looks for it.
        store (str): Where it lives: ``'pyiqa'``, ``'torchvision'``, ``'clip'``, ``'huggingface'``,
            ``'bundled'`` or ``'option'`` (see the module docstring).
        url (str): Where to fetch it on a machine with network access (``'bundled'``: the package folder;
            ``'option'``: the YAML key naming the file).
        repo_id (str): Hugging Face repository, for ``store='huggingface'`` only.
    """
    file_name: str
    store: str
    url: str = ''
    repo_id: Optional[str] = None

    def folder(self) -> str:
        """The folder the file must be in, resolved from the environment now."""
        if self.store == 'pyiqa':
            return pyiqa_weights_dir()
        if self.store == 'torchvision':
            return os.path.join(torch_hub_dir(), 'checkpoints')
        if self.store == 'clip':
            return os.path.join(torch_hub_dir(), 'clip')
        if self.store == 'huggingface':
            return os.path.join(huggingface_cache_dir(), 'models--' + self.repo_id.replace('/', '--'))
        if self.store in ('bundled', 'option'):
            return self.url
        raise ValueError(f'Unknown weight store {self.store!r} for {self.file_name}.')

    def is_present(self) -> bool:
        """Whether the file is where the loading code will look (no network access)."""
        if self.store in ('bundled', 'option'):
            return True  # bundled: always there; option: the metric itself checks the path it is given
        if self.store == 'huggingface':
            from huggingface_hub import try_to_load_from_cache
            return isinstance(try_to_load_from_cache(self.repo_id, self.file_name), str)
        return os.path.isfile(os.path.join(self.folder(), self.file_name))

    def placement(self) -> str:
        """One sentence: where to put the file and where to get it."""
        if self.store == 'huggingface':
            return (f'{self.file_name} of the Hugging Face repository {self.repo_id}: on a machine with network '
                    f'access run `hf download {self.repo_id} {self.file_name} --cache-dir CACHE` and copy '
                    f'CACHE/{os.path.basename(self.folder())} to {self.folder()}')
        return f'{self.file_name} -> put it in {self.folder()} (from {self.url})'

    def table_cell(self) -> str:
        """Machine-independent location, for the Markdown table."""
        if self.store == 'pyiqa':
            return f'`$TORCH_HOME/hub/pyiqa/{self.file_name}`'
        if self.store == 'torchvision':
            return f'`$TORCH_HOME/hub/checkpoints/{self.file_name}`'
        if self.store == 'clip':
            return f'`$TORCH_HOME/hub/clip/{self.file_name}`'
        if self.store == 'huggingface':
            return f'HF cache: `{self.repo_id}` (`{self.file_name}`)'
        if self.store == 'option':
            return f'`{self.url}` in the YAML: {self.file_name}'
        return f'bundled (`{self.file_name}`)'


def _pyiqa_file(name: str) -> WeightFile:
    return WeightFile(name, 'pyiqa', PYIQA_WEIGHTS_URL.format(name))


def _torchvision_file(name: str) -> WeightFile:
    return WeightFile(name, 'torchvision', TORCHVISION_WEIGHTS_URL.format(name))


def _huggingface_file(repo_id: str, name: str) -> WeightFile:
    return WeightFile(name, 'huggingface', HUGGINGFACE_URL.format(repo_id, name), repo_id)


@dataclass(frozen=True)
class MetricInfo:
    """The facts of one registered (or documented) BasicSR metric.

    Attributes:
        basicsr_type (str): The ``type`` to write in a ``val.metrics`` block.
        name (str): The metric, in the paper's words.
        pyiqa_name (str): The ``pyiqa.create_metric`` name it wraps, or None for BasicSR's own metrics.
        reference (str): ``'FR'`` (needs the ground truth ``img2``) or ``'NR'`` (ignores it).
        lower_better (bool): Whether a lower score is better (then write ``better: lower``).
        score_range (str): Typical range of the score, in pyiqa's notation (``~`` = approximate bound).
        weights (tuple[WeightFile]): The weight files read with default options.
        source (str): Who implements it.
        paper (str): Short citation.
    """
    basicsr_type: str
    name: str
    pyiqa_name: Optional[str]
    reference: str
    lower_better: bool
    score_range: str
    weights: Tuple[WeightFile, ...] = field(default_factory=tuple)
    source: str = 'pyiqa'
    paper: str = ''

    @property
    def better(self) -> str:
        """The value for BasicSR's ``better`` key of this metric."""
        return 'lower' if self.lower_better else 'higher'


_BASICSR_NIQE_PARAMS = WeightFile('niqe_pris_params.npz', 'bundled', 'basicsr/metrics')

METRIC_TABLE: Tuple[MetricInfo, ...] = (
    MetricInfo('calculate_psnr', 'PSNR', None, 'FR', False, '0, ~50 (dB)', source='BasicSR',
               paper='peak signal-to-noise ratio'),
    MetricInfo('calculate_ssim', 'SSIM', None, 'FR', False, '0, 1', source='BasicSR',
               paper='Wang et al., TIP 2004'),
    MetricInfo('calculate_niqe', 'NIQE', None, 'NR', True, '~0, ~100', (_BASICSR_NIQE_PARAMS, ), source='BasicSR',
               paper='Mittal et al., IEEE SPL 2013'),
    MetricInfo('calculate_pyiqa_niqe', 'NIQE', 'niqe', 'NR', True, '~0, ~100',
               (_pyiqa_file('niqe_modelparameters.mat'), ), paper='Mittal et al., IEEE SPL 2013'),
    MetricInfo('calculate_lpips', 'LPIPS (AlexNet, v0.1)', 'lpips', 'FR', True, '0, 1',
               (_torchvision_file('alexnet-owt-7be5be79.pth'), _pyiqa_file('LPIPS_v0.1_alex-df73285e.pth')),
               paper='Zhang et al., CVPR 2018'),
    MetricInfo('calculate_dists', 'DISTS', 'dists', 'FR', True, '0, 1',
               (_torchvision_file('vgg16-397923af.pth'), _pyiqa_file('DISTS_weights-f5e65c96.pth')),
               paper='Ding et al., TPAMI 2020'),
    MetricInfo('calculate_musiq', 'MUSIQ (KonIQ-10k)', 'musiq', 'NR', False, '~0, ~100',
               (_pyiqa_file('musiq_koniq_ckpt-e95806b9.pth'), ), paper='Ke et al., ICCV 2021'),
    MetricInfo('calculate_maniqa', 'MANIQA (KonIQ-10k)', 'maniqa', 'NR', False, '~0, ~1',
               (_huggingface_file('timm/vit_base_patch8_224.augreg2_in21k_ft_in1k', 'model.safetensors'),
                _pyiqa_file('ckpt_koniq10k.pt')),
               paper='Yang et al., CVPRW 2022'),
    MetricInfo('calculate_clipiqa', 'CLIP-IQA (RN50)', 'clipiqa', 'NR', False, '0, 1',
               (WeightFile('RN50.pt', 'clip', 'https://openaipublic.azureedge.net/clip/models/'
                           'afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt'), ),
               paper='Wang et al., AAAI 2023'),
    MetricInfo('calculate_calibrated_iqa', 'rank-calibrated blind IQA (Q)', None, 'NR', False, '~1, ~5 (unbounded)',
               (WeightFile('`net_g_<iter>.pth` (+ `.json`) of a trained `RankCalibrationModel`', 'option',
                           'model_path'), ),
               source='dspo_basicsr', paper='Learning from Model Rankings Improves Blind SR IQA'),
)

# Weight files of pyiqa metrics with default options, by pyiqa name (the precheck of calculate_pyiqa).
# Metrics computed from the pixels alone need none.
PYIQA_WEIGHT_FILES: Dict[str, Tuple[WeightFile, ...]] = {
    info.pyiqa_name: info.weights for info in METRIC_TABLE if info.pyiqa_name is not None
}
PYIQA_WEIGHT_FILES.update({name: () for name in ('psnr', 'psnry', 'ssim', 'ssimc', 'ms_ssim', 'cw_ssim', 'fsim',
                                                   'vif', 'gmsd', 'nlpd', 'vsi', 'mad', 'piqe', 'entropy')})


def metric_info(basicsr_type: str) -> MetricInfo:
    """The table row of a registered metric ``type``.

    Raises:
        KeyError: The type is not in the table; the message lists the types that are.
    """
    for info in METRIC_TABLE:
        if info.basicsr_type == basicsr_type:
            return info
    raise KeyError(f'No metric table row for type {basicsr_type!r}; the table has: '
                   f'{", ".join(info.basicsr_type for info in METRIC_TABLE)}.')


def required_weight_files(pyiqa_name: str, metric_opts: Optional[dict] = None) -> Optional[List[WeightFile]]:
    """The weight files a pyiqa metric reads, when the table knows them for these options.

    Args:
        pyiqa_name (str): The ``pyiqa.create_metric`` name.
        metric_opts (dict): Options passed to the pyiqa architecture.

    Returns:
        list[WeightFile] | None: The files, or None when the table does not know them (another metric, or an
        option that selects other weights); then only the download guard reports missing files.
    """
    if metric_opts and WEIGHT_SELECTING_OPTIONS.intersection(metric_opts):
        return None
    files = PYIQA_WEIGHT_FILES.get(pyiqa_name)
    return None if files is None else list(files)


class MissingWeightsError(FileNotFoundError):
    """A metric needs weight files that are not on this machine; nothing is downloaded at run time.

    Attributes:
        metric (str): The pyiqa metric name.
        missing (list[str]): One placement sentence per missing file (file name, folder, source).
    """

    def __init__(self, metric: str, missing: List[str]):
        self.metric = metric
        self.missing = list(missing)
        lines = '\n'.join(f'  - {line}' for line in self.missing)
        super().__init__(
            f'pyiqa metric {metric!r} needs weight files that are not on this machine, and nothing is '
            f'downloaded at run time:\n{lines}\nCopy them there from a machine with network access (or set '
            f'TORCH_HOME to a folder whose hub/ already holds them), then run again.')


def missing_pyiqa_weights(pyiqa_name: str, files: List[WeightFile]) -> Optional[MissingWeightsError]:
    """The error naming every absent file of ``files``, or None when all are present."""
    missing = [weight.placement() for weight in files if not weight.is_present()]
    return MissingWeightsError(pyiqa_name, missing) if missing else None


def metric_table_markdown() -> str:
    """Render :data:`METRIC_TABLE` as a Markdown table (the table of docs/metrics.md)."""
    header = ('| `type` | metric | pyiqa name | reference | `better` | score range | weight files | paper |\n'
              '| --- | --- | --- | --- | --- | --- | --- | --- |')
    rows = []
    for info in METRIC_TABLE:
        weights = '<br>'.join(weight.table_cell() for weight in info.weights) or 'none'
        pyiqa_name = f'`{info.pyiqa_name}`' if info.pyiqa_name else f'({info.source})'
        rows.append(f'| `{info.basicsr_type}` | {info.name} | {pyiqa_name} | {info.reference} | {info.better} | '
                    f'{info.score_range} | {weights} | {info.paper} |')
    return '\n'.join([header] + rows)
