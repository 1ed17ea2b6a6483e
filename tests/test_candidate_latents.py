"""Precomputed candidate latents (issue 22): written by scripts/add_candidate_latents.py, read by the dataset,
drawn by DSPOModel exactly as encoding would draw them, refused when another VAE wrote them."""
import importlib.util
import math
import os
import random

import numpy as np
import pytest
import torch
import yaml

import dspo_basicsr  # noqa: F401
from dspo_basicsr.archs.control_sd2_arch import ControlSD2Arch
from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset, preference_item, random_aligned_crop
from dspo_basicsr.data.preference_set import PreferenceLMDB
from dspo_basicsr.demo.tiny_arch import TinyControlSD2Arch
from dspo_basicsr.models.dspo_model import DSPOModel

from dspo_fixtures import dspo_options, in_process_options, make_tiny_preference_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location('add_candidate_latents',
                                                  os.path.join(ROOT, 'scripts', 'add_candidate_latents.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def latent_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('latents')
    tiny_set = make_tiny_preference_set(str(root))
    option_file = root / 'dspo.yml'
    option_file.write_text(yaml.safe_dump(dspo_options(tiny_set, val=False)))
    dst = str(root / 'tiny_pref_latents.lmdb')
    assert _script().main([tiny_set['lmdb'], dst, '-opt', str(option_file), '--device', 'cpu', '--no-progress']) == 0
    return dict(tiny_set, latents=dst)


def _batch(path, phase='val', **opt):
    dataset = PreferenceLMDBDataset({'name': 't', 'type': 'PreferenceLMDBDataset', 'dataroot': path, 'phase': phase,
                                     **opt})
    return dataset.collate_fn([dataset[i] for i in range(2)])


def test_stored_posterior_sample_equals_encoding_with_the_same_generator():
    torch.manual_seed(0)
    net = TinyControlSD2Arch()
    images = torch.rand(3, 3, 32, 32)
    mean, std = net.encode_posterior(images)
    for sample in (False, True):
        expected = net.encode_images(images, sample, torch.Generator().manual_seed(5))
        got = net.latents_from_posterior(mean, std, sample, torch.Generator().manual_seed(5))
        assert torch.equal(got, expected)
    assert not torch.equal(net.latents_from_posterior(mean, std, True, torch.Generator().manual_seed(6)), expected)


def test_set_stores_each_candidates_posterior_and_the_vae_digest(latent_set):
    store, source = PreferenceLMDB(latent_set['latents']), PreferenceLMDB(latent_set['lmdb'])
    assert store.ids() == source.ids() and 'candidate_latents' in store.header['extras']
    sample = store[store.ids()[0]]
    latents = sample.extras['candidate_latents']
    torch.manual_seed(0)
    net = ControlSD2Arch(pretrained_model_path=latent_set['model'], controlnet_path=latent_set['controlnet'])
    f = net.vae_scale_factor
    assert latents.dtype == np.float32 and latents.shape == (3, 2, 4, 32 // f, 32 // f)
    assert sample.meta['candidate_latents']['vae_digest'] == net.vae_digest()
    images = torch.from_numpy(np.stack(sample.candidates)).permute(0, 3, 1, 2).float() / 255
    mean, std = net.encode_posterior(images)
    torch.testing.assert_close(torch.from_numpy(latents[:, 0]), mean)
    torch.testing.assert_close(torch.from_numpy(latents[:, 1]), std)


def test_model_draws_from_stored_latents_exactly_as_from_encoding(latent_set, tmp_path):
    model = DSPOModel(in_process_options(latent_set, tmp_path))
    drawn = []
    for path in (latent_set['lmdb'], latent_set['latents']):
        model.feed_data(_batch(path))
        assert (model.candidate_latents is not None) == (path == latent_set['latents'])
        index = model.all_candidates()
        drawn.append(model.encode_candidates(index, torch.Generator().manual_seed(3), sample_posterior=True))
    # The same noise draws; the posteriors differ only by the float rounding of another VAE batch composition
    # (the writer encodes 4 candidates per call, training 6). Equal posteriors give equal samples (test above).
    torch.testing.assert_close(drawn[1], drawn[0], rtol=1e-5, atol=1e-5)


def test_training_step_with_stored_latents_never_runs_the_vae_encoder(latent_set, tmp_path, monkeypatch):
    model = DSPOModel(in_process_options(latent_set, tmp_path))

    def no_encoding(*args, **kwargs):
        raise AssertionError('the VAE encoder ran')

    monkeypatch.setattr(model.bare.vae, 'encode', no_encoding)
    model.feed_data(_batch(latent_set['latents'], phase='train', gt_size=32, use_hflip=True))
    model.optimize_parameters(1)
    assert np.isfinite(model.get_current_log()['l_dspo'])


def test_latents_of_another_vae_are_refused_in_one_line(latent_set, tmp_path):
    model = DSPOModel(in_process_options(latent_set, tmp_path))
    with torch.no_grad():
        next(model.bare.vae.parameters()).add_(1e-3)  # another VAE
    with pytest.raises(ValueError, match='written by another VAE.*add_candidate_latents.py') as info:
        model.feed_data(_batch(latent_set['latents']))
    assert '\n' not in str(info.value)


def test_dataset_can_ignore_stored_latents(latent_set):
    batch = _batch(latent_set['latents'], use_candidate_latents=False)
    assert 'candidate_latents' not in batch and 'candidate_latents' not in batch['extras']


def test_crop_is_aligned_to_the_vae_factor_and_flips_follow_the_images(latent_set):
    store = PreferenceLMDB(latent_set['latents'])
    sample = store[store.ids()[0]]
    stored = sample.extras['candidate_latents']
    f = 32 // stored.shape[-1]
    for seed in range(8):
        top, left = random_aligned_crop(sample, 4, 16, random.Random(seed), align=f)
        assert (top * 4) % f == 0 and (left * 4) % f == 0
    for seed in range(4):
        item = preference_item(sample, 4, gt_size=16, use_hflip=True, use_rot=True, rng=random.Random(seed))
        latents = item['candidate_latents'].numpy()
        assert latents.shape == (3, 2, 4, 16 // f, 16 // f)
        # Find the window and the flips from the images, then check the latents went the same way.
        state = random.Random(seed)
        top, left = (v * 4 for v in random_aligned_crop(sample, 4, 16, state, align=f))
        hflip, vflip, rot = state.random() < 0.5, state.random() < 0.5, state.random() < 0.5
        window = stored[..., top // f:(top + 16) // f, left // f:(left + 16) // f]
        if hflip:
            window = window[..., ::-1]
        if vflip:
            window = window[..., ::-1, :]
        if rot:
            window = window.swapaxes(-1, -2)
        np.testing.assert_array_equal(latents, window)
        image = sample.candidates[0][top:top + 16, left:left + 16]
        image = image[:, ::-1] if hflip else image
        image = image[::-1] if vflip else image
        image = image.swapaxes(0, 1) if rot else image
        np.testing.assert_allclose(item['candidates'][0].permute(1, 2, 0).numpy(), image / 255, atol=1e-6)


@pytest.mark.parametrize('instance_level', [False, True])
def test_dro_step_with_stored_latents_never_runs_the_vae_encoder(latent_set, tmp_path, monkeypatch, instance_level):
    from basicsr.models import build_model
    opt = in_process_options(latent_set, tmp_path)
    opt['model_type'] = 'DiffusionDROModel'
    opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': 1e-3, 'instance_level': instance_level}
    opt['train']['dro'] = {'sampler_steps': 2, 'sampler': 'ddim', 'buffer_size': 8, 'expert': 'preferred',
                           'online_ratio': 0.5}
    model = build_model(opt)

    def no_encoding(*args, **kwargs):
        raise AssertionError('the VAE encoder ran')

    monkeypatch.setattr(model.bare.vae, 'encode', no_encoding)
    model.feed_data(_batch(latent_set['latents'], phase='train', gt_size=32))
    model.optimize_parameters(1)
    assert math.isfinite(model.get_current_log()['l_dro'])


def test_interrupted_run_resumes_without_reencoding_the_stored_samples(latent_set, tmp_path, monkeypatch):
    from dspo_basicsr.data.preference_set import resumable_ids, write_preference_lmdb
    from dspo_basicsr.preference import candidate_latents
    source = PreferenceLMDB(latent_set['lmdb'])
    torch.manual_seed(0)
    net = ControlSD2Arch(pretrained_model_path=latent_set['model'], controlnet_path=latent_set['controlnet'])
    dst = str(tmp_path / 'resumed.lmdb')

    def interrupted(samples, after):
        for n, sample in enumerate(samples):
            if n == after:
                raise KeyboardInterrupt
            yield sample

    with pytest.raises(KeyboardInterrupt):
        write_preference_lmdb(dst, interrupted(candidate_latents.samples_with_candidate_latents(source, net), 2),
                              progress=False, batch_bytes=1)
    encoded = []
    original = net.encode_posterior
    monkeypatch.setattr(net, 'encode_posterior', lambda images: encoded.append(len(images)) or original(images))
    done = resumable_ids(dst)
    assert len(done) == 2
    store = write_preference_lmdb(dst, candidate_latents.samples_with_candidate_latents(source, net, done=done),
                                  progress=False)
    assert store.ids() == source.ids() and all('candidate_latents' in store[s].extras for s in store.ids())
    assert len(encoded) == 1  # only the third sample (3 candidates, one VAE call) was encoded again
