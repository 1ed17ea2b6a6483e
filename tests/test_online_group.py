"""OnlineGroupModel: groups sampled from the policy, labelled per instance by PSNR, trained with DSPO."""
import math

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registers the model)
from dspo_basicsr.models.online_group_model import group_labels, instance_psnr

from basicsr.models import build_model

from dspo_fixtures import in_process_options, make_tiny_preference_set, preference_batch


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def test_instance_psnr_and_group_labels():
    gt = torch.full((1, 3, 2, 2), 0.5)
    seg = torch.tensor([[[0, 0], [1, 1]]])
    candidates = gt[:, None].repeat(1, 3, 1, 1, 1)
    candidates[0, 0, :, 0] += 0.1  # candidate 0: error 0.1 in instance 0 only
    candidates[0, 1, :, 1] += 0.2  # candidate 1: error 0.2 in instance 1 only
    candidates[0, 2] += 0.05       # candidate 2: error 0.05 everywhere
    scores = instance_psnr(candidates, gt, seg, num_instances=3)
    assert scores.shape == (1, 3, 3)
    assert scores[0, 0, 0].item() == pytest.approx(-10 * math.log10(0.01), rel=1e-4)
    assert torch.isnan(scores[0, 2]).all()  # no pixel: padding
    win, lose = group_labels(scores)
    assert win.tolist() == [[1, 0, -1]] and lose.tolist() == [[0, 1, -1]]


def _options(tiny_set, tmp_path, **online):
    opt = in_process_options(tiny_set, tmp_path)
    opt['model_type'] = 'OnlineGroupModel'
    opt['train']['online'] = dict(dict(group_size=3, steps=2), **online)
    opt['path']['visualization'] = str(tmp_path / 'visualization')
    return opt


def test_online_step_trains_dspo_on_a_policy_group(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path, sheet_freq=1))
    data = preference_batch(tiny_set)
    model.feed_data(data)
    before = [p.detach().clone() for p in model.trainable_params]
    model.optimize_parameters(1)
    assert model.candidates.shape == (2, 3, 3, 32, 32)  # G policy samples replaced the 3 stored candidates
    assert not torch.equal(model.candidates[0, 0], data['candidates'][0, 0])
    scores = torch.nan_to_num(model.group_rewards, nan=-1.0)
    paired = model.win >= 0
    assert paired.any()
    assert torch.equal(model.win[paired], scores.argmax(-1)[paired])
    assert math.isfinite(model.log_dict['online_psnr']) and 'l_dspo' in model.log_dict
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_params))
    assert (tmp_path / 'visualization' / 'online_groups' / 'group_000001.png').is_file()


def test_groups_depend_only_on_the_iteration_so_a_resume_samples_the_same(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    first, _ = model.sample_group(7)
    model.feed_data(preference_batch(tiny_set))
    again, _ = model.sample_group(7)
    other, _ = model.sample_group(8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0, 0], first[0, 1])  # the group is diverse


def test_share_mixes_online_and_stored_steps_and_bad_options_fail(tiny_set, tmp_path):
    model = build_model(_options(tiny_set, tmp_path, share=0.25))
    assert sum(model.is_online_step(i) for i in range(1, 101)) == 25
    with pytest.raises(ValueError, match='group_size'):
        build_model(_options(tiny_set, tmp_path, group_size=1))
    with pytest.raises(ValueError, match="unknown option 'train.online.sample_every'"):
        build_model(_options(tiny_set, tmp_path, sample_every=2))
