"""Batched candidate sampling: settings that differ only in seed, sampled as one batch, equal one-by-one."""
import numpy as np
import pytest

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.preference.candidates import expand_settings_grid, sample_candidates, seed_groups
from dspo_basicsr.preference.pipeline import build_framework

from pipeline_fixtures import FakeFramework, tiny_control_sd2_network


def test_seed_groups_keep_order_and_split_by_batch_size():
    settings = expand_settings_grid({'guidance_scale': [1.0, 3.0], 'seed': [1, 2, 3]},
                                    {'steps': 2, 'guidance_scale': 1.0, 'seed': 0})
    groups = seed_groups(settings, batch_size=3)
    assert sorted(i for group in groups for i in group) == list(range(len(settings)))
    for group in groups:
        assert len(group) <= 3 and len({settings[i]['guidance_scale'] for i in group}) == 1
    assert groups[0] == [0, 1, 2] and seed_groups(settings, 1) == [[i] for i in range(len(settings))]


@pytest.fixture(scope='module')
def framework():
    return build_framework({'network': tiny_control_sd2_network()})


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_batched_candidates_equal_one_by_one(framework, sampler):
    rng = np.random.default_rng(0)
    lq = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    settings = expand_settings_grid({'seed': list(range(1, 5)), 'guidance_scale': [1.0, 3.0]},
                                    {'steps': 2, 'guidance_scale': 3.0, 'seed': 0, 'sampler': sampler})
    assert len(settings) == 9
    one_by_one = sample_candidates(framework, lq, settings, prompt='a photo', negative_prompt='blurry', batch_size=1)
    calls = []
    real = framework.sample

    def counting(lq_tensor, *args, **kwargs):
        calls.append(lq_tensor.shape[0])
        return real(lq_tensor, *args, **kwargs)

    framework.sample = counting
    try:
        batched = sample_candidates(framework, lq, settings, prompt='a photo', negative_prompt='blurry', batch_size=4)
    finally:
        del framework.sample
    assert sorted(calls) == [1, 4, 4]  # cfg 3: seeds 0-4 -> 4 + 1; cfg 1: seeds 1-4 -> 4
    assert len({o.tobytes() for o in one_by_one}) == len(settings)  # the seeds do change the output
    for single, batch in zip(one_by_one, batched):
        # Same noise per image; a batched convolution may round its last bit differently, so allow one level.
        assert np.abs(single.astype(int) - batch.astype(int)).max() <= 1
        assert np.mean(single != batch) < 0.01


def test_frameworks_without_generator_lists_are_sampled_one_by_one():
    fake = FakeFramework()
    settings = expand_settings_grid({'seed': [1, 2, 3]}, {'steps': 2, 'guidance_scale': 1.0, 'seed': 0})
    sample_candidates(fake, np.zeros((8, 8, 3), np.uint8), settings, batch_size=8)
    assert [call['shape'][0] for call in fake.calls] == [1, 1, 1, 1]
