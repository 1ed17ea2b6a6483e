"""EMA of the trained parameters (train.ema_decay) and prompt dropout in DSPOModel / DiffusionDROModel (issue 23)."""
import types

import pytest
import torch
from torch import nn

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.models.trainable_ema import TrainableEMA, ema_decay_at

from basicsr.models import build_model

from conftest import run_cli, write_options
from dspo_fixtures import dspo_options, in_process_options, make_tiny_preference_set, preference_batch


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def _ema_options(tiny_set, tmp_path, decay=0.5, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    opt = in_process_options(tiny_set, tmp_path)
    opt['train'].update(ema_decay=decay, **train)
    return opt


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_update_formula_and_frozen_parameters_left_out():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    net[1].weight.requires_grad_(False)
    ema = TrainableEMA(net)
    assert set(ema.state) == {'0.weight', '0.bias', '1.bias'}  # frozen parts are not copied
    start = _clone(ema.state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 0.9)
    for name, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ema.state[name], 0.9 * start[name] + 0.1 * p.detach(), rtol=0, atol=1e-7)


def test_diffusers_schedule_is_emamodel_get_decay():
    from diffusers.training_utils import EMAModel
    reference = EMAModel(nn.Linear(1, 1).parameters(), decay=0.9999)
    for update in (1, 2, 3, 50, 100000):
        assert ema_decay_at(0.9999, update, 'diffusers') == pytest.approx(reference.get_decay(update))
    assert ema_decay_at(0.999, 5, 'constant') == 0.999
    with pytest.raises(ValueError, match="train.ema_schedule 'cosine' is unknown"):
        ema_decay_at(0.9, 1, 'cosine')


def test_training_updates_the_ema_once_per_update_and_saves_params_ema(tiny_set, tmp_path):
    model = build_model(_ema_options(tiny_set, tmp_path, decay=0.5))
    data = preference_batch(tiny_set)
    expected = _clone(model.bare.trainable_state_dict())
    assert _equal(model.net_g_ema.state, expected)  # starts at the policy
    for step in (1, 2):
        model.feed_data(data)
        model.optimize_parameters(step)
        policy = model.bare.trainable_state_dict()
        expected = {k: 0.5 * expected[k] + 0.5 * policy[k] for k in expected}
    for key, value in expected.items():
        torch.testing.assert_close(model.net_g_ema.state[key], value, rtol=0, atol=1e-7)
    assert not _equal(model.net_g_ema.state, model.bare.trainable_state_dict())
    assert all(k.startswith('controlnet.') for k in model.net_g_ema.state)  # the trained ControlNet only

    model.save(0, 2)
    saved = torch.load(tmp_path / 'models' / 'net_g_2.pth', weights_only=True)
    assert set(saved) == {'params', 'params_ema'}
    assert _equal(saved['params'], {k: v.cpu() for k, v in model.bare.trainable_state_dict().items()})
    assert _equal(saved['params_ema'], {k: v.cpu() for k, v in model.net_g_ema.state.items()})


def test_lora_training_averages_only_the_adapters(tiny_set, tmp_path):
    opt = in_process_options(tiny_set, tmp_path, trainable='unet_lora')
    opt['train']['ema_decay'] = 0.5
    model = build_model(opt)
    assert model.net_g_ema.state and all('lora' in k for k in model.net_g_ema.state)
    assert set(model.net_g_ema.state) == set(model.bare.trainable_state_dict())


def test_basicsr_test_loads_params_ema_when_present(tiny_set, tmp_path):
    model = build_model(_ema_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    model.optimize_parameters(1)
    model.save(0, 1)
    path = str(tmp_path / 'models' / 'net_g_1.pth')
    saved = torch.load(path, weights_only=True)

    def test_model(**path_opt):
        opt = in_process_options(tiny_set, tmp_path)
        opt['is_train'] = False
        opt['path'].update(pretrain_network_g=path, **path_opt)
        return build_model(opt)

    assert _equal({k: v.cpu() for k, v in test_model().bare.trainable_state_dict().items()}, saved['params_ema'])
    explicit = test_model(param_key_g='params').bare.trainable_state_dict()
    assert _equal({k: v.cpu() for k, v in explicit.items()}, saved['params'])


def test_validation_runs_with_the_ema_weights_and_restores_the_policy(tiny_set, tmp_path):
    from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
    model = build_model(_ema_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    model.optimize_parameters(1)
    policy, ema = _clone(model.bare.trainable_state_dict()), _clone(model.net_g_ema.state)
    seen = []
    model.preference_validation = lambda *args: seen.append(_clone(model.bare.trainable_state_dict()))
    dataset = PreferenceLMDBDataset({'name': 'v', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb'],
                                     'phase': 'val'})
    model.nondist_validation(types.SimpleNamespace(dataset=dataset), 1, None, False)
    assert len(seen) == 1 and _equal(seen[0], ema) and not _equal(ema, policy)
    assert _equal(_clone(model.bare.trainable_state_dict()), policy)
    assert _equal(model.net_g_ema.state, ema)


def _run(model, data, iters, seed=0):
    for step in iters:
        torch.manual_seed(seed + step)  # the step's timesteps and noise, the same in both runs
        model.feed_data(data)
        model.optimize_parameters(step)


def test_resume_gives_the_ema_back_bit_exactly(tiny_set, tmp_path):
    data = preference_batch(tiny_set)
    straight = build_model(_ema_options(tiny_set, tmp_path / 'straight', decay=0.9, ema_schedule='diffusers'))
    _run(straight, data, (1, 2, 3))

    first_dir = tmp_path / 'first'
    first = build_model(_ema_options(tiny_set, first_dir, decay=0.9, ema_schedule='diffusers'))
    _run(first, data, (1, 2))
    first.save(0, 2)
    opt = _ema_options(tiny_set, first_dir, decay=0.9, ema_schedule='diffusers')
    opt['path'].update(pretrain_network_g=str(first_dir / 'models' / 'net_g_2.pth'),
                       resume_state=str(first_dir / 'states' / '2.state'))
    resumed = build_model(opt)
    resumed.resume_training(torch.load(first_dir / 'states' / '2.state', weights_only=True))
    assert _equal(resumed.net_g_ema.state, first.net_g_ema.state)
    _run(resumed, data, (3,))
    assert _equal(resumed.bare.trainable_state_dict(), straight.bare.trainable_state_dict())
    assert _equal(resumed.net_g_ema.state, straight.net_g_ema.state)


@pytest.mark.parametrize('model_type', ['DSPOModel', 'DiffusionDROModel'])
def test_prompt_dropout_replaces_prompts_by_the_empty_prompt(tiny_set, tmp_path, model_type):
    def prompts_seen(dropout):
        opt = in_process_options(tiny_set, tmp_path)
        opt['train']['prompt_dropout'] = dropout
        if model_type == 'DiffusionDROModel':
            opt['model_type'] = model_type
            opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': 1e-3}
            opt['train']['dro'] = {'online_ratio': 0.0}
        model = build_model(opt)
        seen = []
        condition = model.bare.condition
        model.bare.condition = lambda lq, prompts, *args, **kwargs: (seen.append(list(prompts)),
                                                                     condition(lq, prompts, *args, **kwargs))[1]
        data = preference_batch(tiny_set)
        data['prompt'] = ['a cat', 'a dog']
        torch.manual_seed(0)
        model.feed_data(data)
        model.optimize_parameters(1)
        return seen

    assert prompts_seen(0.0) == [['a cat', 'a dog']]
    assert prompts_seen(1.0) == [['', '']]
    with pytest.raises(ValueError, match=r'train.prompt_dropout must be a non-negative finite number <= 1, got 1.5'):
        prompts_seen(1.5)


def test_dro_refresh_counts_optimizer_updates(tiny_set, tmp_path):
    opt = in_process_options(tiny_set, tmp_path, total_iter=8)
    opt['model_type'] = 'DiffusionDROModel'
    opt['train'].update(accumulate_grad_batches=4,
                        preference_opt={'type': 'DiffusionDROLoss', 'margin': 1e-3})
    opt['train']['dro'] = {'online_ratio': 1.0, 'refresh_every': 1, 'sampler_steps': 4, 'sampler': 'ddim'}
    model = build_model(opt)
    synced = [i for i in range(1, 9) if model.refresh_lagged_policy(i)]
    assert synced == [1, 5]  # one update = 4 micro-batches (Diffusion-DRO: --buffer_update_steps 16 / accumulation 16)


def test_upstream_dro_recipe_file():
    """options/compare_dro_upstream_sd21.yml carries basiclab/DiffusionDRO train.py's defaults (issue 23, item 5)."""
    import os

    from dspo_basicsr.option_check import check_options
    from dspo_basicsr.utils.options import read_option_file

    from conftest import REPO
    opt = read_option_file(os.path.join(REPO, 'options', 'compare_dro_upstream_sd21.yml'))
    train = opt['train']
    assert train['dro']['guidance_scale'] == 1.0  # --buffer_guidance_scale 1.0
    assert train['accumulate_grad_batches'] == 16 and train['dro']['refresh_every'] == 1  # 16 micro-steps
    assert train['ema_decay'] == 0.9999 and train['ema_schedule'] == 'diffusers'  # --use_ema, EMAModel
    assert train['prompt_dropout'] == 0.2  # --random_drop_prompt_probability
    assert train['optim_g']['lr'] == 1e-4 and train['total_iter'] == 25600 and train['grad_clip'] == 1.0
    assert train['dro']['sampler'] == 'dpmsolver++' and train['dro']['sampler_steps'] == 20
    assert train['dro']['perturb_timesteps'] is True and train['dro']['online_ratio'] == 1.0
    assert check_options(opt, check_paths=False) == []


@pytest.mark.slow
def test_cli_trains_validates_and_tests_with_the_ema(tiny_set, tmp_path):
    opt = dspo_options(tiny_set, name='dspo_ema', total_iter=2)
    opt['train']['ema_decay'] = 0.9
    trained = run_cli(['train', '-opt', write_options(tmp_path / 'train.yml', opt)], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    saved = torch.load(tmp_path / 'experiments' / 'dspo_ema' / 'models' / 'net_g_latest.pth', weights_only=True)
    assert set(saved) == {'params', 'params_ema'} and not _equal(saved['params'], saved['params_ema'])

    test_opt = dspo_options(tiny_set, name='dspo_ema_test')
    del test_opt['train']
    test_opt['datasets'] = {'test_1': test_opt['datasets'].pop('val_1')}
    test_opt['path']['pretrain_network_g'] = str(tmp_path / 'experiments' / 'dspo_ema' / 'models' /
                                                 'net_g_latest.pth')
    tested = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', test_opt)], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    log = open(next((tmp_path / 'results' / 'dspo_ema_test').glob('test_*.log'))).read()
    assert 'net_g_latest.pth [params_ema]' in log and 'implicit_acc' in log
