"""The official test scripts' inference, on tiny random weights saved in the released layouts: DAPE LoRA-only
files, RAM's tagging head, each sampler against a step-by-step reference, colour fix, tiling, tag prompts."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.archs.color_fix import adain_color_fix, color_fix, wavelet_color_fix, wavelet_decomposition
from dspo_basicsr.archs.ram_arch import (
    dape_lora_state,
    read_ram_tag_data,
    save_dape_checkpoint,
    save_ram_checkpoint,
)
from dspo_basicsr.demo.tiny_arch import TinyAddSRArch, TinyControlSD2Arch, TinyOSEDiffArch, TinySeeSRArch
from dspo_basicsr.demo.tiny_components import tiny_ram_embedder

TINY_RAM = {'embed_dim': 24}


def _perturbed_tagger():
    torch.manual_seed(0)
    embedder = tiny_ram_embedder(**TINY_RAM, tagging=True)
    with torch.no_grad():
        for p in embedder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return embedder


def test_lora_only_dape_file_is_merged_onto_the_ram_base(tmp_path):
    base = _perturbed_tagger()
    ram = save_ram_checkpoint(base, str(tmp_path / 'ram.pth'))
    dape_path = save_dape_checkpoint(base, str(tmp_path / 'DAPE.pth'), seed=3)
    dape = torch.load(dape_path, weights_only=True)
    # Written as SeeSR's DAPE trainer writes it: a flat dict of only 'lora_' keys, captioning LoRA included.
    assert all('lora_' in k for k in dape) and any(k.startswith('tag_encoder.') for k in dape)
    loaded = tiny_ram_embedder(ram_path=ram, dape_path=dape_path, **TINY_RAM, tagging=True)
    own = loaded.state_dict()
    raw = torch.load(ram, weights_only=True)['model']

    # Hand merge of loralib MergedLinear(enable_lora=[q, k: no, v]) on one Swin qkv, rank 8, scaling 1/8.
    qkv = 'visual_encoder.layers.1.blocks.0.attn.qkv'
    w, a, b = raw[qkv + '.weight'], dape[qkv + '.lora_A'], dape[qkv + '.lora_B']
    c = w.shape[1]
    expected = w.clone()
    expected[:c] += b[:c] @ a[:8] / 8
    expected[2 * c:] += b[c:] @ a[8:] / 8
    torch.testing.assert_close(own[qkv + '.weight'], expected)
    torch.testing.assert_close(own[qkv + '.weight'][c:2 * c], w[c:2 * c])
    # loralib Linear on the tagging head's cross-attention query: W + B A / 8; value untouched.
    query = 'tagging_head.encoder.layer.1.crossattention.self.query'
    torch.testing.assert_close(own[query + '.weight'],
                               raw[query + '.weight'] + dape[query + '.lora_B'] @ dape[query + '.lora_A'] / 8)
    value = 'tagging_head.encoder.layer.1.crossattention.self.value.weight'
    torch.testing.assert_close(own[value], raw[value])

    # The embeddings are those of the hand-merged network.
    manual = tiny_ram_embedder(**TINY_RAM, tagging=True)
    state = dict(base.state_dict())
    state['visual_encoder.layers.1.blocks.0.attn.qkv.weight'] = expected
    merged = {}
    for module in {k.rsplit('.', 1)[0] for k in dape if k.startswith(('visual_encoder.', 'tagging_head.'))}:
        key = module + '.weight'
        if key.startswith('visual_encoder.'):
            key = key.replace('layers.0.downsample', 'layers.1.downsample')
        lora_a, lora_b = dape[module + '.lora_A'], dape[module + '.lora_B']
        if module.endswith('qkv'):
            dim = lora_a.shape[1]
            delta = torch.zeros(3 * dim, dim)
            delta[:dim], delta[2 * dim:] = lora_b[:dim] @ lora_a[:8] / 8, lora_b[dim:] @ lora_a[8:] / 8
        else:
            delta = lora_b @ lora_a / 8
        merged[key] = base.state_dict()[key] + delta
    state.update(merged)
    manual.load_state_dict(state)
    images = torch.rand(2, 3, 20, 24)
    torch.testing.assert_close(loaded(images), manual(images))
    torch.testing.assert_close(loaded.tag_logits(images), manual.tag_logits(images))
    assert not torch.allclose(loaded(images), base(images))

    # Without tagging the tagging-head LoRA is ignored, never a reason to fail.
    plain = tiny_ram_embedder(ram_path=ram, dape_path=dape_path, **TINY_RAM)
    torch.testing.assert_close(plain(images), loaded(images))
    # A LoRA with no base weight, or half a pair, is named.
    torch.save(dict(dape, **{'visual_encoder.layers.9.blocks.0.attn.qkv.lora_A': torch.zeros(16, 4),
                             'visual_encoder.layers.9.blocks.0.attn.qkv.lora_B': torch.zeros(8, 8)}),
               tmp_path / 'bad.pth')
    with pytest.raises(KeyError, match='layers.9.blocks.0.attn.qkv'):
        tiny_ram_embedder(ram_path=ram, dape_path=str(tmp_path / 'bad.pth'), **TINY_RAM)
    half = {k: v for k, v in dape.items() if k != qkv + '.lora_B'}
    torch.save(half, tmp_path / 'half.pth')
    with pytest.raises(KeyError, match='only one of lora_A'):
        tiny_ram_embedder(ram_path=ram, dape_path=str(tmp_path / 'half.pth'), **TINY_RAM)


def _ram_tags_by_formula(state, images, heads, thresholds, tag_list, img_size=32):
    """RAM's generate_tag written out from ram.py / bert.py (tagging mode), on a RAM-layout state dict."""
    embedder = tiny_ram_embedder(**TINY_RAM)  # only the image embeddings part, loaded from the same file
    embedder.load_state_dict({k: v for k, v in _timm_state(state).items() if k in embedder.state_dict()})
    x = F.interpolate(images, size=(img_size, img_size), mode='bilinear', align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    image_embeds = embedder.image_embeds(x)  # (B, L, E)

    def linear(name, value):
        return value @ state[name + '.weight'].T + state[name + '.bias']

    def layer_norm(name, value):
        mean = value.mean(-1, keepdim=True)
        var = value.var(-1, keepdim=True, unbiased=False)
        return (value - mean) / torch.sqrt(var + 1e-12) * state[name + '.weight'] + state[name + '.bias']
    hidden = torch.relu(linear('wordvec_proj', state['label_embed']))[None].repeat(images.shape[0], 1, 1)
    layer = 0
    while f'tagging_head.encoder.layer.{layer}.output.dense.weight' in state:
        p = f'tagging_head.encoder.layer.{layer}'
        q = linear(f'{p}.crossattention.self.query', hidden)
        k = linear(f'{p}.crossattention.self.key', image_embeds)
        v = linear(f'{p}.crossattention.self.value', image_embeds)
        d = q.shape[-1] // heads
        split = lambda t, d=d: t.view(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)  # + zero mask (all image tokens kept)
        context = (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(q.shape)
        attention = layer_norm(f'{p}.crossattention.output.LayerNorm',
                               linear(f'{p}.crossattention.output.dense', context) + hidden)
        inter = linear(f'{p}.intermediate.dense', attention)
        inter = 0.5 * inter * (1 + torch.erf(inter / math.sqrt(2)))  # BERT's exact gelu
        hidden = layer_norm(f'{p}.output.LayerNorm', linear(f'{p}.output.dense', inter) + attention)
        layer += 1
    logits = linear('fc', hidden).squeeze(-1)
    keep = torch.sigmoid(logits) > thresholds
    return logits, [', '.join(t for t, on in zip(tag_list, row) if on) for row in keep.tolist()]


def _timm_state(state):
    from dspo_basicsr.archs.ram_arch import ram_to_timm_key
    out = {}
    for key, value in state.items():
        if key.startswith('visual_encoder.'):
            inner = ram_to_timm_key(key[len('visual_encoder.'):])
            if inner is None:
                continue
            key = 'visual_encoder.' + inner
        out[key] = value
    return out


def test_tagging_head_loads_ram_layout_strictly_and_equals_rams_formula(tmp_path):
    ram = save_ram_checkpoint(_perturbed_tagger(), str(tmp_path / 'ram.pth'))
    state = torch.load(ram, weights_only=True)['model']
    assert state['label_embed'].shape == (16, 24) and 'wordvec_proj.weight' in state and 'fc.weight' in state
    assert 'tagging_head.encoder.layer.0.crossattention.self.key.weight' in state
    assert not any('.attention.' in k for k in state if k.startswith('tagging_head.'))  # self-attention deleted
    tagger = tiny_ram_embedder(ram_path=ram, **TINY_RAM, tagging=True)
    images = torch.rand(3, 3, 28, 20)
    probs = torch.sigmoid(tagger.tag_logits(images))
    # a threshold that keeps some tags and drops some, halfway between two probabilities (never on one, where the
    # tagger's and the formula's roundings could fall on either side)
    middle = probs.flatten().sort().values[probs.numel() // 2 - 1:probs.numel() // 2 + 1]
    tagger.class_threshold = middle.mean().expand(16).clone()
    logits, tags = _ram_tags_by_formula(state, images, heads=2, thresholds=tagger.class_threshold,
                                        tag_list=tagger.tag_list)
    torch.testing.assert_close(tagger.tag_logits(images), logits, rtol=1e-4, atol=1e-5)
    assert tagger.tags(images) == tags and any(tags) and not all(t.count(',') == 15 for t in tags)

    # The package data: RAM's 4585 tags and per-tag thresholds, the tiny head takes the first ones.
    all_tags, thresholds = read_ram_tag_data()
    assert len(all_tags) == len(thresholds) == 4585 and tagger.tag_list == all_tags[:16]
    # Strict keys: a tagging key with no place, or a missing one, is named.
    torch.save({'model': dict(state, **{'tagging_head.encoder.layer.0.attention.self.query.weight': torch.zeros(1)})},
               tmp_path / 'extra.pth')
    with pytest.raises(KeyError, match='attention.self.query.weight'):
        tiny_ram_embedder(ram_path=str(tmp_path / 'extra.pth'), **TINY_RAM, tagging=True)
    torch.save({'model': {k: v for k, v in state.items() if k != 'label_embed'}}, tmp_path / 'lacking.pth')
    with pytest.raises(KeyError, match='label_embed'):
        tiny_ram_embedder(ram_path=str(tmp_path / 'lacking.pth'), **TINY_RAM, tagging=True)


def test_dape_lora_state_has_the_trainers_key_names():
    state = dape_lora_state(tiny_ram_embedder(**TINY_RAM, tagging=True))
    assert 'visual_encoder.layers.0.blocks.0.attn.qkv.lora_A' in state
    assert state['visual_encoder.layers.0.blocks.0.attn.qkv.lora_A'].shape == (16, 16)
    assert 'tagging_head.encoder.layer.0.crossattention.self.key.lora_B' in state


# ------------------------------------------------------------------ colour fix
def test_adain_gives_the_lq_channel_statistics_and_wavelet_keeps_its_low_frequencies():
    torch.manual_seed(0)
    output = torch.rand(2, 3, 32, 32) * 0.5 + 0.2
    reference = torch.rand(2, 3, 32, 32) * 0.3 + 0.4
    fixed = adain_color_fix(output, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-3, rtol=0)
    # wavelet: the output's 5-level high frequencies on the reference's low frequencies (StableSR's colour fix).
    output = output * 0.2 + 0.4  # no clamping involved
    fixed = wavelet_color_fix(output, reference)
    high_out, low_out = wavelet_decomposition(output)
    torch.testing.assert_close(high_out + low_out, output)
    torch.testing.assert_close(fixed, high_out + wavelet_decomposition(reference)[1])
    coarse = lambda x: F.avg_pool2d(x, 16)  # noqa: E731  (the coarse scale: LQ colours)
    assert (coarse(fixed) - coarse(reference)).abs().max() < 0.02 < (coarse(output) - coarse(reference)).abs().max()
    assert color_fix(output, reference, 'none') is output
    with pytest.raises(ValueError, match='color_fix must be one of'):
        color_fix(output, reference, 'histogram')


# ------------------------------------------------------------------ samplers against step-by-step references
def _ddpm(arch):
    return DDPMScheduler.from_config(arch.noise_scheduler.config)


def test_seesr_sampler_equals_the_official_algorithm_step_by_step():
    arch = TinySeeSRArch(default_negative_prompt='noise').eval()
    lq = torch.rand(1, 3, 8, 8)
    out = arch.sample(lq, prompt='a', steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(5))
    # pipeline_seesr.py: noise from prepare_latents, LQ latent from latent_dist.sample(), noised to 999 exactly,
    # then DDPM over the 3-step schedule with guidance eps_u + s (eps_c - eps_u), the generator in every step.
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    up = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    z = arch.vae.encode(up * 2 - 1).latent_dist.sample(gen) * arch.vae.config.scaling_factor
    latents = _ddpm(arch).add_noise(z, noise, torch.tensor([999]))
    scheduler = _ddpm(arch)
    scheduler.set_timesteps(3)
    assert int(scheduler.timesteps[0]) < 999
    prompt, negative = arch.encode_prompts(['a, clean, high-resolution, 8k']), arch.encode_prompts(['noise'])
    embeds = arch.ram(lq)
    for t in scheduler.timesteps:
        eps = [arch.predict_noise(latents, t.expand(1), {'control_image': up, 'image_embeds': embeds,
                                                         'prompt_embeds': text}) for text in (negative, prompt)]
        latents = scheduler.step(eps[0] + 2.0 * (eps[1] - eps[0]), t, latents, generator=gen).prev_sample
    torch.testing.assert_close(out, arch.decode_latents(latents))


def test_addsr_sampler_equals_the_official_algorithm_step_by_step():
    arch = TinyAddSRArch().eval()
    assert arch.psr_weight == 0.4
    lq = torch.rand(1, 3, 8, 8)
    out = arch.sample(lq, prompt='', generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    up = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    z = arch.vae.encode(up * 2 - 1).latent_dist.sample(gen) * arch.vae.config.scaling_factor
    alphas = arch.noise_scheduler.alphas_cumprod
    latents = alphas[999].sqrt() * z + (1 - alphas[999]).sqrt() * noise
    text = arch.encode_prompts([arch.added_prompt])
    control, embeds = up, arch.ram(lq)
    steps = [999, 749, 499, 249]
    for i, t in enumerate(steps):
        eps = arch.predict_noise(latents, torch.tensor([t]), {'control_image': control, 'image_embeds': embeds,
                                                             'prompt_embeds': text})
        x0 = (latents - (1 - alphas[t]).sqrt() * eps) / alphas[t].sqrt()
        if i + 1 < len(steps):
            fresh = torch.randn(1, 4, 8, 8, generator=gen)
            latents = alphas[steps[i + 1]].sqrt() * x0 + (1 - alphas[steps[i + 1]]).sqrt() * fresh
            control = 0.4 * arch.decode_latents(x0) + 0.6 * up  # PSR with the pipeline's 0.4
            embeds = arch.ram(control)
    torch.testing.assert_close(out, arch.decode_latents(x0), rtol=1e-4, atol=1e-5)


def test_osediff_and_controlsd2_samplers_equal_their_references():
    lq = torch.rand(1, 3, 8, 8)
    up = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    arch = TinyOSEDiffArch().eval()
    out = arch.sample(lq, prompt='x', generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    # osediff.py OSEDiff_test.forward: z = encoder(lq).latent_dist.sample(); one UNet call at 999; x0; decode.
    z = arch.lq_vae.encode(up * 2 - 1).latent_dist.sample(gen) * arch.lq_vae.config.scaling_factor
    eps = arch.unet(z, torch.tensor([999]), encoder_hidden_states=arch.encode_prompts(['x'])).sample
    a = arch.noise_scheduler.alphas_cumprod[999]
    torch.testing.assert_close(out, arch.decode_latents((z - (1 - a).sqrt() * eps) / a.sqrt()))

    arch = TinyControlSD2Arch(sampler='ddim').eval()
    out = arch.sample(lq, prompt='x', steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    scheduler = DDIMScheduler.from_config(arch.noise_scheduler.config)
    scheduler.set_timesteps(3)
    latents = torch.randn(1, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    cond = {'control_image': up, 'prompt_embeds': arch.encode_prompts(['x'])}
    for t in scheduler.timesteps:
        latents = scheduler.step(arch.predict_noise(latents, t.expand(1), cond), t, latents).prev_sample
    torch.testing.assert_close(out, arch.decode_latents(latents))


# ------------------------------------------------------------------ tags, tiling, process size
def test_tag_prompts_follow_the_official_scripts():
    lq = torch.rand(2, 3, 8, 8)
    seesr = TinySeeSRArch()
    tags = seesr.ram.tags(lq)
    prompts, _ = seesr.sampling_prompts(lq, 'user', None, prompt_source='tags')
    assert prompts == [f'{t}, user,clean, high-resolution, 8k' for t in tags]  # test_seesr.py's string
    osediff = TinyOSEDiffArch()
    up = F.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    prompts, _ = osediff.sampling_prompts(lq, '', None, prompt_source='tags')
    assert prompts == [f'{t}, ,' for t in osediff.ram.tags(up)]
    with pytest.raises(ValueError, match='tagging head'):
        TinySeeSRArch(random_ram=False).sampling_prompts(lq, '', None, prompt_source='tags')


def test_tiled_and_untiled_sampling_agree_where_tiles_overlap():
    arch = TinyOSEDiffArch().eval()
    # A local predictor (a function of each latent pixel and its spatial conditions): tiles blend back exactly,
    # so windows, crops of the spatial conditions and the Gaussian normalisation are right.
    x = torch.randn(2, 4, 20, 28)
    cond = {'control_image': torch.rand(2, 3, 80, 112), 'lq_latents': torch.randn(2, 4, 20, 28),
            'prompt_embeds': torch.randn(2, 5, 8)}

    def local(x_t, c):
        return x_t * c['lq_latents'] + F.avg_pool2d(c['control_image'], 4).mean(1, keepdim=True) \
            + c['prompt_embeds'].mean()
    torch.testing.assert_close(arch.tiled_prediction(local, x, cond, (12, 4)), local(x, cond))
    # The tiny UNet (global attention, group norm) on 12 x 12 tiles of a 16 x 16 latent, overlap 4: close.
    lq = torch.rand(1, 3, 16, 16)
    whole = arch.sample(lq, generator=torch.Generator().manual_seed(0))
    tiled = arch.sample(lq, generator=torch.Generator().manual_seed(0), tile_size=12, tile_overlap=4)
    assert not torch.equal(whole, tiled)  # the tiles really ran
    assert (whole - tiled).abs().mean() < 0.1, (whole - tiled).abs().mean()
    with_fix = arch.sample(lq, generator=torch.Generator().manual_seed(0), color_fix='adain', process_size=128,
                           vae_tile=True)
    assert with_fix.shape == whole.shape  # sampled from a 32 x 32 LQ, resized back


# ------------------------------------------------------------------ basicsr test with the official protocol
@pytest.mark.slow
@pytest.mark.parametrize('framework', ['seesr', 'osediff'])
def test_basicsr_test_runs_with_tag_prompts_and_colour_fix(framework, tmp_path):
    import glob

    from conftest import run_cli, write_options
    from framework_fixtures import build_framework_checkpoints, sr_test_options
    paths = build_framework_checkpoints(str(tmp_path), framework)
    assert paths['dape_path'] and all('lora_' in k for k in torch.load(paths['dape_path'], weights_only=True))
    opt = sr_test_options(framework, paths, None, str(tmp_path))
    opt['network_g'].update(type='Tiny' + opt['network_g']['type'].replace('Tiny', ''), ram_path=paths['ram_path'],
                            dape_path=paths['dape_path'])
    opt['path']['pretrain_network_g'] = None  # the released networks themselves
    opt['val']['sample'].update(prompt_source='tags', color_fix='adain', process_size=64, tile_size=8,
                                tile_overlap=4)
    result = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', opt)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(glob.glob(str(tmp_path / 'results' / opt['name'] / 'visualization' / 'tiny_pairs' / '*.png'))) == 2


def test_tag_images_script_writes_tags_per_image_and_resumes(tmp_path):
    import importlib.util
    import json
    import os

    from conftest import REPO, make_paired_folders
    _, lq_dir = make_paired_folders(str(tmp_path / 'pairs'), num=3)
    ram = save_ram_checkpoint(_perturbed_tagger(), str(tmp_path / 'ram.pth'))
    dape = save_dape_checkpoint(_perturbed_tagger(), str(tmp_path / 'DAPE.pth'))
    spec = importlib.util.spec_from_file_location('tag_images', os.path.join(REPO, 'scripts', 'tag_images.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / 'tags.json')
    args = [lq_dir, out, '--ram-path', ram, '--dape-path', dape, '--tiny', '--device', 'cpu',
            '--no-progress']
    assert script.main(args) == 0
    tags = json.load(open(out, encoding='utf-8'))
    tagger = tiny_ram_embedder(ram_path=ram, dape_path=dape, **TINY_RAM, tagging=True)
    from dspo_basicsr.utils.image_io import read_rgb
    names = sorted(os.listdir(lq_dir))
    assert sorted(tags) == sorted(os.path.splitext(n)[0] for n in names)
    for name in names:
        assert tags[os.path.splitext(name)[0]] == tagger.tags(read_rgb(os.path.join(lq_dir, name))[None])[0]
    json.dump({os.path.splitext(names[0])[0]: 'kept'}, open(out, 'w', encoding='utf-8'))
    assert script.main(args) == 0  # resumes: the stem already there is not tagged again
    assert json.load(open(out, encoding='utf-8'))[os.path.splitext(names[0])[0]] == 'kept'


def test_preference_set_gets_tag_prompts(tmp_path):
    from dspo_basicsr.archs.ram_arch import samples_with_ram_embeddings
    from dspo_basicsr.data.preference_set import PreferenceLMDB

    from dspo_fixtures import write_tiny_preference_set
    store = PreferenceLMDB(write_tiny_preference_set(str(tmp_path / 'pref.lmdb')))
    tagger = _perturbed_tagger()
    samples = list(samples_with_ram_embeddings(store, tagger, tags=True))
    for sample in samples:
        lq = torch.from_numpy(sample.lq).permute(2, 0, 1)[None].float() / 255
        own = store[sample.sid].prompt
        assert sample.prompt == ', '.join(p for p in (tagger.tags(lq)[0], own) if p)


def test_controlsd2_can_tag_with_a_ram_file(tmp_path):
    tagger = _perturbed_tagger()
    ram = save_ram_checkpoint(tagger, str(tmp_path / 'ram.pth'))
    arch = TinyControlSD2Arch(ram_path=ram, sampler='ddim')
    lq = torch.rand(1, 3, 8, 8)
    prompts, _ = arch.sampling_prompts(lq, 'p', None, prompt_source='tags')
    assert prompts == [f'{tagger.tags(lq)[0]}, p,']
    out = arch.sample(lq, steps=2, guidance_scale=1.0, prompt_source='tags', color_fix='wavelet')
    assert out.shape == (1, 3, 32, 32)


def test_tags_run_with_the_frozen_ram_in_bf16():
    arch = TinySeeSRArch(mixed_precision='bf16')
    assert arch.ram.image_proj.weight.dtype == torch.bfloat16
    prompts, _ = arch.sampling_prompts(torch.rand(1, 3, 8, 8), 'x', None, prompt_source='tags')
    assert prompts[0].endswith(', x,clean, high-resolution, 8k')


def test_process_size_samples_small_lq_larger_and_candidate_settings_carry_the_protocol():
    from dspo_basicsr.preference.pipeline import sampling_settings
    arch = TinyOSEDiffArch().eval()
    seen = []
    real = arch.sample_images

    def record(lq, *args, **kwargs):
        seen.append(tuple(lq.shape[2:]))
        return real(lq, *args, **kwargs)
    arch.sample_images = record
    out = arch.sample(torch.rand(1, 3, 8, 12), process_size=64)  # shorter side 8 < 64 / 4: resized to 16 x 24
    assert seen == [(16, 24)] and out.shape == (1, 3, 32, 48)
    arch.sample(torch.rand(1, 3, 20, 20), process_size=64)
    assert seen[-1] == (20, 20)  # large enough: untouched
    settings = sampling_settings(arch, {'prompt_source': 'tags', 'color_fix': 'adain',
                                        'default': {'steps': 1, 'guidance_scale': 1.0, 'seed': 0},
                                        'grid': {'seed': [0, 1]}})
    assert settings and all(s['prompt_source'] == 'tags' and s['color_fix'] == 'adain' for s in settings)
