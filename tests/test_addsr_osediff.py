"""AddSRArch (4-step sampler, self-refinement) and OSEDiffArch (one step, operating-point likelihood, LoRA file)."""
import argparse
import glob
import math
import os
import re

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.archs.osediff_arch import OSEDiffArch, equivalent_x0_beta, read_osediff_lora
from dspo_basicsr.demo.tiny_arch import TinyAddSRArch

from basicsr.models import build_model

from conftest import run_cli, write_options
from dspo_fixtures import complete_for_in_process, preference_batch
from framework_fixtures import framework_options, framework_setup, sr_test_options


@pytest.fixture(scope='module')
def addsr(tmp_path_factory):
    return framework_setup(tmp_path_factory.mktemp('addsr'), 'addsr')


@pytest.fixture(scope='module')
def osediff(tmp_path_factory):
    return framework_setup(tmp_path_factory.mktemp('osediff'), 'osediff')


def _in_process(opt, tmp_path):
    return build_model(complete_for_in_process(opt, tmp_path))


def _batch(lmdb):
    return preference_batch({'lmdb': lmdb})


def _train_and_test_through_cli(framework, paths, tmp_path, trained_prefix):
    opt = framework_options(framework, paths, paths['lmdb'], total_iter=2)
    train = run_cli(['train', '-opt', write_options(tmp_path / 'train.yml', opt)], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = tmp_path / 'experiments' / opt['name'] / 'models' / 'net_g_2.pth'
    saved = torch.load(checkpoint, weights_only=True)['params']
    assert saved and all(k.startswith(trained_prefix) for k in saved)
    test_opt = sr_test_options(framework, paths, str(checkpoint), str(tmp_path))
    test = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', test_opt)], cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    images = glob.glob(str(tmp_path / 'results' / test_opt['name'] / 'visualization' / 'tiny_pairs' / '*.png'))
    assert len(images) == 2
    log = '\n'.join(open(f).read() for f in glob.glob(str(tmp_path / 'results' / test_opt['name'] / '*.log')))
    assert re.search(r'psnr: \d', log)


# ---------------------------------------------------------------------------------------------- AddSR
def test_addsr_loads_seesr_layout_and_samples_at_its_four_timesteps_with_self_refinement(addsr):
    arch = TinyAddSRArch(pretrained_model_path=addsr['pretrained_model_path'],
                         addsr_model_path=addsr['seesr_model_path'], ram_path=addsr['ram_path'])
    calls = []
    real = arch.predict_noise

    def spy(x_t, t, cond):
        calls.append((t.tolist(), cond['control_image'].clone(), cond['image_embeds'].clone()))
        return real(x_t, t, cond)

    arch.predict_noise = spy
    lq = torch.rand(2, 3, 8, 8)
    out = arch.sample(lq, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert [t for t, _, _ in calls] == [[999, 999], [749, 749], [499, 499], [249, 249]]
    lq_up = arch.upsample_lq(lq)
    torch.testing.assert_close(calls[0][1], lq_up)
    # Self-refinement: later conditions blend the decoded x0 prediction with the LQ (w = 0.5), and the RAM
    # embeddings follow the refined image.
    assert not torch.allclose(calls[1][1], lq_up)
    assert not torch.allclose(calls[1][2], calls[0][2])
    assert arch.default_guidance_scale == 1.0 and arch.default_steps == 4


@pytest.mark.slow
def test_addsr_trains_through_cli_and_samples_through_basicsr_test(addsr, tmp_path):
    _train_and_test_through_cli('addsr', addsr, tmp_path, 'controlnet.')


# ---------------------------------------------------------------------------------------------- OSEDiff
def test_osediff_lora_file_loads_strictly_and_refuses_objects(osediff, tmp_path):
    plain = OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'])
    loaded = OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'], osediff_path=osediff['osediff_path'])
    lq = torch.rand(1, 3, 8, 8)
    assert not torch.allclose(plain.sample(lq), loaded.sample(lq))
    # The LQ encoder carries OSEDiff's VAE LoRA; the candidates' encoder and the decoder stay SD's.
    assert not torch.allclose(plain.lq_latents(lq), loaded.lq_latents(lq))
    torch.testing.assert_close(plain.encode_images(lq), loaded.encode_images(lq))

    lora = read_osediff_lora(osediff['osediff_path'])
    key = next(k for k in sorted(lora['state_dict_unet']) if 'lora_A.default_decoder' in k)
    broken = dict(lora, state_dict_unet={k: v for k, v in lora['state_dict_unet'].items() if k != key})
    torch.save(broken, tmp_path / 'missing.pkl')
    with pytest.raises(KeyError, match=re.escape(key)):
        OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'], osediff_path=str(tmp_path / 'missing.pkl'))
    extra = dict(lora, state_dict_vae=dict(lora['state_dict_vae'], **{'encoder.extra.lora_A.weight': torch.zeros(1)}))
    torch.save(extra, tmp_path / 'extra.pkl')
    with pytest.raises(KeyError, match='encoder.extra.lora_A.weight'):
        OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'], osediff_path=str(tmp_path / 'extra.pkl'))
    torch.save(dict(lora, args=argparse.Namespace(rank=4)), tmp_path / 'pickled.pkl')
    with pytest.raises(ValueError, match='more than tensors'):
        read_osediff_lora(str(tmp_path / 'pickled.pkl'))
    with pytest.raises(FileNotFoundError, match='osediff.pkl'):
        read_osediff_lora(str(tmp_path / 'absent.pkl'))


def test_osediff_preference_likelihood_at_its_operating_point(osediff, tmp_path):
    model = _in_process(framework_options('osediff', osediff, osediff['lmdb'], val=False), tmp_path)
    arch = model.bare
    assert model.net_ref.copies == {}  # the reference is the same network with the DSPO adapter disabled
    assert arch.training_timesteps(2, 0, 1000).tolist() == [999, 999]
    data = _batch(osediff['lmdb'])
    model.feed_data(data)
    cond = arch.condition(model.lq, model.prompts)
    latents = torch.randn(2, 4, 8, 8)
    x_t, target = arch.diffusion_inputs(latents, torch.randn(2, 4, 8, 8), torch.full((2,), 999), cond)
    torch.testing.assert_close(x_t, cond['lq_latents'])
    # A prediction equal to the target noise reproduces the candidate latent as OSEDiff's one-step x0.
    alpha = arch.operating_alpha
    torch.testing.assert_close((x_t - (1 - alpha).sqrt() * target) / alpha.sqrt(), latents, rtol=1e-4, atol=1e-4)
    assert equivalent_x0_beta(8000, float(alpha)) == pytest.approx(37.455, abs=0.01)

    loss = model.preference_loss().loss
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    before = {k: v.clone() for k, v in arch.state_dict().items() if 'lora_' not in k}
    for step in range(2):
        model.feed_data(data)
        model.optimize_parameters(step + 1)
    assert math.isfinite(model.get_current_log()['l_dspo'])
    assert all(torch.equal(v, before[k]) for k, v in arch.state_dict().items() if 'lora_' not in k)
    t = torch.full((2,), 999)
    with torch.no_grad():
        policy = arch.predict_noise(x_t, t, cond)
        reference = model.net_ref.predict_noise(x_t, t, cond)
        fresh = OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'],
                            osediff_path=osediff['osediff_path']).predict_noise(x_t, t, cond)
    assert not torch.allclose(policy, reference)
    torch.testing.assert_close(reference, fresh)


@pytest.mark.slow
def test_osediff_trains_through_cli_and_samples_through_basicsr_test(osediff, tmp_path):
    _train_and_test_through_cli('osediff', osediff, tmp_path, 'unet.')
    saved = torch.load(next(iter(glob.glob(str(tmp_path / 'experiments' / '*' / 'models' / 'net_g_2.pth')))),
                       weights_only=True)['params']
    assert all('lora_' in k and '.dspo.' in k for k in saved)
    assert os.path.isfile(osediff['osediff_path'])


def test_osediff_bf16_frozen_unet_with_float32_lora(osediff, tmp_path):
    model = _in_process(framework_options('osediff', osediff, osediff['lmdb'], val=False, mixed_precision='bf16'),
                        tmp_path)
    arch = model.bare
    lora = [p for n, p in arch.unet.named_parameters() if '.dspo.' in n]
    frozen = [p for n, p in arch.unet.named_parameters() if 'lora_' not in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    model.feed_data(_batch(osediff['lmdb']))
    model.optimize_parameters(1)
    assert math.isfinite(model.get_current_log()['l_dspo'])
    assert arch.sample(torch.rand(1, 3, 8, 8)).dtype == torch.float32


def test_osediff_lora_file_holds_and_loads_the_quant_conv_target(osediff):
    lora = read_osediff_lora(osediff['osediff_path'])
    assert 'quant_conv' in lora['vae_lora_encoder_modules']  # OSEDiff's initialize_vae targets it
    assert not any(m.startswith(('decoder.', 'post_quant_conv')) for m in lora['vae_lora_encoder_modules'])
    quant_conv_lora = {k: v for k, v in lora['state_dict_vae'].items() if k.startswith('quant_conv.')}
    assert quant_conv_lora
    loaded = OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'], osediff_path=osediff['osediff_path'])
    plain = OSEDiffArch(pretrained_model_path=osediff['pretrained_model_path'])
    a = quant_conv_lora['quant_conv.lora_A.default_encoder.weight'].flatten(1)  # (r, C)
    b = quant_conv_lora['quant_conv.lora_B.default_encoder.weight'].flatten(1)  # (C, r)
    scaling = 8 / lora['rank_vae']  # OSEDIFF_LORA_ALPHA / rank
    merged = plain.lq_vae.quant_conv.weight.flatten(1) + scaling * b @ a
    torch.testing.assert_close(loaded.lq_vae.quant_conv.weight.flatten(1), merged)
