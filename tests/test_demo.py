"""The embedded demo's pieces: sampling from the noised LQ latent, the instance win rate."""
import numpy as np
import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.archs.control_sd2_arch import ControlSD2Arch
from dspo_basicsr.demo.dspo import instance_win_rate
from dspo_basicsr.demo.tiny_arch import TinyControlSD2Arch
from dspo_basicsr.demo.tiny_components import tiny_ram_embedder


@pytest.fixture(scope='module')
def tiny_arch():
    return TinyControlSD2Arch(sampler='ddim').eval()


def _timesteps_run(arch, start_timestep, steps=8):
    seen = []
    predict = ControlSD2Arch.predict_noise.__get__(arch)
    arch.predict_noise = lambda x_t, t, cond: seen.append(int(t[0])) or predict(x_t, t, cond)
    arch.set_sampling_start('noise' if start_timestep is None else 'lr', start_timestep)
    try:
        arch.sample(torch.rand(1, 3, 8, 8), 'a cat', steps=steps, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0))
    finally:
        del arch.predict_noise
        arch.set_sampling_start('noise', None)
    return seen


def test_start_timestep_runs_only_the_timesteps_from_it_on(tiny_arch):
    full = _timesteps_run(tiny_arch, None)
    assert len(full) == 8
    assert _timesteps_run(tiny_arch, full[-2]) == full[-2:]
    assert _timesteps_run(tiny_arch, full[-4]) == full[-4:]
    assert _timesteps_run(tiny_arch, full[-4] + 1) == full[-4:]  # between two: from the next one down
    with pytest.raises(ValueError, match='start_timestep'):
        tiny_arch.set_sampling_start('lr', None)


def test_start_point_lr_starts_from_the_noised_lq_latent(tiny_arch):
    lq = torch.rand(2, 3, 8, 8)
    scheduler = tiny_arch._sampling_scheduler('ddim')
    scheduler.set_timesteps(8)
    scheduler.timesteps = scheduler.timesteps[-1:]  # t = 0: almost no noise
    tiny_arch.set_sampling_start('lr', 0)
    try:
        start = tiny_arch.initial_latents(lq, scheduler, torch.Generator().manual_seed(0))
    finally:
        tiny_arch.set_sampling_start('noise', None)
    lq_latent = tiny_arch.encode_images(tiny_arch.upsample_lq(lq))
    noise = tiny_arch.initial_noise(lq, torch.Generator().manual_seed(0))
    alpha = scheduler.alphas_cumprod[0]
    torch.testing.assert_close(start, alpha.sqrt() * lq_latent + (1 - alpha).sqrt() * noise)
    pure = tiny_arch.initial_latents(lq, scheduler, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pure, noise)


def test_instance_win_rate_counts_instances_by_their_psnr():
    gt = np.full((8, 8, 3), 100, np.uint8)
    seg = np.zeros((8, 8), np.int64)
    seg[:, 4:] = 1
    seg[6:, :4] = 2
    reference = gt.copy()
    reference[:, 4:] += 10  # instance 1: the reference is off
    current = gt.copy()
    current[:6, :4] += 5  # instance 0: the current model is off; instance 2: a tie
    assert instance_win_rate([current], [reference], [gt], [seg]) == dict(wins=1, losses=1, ties=1, win_rate=0.5)


def test_build_preference_set_rerun_says_to_pass_overwrite(tmp_path, monkeypatch, capsys):
    import importlib.util
    import os

    from conftest import REPO
    spec = importlib.util.spec_from_file_location('build_preference_set',
                                                  os.path.join(REPO, 'scripts', 'build_preference_set.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def finished_set(work, out, overwrite=False, **kwargs):
        if not overwrite:
            raise FileExistsError(f"preference set '{out}' already exists; pass overwrite=True to replace it.")
        raise AssertionError('not reached in this test')

    monkeypatch.setattr(script, 'assemble_preference_set', finished_set)
    assert script.main(['--work', str(tmp_path), '--out', str(tmp_path / 'set.lmdb')]) == 2
    assert 'pass --overwrite' in capsys.readouterr().err


def test_demo_vae_posterior_is_nearly_deterministic():
    """The tiny VAE learns by decoding the mode; its posterior std must still be small next to the latents,
    or the sampled latents of DSPO training are noise as large as the signal (the demo then learns nothing)."""
    from dspo_basicsr.demo.dspo import pretrain_tiny_framework
    arch = TinyControlSD2Arch(sampler='ddim')
    hq, lq = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    pretrain_tiny_framework(arch, hq, lq, ['a cat', 'a dog'], vae_steps=2, diffusion_steps=0, batch=2)
    with torch.no_grad():
        posterior = arch.vae.encode(hq * 2 - 1).latent_dist
    ratio = (posterior.std.max() / posterior.mode().std()).item()
    assert ratio < 2e-3
    sampled = arch.encode_images(hq, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    mode = arch.encode_images(hq)
    assert (sampled - mode).abs().max() < 1e-2 * mode.std()


def test_demo_test_options_sample_with_the_demo_tagger_and_colour_fix(tmp_path):
    """options/demo/test_dspo_demo.yml reads the tagger make_demo_data writes and samples as the SR test scripts."""
    import os

    import yaml

    from dspo_basicsr.archs.ram_arch import save_ram_checkpoint

    from conftest import REPO
    with open(os.path.join(REPO, 'options', 'demo', 'test_dspo_demo.yml')) as f:
        opt = yaml.safe_load(f)
    assert opt['network_g']['ram_path'] == 'datasets/demo/ram/ram_tiny.pth'  # build_demo_data's default root
    assert opt['network_g']['type'] == 'TinyControlSD2Arch'  # reads ram_path as a tiny RAM checkpoint
    protocol = {k: opt['val']['sample'][k] for k in ('prompt_source', 'color_fix')}
    assert protocol == {'prompt_source': 'tags', 'color_fix': 'adain'}
    torch.manual_seed(0)
    ram = save_ram_checkpoint(tiny_ram_embedder(tagging=True), str(tmp_path / 'ram' / 'ram_tiny.pth'))
    arch = TinyControlSD2Arch(sampler='ddim', ram_path=ram).eval()
    lq = torch.rand(1, 3, 8, 8)
    prompts, _ = arch.sampling_prompts(lq, '', prompt_source='tags')
    assert prompts == [arch.compose_tag_prompt(arch.ram.tags(lq)[0], '')]
    sr = arch.sample(lq, '', steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **protocol)
    torch.testing.assert_close(sr.mean(dim=(2, 3)), lq.mean(dim=(2, 3)), atol=0.05, rtol=0)


def test_compare_options_measure_implicit_accuracy_on_held_out_pairs():
    """options/demo/compare_*.yml validate their implicit accuracy on the held-out set, not on the training pairs."""
    import glob
    import os

    import yaml

    from conftest import REPO
    files = sorted(glob.glob(os.path.join(REPO, 'options', 'demo', 'compare_*.yml')))
    assert files
    for path in files:
        with open(path) as f:
            opt = yaml.safe_load(f)
        pairs = [d['dataroot'] for name, d in opt['datasets'].items()
                 if name.startswith('val') and d['type'] == 'PreferenceLMDBDataset']
        assert pairs == ['datasets/demo/demo_pref_val.lmdb'], path
        assert opt['datasets']['train']['dataroot'] == 'datasets/demo/demo_pref.lmdb', path


@pytest.mark.slow
def test_build_demo_data_writes_the_held_out_pairs_of_the_validation_crops(tmp_path):
    import os

    from dspo_basicsr.data.preference_set import PreferenceLMDB
    from dspo_basicsr.demo.dspo import build_demo_data
    root = str(tmp_path / 'demo')
    paths = build_demo_data(root, crops_per_photo=1, base=dict(vae_steps=1, diffusion_steps=1), held_out_pairs=True)
    held_out, train = PreferenceLMDB(paths['held_out_pairs']), PreferenceLMDB(paths['preference_set'])
    val_ids = sorted(name[:-4] for name in os.listdir(os.path.join(root, 'val', 'gt')))
    assert sorted(held_out.ids()) == val_ids and len(val_ids) == 6
    assert not set(held_out.ids()) & set(train.ids())
    sample = held_out[val_ids[0]]
    assert len(sample.candidates) == 4 and any(i['win'] >= 0 for i in sample.instances)


def test_vae_pretraining_patches_are_windows_of_the_drawn_crops():
    from dspo_basicsr.demo.dspo import _augmented_batch
    images = torch.arange(3 * 3 * 16 * 16, dtype=torch.float32).reshape(3, 3, 16, 16)
    patches = _augmented_batch(images, 5, torch.Generator().manual_seed(0), patch_size=6)
    assert patches.shape == (5, 3, 6, 6)
    windows = {frozenset(images[n, :, y:y + 6, x:x + 6].flatten().tolist())
               for n in range(3) for y in range(11) for x in range(11)}
    assert all(frozenset(p.flatten().tolist()) in windows for p in patches)  # flips / rotations keep the values


def test_degradation_is_a_function_of_its_seed_alone():
    from dspo_basicsr.demo.dspo import degrade
    hq = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    first = degrade(hq, seed=3)
    np.random.seed(123)  # the global generator's state must neither matter nor change
    state = np.random.get_state()[1].copy()
    assert np.array_equal(degrade(hq, seed=3), first)
    assert np.array_equal(np.random.get_state()[1], state)
    assert not np.array_equal(degrade(hq, seed=4), first)


def test_denoiser_windows_cut_latents_and_lq_at_the_same_place():
    """The denoiser's training windows: the latent window and the LQ window cover the same HQ pixels."""
    from types import SimpleNamespace

    from dspo_basicsr.demo.dspo import _aligned_windows
    framework = SimpleNamespace(vae_scale_factor=2, scale=4)
    rows = torch.arange(32, dtype=torch.float32)
    latents = (rows[:, None] * 2).expand(32, 32)[None, None].repeat(2, 4, 1, 1)  # HQ row of each latent pixel
    lq = (rows[:16, None] * 4).expand(16, 16)[None, None].repeat(2, 3, 1, 1)  # HQ row of each LQ pixel
    seen = set()
    for seed in range(20):
        z, small = _aligned_windows(latents, lq, framework, 32, torch.Generator().manual_seed(seed))
        assert z.shape == (2, 4, 16, 16) and small.shape == (2, 3, 8, 8)
        assert z[0, 0, 0, 0] == small[0, 0, 0, 0]  # the same first HQ row
        seen.add(int(z[0, 0, 0, 0]))
    assert len(seen) > 1  # the windows move
    whole = _aligned_windows(latents, lq, framework, None, torch.Generator())
    assert whole[0] is latents and whole[1] is lq


def test_demo_base_settings_reach_the_pretraining_functions_and_the_tiny_networks():
    from dspo_basicsr.demo.dspo import DEMO_BASE, demo_tiny_components, denoiser_options, vae_options
    assert denoiser_options(DEMO_BASE) == {'steps': DEMO_BASE['diffusion_steps'],
                                           'patch_size': DEMO_BASE['diffusion_patch_size']}
    assert vae_options(dict(DEMO_BASE, vae_steps=1)) == {'steps': 1, 'batch': 16, 'lr': 3e-3, 'patch_size': 32}
    arch = TinyControlSD2Arch(**demo_tiny_components(DEMO_BASE), sampler='ddim')
    assert arch.vae_scale_factor == 2 ** (len(DEMO_BASE['vae_widths']) - 1) == 2
    assert list(arch.unet.config.down_block_types) == list(DEMO_BASE['unet_down_block_types'])
    assert list(arch.controlnet.config.down_block_types) == list(DEMO_BASE['unet_down_block_types'])


@pytest.mark.slow
def test_base_quality_measures_each_stage_with_the_validation_metric(tmp_path):
    import glob
    import os

    import cv2
    import yaml

    from dspo_basicsr.demo.base_quality import base_quality
    from dspo_basicsr.demo.dspo import build_demo_data

    from basicsr.metrics import calculate_psnr

    from conftest import REPO
    root = str(tmp_path / 'demo')
    build_demo_data(root, crops_per_photo=1, base=dict(vae_steps=1, diffusion_steps=1))
    with open(os.path.join(REPO, 'options', 'demo', 'dspo_demo.yml')) as f:
        text = f.read().replace('datasets/demo', root)
    option_file = tmp_path / 'demo.yml'
    option_file.write_text(text)
    result = base_quality(str(option_file))
    assert result['images'] == 6
    crop = yaml.safe_load(text)['val']['metrics']['psnr']['crop_border']
    expected = []
    for path in sorted(glob.glob(os.path.join(root, 'val', 'gt', '*.png'))):
        gt = cv2.imread(path)
        lq = cv2.imread(path.replace(os.sep + 'gt' + os.sep, os.sep + 'lq' + os.sep)).astype(np.float32) / 255
        lq = torch.from_numpy(lq).permute(2, 0, 1)[None]
        bicubic = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
        bicubic = (bicubic[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected.append(calculate_psnr(bicubic, gt, crop_border=crop))
    assert abs(result['bicubic'] - float(np.mean(expected))) < 1e-3
    assert all(np.isfinite(v) for v in result.values())
    # the option file's colour fix (adain) is applied to the round trip, so the two differ
    assert result['vae_round_trip_bicubic_color_fixed'] != result['vae_round_trip_bicubic']
