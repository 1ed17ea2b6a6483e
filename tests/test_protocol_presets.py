"""Training option files validate with the test protocol of their test file (issue 23, item 2)."""
import os

import pytest
import torch

from dspo_basicsr.archs.diffusion_sr_base import sample_protocol, sample_with_options
from dspo_basicsr.archs.sampling_protocols import SAMPLING_PROTOCOLS, resolve_sample_options
from dspo_basicsr.option_check import check_options
from dspo_basicsr.utils.options import read_option_file

from conftest import REPO

# training file -> the test file whose protocol it must validate with
TRAINING_TO_TEST = {
    'dspo_seesr.yml': 'test_dspo_seesr.yml',
    'dspo_seesr_m1.yml': 'test_dspo_seesr.yml',
    'dspo_addsr.yml': 'test_dspo_addsr.yml',
    'dspo_osediff.yml': 'test_dspo_osediff.yml',
    'dspo_sd21.yml': 'test_dspo_sd21.yml',
}


def _read(name):
    return read_option_file(os.path.join(REPO, 'options', name))


@pytest.mark.parametrize('train_name', sorted(TRAINING_TO_TEST))
def test_training_file_validates_with_its_test_files_protocol(train_name):
    train_opt, test_opt = _read(train_name), _read(TRAINING_TO_TEST[train_name])
    resolved = resolve_sample_options(train_opt['val']['sample'])
    assert resolved == resolve_sample_options(test_opt['val']['sample'])
    assert 'steps' in resolved and 'guidance_scale' in resolved  # a real protocol, not two empty blocks
    # the network settings that sampling reads (start timestep, PSR weight, RAM / DAPE for the tags) agree too
    assert train_opt['network_g'] == test_opt['network_g']


@pytest.mark.parametrize('name', ['seesr', 'addsr', 'osediff'])
def test_presets_of_tagged_frameworks_carry_the_official_protocol(name):
    preset = SAMPLING_PROTOCOLS[name]
    assert preset['prompt_source'] == 'tags' and preset['color_fix'] == 'adain' and preset['process_size'] == 512
    assert preset['vae_tile'] is True and preset['tile_size'] > preset['tile_overlap']


def test_addsr_trains_and_tests_with_the_upstream_psr_weight():
    for name in ('dspo_addsr.yml', 'test_dspo_addsr.yml'):
        assert _read(name)['network_g']['psr_weight'] == 0.4  # pipelines/pipeline_addsr.py PSR_weight default


def test_explicit_keys_override_the_preset_and_resolving_twice_changes_nothing():
    resolved = resolve_sample_options({'protocol': 'seesr', 'steps': 20, 'color_fix': 'none'})
    assert resolved == {**SAMPLING_PROTOCOLS['seesr'], 'steps': 20, 'color_fix': 'none'}
    assert resolve_sample_options(resolved) == resolved
    assert resolve_sample_options({'steps': 3}) == {'steps': 3}  # no preset: the block as it is
    assert sample_protocol({'protocol': 'osediff'})['tile_overlap'] == 32


def test_an_unknown_preset_is_one_clear_error():
    with pytest.raises(ValueError, match=r"val.sample.protocol 'seer' is unknown; choose one of"):
        resolve_sample_options({'protocol': 'seer'})
    opt = _read('dspo_sd21.yml')
    opt['val']['sample'] = {'protocol': 'seer'}
    with pytest.raises(ValueError, match='val.sample.protocol must be one of seesr, addsr, osediff, sd21'):
        check_options(opt, check_paths=False)


def test_sampling_with_a_preset_passes_its_settings_to_the_framework():
    calls = []

    class Recorder:
        def sample(self, lq, **kwargs):
            calls.append(kwargs)
            return lq

    sample_with_options(Recorder(), torch.zeros(1, 3, 4, 4), {'protocol': 'addsr', 'seed': 3})
    assert calls[0]['steps'] == 4 and calls[0]['guidance_scale'] == 1.0 and calls[0]['prompt_source'] == 'tags'
    assert calls[0]['tile_size'] == 320 and calls[0]['color_fix'] == 'adain'
