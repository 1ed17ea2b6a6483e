"""DSPOModel: the training step, checkpoints without the reference, resume, non-finite losses, CLI."""
import dataclasses
import glob
import math
import os
import re

import pytest
import torch

import dspo_basicsr  # noqa: F401  (registration)
from dspo_basicsr.models.dspo_model import NonFiniteLossError

from basicsr.models import build_model

from conftest import make_paired_folders, run_cli, write_options
from dspo_fixtures import dspo_options, in_process_options, make_tiny_preference_set, preference_batch


class Payload:
    """A Python object: ``weights_only=True`` refuses to unpickle it."""


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    return make_tiny_preference_set(str(tmp_path_factory.mktemp('tiny_set')))


def _pretrained_controlnet(tiny_set):
    from diffusers import ControlNetModel
    return ControlNetModel.from_pretrained(tiny_set['controlnet'], local_files_only=True).state_dict()


def test_training_moves_policy_not_reference_and_saves_only_trainable(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path))
    data = preference_batch(tiny_set)
    before = {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}
    for step in range(3):
        model.feed_data(data)
        model.optimize_parameters(step + 1)
    log = model.get_current_log()
    assert {'l_dspo', 'implicit_acc', 'logit_mean', 'err_theta_w', 'err_ref_l'} <= set(log)
    assert math.isfinite(log['l_dspo'])
    after = model.bare.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pretrained = _pretrained_controlnet(tiny_set)
    for key, value in model.net_ref.copies['controlnet'].state_dict().items():
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0)

    model.save_network(model.net_g, 'net_g', 3)
    saved = torch.load(tmp_path / 'models' / 'net_g_3.pth', weights_only=True)['params']
    assert set(saved) == set(after) and all(k.startswith('controlnet.') for k in saved)
    assert not any(k.startswith(('unet.', 'vae.', 'text_encoder.')) for k in saved)

    # Loading the checkpoint restores the policy; the reference is rebuilt from the pretrained source.
    opt = in_process_options(tiny_set, tmp_path)
    opt['path']['pretrain_network_g'] = str(tmp_path / 'models' / 'net_g_3.pth')
    resumed = build_model(opt)
    for key, value in resumed.bare.trainable_state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=0, atol=0)
    for key, value in resumed.net_ref.copies['controlnet'].state_dict().items():
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0)


def test_policy_equal_to_reference_gives_ln2(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    result = model.preference_loss()
    loss, stats = result.loss, result.statistics()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats['implicit_acc'].item() == pytest.approx(0.5)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in model.bare.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize('preference,log_key', [('DiffusionDPOLoss', 'l_dpo'), ('DiffusionSFTLoss', 'l_sft')])
def test_image_level_objectives_step(tiny_set, tmp_path, preference, log_key):
    model = build_model(in_process_options(tiny_set, tmp_path, preference=preference))
    data = preference_batch(tiny_set)
    model.feed_data(data)
    before = {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}
    torch.manual_seed(1)
    model.optimize_parameters(1)
    log = model.get_current_log()
    after = {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if preference == 'DiffusionDPOLoss':
        # Before the first update policy = reference: no preference yet, the loss is ln 2 on every image pair.
        assert log[log_key] == pytest.approx(math.log(2), abs=1e-5)
        assert log['implicit_acc'] == 0.5 and log['logit_mean'] == pytest.approx(0.0, abs=1e-6)
        assert log['err_theta_w'] == pytest.approx(log['err_ref_w'], rel=1e-6)
        assert log['err_theta_l'] == pytest.approx(log['err_ref_l'], rel=1e-6)
    else:
        # SFT runs only the preferred image of each pair: its loss is the plain diffusion loss on it.
        model.bare.load_trainable_state_dict(before, source='the weights before the step')
        torch.manual_seed(1)
        err_theta, err_ref = model.denoising_errors(data['pair'][:, :1], with_reference=False)
        assert err_ref is None
        assert log[log_key] == pytest.approx(err_theta.mean().item(), rel=1e-6)
        assert log['err_theta_w'] == pytest.approx(log[log_key], rel=1e-6)


def test_logged_statistics_are_the_objectives_own(tiny_set, tmp_path, monkeypatch):
    # The model logs the objective's result as it is: shifting the loss's logits shifts the log.
    model = build_model(in_process_options(tiny_set, tmp_path))
    model.feed_data(preference_batch(tiny_set))
    forward = type(model.cri_pref).forward

    def shifted(self, *args):
        result = forward(self, *args)
        return dataclasses.replace(result, logits=result.logits + 3.0)

    monkeypatch.setattr(type(model.cri_pref), 'forward', shifted)
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert log['logit_mean'] == pytest.approx(3.0, abs=1e-4)  # policy = reference: the loss's logits are 0
    assert log['implicit_acc'] == 1.0
    assert log['l_dspo'] == pytest.approx(math.log(2), abs=1e-5)  # the loss itself is untouched


def test_lora_training_has_no_reference_copy(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path, trainable='unet_lora', feedback=2.0))
    assert model.net_ref.copies == {}
    model.feed_data(preference_batch(tiny_set))
    model.optimize_parameters(1)
    keys = set(model.bare.trainable_state_dict())
    assert keys and all('lora_' in k for k in keys)


def test_nonfinite_loss_skips_update_then_stops(tiny_set, tmp_path, monkeypatch):
    opt = in_process_options(tiny_set, tmp_path)
    opt['train']['max_nonfinite_steps'] = 2
    model = build_model(opt)
    model.feed_data(preference_batch(tiny_set))
    before = {k: v.clone() for k, v in model.bare.trainable_state_dict().items()}
    real = model.preference_loss

    def nan_loss():
        result = real()
        return dataclasses.replace(result, loss=result.loss * float('nan'))

    monkeypatch.setattr(model, 'preference_loss', nan_loss)
    model.optimize_parameters(1)
    assert model.nonfinite_total == 1
    for key, value in model.bare.trainable_state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(NonFiniteLossError, match='non-finite loss'):
        model.optimize_parameters(2)


def test_checkpoint_with_wrong_keys_names_them(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path))
    state = model.bare.trainable_state_dict()
    dropped = sorted(state)[0]
    broken = {('controlnet.extra.weight' if k == dropped else k): v for k, v in state.items()}
    torch.save({'params': broken}, tmp_path / 'broken.pth')
    opt = in_process_options(tiny_set, tmp_path)
    opt['path']['pretrain_network_g'] = str(tmp_path / 'broken.pth')
    with pytest.raises(KeyError, match=re.escape(dropped)) as error:
        build_model(opt)
    assert 'controlnet.extra.weight' in str(error.value) and 'broken.pth' in str(error.value)
    torch.save({'params': state, 'note': Payload()}, tmp_path / 'pickled.pth')  # the one strict reader refuses it
    with pytest.raises(ValueError, match='path.pretrain_network_g.*pickled.pth.*weights_only=True'):
        model.load_network(model.net_g, str(tmp_path / 'pickled.pth'))


def test_nonfinite_weights_never_reach_a_checkpoint(tiny_set, tmp_path):
    model = build_model(in_process_options(tiny_set, tmp_path))
    model.save_network(model.net_g, 'net_g', 1)
    with torch.no_grad():
        next(p for p in model.bare.parameters() if p.requires_grad).fill_(float('inf'))
    with pytest.raises(NonFiniteLossError, match='refusing to save'):
        model.save_network(model.net_g, 'net_g', 2)
    assert sorted(os.listdir(tmp_path / 'models')) == ['net_g_1.pth']


@pytest.mark.slow
def test_cli_trains_saves_auto_resumes_with_same_reference_and_tests(tiny_set, tmp_path):
    opt_file = write_options(tmp_path / 'dspo.yml', dspo_options(tiny_set, total_iter=2))
    first = run_cli(['train', '-opt', opt_file], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'dspo_tiny'
    assert (exp / 'models' / 'net_g_2.pth').is_file() and (exp / 'training_states' / '2.state').is_file()
    saved = torch.load(exp / 'models' / 'net_g_2.pth', weights_only=True)['params']
    assert saved and all(k.startswith('controlnet.') for k in saved)

    opt_file = write_options(tmp_path / 'dspo.yml', dspo_options(tiny_set, total_iter=4))
    second = run_cli(['train', '-opt', opt_file, '--auto_resume'], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (exp / 'models' / 'net_g_4.pth').is_file()
    logs = [open(f).read() for f in sorted(glob.glob(str(exp / 'train_*.log')))]
    text = '\n'.join(logs)
    assert 'Resuming training from epoch' in text and 'l_dspo' in text and 'implicit_acc' in text
    checksums = re.findall(r'checksum (\S+)\.', text)
    expected = sum(v.double().sum() for v in _pretrained_controlnet(tiny_set).values())
    assert len(checksums) == 2 and all(float(c) == pytest.approx(float(expected), rel=1e-9) for c in checksums)

    # basicsr test: SR samples with metrics on an image set, implicit accuracy on the preference set.
    gt_dir, lq_dir = make_paired_folders(str(tmp_path / 'paired'), num=2, size=32)
    test_opt = dspo_options(tiny_set, name='dspo_tiny_test', val=False)
    del test_opt['train']
    test_opt['datasets'] = {
        'test_1': {'name': 'paired', 'type': 'PairedImageDataset', 'dataroot_gt': gt_dir, 'dataroot_lq': lq_dir,
                   'io_backend': {'type': 'disk'}},
        'test_2': {'name': 'pairs', 'type': 'PreferenceLMDBDataset', 'dataroot': tiny_set['lmdb']}}
    test_opt['path']['pretrain_network_g'] = str(exp / 'models' / 'net_g_latest.pth')
    test_opt['val'] = {'save_img': True, 'suffix': None, 'preference_timesteps': [500],
                       'sample': {'steps': 2, 'guidance_scale': 2.0, 'seed': 0, 'sampler': 'ddim'},
                       'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}}
    tested = run_cli(['test', '-opt', write_options(tmp_path / 'test.yml', test_opt)], cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    results = tmp_path / 'results' / 'dspo_tiny_test'
    assert len(glob.glob(str(results / 'visualization' / 'paired' / '*.png'))) == 2
    assert (results / 'visualization' / 'summary_dspo_tiny_test.png').is_file()  # LQ | reference | current | GT
    log = '\n'.join(open(f).read() for f in glob.glob(str(results / 'test_*.log')))
    assert re.search(r'# psnr: [0-9.]+', log) and re.search(r'# implicit_acc: [0-9.]+', log)
    assert "Loading trained parameters of ControlSD2Arch from" in log


def test_top_bottom_pairs_from_the_sets_score_tables_train_like_best_worst(tiny_set, tmp_path):
    # The tiny set stores only each instance's pair, so its score tables rank to the same pairs with top_n 1.
    data = preference_batch(tiny_set)
    losses = []
    for pairs in ('best_worst', 'top_bottom'):
        opt = in_process_options(tiny_set, tmp_path)
        opt['train']['preference_opt'].update(pairs=pairs, top_n=1)
        model = build_model(opt)
        model.feed_data(data)
        assert model.scores.shape == (2, 4, 3)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # policy != reference: a loss away from ln 2
            for p in model.trainable_params:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        torch.manual_seed(3)
        losses.append(model.preference_loss().loss)
    assert losses[0].item() != pytest.approx(math.log(2), abs=1e-4)
    assert torch.equal(losses[0], losses[1])
