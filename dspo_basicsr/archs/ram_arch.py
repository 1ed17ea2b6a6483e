"""RAM image embeddings for SeeSR / AddSR: a Swin-L backbone (timm) and RAM's projection to (B, 145, 512).

Papers: Zhang et al., "Recognize Anything: A Strong Image Tagging Model" (RAM), 2023
(https://github.com/xinyu1205/recognize-anything); SeeSR's degradation-aware prompt extractor DAPE
(Wu et al., CVPR 2024), a LoRA fine-tune of RAM's image encoder.

What is computed (RAM's ``generate_image_embeds``): the LQ image resized to 384 x 384 and normalised with the
ImageNet mean / std goes through Swin-L (patch 4, window 12, depths 2-2-18-2, width 192); the final-norm
tokens (B, 144, 1536) are prefixed with their average (B, 1, 1536) and projected by ``image_proj``
(Linear 1536 -> 512): (B, 145, 512).

Checkpoint layout (local files, read with ``torch.load(weights_only=True)``: no unpickling of objects):
    ram_swin_large_14m.pth   {'model': state_dict} of RAM; used: ``visual_encoder.*`` (official Swin layout:
                             downsampling at the end of stages 0-2, ``relative_position_index`` / ``attn_mask``
                             buffers) and ``image_proj.*``; RAM's tagging parts are not needed and are skipped.
    DAPE.pth                 SeeSR's DAPE: a RAM state dict whose ``visual_encoder`` has loralib ``MergedLinear``
                             LoRA on ``attn.qkv`` (``lora_A`` (16, C), ``lora_B`` (2C, 8): rank 8 on q and v,
                             scaling 1/8); it overrides RAM's weights and its LoRA is merged into ``qkv``.
Every backbone and projection weight must be found, and every ``visual_encoder.`` / ``image_proj.`` key of a
checkpoint must be used; otherwise an error names the key.
Weights licence: RAM is released under the Apache-2.0 licence; DAPE with SeeSR (see its repository).
"""
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWIN_L_384 = dict(img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                  num_heads=(6, 12, 24, 48))
# loralib MergedLinear(dim, 3 dim, r=8, enable_lora=[True, False, True]) with lora_alpha = 1: scaling 1/8.
DAPE_LORA_RANK = 8
DAPE_LORA_SCALING = 1.0 / DAPE_LORA_RANK
_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


def tiny_swin_config(img_size=32):
    """A two-stage Swin with width 16 (tests): 32 x 32 input -> 4 x 4 tokens + 1 = 17 tokens."""
    return dict(img_size=img_size, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))


def read_torch_checkpoint(path, what):
    """``torch.load(weights_only=True)`` of a local file, with errors that say what to do."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: expected the file '{path}', but it is not there. Nothing is downloaded at "
                                'run time: download it yourself and put it at that path (see docs/frameworks.md).')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001  (weights_only refuses pickled Python objects)
        raise ValueError(f"{what}: '{path}' holds more than tensors and plain values ({error}). It is not loaded, "
                         'because unpickling arbitrary objects can run code; extract its state dict with a trusted '
                         'tool and save that instead.') from None
    if isinstance(state, dict) and isinstance(state.get('model'), dict):
        state = state['model']
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{what}: '{path}' is not a state dict (a mapping from parameter names to tensors).")
    return state


def ram_to_timm_key(key):
    """An official-Swin key of RAM's ``visual_encoder`` (prefix removed) -> the timm Swin key, or None to skip.

    The official Swin downsamples at the end of stages 0-2 (``layers.i.downsample``), timm at the start of
    stages 1-3 (``layers.{i+1}.downsample``); the patch-merging concatenation order is the same in both.
    """
    if key.endswith(_DERIVED_BUFFERS):
        return None
    match = re.match(r'layers\.(\d+)\.downsample\.(.*)', key)
    if match:
        return f'layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}'
    return key


def timm_to_ram_key(key):
    """Inverse of :func:`ram_to_timm_key` (used to write checkpoints in RAM's layout)."""
    match = re.match(r'layers\.(\d+)\.downsample\.(.*)', key)
    if match:
        return f'layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}'
    return key


def merge_dape_lora(qkv_weight, lora_a, lora_b, scaling=DAPE_LORA_SCALING):
    """Merge a loralib ``MergedLinear`` LoRA on q and v into the qkv weight.

    Args:
        qkv_weight (Tensor): (3C, C).
        lora_a (Tensor): (2r, C), the A matrices of q and v stacked.
        lora_b (Tensor): (2C, r), the B matrices of q and v stacked.

    Returns:
        Tensor: (3C, C) with ``B_q A_q * scaling`` added to the q rows and ``B_v A_v * scaling`` to the v rows.
    """
    dim = qkv_weight.shape[1]
    rank = lora_a.shape[0] // 2
    a_q, a_v = lora_a[:rank], lora_a[rank:]  # (r, C) each
    b_q, b_v = lora_b[:dim], lora_b[dim:]  # (C, r) each
    merged = qkv_weight.clone()
    merged[:dim] += (b_q @ a_q) * scaling
    merged[2 * dim:] += (b_v @ a_v) * scaling
    return merged


class RAMImageEmbedder(nn.Module):
    """RAM / DAPE image embeddings of LQ images, frozen.

    Args:
        ram_path (str | None): RAM checkpoint (``ram_swin_large_14m.pth``, or a tiny one in the same layout).
        dape_path (str | None): SeeSR's ``DAPE.pth``, applied on top of ``ram_path``.
        tiny (bool | dict): Tiny Swin (tests); a dict may give ``embed_dim`` (output width, default 512) and
            ``img_size``.
        embed_dim (int): Output width (RAM: 512).

    Shapes:
        forward: (B, 3, H, W) in [0, 1] -> (B, 1 + (img_size/32)^2, embed_dim); RAM: (B, 145, 512).
    """

    def __init__(self, ram_path=None, dape_path=None, tiny=False, embed_dim=512):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer
        if tiny:
            tiny = tiny if isinstance(tiny, dict) else {}
            embed_dim = tiny.get('embed_dim', embed_dim)
            swin = tiny_swin_config(tiny.get('img_size', 32))
        else:
            swin = dict(SWIN_L_384)
        self.img_size = swin['img_size']
        self.visual_encoder = SwinTransformer(num_classes=0, global_pool='', **swin)
        self.image_proj = nn.Linear(self.visual_encoder.num_features, embed_dim)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if ram_path:
            self.load_ram_checkpoints(ram_path, dape_path)
        elif dape_path:
            raise ValueError('RAMImageEmbedder: dape_path needs ram_path too (DAPE is applied on top of RAM).')
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        """The embedder stays in eval mode (it is frozen, and its dropout paths must stay off)."""
        return super().train(False)

    def load_ram_checkpoints(self, ram_path, dape_path=None):
        """Load RAM (then DAPE) weights with a strictly checked key mapping; see the module docstring."""
        own = self.state_dict()
        found, sources = {}, []
        for path, what in ((ram_path, 'RAM checkpoint'), (dape_path, 'DAPE checkpoint')):
            if not path:
                continue
            state = read_torch_checkpoint(path, what)
            sources.append(path)
            mapped = self._map_checkpoint(state, own, path, what)
            found.update(mapped)
        missing = sorted(set(own) - set(found))
        if missing:
            raise KeyError(f"RAM image embedder: {sources} lack the key(s) {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all, names in timm's Swin "
                           'layout). Check that ram_path is ram_swin_large_14m.pth (Swin-L, 384 px).')
        self.load_state_dict(found, strict=True)

    @staticmethod
    def _map_checkpoint(state, own, path, what):
        mapped, loras = {}, {}
        for key, value in state.items():
            if key.startswith('image_proj.'):
                target = key
            elif key.startswith('visual_encoder.'):
                inner = key[len('visual_encoder.'):]
                if inner.endswith(('.lora_A', '.lora_B')):
                    loras[inner] = value
                    continue
                target = ram_to_timm_key(inner)
                if target is None:
                    continue
                target = f'visual_encoder.{target}'
            else:
                continue  # RAM's tagging head, label embeddings, text decoder: not used for the embeddings
            if target not in own:
                raise KeyError(f"{what} '{path}': key '{key}' has no place in the RAM image embedder (mapped to "
                               f"'{target}'); the checkpoint is not RAM Swin-L, or its layout changed.")
            if tuple(value.shape) != tuple(own[target].shape):
                raise ValueError(f"{what} '{path}': key '{key}' has shape {tuple(value.shape)}, expected "
                                 f"{tuple(own[target].shape)} (Swin-L at 384 px, window 12).")
            mapped[target] = value.float()
        for inner in sorted(k for k in loras if k.endswith('.lora_A')):
            base = inner[:-len('.lora_A')]
            weight_key = f'visual_encoder.{ram_to_timm_key(base + ".weight")}'
            if base + '.lora_B' not in loras or weight_key not in own:
                raise KeyError(f"{what} '{path}': LoRA key 'visual_encoder.{inner}' has no matching lora_B or "
                               f"base weight '{weight_key}'.")
            weight = mapped.get(weight_key)
            if weight is None:
                raise KeyError(f"{what} '{path}': LoRA 'visual_encoder.{inner}' needs the base weight "
                               f"'visual_encoder.{base}.weight' in the same file.")
            mapped[weight_key] = merge_dape_lora(weight, loras[inner].float(), loras[base + '.lora_B'].float())
        orphans = sorted(k for k in loras if k.endswith('.lora_B') and k[:-len('.lora_B')] + '.lora_A' not in loras)
        if orphans:
            raise KeyError(f"{what} '{path}': key 'visual_encoder.{orphans[0]}' has no matching lora_A.")
        return mapped

    @torch.no_grad()
    def forward(self, images):
        """(B, 3, H, W) images in [0, 1] -> RAM image embeddings (B, 1 + N, D)."""
        x = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode='bicubic', align_corners=False,
                          antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        tokens = self.visual_encoder.forward_features(x).flatten(1, 2)  # (B, h, w, C) -> (B, N, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1 + N, C): average token first
        return self.image_proj(tokens)


def save_ram_checkpoint(embedder, path):
    """Write an embedder's weights as a RAM checkpoint (``{'model': ...}``, official Swin key layout)."""
    state = {}
    for key, value in embedder.state_dict().items():
        if key.startswith('visual_encoder.'):
            key = 'visual_encoder.' + timm_to_ram_key(key[len('visual_encoder.'):])
        state[key] = value.detach().clone()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({'model': state}, path)
    return path


def samples_with_ram_embeddings(store, embedder, prompts=None, device='cpu', extra_name='ram_embeds'):
    """The samples of a preference set with RAM embeddings of their LQ images (and tag prompts) added.

    Args:
        store (PreferenceLMDB): The source set.
        embedder (RAMImageEmbedder): The (frozen) embedder, already on ``device``.
        prompts (dict[str, str] | None): Tag prompts by sample id (e.g. RAM / DAPE tags computed elsewhere);
            a sample without an entry keeps its prompt.
        device (str | torch.device): Where the embedder runs.
        extra_name (str): Name of the extra array. Default: ``ram_embeds``.

    Yields:
        PreferenceSample: With ``extras[extra_name]`` a float32 array (1 + N, D) (RAM: (145, 512)).
    """
    import dataclasses

    import numpy as np
    for sid in store.ids():
        sample = store[sid]
        lq = torch.from_numpy(np.ascontiguousarray(sample.lq)).permute(2, 0, 1)[None].float().div(255)  # (1, 3, h, w)
        embeds = embedder(lq.to(device))[0].float().cpu().numpy()  # (1 + N, D)
        extras = dict(sample.extras or {}, **{extra_name: embeds.astype(np.float32)})
        prompt = prompts.get(sid, sample.prompt) if prompts else sample.prompt
        yield dataclasses.replace(sample, extras=extras, prompt=prompt)
