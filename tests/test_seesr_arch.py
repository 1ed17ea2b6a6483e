"""SeeSRArch and the RAM embedder: released structure and sizes, strict loading, DSPO through the CLI,
user-description feedback (M1 vs M1+M2), precomputed RAM embeddings."""
import argparse
import glob
import json
import math
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.archs.ram_arch import RAMImageEmbedder, merge_dape_lora, save_ram_checkpoint
from dspo_basicsr.archs.seesr_arch import load_seesr_network, seesr_networks_on_meta
from dspo_basicsr.demo.tiny_arch import TinySeeSRArch
from dspo_basicsr.demo.tiny_components import tiny_ram_embedder

from basicsr.models import build_model

from conftest import REPO, run_cli, write_options
from dspo_fixtures import complete_for_in_process, preference_batch
from framework_fixtures import TINY_RAM, framework_options, framework_setup, sr_test_options


@pytest.fixture(scope='module')
def seesr(tmp_path_factory):
    return framework_setup(tmp_path_factory.mktemp('seesr'), 'seesr')


def _millions(module, keep=lambda name: True):
    return sum(p.numel() for name, p in module.named_parameters() if keep(name)) / 1e6


def test_meta_structure_has_the_released_seesr_sizes_and_keys():
    # Released SeeSR (fp32): unet ~1126.8 M (SD2's 865.9 M + 260.8 M image cross-attention), controlnet
    # ~489.0 M (364.2 M + 124.8 M), quoted to 0.1 M: +-0.05 M is exactly that rounding. The smallest
    # structural slip (one image transformer at width 320: ~2.4 M) is 50x larger than the tolerance.
    unet, controlnet = seesr_networks_on_meta()
    def image(name):
        return '.image_attentions.' in name
    assert _millions(unet) == pytest.approx(1126.8, abs=0.05)
    assert _millions(controlnet) == pytest.approx(489.0, abs=0.05)
    assert _millions(unet, image) == pytest.approx(260.8, abs=0.05)
    assert _millions(controlnet, image) == pytest.approx(124.8, abs=0.05)
    keys = set(unet.state_dict())
    for key in ('down_blocks.0.image_attentions.1.transformer_blocks.0.attn2.to_k.weight',
                'mid_block.image_attentions.0.proj_out.weight',
                'up_blocks.3.image_attentions.2.transformer_blocks.0.attn2.to_v.weight'):
        assert key in keys
    key = 'down_blocks.0.image_attentions.0.transformer_blocks.0.attn2.to_k.weight'
    assert unet.state_dict()[key].shape == (320, 512)
    assert 'down_blocks.3.image_attentions.0.norm.weight' not in keys  # DownBlock2D has no cross-attention
    assert unet.config.use_image_cross_attention and unet.config.image_cross_attention_dim == 512
    # A real-size forward on the meta device: text (B, 77, 1024) and RAM embeddings (B, 145, 512) fit every layer.
    from dspo_basicsr.archs.seesr_arch import image_kwargs
    with torch.device('meta'):
        x_t, t = torch.randn(2, 4, 64, 64), torch.tensor([1, 999])
        text, ram = torch.randn(2, 77, 1024), torch.randn(2, 145, 512)
        down, mid = controlnet(x_t, t, encoder_hidden_states=text, controlnet_cond=torch.rand(2, 3, 512, 512),
                               cross_attention_kwargs=image_kwargs(ram), return_dict=False)
        eps = unet(x_t, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                   mid_block_additional_residual=mid, cross_attention_kwargs=image_kwargs(ram), return_dict=False)[0]
    assert eps.shape == (2, 4, 64, 64)


def test_ram_embedder_swin_large_gives_145_tokens_of_512_on_meta():
    with torch.device('meta'):
        embedder = RAMImageEmbedder()
        out = embedder(torch.rand(2, 3, 128, 96))
    assert tuple(out.shape) == (2, 145, 512)
    # Swin-L (patch 4, window 12, 384 px, 195.2 M) + image_proj 1536 -> 512 (0.79 M).
    assert _millions(embedder) == pytest.approx(195.99, abs=0.05)


def test_tiny_checkpoint_folders_load_back_strictly(seesr):
    loaded = TinySeeSRArch(pretrained_model_path=seesr['pretrained_model_path'],
                           seesr_model_path=seesr['seesr_model_path'], ram_path=seesr['ram_path'])
    built = TinySeeSRArch()  # with the same tiny random RAM embedder
    loaded_state, built_state = loaded.state_dict(), built.state_dict()
    assert set(loaded_state) == set(built_state)
    shared = [k for k in built_state]
    assert shared and all(torch.equal(loaded_state[k], built_state[k]) for k in shared)
    assert any('.image_attentions.' in k for k in shared)
    with open(os.path.join(seesr['seesr_model_path'], 'unet', 'config.json'), encoding='utf-8') as f:
        config = json.load(f)
    assert config['_class_name'] == 'UNet2DConditionModel' and config['use_image_cross_attention'] is True


@pytest.mark.parametrize('kind', ['unet', 'controlnet'])
def test_wrong_or_missing_key_is_named(seesr, tmp_path, kind):
    import shutil
    folder = tmp_path / kind
    shutil.copytree(os.path.join(seesr['seesr_model_path'], kind), folder)
    weights = folder / 'diffusion_pytorch_model.safetensors'
    state = load_file(str(weights))
    key = next(k for k in sorted(state) if '.image_attentions.' in k and k.endswith('to_k.weight'))

    missing = {k: v for k, v in state.items() if k != key}
    save_file(missing, str(weights))
    with pytest.raises(KeyError, match=re.escape(key)) as error:
        load_seesr_network(str(folder), kind)
    assert 'with SeeSR image cross-attention' in str(error.value) and 'released SeeSR/AddSR weights' in str(error.value)

    renamed = dict(missing, **{key.replace('image_attentions', 'image_attention'): state[key]})
    save_file(renamed, str(weights))
    with pytest.raises(KeyError, match=re.escape(key.replace('image_attentions', 'image_attention'))):
        load_seesr_network(str(folder), kind)

    reshaped = dict(state, **{key: state[key][:, :-1].contiguous()})
    save_file(reshaped, str(weights))
    with pytest.raises(ValueError, match=re.escape(key)):
        load_seesr_network(str(folder), kind)

    os.remove(weights)
    with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
        load_seesr_network(str(folder), kind)


def test_ram_and_dape_checkpoints_are_mapped_strictly(tmp_path):
    embedder = tiny_ram_embedder(**TINY_RAM)
    with torch.no_grad():
        for p in embedder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ram = save_ram_checkpoint(embedder, str(tmp_path / 'ram.pth'))
    raw = torch.load(ram, weights_only=True)['model']
    # RAM's layout: downsampling at the end of stage 0, derived buffers present, tagging parts beside it.
    assert 'visual_encoder.layers.0.downsample.reduction.weight' in raw
    loaded = tiny_ram_embedder(ram_path=ram, **TINY_RAM)
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images), embedder(images))

    extra = dict(raw, **{'visual_encoder.layers.0.blocks.0.attn.qkv.weight_extra': torch.zeros(1),
                         'tagging_head.layer.0.weight': torch.zeros(1)})
    torch.save({'model': extra}, tmp_path / 'extra.pth')
    with pytest.raises(KeyError, match='visual_encoder.layers.0.blocks.0.attn.qkv.weight_extra'):
        tiny_ram_embedder(ram_path=str(tmp_path / 'extra.pth'), **TINY_RAM)
    lacking = {k: v for k, v in raw.items() if k != 'image_proj.weight'}
    torch.save({'model': lacking}, tmp_path / 'lacking.pth')
    with pytest.raises(KeyError, match='image_proj.weight'):
        tiny_ram_embedder(ram_path=str(tmp_path / 'lacking.pth'), **TINY_RAM)

    # DAPE: loralib MergedLinear LoRA (rank 8 on q and v, scaling 1/8) merged into qkv.
    qkv = 'visual_encoder.layers.1.blocks.0.attn.qkv'
    dim = raw[qkv + '.weight'].shape[1]
    lora_a, lora_b = torch.randn(16, dim), torch.randn(2 * dim, 8)
    torch.save({qkv + '.weight': raw[qkv + '.weight'], qkv + '.lora_A': lora_a, qkv + '.lora_B': lora_b},
               tmp_path / 'dape.pth')
    dape = tiny_ram_embedder(ram_path=ram, dape_path=str(tmp_path / 'dape.pth'), **TINY_RAM)
    merged = dape.state_dict()['visual_encoder.layers.1.blocks.0.attn.qkv.weight']
    expected = raw[qkv + '.weight'].clone()
    expected[:dim] += lora_b[:dim] @ lora_a[:8] / 8
    expected[2 * dim:] += lora_b[dim:] @ lora_a[8:] / 8
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged[dim:2 * dim], raw[qkv + '.weight'][dim:2 * dim])  # k untouched
    torch.testing.assert_close(merge_dape_lora(raw[qkv + '.weight'], lora_a, lora_b), expected)

    torch.save({'model': raw, 'args': argparse.Namespace(lr=1)}, tmp_path / 'pickled.pth')
    with pytest.raises(ValueError, match='more than tensors'):
        tiny_ram_embedder(ram_path=str(tmp_path / 'pickled.pth'), **TINY_RAM)


def test_image_embeddings_reach_unet_and_controlnet_and_precomputed_ones_are_used():
    import copy
    arch = TinySeeSRArch(random_ram=False)
    with torch.no_grad():  # SeeSR's ControlNet is trained: its zero convolutions are not zero any more
        for name, p in arch.controlnet.named_parameters():
            if name.startswith(('controlnet_down_blocks', 'controlnet_mid_block')):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    lq = torch.rand(2, 3, 8, 8)
    precomputed = torch.randn(2, 5, 24)
    cond = arch.condition(lq, ['a', 'b'], ram_embeds=precomputed)
    assert torch.equal(cond['image_embeds'], precomputed)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        base = arch.predict_noise(x_t, t, cond)
        for part in ('unet', 'controlnet'):
            other = copy.deepcopy(arch)
            for name, p in getattr(other, part).named_parameters():
                if '.image_attentions.' in name and name.endswith('proj_out.weight'):
                    p.add_(0.5)
            assert not torch.allclose(other.predict_noise(x_t, t, cond), base), part
        changed = arch.predict_noise(x_t, t, dict(cond, image_embeds=precomputed + 1))
    assert not torch.allclose(changed, base)
    with pytest.raises(ValueError, match='ram_path'):
        arch.condition(lq, ['a', 'b'])  # no embedder and nothing precomputed
    with pytest.raises(ValueError, match='ram_embeds has shape'):
        arch.condition(lq, ['a', 'b'], ram_embeds=torch.randn(2, 5, 7))


def _in_process(opt, tmp_path):
    return build_model(complete_for_in_process(opt, tmp_path))


def _batch(lmdb):
    return preference_batch({'lmdb': lmdb})


def _errors(model, data, negative_prompts):
    model.feed_data(data)
    model.negative_prompts = list(negative_prompts)
    index = model.all_candidates()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model.denoising_errors(index, generator=generator, timesteps=torch.tensor([300, 600]))


def test_feedback_guidance_changes_training_errors_only_when_on(seesr, tmp_path):
    """M1 (feedback off) ignores the samples' negative prompts; M1+M2 guides with them."""
    data = _batch(seesr['lmdb'])
    stored = list(data['negative_prompt'])
    other = ['blurry faces, text artifacts'] * len(stored)
    m1 = _in_process(framework_options('seesr', seesr, seesr['lmdb'], val=False), tmp_path)
    m12 = _in_process(framework_options('seesr', seesr, seesr['lmdb'], val=False, feedback=3.0), tmp_path)
    off_a, off_ref_a = _errors(m1, data, stored)
    off_b, off_ref_b = _errors(m1, data, other)
    on_a, on_ref_a = _errors(m12, data, stored)
    on_b, on_ref_b = _errors(m12, data, other)
    torch.testing.assert_close(off_a, off_b, rtol=0, atol=0)
    torch.testing.assert_close(off_ref_a, off_ref_b, rtol=0, atol=0)
    assert not torch.allclose(on_a, on_b) and not torch.allclose(on_ref_a, on_ref_b)
    assert not torch.allclose(on_a, off_a)
    # Policy = reference at initialisation, with or without guidance: the DSPO loss starts at ln 2.
    m12.feed_data(data)
    loss = m12.preference_loss().loss
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_add_ram_embeddings_script_then_training_uses_them(seesr, tmp_path):
    prompts = tmp_path / 'tags.json'
    prompts.write_text(json.dumps({'s00': 'tree, sky, house'}))
    out = tmp_path / 'with_ram.lmdb'
    result = run_cli_script(['scripts/add_ram_embeddings.py', seesr['lmdb'], str(out), '--ram-path', seesr['ram_path'],
                             '--tiny', '--prompts', str(prompts), '--device', 'cpu',
                             '--no-progress'])
    assert result.returncode == 0, result.stderr[-3000:]
    from dspo_basicsr.data.preference_set import PreferenceLMDB
    store, source = PreferenceLMDB(str(out)), PreferenceLMDB(seesr['lmdb'])
    assert store.ids() == source.ids()
    first = store['s00']
    assert first.extras['ram_embeds'].shape == (17, 24) and first.prompt == 'tree, sky, house'
    assert store['s01'].prompt == source['s01'].prompt
    embedder = tiny_ram_embedder(ram_path=seesr['ram_path'], **TINY_RAM)
    lq = torch.from_numpy(first.lq).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(torch.from_numpy(first.extras['ram_embeds']), embedder(lq)[0])

    # A SeeSR without a RAM embedder trains on the precomputed embeddings.
    model = _in_process(framework_options('seesr', seesr, str(out), val=False, ram_path=None), tmp_path)
    assert model.bare.ram is None
    model.feed_data(_batch(str(out)))
    model.optimize_parameters(1)
    assert math.isfinite(model.get_current_log()['l_dspo'])


def run_cli_script(args):
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_seesr_trains_through_cli_and_samples_through_basicsr_test(seesr, tmp_path):
    opt = framework_options('seesr', seesr, seesr['lmdb'], total_iter=2, feedback=2.0)
    train = run_cli(['train', '-opt', write_options(tmp_path / 'train.yml', opt)], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    exp = tmp_path / 'experiments' / opt['name']
    checkpoint = exp / 'models' / 'net_g_2.pth'
    saved = torch.load(checkpoint, weights_only=True)['params']
    assert saved and all(k.startswith('controlnet.') for k in saved)
    log = '\n'.join(open(f).read() for f in glob.glob(str(exp / 'train_*.log')))
    assert 'l_dspo' in log and 'implicit_acc' in log

    test_opt = sr_test_options('seesr', seesr, str(checkpoint), str(tmp_path))
    test = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', test_opt)], cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    images = glob.glob(str(tmp_path / 'results' / test_opt['name'] / 'visualization' / 'tiny_pairs' / '*.png'))
    assert len(images) == 2
    test_log = '\n'.join(open(f).read() for f in glob.glob(str(tmp_path / 'results' / test_opt['name'] / '*.log')))
    assert re.search(r'psnr: \d', test_log)


def test_bf16_frozen_parts_keep_trained_parameters_in_float32(seesr, tmp_path):
    model = _in_process(framework_options('seesr', seesr, seesr['lmdb'], val=False, feedback=2.0,
                                          mixed_precision='bf16'), tmp_path)
    arch = model.bare
    assert next(arch.unet.parameters()).dtype == torch.bfloat16 and next(arch.vae.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in arch.controlnet.parameters())
    model.feed_data(_batch(seesr['lmdb']))
    loss = model.preference_loss().loss
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(math.log(2), abs=1e-3)
    model.optimize_parameters(1)
    assert math.isfinite(model.get_current_log()['l_dspo'])
    assert all(p.dtype == torch.float32 and p.requires_grad for p in arch.controlnet.parameters())
    out = arch.sample(torch.rand(1, 3, 8, 8), steps=2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 32, 32)


def test_gradient_checkpointing_gives_the_same_step(seesr, tmp_path):
    data = _batch(seesr['lmdb'])
    grads = []
    for checkpointing in (False, True):
        model = _in_process(framework_options('seesr', seesr, seesr['lmdb'], val=False, feedback=2.0,
                                              gradient_checkpointing=checkpointing), tmp_path)
        model.bare.train()
        model.feed_data(data)
        torch.manual_seed(0)  # the same timesteps, noise and posterior samples in both runs
        loss = model.preference_loss().loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.bare.controlnet.parameters() if p.grad is not None]))
    assert any(getattr(m, 'gradient_checkpointing', False) for m in model.bare.unet.modules())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
