"""The SeeSR / AddSR / OSEDiff demos: released layouts loaded back, own candidates, a usable posterior."""
import json
import os

import numpy as np
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.cli import read_option_file
from dspo_basicsr.demo.frameworks import DEMO_CANDIDATE_SETTINGS, build_framework_demo, framework_network_options
from dspo_basicsr.preference import PreferenceLMDB

from basicsr.archs import build_network

from conftest import REPO

FRAMEWORKS = ('seesr', 'addsr', 'osediff')
FAST = {'vae_steps': 2, 'diffusion_steps': 2}


@pytest.fixture(scope='module', params=FRAMEWORKS)
def demo(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f'{request.param}_demo'))
    paths = build_framework_demo(request.param, root, crops_per_photo=1, base=FAST)
    model = build_network(framework_network_options(request.param, root)).eval()  # the real loading code
    return request.param, root, paths, model


@pytest.mark.slow
def test_framework_demo_writes_the_released_layout(demo):
    framework, root, paths, _ = demo
    folder = os.path.join(root, framework)
    for part in ('vae', 'text_encoder', 'tokenizer', 'scheduler', 'unet'):
        assert os.path.isdir(os.path.join(folder, 'sd2', part)), part
    if framework == 'osediff':
        lora = torch.load(os.path.join(folder, 'osediff.pkl'), map_location='cpu', weights_only=True)
        assert lora['unet_lora_encoder_modules'] and lora['vae_lora_encoder_modules']
    else:
        for part in ('unet', 'controlnet'):
            with open(os.path.join(folder, framework, part, 'config.json'), encoding='utf-8') as f:
                assert json.load(f)['use_image_cross_attention'] is True
            assert os.path.isfile(os.path.join(folder, framework, part, 'diffusion_pytorch_model.safetensors'))
    assert os.path.isfile(os.path.join(folder, 'ram', 'ram_tiny.pth'))
    assert sorted(os.listdir(os.path.join(paths['val'], 'gt'))) == sorted(os.listdir(os.path.join(paths['val'], 'lq')))


@pytest.mark.slow
def test_framework_demo_candidates_are_sampled_by_the_loaded_framework(demo):
    """Candidates come from this framework loaded back through its real loading code, not another model: the
    stored default candidate is what the loaded model samples with the default setting."""
    _, _, paths, model = demo
    data = PreferenceLMDB(paths['preference_set'])
    sample = data[data.ids()[0]]
    setting = DEMO_CANDIDATE_SETTINGS[0]
    lq = torch.from_numpy(sample.lq).permute(2, 0, 1)[None].float().div(255)
    sr = model.sample(lq, sample.prompt, steps=setting['steps'], guidance_scale=setting['guidance_scale'],
                      generator=torch.Generator().manual_seed(setting['seed']))
    resampled = (sr[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round()
    assert np.abs(resampled - sample.candidates[0].astype(np.float64)).max() <= 1
    assert len(sample.candidates) == len(DEMO_CANDIDATE_SETTINGS)
    assert any(p.requires_grad for p in model.parameters())  # what the option file trains
    assert any(i['win'] >= 0 for i in sample.instances)


@pytest.mark.slow
def test_framework_demo_training_latents_are_not_posterior_noise(demo):
    """The cause of the old SeeSR / AddSR / OSEDiff demos' 0.5 implicit accuracy: DSPOModel samples the VAE
    posterior in training, and a random tiny VAE's posterior std was ~7x the spread of its latents, so the
    candidates' latents were noise. The demo model, as loaded, keeps that noise far below the latents' spread."""
    _, _, paths, model = demo
    data = PreferenceLMDB(paths['preference_set'])
    images = torch.from_numpy(np.stack(data[data.ids()[0]].candidates)).permute(0, 3, 1, 2).float().div(255)
    mode = model.encode_images(images)
    sampled = model.encode_images(images, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert (sampled - mode).std() < 1e-2 * mode.std()


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_framework_demo_option_files_use_the_built_model(framework):
    for name in (f'dspo_{framework}_demo.yml', f'test_dspo_{framework}_demo.yml'):
        path = os.path.join(REPO, 'options', 'demo', name)
        if not os.path.isfile(path):
            continue
        opt = read_option_file(path)
        assert opt['network_g'] == framework_network_options(framework), name
        roots = {d.get('dataroot', d.get('dataroot_gt', '')).split('/')[2] for d in opt['datasets'].values()}
        assert roots == {framework}, name


@pytest.mark.parametrize('arch_type', ['SeeSRArch', 'OSEDiffArch'])  # AddSR: SeeSR's VAE
def test_dspo_model_reports_a_posterior_that_swamps_the_latents(arch_type, monkeypatch):
    """What the old demos ran into unseen: the random tiny VAEs (``Tiny*Arch``) of SeeSR / AddSR / OSEDiff have a
    posterior std several times their latents' spread, so DSPO trained on noise (implicit accuracy ~0.5).
    DSPOModel now says so on its first posterior-sampled batch; a demo-pretrained VAE passes silently."""
    from types import SimpleNamespace

    from dspo_basicsr.demo.dspo import pretrain_tiny_vae
    from dspo_basicsr.models import dspo_model

    from basicsr.utils.registry import ARCH_REGISTRY
    warnings = []
    monkeypatch.setattr(dspo_model, 'get_root_logger', lambda: SimpleNamespace(warning=warnings.append))
    arch = ARCH_REGISTRY.get('Tiny' + arch_type)()
    images = torch.rand(2, 3, 32, 32)
    model = SimpleNamespace(bare=arch, max_posterior_noise_ratio=dspo_model.DSPOModel.max_posterior_noise_ratio)
    assert dspo_model.DSPOModel.check_posterior_noise(model, images) > 1
    assert len(warnings) == 1 and 'posterior noise' in warnings[0]
    pretrain_tiny_vae(arch.vae, images, images, steps=2, batch=2)
    assert dspo_model.DSPOModel.check_posterior_noise(model, images) < 1e-2
    assert len(warnings) == 1
