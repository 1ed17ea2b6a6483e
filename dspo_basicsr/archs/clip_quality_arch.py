"""LIQE-style CLIP quality backbone q_w.

Papers:
    Zhang et al., "Blind Image Quality Assessment via Vision-Language Correspondence: A Multitask Learning
    Perspective" (LIQE), CVPR 2023; used as the frozen backbone q_w in "Learning from Model Rankings
    Improves Blind Super-Resolution Image Quality Assessment".

    q(x) = sum_{c=1..5} c * softmax_c( s * cos(f_img(x), f_txt("a photo with {bad, poor, fair, good,
    perfect} quality")) ),   s = exp(logit_scale) (CLIP's learned temperature, 100 for released models).

Checkpoint layout loaded (``load_path``, a local file; nothing is downloaded):
    * an OpenAI-CLIP state dict (``visual.*``, ``transformer.*``, ``token_embedding.weight``,
      ``positional_embedding``, ``text_projection``, ``ln_final.*``, ``logit_scale``), saved with
      ``torch.save`` (read with ``weights_only=True``) or as ``.safetensors``; the architecture (ViT or
      ResNet, widths, depths) is inferred from the shapes as in ``clip.model.build_model``;
    * a LIQE checkpoint: the same keys under a ``clip_model.`` / ``model.`` / ``module.`` prefix, or inside
      a ``params`` / ``state_dict`` / ``model`` entry;
    * the OpenAI TorchScript release files (``ViT-B-32.pt``): their state dict is read with
      ``torch.jit.load`` (TorchScript archives hold no Python pickles).

Licence of the weights: OpenAI CLIP weights are MIT-licensed (github.com/openai/CLIP); LIQE weights are
released by its authors under their repository's licence (github.com/zwx8981/LIQE, research use). Tests and
the demo build a randomly initialised tiny one (``dspo_basicsr.demo.tiny_components.TINY_CLIP_CONFIG``).
"""
import os
import zipfile

import torch
import torch.nn.functional as F
from torch import nn

from dspo_basicsr.utils.checkpoint import read_checkpoint

from basicsr.utils.registry import ARCH_REGISTRY

QUALITY_LEVELS = ('bad', 'poor', 'fair', 'good', 'perfect')
PROMPT_TEMPLATE = 'a photo with {} quality'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PREFIXES = ('module.', 'clip_model.', 'model.', 'clip.')


def read_state_dict(path, what='weights'):
    """Read a state dict from a local ``.pth``/``.pt`` (weights only), ``.safetensors`` or TorchScript file.

    Args:
        path (str): The file.
        what (str): What the file holds, for the error message.

    Returns:
        dict[str, Tensor]: The state dict, unwrapped from ``params``/``state_dict``/``model`` entries.

    Raises:
        FileNotFoundError: The file is missing; the message names it.
    """
    if path and os.path.isfile(path) and zipfile.is_zipfile(path) and _is_torchscript(path):
        # OpenAI's release files are TorchScript archives; torch.jit.load reads them without Python pickles
        return torch.jit.load(path, map_location='cpu').state_dict()
    return read_checkpoint(path, what)


def _is_torchscript(path):
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith('/constants.pkl') for name in archive.namelist())


def _strip_prefixes(state):
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def clip_config_from_state_dict(state):
    """CLIP constructor arguments inferred from an OpenAI-CLIP state dict (as ``clip.model.build_model``)."""
    required = ('text_projection', 'positional_embedding', 'token_embedding.weight', 'ln_final.weight')
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f'not an OpenAI-CLIP state dict: missing keys {missing} (found e.g. {list(state)[:5]}).')
    if 'visual.proj' in state:
        width = state['visual.conv1.weight'].shape[0]
        layers = len([k for k in state if k.startswith('visual.') and k.endswith('.attn.in_proj_weight')])
        patch = state['visual.conv1.weight'].shape[-1]
        grid = round((state['visual.positional_embedding'].shape[0] - 1) ** 0.5)
        resolution = patch * grid
    else:
        layers = tuple(len({k.split('.')[2] for k in state if k.startswith(f'visual.layer{b}')}) for b in (1, 2, 3, 4))
        width = state['visual.layer1.0.conv1.weight'].shape[0]
        patch = None
        resolution = round((state['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5) * 32
    text_width = state['ln_final.weight'].shape[0]
    return dict(
        embed_dim=state['text_projection'].shape[1], image_resolution=resolution, vision_layers=layers,
        vision_width=width, vision_patch_size=patch, context_length=state['positional_embedding'].shape[0],
        vocab_size=state['token_embedding.weight'].shape[0], transformer_width=text_width,
        transformer_heads=max(text_width // 64, 1),
        transformer_layers=len({k.split('.')[2] for k in state if k.startswith('transformer.resblocks')}))


@ARCH_REGISTRY.register()
class CLIPQualityArch(nn.Module):
    """LIQE-style quality predictor: CLIP image/text towers and five quality prompts.

    Either ``load_path`` (a checkpoint; the architecture is read from its shapes) or an explicit CLIP
    configuration (``embed_dim`` ... ``transformer_layers``, e.g. a tiny one for tests) must be given.

    Args:
        load_path (str, optional): Local checkpoint (see module docstring).
        embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
        vocab_size, transformer_width, transformer_heads, transformer_layers: ``clip.model.CLIP`` arguments,
            used when ``load_path`` is None. ``vocab_size`` must be 49408 (CLIP's BPE tokenizer).
        levels (list[str]): Quality words, worst to best; level c (1-based) scores c.
        template (str): Prompt template with one ``{}``.
        input_mode (str): ``'resize'``: the whole image resized to the model resolution (one pass);
            ``'patches'``: LIQE's test-time protocol, ``num_patch`` evenly spaced resolution-sized patches on
            a ``step`` grid, logits averaged over patches (images whose short side is below the resolution
            are first upsampled to it; LIQE refuses them).
        num_patch (int): Patches per image in ``'patches'`` mode (LIQE: 15).
        step (int): Patch grid stride in ``'patches'`` mode (LIQE: 32).
    """

    def __init__(self, load_path=None, embed_dim=None, image_resolution=224, vision_layers=None,
                 vision_width=None, vision_patch_size=None, context_length=77, vocab_size=49408,
                 transformer_width=None, transformer_heads=None, transformer_layers=None,
                 levels=QUALITY_LEVELS, template=PROMPT_TEMPLATE, input_mode='resize', num_patch=15, step=32):
        super().__init__()
        from clip.model import CLIP

        state = None
        if load_path is not None:
            state = _strip_prefixes(read_state_dict(load_path, 'CLIPQualityArch load_path'))
            config = clip_config_from_state_dict(state)
        else:
            config = dict(embed_dim=embed_dim, image_resolution=image_resolution, vision_layers=vision_layers,
                          vision_width=vision_width, vision_patch_size=vision_patch_size,
                          context_length=context_length, vocab_size=vocab_size,
                          transformer_width=transformer_width, transformer_heads=transformer_heads,
                          transformer_layers=transformer_layers)
            unset = [k for k, v in config.items() if v is None and k != 'vision_patch_size']
            if unset:
                raise ValueError(f'CLIPQualityArch: give load_path (a CLIP/LIQE checkpoint) or the full CLIP '
                                 f'configuration; missing {unset}.')
        if isinstance(config['vision_layers'], list):
            config['vision_layers'] = tuple(config['vision_layers'])
        self.config = config
        self.clip = CLIP(**config)
        if state is not None:
            for key in ('input_resolution', 'context_length', 'vocab_size'):
                state.pop(key, None)
            missing, unexpected = self.clip.load_state_dict(state, strict=False)
            if missing:
                raise KeyError(f'CLIPQualityArch: checkpoint {load_path!r} lacks keys {missing[:8]}'
                               f'{" ..." if len(missing) > 8 else ""}; is it a CLIP / LIQE state dict?')
        self.clip.float()  # OpenAI weights are stored in fp16
        self.levels = list(levels)
        self.prompts = [template.format(level) for level in self.levels]
        import clip
        self.register_buffer('prompt_tokens', clip.tokenize(self.prompts, context_length=config['context_length']),
                             persistent=False)  # (5, context_length)
        self.register_buffer('level_values', torch.arange(1, len(self.levels) + 1, dtype=torch.float32),
                             persistent=False)
        self.register_buffer('mean', torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.feature_dim = config['embed_dim']
        if input_mode not in ('resize', 'patches'):
            raise ValueError(f"CLIPQualityArch: input_mode must be 'resize' or 'patches', got {input_mode!r}.")
        self.input_mode, self.num_patch, self.step = input_mode, num_patch, step
        self._text_cache = None
        self._register_load_state_dict_pre_hook(self._clear_text_cache)

    @property
    def image_resolution(self):
        return self.config['image_resolution']

    def text_features(self):
        """L2-normalised prompt embeddings, (5, embed_dim).

        The prompts are fixed, so with a frozen text tower they are encoded once per device and reused
        (loading a state dict clears the copy).
        """
        frozen = not any(p.requires_grad for p in self.clip.transformer.parameters())
        device = self.prompt_tokens.device
        if frozen and self._text_cache is not None and self._text_cache.device == device:
            return self._text_cache
        feats = F.normalize(self.clip.encode_text(self.prompt_tokens).float(), dim=-1)
        if frozen:
            self._text_cache = feats.detach()
        return feats

    def _clear_text_cache(self, *args, **kwargs):
        self._text_cache = None

    def patches(self, x):
        """Backbone inputs of each image.

        Args:
            x (Tensor): (B, 3, H, W) RGB in [0, 1].

        Returns:
            Tensor: (B, P, 3, r, r) with r the model resolution; P = 1 in ``'resize'`` mode.
        """
        size = self.image_resolution
        if self.input_mode == 'resize':
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode='bicubic', align_corners=False, antialias=True)
            return x.unsqueeze(1)
        short = min(x.shape[-2:])
        if short < size:
            x = F.interpolate(x, scale_factor=size / short, mode='bicubic', align_corners=False)
        b = x.shape[0]
        grid = x.unfold(2, size, self.step).unfold(3, size, self.step)      # (B, 3, nh, nw, r, r)
        grid = grid.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 3, size, size)  # (B, nh*nw, 3, r, r)
        num_patch = min(self.num_patch, grid.shape[1])
        stride = max(1, grid.shape[1] // num_patch)
        return grid[:, torch.arange(num_patch, device=x.device) * stride]

    def forward_features(self, x):
        """Quality and the features a rectifier sees.

        Args:
            x (Tensor): (B, 3, H, W) RGB in [0, 1].

        Returns:
            dict: ``q`` (B,) quality in [1, 5]; ``probs`` (B, 5) over the quality levels;
            ``features`` (B, embed_dim) the normalised (patch-averaged) image embedding.
        """
        patches = self.patches(x)                                        # (B, P, 3, r, r)
        b, p = patches.shape[:2]
        pixels = (patches.flatten(0, 1) - self.mean) / self.std          # (B*P, 3, r, r)
        image = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)  # (B*P, D)
        logits = self.clip.logit_scale.exp() * image @ self.text_features().t()  # (B*P, 5)
        probs = logits.view(b, p, -1).mean(dim=1).softmax(dim=-1)       # LIQE: average logits over patches
        features = F.normalize(image.view(b, p, -1).mean(dim=1), dim=-1)  # (B, D)
        return {'q': probs @ self.level_values, 'probs': probs, 'features': features}

    def forward(self, x):
        """(B, 3, H, W) RGB in [0, 1] -> (B,) quality q in [1, 5] (higher is better)."""
        return self.forward_features(x)['q']
