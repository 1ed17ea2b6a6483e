"""Options are checked at start: typos name the closest key, bad values and files get one clear error."""
import copy
import os

import pytest
from test_cli import msrresnet_options

from dspo_basicsr.cli import OptionFileError, apply_force_yml, read_option_file
from dspo_basicsr.option_check import OptionCheckError, check_options
from dspo_basicsr.utils.options import plain_options

from conftest import REPO, run_cli, run_cli_refusal, write_options

DEMO = plain_options(read_option_file(os.path.join(REPO, 'options', 'demo', 'dspo_demo.yml')))


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
    ('train.preference_opt.beta', 'abc', 'a positive finite number'),
    ('train.preference_opt.beta', -5, 'a positive finite number'),
    ('train.preference_opt.beta', float('inf'), 'a positive finite number'),  # every step skipped, rc 0
    ('train.grad_clip', 0, 'a positive finite number'), ('train.timestep_range', [500, 100], 'low < high'),
    ('train.timestep_range', [0, 2000], 'high <= 1000'),  # an IndexError in the first step
    ('train.optim_g.lr', '1e-4', '!!float 1e-4'), ('val.val_freq', 'often', 'a positive whole number'),
    ('datasets.train.batch_size_per_gpu', -2, 'a positive integer'),
    ('datasets.train.batch_size_per_gpu', 0, 'a positive integer'),
    ('datasets.train.batch_size_per_gpu', 'two', 'a positive integer'),
    ('datasets.train.gt_size', 7, 'a positive multiple of scale 4'),
    ('datasets.train.num_worker_per_gpu', -1, 'a non-negative integer'),
    ('datasets.train.use_hflip', 'false', 'true or false'),  # a quoted string turned flips on
    ('num_gpu', 'abc', "a non-negative integer (or 'auto')"), ('train.warmup_iter', 'abc', 'a whole number'),
    ('val.summary', 'sometimes', 'one of end, every'), ('val.preference_seed', 1.5, 'an integer'),
    ('logger.save_checkpoint_freq', 0, 'a positive whole number'),
    ('train.accumulate_grad_batches', 7, 'a divisor of train.total_iter')])
def test_bad_values_are_refused_naming_key_and_what_it_must_be(dotted, value, what):
    message = refused(demo_with(dotted, value))
    line = next(line for line in message.splitlines() if dotted in line)
    assert what in line and repr(value) in line


@pytest.mark.parametrize('dotted', ['train', 'network_g', 'logger', 'train.optim_g', 'train.preference_opt',
                                    'logger.save_checkpoint_freq', 'train.total_iter', 'datasets',
                                    'datasets.train.batch_size_per_gpu', 'datasets.train.dataroot'])
def test_missing_section_or_required_key_is_refused_by_name(dotted):
    opt = copy.deepcopy(DEMO)
    *sections, key = dotted.split('.')
    node = opt
    for section in sections:
        node = node[section]
    del node[key]
    message = refused(opt)
    assert f"missing section '{dotted}'" in message or f"missing option '{dotted}'" in message
    assert 'KeyError' not in message


def test_test_runs_need_no_train_or_logger_section():
    opt = copy.deepcopy(DEMO)
    for section in ('train', 'logger'):
        del opt[section]
    del opt['datasets']['train']
    assert check_options(opt, check_paths=False, is_train=False) == []
    assert "missing section 'train'" in refused(opt)


def test_validation_metrics_are_checked_at_start():
    opt = copy.deepcopy(DEMO)
    opt['val']['metrics'] = {'psnr': {'type': 'calculate_psnrr'},
                             'lpips': {'type': 'calculate_lpips', 'better': 'less'}}
    message = refused(opt)
    assert "val.metrics.psnr.type: No object named 'calculate_psnrr'" in message
    assert "val.metrics.lpips.better must be one of higher, lower, got 'less'" in message


def test_optimizer_type_is_checked_at_start():
    assert "train.optim_g.type must be a torch.optim optimizer or AdamW8bit (did you mean 'AdamW8bit'?), " \
        "got 'AdamW8bt'" in refused(demo_with('train.optim_g.type', 'AdamW8bt'))
    for name in ('AdamW8bit', 'AdamW', 'SGD'):
        check_options(demo_with('train.optim_g.type', name), check_paths=False)


def test_path_section_is_checked():
    message = refused(demo_with('path.strict_load_gg', True))
    assert "unknown option 'path.strict_load_gg' (did you mean 'strict_load_g'?)" in message
    assert 'path.strict_load_g must be true or false' in refused(demo_with('path.strict_load_g', 'yes'))


def test_documented_and_read_keys_are_accepted_and_unread_ones_refused():
    assert check_options(demo_with('val.summary', 'every'), check_paths=False) == []
    assert check_options(demo_with('val.summary', False), check_paths=False) == []
    assert "unknown option 'val.sample.start_timestep'" in refused(demo_with('val.sample.start_timestep', 999))


@pytest.mark.parametrize('dotted, new', [
    ('network_g.start_strength', 'network_g.start_point: lr with network_g.start_timestep'),
    ('network_g.default_cfg', 'network_g.default_guidance_scale'),
    ('network_g.sampling_timesteps', 'network_g.timesteps'),
    ('network_g.timestep_mode', 'network_g.likelihood_point'),
    ('val.sample.cfg', 'val.sample.guidance_scale'),
    ('train.dro.cfg', 'train.dro.guidance_scale'),
    ('network_g.tiny', 'network_g.type: TinyControlSD2Arch (the demo'),
    ('network_g.ram_tiny', 'network_g.type: TinyControlSD2Arch (it reads ram_path as a tiny RAM checkpoint)')])
def test_an_old_name_is_refused_in_one_line_naming_the_new_one(dotted, new):
    opt = copy.deepcopy(DEMO)
    opt['train']['dro'] = {}  # the section of DiffusionDROModel; the rename is refused before the model is known
    opt = demo_with(dotted, 1.0) if dotted != 'train.dro.cfg' else dict(opt, train=dict(opt['train'], dro={'cfg': 1}))
    message = refused(opt)
    assert message.startswith(f'{dotted} was renamed to {new}') and '\n' not in message


def test_every_old_name_is_named_on_the_same_line(tmp_path):
    opt = demo_with('val.sample.cfg', 3.0)
    opt['network_g']['default_cfg'] = 5.5
    path = write_options(tmp_path / 'old_names.yml', opt)
    result = run_cli_refusal(['train', '-opt', path], tmp_path)
    line = [ln for ln in result.stderr.splitlines() if 'was renamed' in ln]
    assert len(line) == 1 and f'{path}: ' in line[0]
    assert 'network_g.default_cfg was renamed to network_g.default_guidance_scale' in line[0]
    assert 'val.sample.cfg was renamed to val.sample.guidance_scale' in line[0]


def test_framework_archs_take_no_tiny_arguments_and_the_demo_registers_tiny_types():
    import inspect

    from dspo_basicsr.demo.tiny_arch import TINY_FRAMEWORKS

    from basicsr.utils.registry import ARCH_REGISTRY
    for name, tiny in TINY_FRAMEWORKS.items():
        released = ARCH_REGISTRY.get(name)
        assert not {'tiny', 'ram_tiny'} & set(inspect.signature(released.__init__).parameters), name
        assert ARCH_REGISTRY.get(tiny.__name__) is tiny and issubclass(tiny, released)
        with pytest.raises(ValueError, match=f'type: {tiny.__name__}'):  # no folders: points to the tiny type
            released()


def test_old_names_in_a_chain_file_or_a_sampling_block_are_refused_naming_the_new_ones(tmp_path):
    from dspo_basicsr.archs.sampling_protocols import resolve_sample_options
    from dspo_basicsr.preference.chain_options import load_chain_options
    chain = {'framework': {'network': {'type': 'ControlSD2Arch', 'start_strength': 0.375}},
             'sampling': {'default': {'steps': 8, 'cfg': 3.0}, 'grid': {'cfg': [1.0]}}}
    path = write_options(tmp_path / 'chain.yml', chain)
    with pytest.raises(ValueError) as err:
        load_chain_options(path)
    assert str(err.value) == (
        f'{path}: framework.network.start_strength was renamed to framework.network.start_point: lr with '
        'framework.network.start_timestep (strength s of N sampler steps starts at the round(s N)-th last timestep: '
        '0.375 of 8 DDIM steps is 250); sampling.default.cfg was renamed to sampling.default.guidance_scale; '
        'sampling.grid.cfg was renamed to sampling.grid.guidance_scale')
    with pytest.raises(ValueError, match="'cfg' was renamed to 'guidance_scale'"):  # sr_methods' sampling blocks
        resolve_sample_options({'steps': 2, 'cfg': 1.0})


def test_iteration_counts_may_be_written_as_basicsr_floats():
    opt = demo_with('logger.save_checkpoint_freq', 5000.0)
    opt['val']['val_freq'] = 5000.0
    assert check_options(opt, check_paths=False) == []


def test_every_finding_is_reported_at_once():
    opt = demo_with('train.grad_clp', 1.0)
    opt['train']['preference_opt']['beta'] = 'abc'
    message = refused(opt)
    assert 'grad_clp' in message and 'beta' in message


def test_keys_other_engineers_add_are_known():
    opt = demo_with('train.accumulate_grad_batches', 2)
    opt['val']['sample'].update(color_fix='adain', tile_size=64, tile_overlap=8, vae_tile=True, process_size=512,
                                prompt_source='tags')
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


@pytest.mark.parametrize('section, key, value, shown', [
    ('datasets.train', 'batch_size_per_gpu', 0, "datasets.train.batch_size_per_gpu must be a positive integer, got 0"),
    ('', 'num_gpu', 'abc', "num_gpu must be a non-negative integer (or 'auto'), got 'abc'"),
    ('logger', 'save_checkpoint_frq', 2, "unknown option 'logger.save_checkpoint_frq'")])
def test_bad_value_of_a_basicsr_key_is_refused_before_anything_is_archived(tmp_path, paired_folders, section, key,
                                                                          value, shown):
    opt = msrresnet_options(*paired_folders, name='kept')
    previous = tmp_path / 'experiments' / 'kept' / 'models'
    previous.mkdir(parents=True)
    node = opt
    for part in filter(None, section.split('.')):
        node = node[part]
    node[key] = value
    if key == 'save_checkpoint_frq':
        opt['model_type'] = 'DSPOModel'  # our model: unknown keys are errors (BasicSR's: warnings)
        del opt['logger']['save_checkpoint_freq']
    result = run_cli_refusal(['train', '-opt', write_options(tmp_path / 'bad.yml', opt)], cwd=tmp_path)
    assert result.returncode == 2 and shown in result.stderr and 'Traceback' not in result.stderr
    assert sorted(os.listdir(tmp_path / 'experiments')) == ['kept']


@pytest.mark.slow
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
    result = run_cli_refusal(['train', '-opt', opt_file, '--force_yml',
                              f"val:suffix=[__import__('os').mkdir('{marker}')]"], cwd=tmp_path)
    assert not marker.exists()
    # read as a YAML list of one string, never evaluated, and refused as not a string
    assert result.returncode == 2 and 'val.suffix must be a string' in result.stderr


def _val_folders_with_bad_images(tmp_path, paired_folders):
    import shutil
    gt, lq = (shutil.copytree(folder, tmp_path / f'val_{side}') for folder, side in zip(paired_folders, 'gl'))
    (gt / 'zz_empty.png').write_bytes(b'')
    png = next(p for p in sorted(os.listdir(lq)) if p.endswith('.png'))
    data = (lq / png).read_bytes()
    (lq / 'zz_cut.png').write_bytes(data[:len(data) // 2])
    return str(gt), str(lq)


@pytest.mark.slow
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
