"""Rank-calibrated blind IQA: a frozen quality backbone q_w plus a rectifier h.

Paper:
    "Learning from Model Rankings Improves Blind Super-Resolution Image Quality Assessment".
    The backbone q_w (LIQE-style CLIP, :class:`CLIPQualityArch`) stays frozen; a small rectifier h maps its
    features to (a, b) and the calibrated quality is

        Q(x) = (1 + |a(x)|) * q_w(x) + b(x),      so the slope alpha = 1 + |a| >= 1 keeps q_w's order
                                                   within images of similar content and only stretches it.

Checkpoint layout loaded:
    * backbone: whatever its own arch loads (``backbone.load_path``: a CLIP/LIQE state dict for
      ``CLIPQualityArch``; a pyiqa state dict for ``type: pyiqa`` backbones);
    * rectifier: ``{'params': {'rectifier.*': ...}}`` as written by ``RankCalibrationModel.save``
      (``net_g_<iter>.pth``), with the network options beside it in ``net_g_<iter>.json``.

Licence of the weights: the backbone's (OpenAI CLIP: MIT; LIQE / pyiqa weights: their authors' terms);
rectifier weights are trained by the user.
"""
import json
import os

import torch
from torch import nn

from dspo_basicsr.archs.clip_quality_arch import read_state_dict
from dspo_basicsr.utils.registry import registry_get

from basicsr.utils.registry import ARCH_REGISTRY


class PyIQAFeatureBackbone(nn.Module):
    """Any pyiqa arch as a quality backbone: its output is q, a forward hook on one module gives features.

    Args:
        arch (str): Name in pyiqa's arch registry, e.g. ``'CNNIQA'``, ``'MUSIQ'``.
        feature_layer (str): Dotted module name whose output (globally averaged if spatial) is the feature.
        load_path (str, optional): Local state dict of the arch (no download; ``pretrained=None`` is passed).
        arch_opt (dict, optional): Constructor arguments of the arch.
        probe_size (int): Side of the dummy image used once to find the feature width.
    """

    def __init__(self, arch, feature_layer, load_path=None, arch_opt=None, probe_size=224):
        super().__init__()
        from pyiqa.archs import build_network
        arch_opt = dict(arch_opt or {})
        arch_opt.setdefault('pretrained', None)  # never download; weights come from load_path
        self.net = build_network({'type': arch, **arch_opt})
        if load_path is not None:
            state = read_state_dict(load_path, f'pyiqa backbone {arch} load_path')
            state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
            self.net.load_state_dict(state, strict=True)
        modules = dict(self.net.named_modules())
        if feature_layer not in modules:
            raise KeyError(f'pyiqa backbone {arch}: no module named {feature_layer!r}; some names: '
                           f'{[n for n in modules if n][:12]}.')
        self._captured = None
        modules[feature_layer].register_forward_hook(self._capture)
        self.feature_layer = feature_layer
        with torch.no_grad():
            self.feature_dim = self.forward_features(torch.rand(1, 3, probe_size, probe_size))['features'].shape[1]

    def _capture(self, module, inputs, output):
        self._captured = output

    def forward_features(self, x):
        """(B, 3, H, W) RGB in [0, 1] -> dict ``q`` (B,), ``features`` (B, D)."""
        q = self.net(x).reshape(x.shape[0], -1).mean(dim=1)
        feats = self._captured
        self._captured = None
        if feats.dim() == 4:
            feats = feats.mean(dim=(2, 3))                   # (B, C, h, w) -> (B, C)
        return {'q': q.float(), 'features': feats.reshape(x.shape[0], -1).float()}


def build_quality_backbone(opt):
    """Build the frozen backbone from its options (``type``: a registered arch name or ``'pyiqa'``)."""
    opt = dict(opt)
    kind = opt.pop('type', 'CLIPQualityArch')
    backbone = PyIQAFeatureBackbone(**opt) if kind == 'pyiqa' else registry_get(ARCH_REGISTRY, kind)(**opt)
    if not hasattr(backbone, 'forward_features') or not hasattr(backbone, 'feature_dim'):
        raise TypeError(f'backbone type {kind!r} has no forward_features()/feature_dim; use CLIPQualityArch or '
                        "type: pyiqa with a feature_layer.")
    return backbone


class Rectifier(nn.Module):
    """The rectifier h: backbone features -> (a, b).

    Args:
        feature_dim (int): D.
        hidden_dim (int): Width of the hidden layer.
        init_std (float): Std of the last layer's initial weights. Small, so Q starts near q_w; not zero,
            because |a| has zero gradient at a = 0.
    """

    def __init__(self, feature_dim, hidden_dim=128, init_std=1e-3):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, 2))
        nn.init.normal_(self.mlp[-1].weight, std=init_std)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features):
        """(B, D) -> a (B,), b (B,)."""
        a, b = self.mlp(features).unbind(dim=-1)
        return a, b


@ARCH_REGISTRY.register()
class RankCalibratedIQAArch(nn.Module):
    """Frozen quality backbone q_w + rectifier: ``Q = (1 + |a|) q_w + b``.

    Args:
        backbone (dict): Backbone options, e.g. ``{type: CLIPQualityArch, load_path: ...}`` or
            ``{type: pyiqa, arch: CNNIQA, feature_layer: fc2, load_path: ...}``.
        hidden_dim (int): Rectifier hidden width.
        init_std (float): Rectifier last-layer init std.
    """

    def __init__(self, backbone, hidden_dim=128, init_std=1e-3):
        super().__init__()
        self.backbone = build_quality_backbone(backbone)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.rectifier = Rectifier(self.backbone.feature_dim, hidden_dim, init_std)

    def train(self, mode=True):
        """Train mode for the rectifier only; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def backbone_outputs(self, x):
        """Frozen backbone pass.

        Args:
            x (Tensor): (B, 3, H, W) RGB in [0, 1].

        Returns:
            tuple: features (B, D) and q (B,), both float32 and without gradient.
        """
        out = self.backbone.forward_features(x)
        return out['features'].float(), out['q'].float()

    def calibrate(self, features, q):
        """Rectify backbone scores.

        Args:
            features (Tensor): (..., D) backbone features.
            q (Tensor): (...) backbone quality.

        Returns:
            dict: ``Q`` (...) calibrated quality, ``alpha`` (...) = 1 + |a| >= 1, ``beta`` (...) = b.
        """
        a, b = self.rectifier(features)
        alpha = 1 + a.abs()
        return {'Q': alpha * q + b, 'alpha': alpha, 'beta': b}

    def forward(self, x):
        """(B, 3, H, W) RGB in [0, 1] -> (B,) calibrated quality Q (higher is better)."""
        features, q = self.backbone_outputs(x)
        return self.calibrate(features, q)['Q']

    def rectifier_state_dict(self):
        """The trainable part only, keyed ``rectifier.*`` (what ``RankCalibrationModel`` saves)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith('rectifier.')}

    def load_rectifier(self, path):
        """Load rectifier weights from a ``net_g_<iter>.pth`` (``params`` entry, ``rectifier.*`` keys)."""
        state = read_state_dict(path, 'rank-calibrated IQA rectifier')
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.startswith('rectifier.')}
        if not state:
            raise KeyError(f'{path!r} holds no rectifier.* weights; expected a net_g_<iter>.pth written by '
                           'RankCalibrationModel.')
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith('rectifier.')]
        if missing or unexpected:
            raise KeyError(f'{path!r}: rectifier keys do not match this network (missing {missing}, unexpected '
                           f'{unexpected}); were the network options (hidden_dim, backbone) the same?')


def network_options_path(model_path):
    """The JSON beside a rectifier checkpoint that holds its network options (``net_g_5000.json``)."""
    return os.path.splitext(model_path)[0] + '.json'


def load_rank_calibrated_iqa(model_path, network=None):
    """Build a trained :class:`RankCalibratedIQAArch` from a ``RankCalibrationModel`` checkpoint.

    Args:
        model_path (str): ``experiments/<name>/models/net_g_<iter>.pth`` (rectifier weights).
        network (dict, optional): Network options overriding those saved in ``net_g_<iter>.json``
            (e.g. another ``backbone.load_path`` on this machine). Needed when the JSON is absent.

    Returns:
        RankCalibratedIQAArch: In eval mode, on the CPU.
    """
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f'calibrated IQA model: expected the rectifier checkpoint {model_path!r} '
                                '(experiments/<name>/models/net_g_<iter>.pth from RankCalibrationModel); '
                                'it does not exist.')
    options = {}
    json_path = network_options_path(model_path)
    if os.path.isfile(json_path):
        with open(json_path, encoding='utf-8') as f:
            options = json.load(f).get('network_g', {})
    elif network is None:
        raise FileNotFoundError(f'calibrated IQA model: {json_path!r} (the network options written beside the '
                                'checkpoint) is missing; give the network options in the metric options instead.')
    options = _merge(options, network or {})
    options.pop('type', None)
    net = RankCalibratedIQAArch(**options)
    net.load_rectifier(model_path)
    return net.eval()


def _merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_dicts else value
    return merged
