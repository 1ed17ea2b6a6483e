"""RAM image embeddings for SeeSR / AddSR: a Swin-L backbone (timm) and RAM's projection to (B, 145, 512).

Papers: Zhang et al., "Recognize Anything: A Strong Image Tagging Model" (RAM), 2023
(https://github.com/xinyu1205/recognize-anything); SeeSR's degradation-aware prompt extractor DAPE
(Wu et al., CVPR 2024), a LoRA fine-tune of RAM's image encoder.

What is computed (RAM's ``generate_image_embeds``): the LQ image resized to 384 x 384 and normalised with the
ImageNet mean / std goes through Swin-L (patch 4, window 12, depths 2-2-18-2, width 192); the final-norm
tokens (B, 144, 1536) are prefixed with their average (B, 1, 1536) and projected by ``image_proj``
(Linear 1536 -> 512): (B, 145, 512).

Tagging (RAM's ``generate_tag``, xinyu1205/recognize-anything ``ram/models/ram.py`` class ``RAM``; the same in
SeeSR's ``ram/models/ram_lora.py``), built with ``tagging=True``: the 4585 label embeddings ``label_embed``
(4585, 512) go through ``wordvec_proj`` (Linear 512 -> 768) and a ReLU, then through ``tagging_head``, a 2-layer
BERT in RAM's "tagging" mode (Query2Label: no token embeddings, no self-attention, each layer is cross-attention
to the image embeddings (4 heads) + feed-forward, ``ram/models/bert.py`` ``BertLayer``); ``fc`` (768 -> 1) gives
one logit per tag and a tag is kept where ``sigmoid(logit)`` exceeds its threshold in
``ram_tag_list_threshold.txt``. Tags are joined with ", " in tag-list order (SeeSR's ``ram_lora.py``).
The tag list and thresholds ship in ``ram_data/`` (Apache-2.0, see its README).

Checkpoint layout (local files, read with ``torch.load(weights_only=True)``: no unpickling of objects):
    ram_swin_large_14m.pth   {'model': state_dict} of RAM; used: ``visual_encoder.*`` (official Swin layout:
                             downsampling at the end of stages 0-2, ``relative_position_index`` / ``attn_mask``
                             buffers), ``image_proj.*`` and, with tagging, ``label_embed``, ``wordvec_proj.*``,
                             ``tagging_head.*`` and ``fc.*``; RAM's captioning parts (``tag_encoder``,
                             ``text_decoder``) are not needed and are skipped.
    DAPE.pth                 SeeSR's DAPE, as its trainer writes it (``basicsr/models/dape_model.py``,
                             ``save_network_lora``): a flat dict of only the keys that contain ``lora_``. SeeSR
                             applies it with ``strict=False`` on top of RAM (``ram/models/ram_lora.py``, ``ram``);
                             here every LoRA is merged into the RAM base weight it belongs to: loralib
                             ``MergedLinear`` on ``visual_encoder...attn.qkv`` (``lora_A`` (16, C), ``lora_B``
                             (2C, 8): rank 8 on q and v) and loralib ``Linear`` on the tagging head's
                             ``crossattention.self.query`` / ``key`` (rank 8); both scale by lora_alpha / r = 1/8.
                             LoRA of the captioning parts is ignored. A file that also holds base weights (a
                             full state dict) overrides RAM's weights with them.
Every backbone / projection / tagging weight must be found, and every key under those prefixes must be used;
otherwise an error names the key.
Weights licence: RAM is released under the Apache-2.0 licence; DAPE with SeeSR (see its repository).
"""
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from dspo_basicsr.utils.atomic_write import atomic_json_dump
from dspo_basicsr.utils.checkpoint import read_checkpoint
from dspo_basicsr.utils.image_io import read_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SWIN_L_384 = dict(img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                  num_heads=(6, 12, 24, 48))
# loralib MergedLinear(dim, 3 dim, r=8, enable_lora=[True, False, True]) with lora_alpha = 1: scaling 1/8.
DAPE_LORA_RANK = 8
DAPE_LORA_SCALING = 1.0 / DAPE_LORA_RANK
_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')
RAM_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ram_data')
# RAM's q2l_config.json (recognize-anything ram/configs/): 2 layers, width 768, 4 heads, feed-forward 3072.
RAM_TAGGING_HEAD = dict(num_class=4585, hidden=768, heads=4, layers=2, intermediate=3072)
TAGGING_PREFIXES = ('label_embed', 'wordvec_proj.', 'tagging_head.', 'fc.')


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


def merge_linear_lora(weight, lora_a, lora_b, scaling=DAPE_LORA_SCALING):
    """Merge a loralib ``Linear`` LoRA: ``W + B A * scaling``; weight (out, in), lora_a (r, in), lora_b (out, r)."""
    return weight + (lora_b @ lora_a) * scaling


def read_ram_tag_data(num_class=None):
    """RAM's tag list and per-tag thresholds (package data, ``ram_data/``), the first ``num_class`` if given.

    Returns:
        tuple[list[str], Tensor]: Tags and thresholds (num_class,).
    """
    with open(os.path.join(RAM_DATA, 'ram_tag_list.txt'), encoding='utf-8') as f:
        tags = f.read().splitlines()
    with open(os.path.join(RAM_DATA, 'ram_tag_list_threshold.txt'), encoding='utf-8') as f:
        thresholds = [float(line) for line in f.read().split()]
    if len(tags) != len(thresholds):
        raise ValueError(f"{RAM_DATA}: {len(tags)} tags but {len(thresholds)} thresholds; the package data is damaged, "
                         'reinstall dspo_basicsr.')
    num_class = num_class or len(tags)
    return tags[:num_class], torch.tensor(thresholds[:num_class])


class TaggingAttentionLayer(nn.Module):
    """One layer of RAM's tagging head in "tagging" mode: cross-attention of the label queries to the image
    embeddings, then the feed-forward; post-LayerNorm residuals (BERT). Submodule names are RAM's
    (``crossattention.self.query`` ..., ``intermediate.dense``, ``output.dense``, ``output.LayerNorm``).

    Shapes:
        forward: queries (B, K, H), image embeddings (B, L, E) -> (B, K, H).
    """

    def __init__(self, hidden, heads, encoder_width, intermediate):
        super().__init__()
        self.heads = heads
        self.crossattention = nn.Module()
        self.crossattention.self = nn.Module()
        self.crossattention.self.query = nn.Linear(hidden, hidden)
        self.crossattention.self.key = nn.Linear(encoder_width, hidden)
        self.crossattention.self.value = nn.Linear(encoder_width, hidden)
        self.crossattention.output = nn.Module()
        self.crossattention.output.dense = nn.Linear(hidden, hidden)
        self.crossattention.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, queries, image_embeds):
        attn = self.crossattention
        b, k, hidden = queries.shape

        def heads(x):  # (B, N, H) -> (B, heads, N, H / heads)
            return x.view(b, x.shape[1], self.heads, hidden // self.heads).transpose(1, 2)
        context = F.scaled_dot_product_attention(
            heads(attn.self.query(queries)), heads(attn.self.key(image_embeds)), heads(attn.self.value(image_embeds)))
        context = context.transpose(1, 2).reshape(b, k, hidden)  # (B, heads, K, d) -> (B, K, H)
        hidden_states = attn.output.LayerNorm(attn.output.dense(context) + queries)
        feed_forward = self.output.dense(F.gelu(self.intermediate.dense(hidden_states)))
        return self.output.LayerNorm(feed_forward + hidden_states)


class RAMImageEmbedder(nn.Module):
    """RAM / DAPE image embeddings (and, with ``tagging``, RAM's tags) of LQ images, frozen.

    Args:
        ram_path (str | None): RAM checkpoint (``ram_swin_large_14m.pth``, or a smaller one in the same layout).
        dape_path (str | None): SeeSR's ``DAPE.pth`` (LoRA only), applied on top of ``ram_path``.
        swin (dict | None): timm ``SwinTransformer`` arguments of the image encoder; None: RAM's Swin-L (384 px).
        tagging_head (dict | None): ``num_class`` (the first tags of RAM's list), ``hidden``, ``heads``, ``layers``,
            ``intermediate`` of the tagging head; None: RAM's.
        embed_dim (int): Output width (RAM: 512).
        tagging (bool): Build RAM's tagging head (``label_embed``, ``wordvec_proj``, ``tagging_head``, ``fc``) and
            load it too, for :meth:`tags`.

    Shapes:
        forward: (B, 3, H, W) in [0, 1] -> (B, 1 + (img_size/32)^2, embed_dim); RAM: (B, 145, 512).
    """

    def __init__(self, ram_path=None, dape_path=None, embed_dim=512, tagging=False, swin=None, tagging_head=None):
        super().__init__()
        from timm.models.swin_transformer import SwinTransformer
        head = dict(tagging_head or RAM_TAGGING_HEAD)
        swin = dict(swin or SWIN_L_384)
        self.img_size = swin['img_size']
        self.visual_encoder = SwinTransformer(num_classes=0, global_pool='', **swin)
        self.image_proj = nn.Linear(self.visual_encoder.num_features, embed_dim)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.tagging = bool(tagging)
        if self.tagging:
            self.tag_list, thresholds = read_ram_tag_data(head['num_class'])
            self.register_buffer('class_threshold', thresholds, persistent=False)
            self.label_embed = nn.Parameter(torch.zeros(len(self.tag_list), embed_dim))  # (K, E)
            self.wordvec_proj = nn.Linear(embed_dim, head['hidden'])
            self.tagging_head = nn.Module()
            self.tagging_head.encoder = nn.Module()
            self.tagging_head.encoder.layer = nn.ModuleList(
                TaggingAttentionLayer(head['hidden'], head['heads'], embed_dim, head['intermediate'])
                for _ in range(head['layers']))
            self.fc = nn.Linear(head['hidden'], 1)
        if ram_path:
            self.load_ram_checkpoints(ram_path, dape_path)
        elif dape_path:
            raise ValueError('RAMImageEmbedder: dape_path needs ram_path too (DAPE is applied on top of RAM).')
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        """The embedder stays in eval mode (it is frozen, and its dropout paths must stay off)."""
        return super().train(False)

    def load_ram_checkpoints(self, ram_path, dape_path=None):
        """Load RAM, then merge DAPE's LoRA into it, with a strictly checked key mapping (see the module docstring)."""
        own = self.state_dict()
        found = self._map_checkpoint(read_checkpoint(ram_path, 'RAM checkpoint'), own, ram_path,
                                     'RAM checkpoint', self.tagging)
        sources = [ram_path]
        if dape_path:
            dape = read_checkpoint(dape_path, 'DAPE checkpoint')
            sources.append(dape_path)
            loras = {k: v for k, v in dape.items() if 'lora_' in k}
            found.update(self._map_checkpoint({k: v for k, v in dape.items() if 'lora_' not in k}, own, dape_path,
                                              'DAPE checkpoint', self.tagging))
            self._merge_dape(found, loras, dape_path)
        missing = sorted(set(own) - set(found))
        if missing:
            raise KeyError(f"RAM image embedder: {sources} lack the key(s) {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all, names in timm's Swin "
                           'layout). Check that ram_path is ram_swin_large_14m.pth (Swin-L, 384 px).')
        self.load_state_dict(found, strict=True)

    @staticmethod
    def _map_checkpoint(state, own, path, what, tagging):
        mapped = {}
        prefixes = ('visual_encoder.', 'image_proj.') + (TAGGING_PREFIXES if tagging else ())
        for key, value in state.items():
            if not key.startswith(prefixes):
                continue  # RAM's captioning parts (tag_encoder, text_decoder), or tagging when not asked for
            target = key
            if key.startswith('visual_encoder.'):
                target = ram_to_timm_key(key[len('visual_encoder.'):])
                if target is None:
                    continue
                target = f'visual_encoder.{target}'
            if target not in own:
                raise KeyError(f"{what} '{path}': key '{key}' has no place in the RAM image embedder (mapped to "
                               f"'{target}'); the checkpoint is not RAM Swin-L, or its layout changed.")
            if tuple(value.shape) != tuple(own[target].shape):
                raise ValueError(f"{what} '{path}': key '{key}' has shape {tuple(value.shape)}, expected "
                                 f"{tuple(own[target].shape)} (Swin-L at 384 px, window 12).")
            mapped[target] = value.float()
        return mapped

    def _merge_dape(self, found, loras, path):
        """Merge DAPE's LoRA pairs (``<module>.lora_A`` / ``lora_B``) into the base weights in ``found``."""
        modules = sorted({k.rsplit('.', 1)[0] for k in loras})
        for module in modules:
            if not module.startswith(('visual_encoder.', 'tagging_head.')):
                continue  # LoRA of RAM's captioning parts (tag_encoder, text_decoder): not used here
            if module.startswith('tagging_head.') and not self.tagging:
                continue
            lora_a, lora_b = loras.get(module + '.lora_A'), loras.get(module + '.lora_B')
            if lora_a is None or lora_b is None:
                raise KeyError(f"DAPE checkpoint '{path}': '{module}' has only one of lora_A / lora_B; the file is "
                               'incomplete (re-save it with SeeSR\'s DAPE trainer).')
            weight_key = module + '.weight'
            if module.startswith('visual_encoder.'):
                weight_key = 'visual_encoder.' + ram_to_timm_key(weight_key[len('visual_encoder.'):])
            if weight_key not in found:
                raise KeyError(f"DAPE checkpoint '{path}': LoRA '{module}' belongs to no weight of the RAM image "
                               f"embedder ('{weight_key}'); the file is not SeeSR's DAPE for RAM Swin-L.")
            weight = found[weight_key]
            merge = merge_dape_lora if module.endswith('.qkv') else merge_linear_lora
            merged = merge(weight, lora_a.float(), lora_b.float())
            if merged.shape != weight.shape:
                raise ValueError(f"DAPE checkpoint '{path}': LoRA '{module}' gives shape {tuple(merged.shape)}, "
                                 f'expected {tuple(weight.shape)}.')
            found[weight_key] = merged

    def preprocess(self, images, resize_mode='bilinear'):
        """(B, 3, H, W) in [0, 1] -> RAM's input: SeeSR's ``ram_transforms`` (``test_seesr.py``), a bilinear
        resize of the tensor to img_size x img_size (torchvision's tensor ``Resize``, no antialias in SeeSR's
        torchvision 0.15) and the ImageNet normalisation. ``resize_mode='bicubic'``: AddSR's PSR re-embedding
        (``pipeline_addsr.py``, ``F.interpolate(..., mode='bicubic')``)."""
        x = F.interpolate(images.float(), size=(self.img_size, self.img_size), mode=resize_mode, align_corners=False)
        return (x - self.mean) / self.std

    def image_embeds(self, x):
        """Preprocessed (B, 3, S, S) -> (B, 1 + N, E): RAM's ``image_proj(visual_encoder(x))``."""
        tokens = self.visual_encoder.forward_features(x).flatten(1, 2)  # (B, h, w, C) -> (B, N, C)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # (B, 1 + N, C): average token first
        return self.image_proj(tokens)

    @torch.no_grad()
    def forward(self, images, resize_mode='bilinear'):
        """(B, 3, H, W) images in [0, 1] -> RAM image embeddings (B, 1 + N, D) (``resize_mode``: see
        :meth:`preprocess`)."""
        return self.image_embeds(self.preprocess(images, resize_mode))

    @torch.no_grad()
    def tag_logits(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, K) tag logits (RAM's ``generate_tag`` before the thresholds)."""
        if not self.tagging:
            raise ValueError('this RAM image embedder has no tagging head: build it with tagging=True (network_g: '
                             'a ram_path, and prompt_source: tags).')
        image_embeds = self.image_embeds(self.preprocess(images))  # (B, 1 + N, E)
        queries = F.relu(self.wordvec_proj(self.label_embed))  # (K, H)
        queries = queries.unsqueeze(0).expand(images.shape[0], -1, -1)  # (B, K, H)
        for layer in self.tagging_head.encoder.layer:
            queries = layer(queries, image_embeds)
        return self.fc(queries).squeeze(-1)

    @torch.no_grad()
    def tags(self, images):
        """(B, 3, H, W) in [0, 1] -> B strings "tag, tag, ..." (tags over their thresholds, in tag-list order)."""
        keep = torch.sigmoid(self.tag_logits(images)) > self.class_threshold.to(images.device)  # (B, K)
        return [', '.join(self.tag_list[i] for i in row.nonzero().flatten().tolist()) for row in keep.cpu()]


def save_ram_checkpoint(embedder, path):
    """Write an embedder's weights as a RAM checkpoint (``{'model': ...}``, official Swin key layout).

    A stand-in for RAM's captioning parts (``tag_encoder``, which the embedder skips) is written too, so the file
    has the mix of used and unused keys that the released one has.
    """
    state = {}
    for key, value in embedder.state_dict().items():
        if key.startswith('visual_encoder.'):
            key = 'visual_encoder.' + timm_to_ram_key(key[len('visual_encoder.'):])
        state[key] = value.detach().clone()
    width = embedder.image_proj.out_features
    state['tag_encoder.encoder.layer.0.attention.self.query.weight'] = torch.zeros(width, width)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({'model': state}, path)
    return path


def dape_lora_state(embedder, seed=0, std=0.5):
    """Random DAPE LoRA tensors for ``embedder`` keyed exactly as SeeSR's DAPE trainer saves them.

    SeeSR's ``basicsr/models/dape_model.py`` (``save_network_lora``, ``lora_state_dict``) saves the keys of its
    ``RAMLora`` that contain ``lora_``: rank-8 loralib ``MergedLinear`` on every Swin ``attn.qkv`` (q and v) and
    rank-8 loralib ``Linear`` on the query / key of every BERT attention (``ram/models/bert_lora.py``): the
    tagging head's cross-attention and, here as a stand-in, one layer of the captioning ``tag_encoder`` and
    ``text_decoder`` (which the embedder must ignore). Official Swin names (the blocks' names equal timm's).

    Returns:
        dict[str, Tensor]: The flat state dict that ``torch.save`` writes as DAPE.pth.
    """
    gen = torch.Generator().manual_seed(seed)
    r = DAPE_LORA_RANK

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * std
    state = {}
    for name, module in embedder.visual_encoder.named_modules():
        if name.endswith('attn.qkv'):
            dim = module.in_features
            base = 'visual_encoder.' + timm_to_ram_key(name)
            state[base + '.lora_A'], state[base + '.lora_B'] = rand(2 * r, dim), rand(2 * dim, r)
    width = embedder.image_proj.out_features
    bert_layers = []
    if embedder.tagging:
        hidden = embedder.fc.in_features
        for i in range(len(embedder.tagging_head.encoder.layer)):
            bert_layers.append((f'tagging_head.encoder.layer.{i}.crossattention.self', hidden, width))
    for prefix in ('tag_encoder.encoder.layer.0', 'text_decoder.bert.encoder.layer.0'):
        bert_layers += [(f'{prefix}.attention.self', width, width), (f'{prefix}.crossattention.self', width, width)]
    for base, hidden, key_width in bert_layers:
        state[f'{base}.query.lora_A'], state[f'{base}.query.lora_B'] = rand(r, hidden), rand(hidden, r)
        state[f'{base}.key.lora_A'], state[f'{base}.key.lora_B'] = rand(r, key_width), rand(hidden, r)
    return state


def save_dape_checkpoint(embedder, path, seed=0):
    """Write a LoRA-only DAPE.pth for ``embedder`` (see :func:`dape_lora_state`); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(dape_lora_state(embedder, seed), path)
    return path


def samples_with_ram_embeddings(store, embedder, prompts=None, device='cpu', extra_name='ram_embeds', tags=False):
    """The samples of a preference set with RAM embeddings of their LQ images (and tag prompts) added.

    Args:
        store (PreferenceLMDB): The source set.
        embedder (RAMImageEmbedder): The (frozen) embedder, already on ``device``.
        prompts (dict[str, str] | None): Tag prompts by sample id (e.g. RAM / DAPE tags computed elsewhere);
            a sample without an entry keeps its prompt.
        device (str | torch.device): Where the embedder runs.
        extra_name (str): Name of the extra array. Default: ``ram_embeds``.
        tags (bool): Replace each prompt by the embedder's RAM / DAPE tags of the LQ (``tagging=True`` needed),
            followed by ", " and the sample's own prompt when it has one (``prompts`` wins over both).

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
        prompt = sample.prompt
        if tags:
            prompt = ', '.join(p for p in (embedder.tags(lq.to(device))[0], (sample.prompt or '').strip()) if p)
        prompt = prompts.get(sid, prompt) if prompts else prompt
        yield dataclasses.replace(sample, extras=extras, prompt=prompt)


TAG_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def tag_image_folder(folder, out, embedder, upscale=1, device='cpu', progress=True):
    """Write {stem: tags} of the images in ``folder`` to ``out`` (resuming from it); returns the mapping."""
    import json

    from tqdm import tqdm
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(TAG_IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"'{folder}' holds no images ({', '.join(TAG_IMAGE_EXTENSIONS)}).")
    tags = {}
    if os.path.isfile(out):
        with open(out, encoding='utf-8') as f:
            tags = json.load(f)
    for name in tqdm(names, desc='tagging', disable=not progress):
        stem = os.path.splitext(name)[0]
        if stem in tags:
            continue
        image = read_rgb(os.path.join(folder, name))[None].to(device)  # (1, 3, H, W)
        if upscale > 1:
            image = F.interpolate(image, scale_factor=upscale, mode='bicubic', align_corners=False).clamp(0, 1)
        tags[stem] = embedder.tags(image)[0]
        atomic_json_dump(tags, out, indent=1, ensure_ascii=False)  # after each image: a killed run loses nothing
    return tags
