"""Options are checked at start: typos name the closest key, bad values and files get one clear error."""
import copy
import os

import pytest
from test_cli import msrresnet_options

from dspo_basicsr.cli import OptionFileError, apply_force_yml, read_option_file
from dspo_basicsr.option_check import OptionCheckError, check_options

from conftest import REPO, run_cli, run_cli_refusal, write_options

DEMO = read_option_file(os.path.join(REPO, 'options', 'demo', 'dspo_demo.yml'))


def refused(opt):
    with pytest.raises(OptionCheckError) as err:
        check_options(opt, check_paths=False)
    return str(err.value)


def demo_with(dotted, value):
    opt = copy.deepcopy(DEMO)
    *sections, key = dotted.split('.')
    node = opt
    for section in sections:
        node = node[section]
    node[key] = value
    return opt


@pytest.mark.parametrize('dotted, closest', [
    ('train.grad_clp', 'grad_clip'), ('trian', 'train'), ('val.preference_timestep', 'preference_timesteps'),
    ('val.sample.stpes', 'steps'), ('network_g.trainabel', 'trainable'), ('datasets.train.gt_szie', 'gt_size'),
    ('train.preference_opt.bta', 'beta')])
def test_unknown_key_of_our_classes_is_refused_naming_the_closest(dotted, closest):
    message = refused(demo_with(dotted, 1.0))
    assert f"unknown option '{dotted}'" in message and f"did you mean '{closest}'" in message


@pytest.mark.parametrize('dotted, value, what', [
    ('train.preference_opt.beta', 'abc', 'a positive number'), ('train.preference_opt.beta', -5, 'a positive number'),
    ('train.grad_clip', 0, 'a positive number'), ('train.timestep_range', [500, 100], 'low < high'),
    ('train.optim_g.lr', '1e-4', '!!float 1e-4'), ('val.val_freq', 'often', 'a positive number')])
def test_bad_values_are_refused_naming_key_and_what_it_must_be(dotted, value, what):
    message = refused(demo_with(dotted, value))
    assert dotted in message and what in message and repr(value) in message


def test_every_finding_is_reported_at_once():
    opt = demo_with('train.grad_clp', 1.0)
    opt['train']['preference_opt']['beta'] = 'abc'
    message = refused(opt)
    assert 'grad_clp' in message and 'beta' in message


def test_keys_other_engineers_add_are_known():
    opt = demo_with('train.accumulate_grad_batches', 2)
    opt['val']['sample'].update(color_fix='adain', tile_size=64, tile_overlap=8, vae_tile=True, process_size=512,
                                prompt_source='ram', start_timestep=999)
    assert check_options(opt, check_paths=False) == []


def test_missing_paths_are_refused():
    with pytest.raises(OptionCheckError) as err:
        check_options(demo_with('path.pretrain_network_g', '/nowhere/net_g_100.pth'))
    message = str(err.value)
    assert "path.pretrain_network_g: '/nowhere/net_g_100.pth' does not exist" in message
    assert "datasets.train.dataroot: 'datasets/demo/demo_pref.lmdb' does not exist" in message or \
        os.path.exists('datasets/demo/demo_pref.lmdb')


def test_basicsr_models_get_warnings_not_errors(paired_folders):
    opt = msrresnet_options(*paired_folders)
    opt['train']['grad_clp'] = 1.0
    warnings = check_options(opt)
    assert any("train.grad_clp" in w for w in warnings)


def test_force_yml_values_are_yaml_literals_never_evaluated():
    opt = copy.deepcopy(DEMO)
    apply_force_yml(opt, ['train:optim_g:lr=1e-5', 'val:preference_timesteps=[100, 900]', 'train:grad_clip=~',
                          "val:sample:prompt=__import__('os').getcwd()"])
    assert opt['train']['optim_g']['lr'] == 1e-5 and opt['val']['preference_timesteps'] == [100, 900]
    assert opt['train']['grad_clip'] is None and opt['val']['sample']['prompt'] == "__import__('os').getcwd()"
    with pytest.raises(OptionFileError, match="no section 'trian'"):
        apply_force_yml(opt, ['trian:grad_clip=1'])
    with pytest.raises(OptionFileError, match='one ='):
        apply_force_yml(opt, ['train:grad_clip=1=2'])


@pytest.mark.parametrize('content, what', [(b'name: x\nmodel_type: \xff\xfe\n', 'not UTF-8'),
                                           (b'\x00\x01PK\x03\x04', 'binary')])
def test_non_text_option_file_is_one_line(tmp_path, content, what):
    path = tmp_path / 'opt.yml'
    path.write_bytes(content)
    result = run_cli_refusal(['train', '-opt', str(path)], cwd=tmp_path)
    assert result.returncode == 2 and what in result.stderr and 'opt.yml' in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith('basicsr train:')]
    assert len(ours) == 1 and 'Traceback' not in result.stderr


def test_refused_run_leaves_the_previous_experiment_in_place(tmp_path, paired_folders):
    opt = msrresnet_options(*paired_folders, name='kept')
    previous = tmp_path / 'experiments' / 'kept' / 'models'
    previous.mkdir(parents=True)
    (previous / 'net_g_100.pth').write_bytes(b'weights')
    opt['model_type'] = 'DSPOModel'  # our model: the typo is an error
    opt['train']['grad_clp'] = 1.0
    result = run_cli(['train', '-opt', write_options(tmp_path / 'typo.yml', opt)], cwd=tmp_path)
    assert result.returncode == 2 and "'train.grad_clp' (did you mean 'grad_clip'?)" in result.stderr
    assert sorted(os.listdir(tmp_path / 'experiments')) == ['kept'] and (previous / 'net_g_100.pth').is_file()


def test_force_yml_list_reaches_basicsr_as_data_not_code(tmp_path, paired_folders):
    marker = tmp_path / 'pwned'
    opt_file = write_options(tmp_path / 'msr.yml', msrresnet_options(*paired_folders, name='forced', total_iter=1))
    result = run_cli(['train', '-opt', opt_file, '--force_yml', f"val:suffix=[__import__('os').mkdir('{marker}')]"],
                     cwd=tmp_path)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-2000:]


def _val_folders_with_bad_images(tmp_path, paired_folders):
    import shutil
    gt, lq = (shutil.copytree(folder, tmp_path / f'val_{side}') for folder, side in zip(paired_folders, 'gl'))
    (gt / 'zz_empty.png').write_bytes(b'')
    png = next(p for p in sorted(os.listdir(lq)) if p.endswith('.png'))
    data = (lq / png).read_bytes()
    (lq / 'zz_cut.png').write_bytes(data[:len(data) // 2])
    return str(gt), str(lq)


def test_unreadable_validation_images_are_refused_at_start_naming_them(tmp_path, paired_folders):
    """Issue 24 item 5: a zero-byte or cut PNG in a validation folder is refused before anything is written."""
    opt = msrresnet_options(*paired_folders, name='kept')
    gt, lq = _val_folders_with_bad_images(tmp_path, paired_folders)
    opt['datasets']['val'].update(dataroot_gt=gt, dataroot_lq=lq)
    with pytest.raises(OptionCheckError) as err:
        check_options(opt)
    message = str(err.value)
    assert f"datasets.val.dataroot_gt: 1 file(s) in '{gt}' cannot be read as images (zz_empty.png: 0 bytes)" \
        in message
    assert 'zz_cut.png: not a readable image' in message
    previous = tmp_path / 'experiments' / 'kept' / 'models'
    previous.mkdir(parents=True)
    result = run_cli(['train', '-opt', write_options(tmp_path / 'bad_val.yml', opt)], cwd=tmp_path)
    assert result.returncode == 2 and 'zz_empty.png: 0 bytes' in result.stderr and 'Traceback' not in result.stderr
    assert sorted(os.listdir(tmp_path / 'experiments')) == ['kept']
