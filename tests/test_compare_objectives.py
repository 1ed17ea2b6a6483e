"""The objective comparison runner: option checks, tables and radar plot, and one tiny end-to-end run."""
import csv
import os
import runpy

import pytest
import yaml

from dspo_basicsr.comparison import (
    PRESETS,
    ComparisonError,
    load_objective_options,
    parse_sweep,
    radar_plot,
    set_option,
    write_tables,
)

from conftest import REPO, make_paired_folders, write_options
from dspo_fixtures import dspo_options, make_tiny_preference_set


@pytest.fixture(scope='module')
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp('compare_set')
    paths = make_tiny_preference_set(str(root))
    paths['val_gt'], paths['val_lq'] = make_paired_folders(str(root / 'paired'), num=2, size=32)
    return paths


def _objective_options(tiny_set, objective):
    opt = dspo_options(tiny_set, name=f'cmp_{objective}', total_iter=1, save_every=1)
    opt['datasets']['val_2'] = {'name': 'tiny_val', 'type': 'PairedImageDataset', 'dataroot_gt': tiny_set['val_gt'],
                                'dataroot_lq': tiny_set['val_lq'], 'io_backend': {'type': 'disk'}}
    opt['val'].update(sample={'steps': 2, 'guidance_scale': 1.0, 'seed': 0, 'sampler': 'ddim'}, metrics={
        'psnr': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': False},
        'ssim': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': False}})
    if objective == 'dro':
        opt['model_type'] = 'DiffusionDROModel'
        opt['train']['preference_opt'] = {'type': 'DiffusionDROLoss', 'margin': 1e-3}
        opt['train']['dro'] = {'online_ratio': 1.0, 'sampler_steps': 2, 'refresh_every': 1}
    return opt


def _rows():
    return [
        {'label': 'SFT', 'key': 'sft', 'iterations': 5, 'seconds': 1.0, 'file': 'a.yml', 'checkpoint': 'a.pth',
         'metrics': {'psnr': 20.0, 'ssim': 0.5, 'lpips': 0.3, 'implicit_acc': 0.5, 'logit_mean': 0.0}},
        {'label': 'DSPO', 'key': 'dspo', 'iterations': 5, 'seconds': 2.0, 'file': 'b.yml', 'checkpoint': 'b.pth',
         'metrics': {'psnr': 21.0, 'ssim': 0.4, 'lpips': 0.2, 'implicit_acc': 0.7, 'logit_mean': 1.0}},
    ]


FACTS = {'psnr': ('PSNR', False), 'ssim': ('SSIM', False), 'lpips': ('LPIPS', True),
         'implicit_acc': ('Implicit acc.', False), 'logit_mean': ('Logit mean', False)}


def test_tables_mark_the_best_value_in_each_direction_and_radar_is_written(tmp_path):
    text = write_tables(_rows(), FACTS, str(tmp_path), note='tiny random models')
    lines = text.splitlines()
    assert lines[0] == 'tiny random models'
    assert 'LPIPS ↓' in lines[2] and 'PSNR ↑' in lines[2]
    sft, dspo = lines[4], lines[5]
    assert '**0.5000**' in sft and '**21.0000**' in dspo and '**0.2000**' in dspo  # ssim up, lpips down
    with open(tmp_path / 'table.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['method'] for r in rows] == ['SFT', 'DSPO'] and float(rows[1]['lpips']) == 0.2
    radar_plot(_rows(), FACTS, str(tmp_path / 'radar.png'))
    assert (tmp_path / 'radar.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(ComparisonError, match='at least 3 metrics'):
        radar_plot(_rows(), {'psnr': FACTS['psnr'], 'logit_mean': FACTS['logit_mean']}, str(tmp_path / 'r.png'))


def test_option_files_must_share_framework_data_and_validation(tiny_set, tmp_path):
    dspo = write_options(tmp_path / 'dspo.yml', _objective_options(tiny_set, 'dspo'))
    dro_opt = _objective_options(tiny_set, 'dro')
    assert [r['key'] for r in load_objective_options([dspo, write_options(tmp_path / 'dro.yml', dro_opt)])] == \
        ['dspo', 'dro']
    dro_opt['network_g']['trainable'] = 'unet_lora'
    with pytest.raises(ComparisonError, match="section 'network_g' differs"):
        load_objective_options([dspo, write_options(tmp_path / 'dro.yml', dro_opt)])
    with pytest.raises(ComparisonError, match='given twice'):
        load_objective_options([dspo, dspo])


@pytest.mark.slow
def test_runner_trains_evaluates_and_writes_table_and_plot(tiny_set, tmp_path):
    main = runpy.run_path(os.path.join(REPO, 'scripts', 'compare_objectives.py'), run_name='dspo_test')['main']
    files = [write_options(tmp_path / f'{k}.yml', _objective_options(tiny_set, k)) for k in ('dspo', 'dro')]
    out = tmp_path / 'out'
    assert main(['--options', *files, '--iters', '1', '--out', str(out), '--workdir', str(tmp_path),
                 '--note', 'tiny random models']) == 0
    with open(out / 'table.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['method'] for r in rows] == ['Pretrained (no alignment)', 'DSPO', 'Diffusion-DRO']
    for row in rows:
        assert 0 <= float(row['implicit_acc']) <= 1 and float(row['psnr']) > 0 and -1 <= float(row['ssim']) <= 1
    assert rows[0]['implicit_acc'] == '0.5'  # the pretrained model is its own reference
    for row in rows[1:]:
        assert row['iterations'] == '1' and os.path.isfile(row['checkpoint'])
    assert (out / 'radar.png').stat().st_size > 0 and 'Diffusion-DRO' in (out / 'table.md').read_text()
    assert sorted(os.listdir(out / 'options')) == ['compare_custom_dro.yml', 'compare_custom_dspo.yml']


def test_sweep_values_and_errors():
    assert parse_sweep('train.preference_opt.beta=500, 2000,8e3') == (['train', 'preference_opt', 'beta'],
                                                                     [500, 2000, 8000.0])
    assert parse_sweep('train.preference_opt.pairs=best_worst,top_bottom')[1] == ['best_worst', 'top_bottom']
    for bad in ('beta', 'train.beta=', '=1,2', 'a.b=1,1'):
        with pytest.raises(ComparisonError, match='--sweep'):
            parse_sweep(bad)
    opt = {'train': {'preference_opt': {'beta': 1}}}
    assert set_option(opt, ['train', 'preference_opt', 'beta'], 5)['train']['preference_opt']['beta'] == 5
    assert opt['train']['preference_opt']['beta'] == 1  # a copy
    with pytest.raises(ComparisonError, match="no section 'train.dro'"):
        set_option(opt, ['train', 'dro', 'seed'], 1)


@pytest.mark.slow
def test_beta_sweep_trains_one_run_per_value_and_plots(tiny_set, tmp_path):
    main = runpy.run_path(os.path.join(REPO, 'scripts', 'compare_objectives.py'), run_name='dspo_test')['main']
    option_file = write_options(tmp_path / 'dspo.yml', _objective_options(tiny_set, 'dspo'))
    out = tmp_path / 'sweep'
    assert main(['--options', option_file, '--sweep', 'train.preference_opt.beta=100,10000', '--iters', '1',
                 '--no-base', '--out', str(out), '--workdir', str(tmp_path)]) == 0
    with open(out / 'table.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['method'] for r in rows] == ['beta = 100', 'beta = 10000']
    for row in rows:
        assert os.path.isfile(row['checkpoint']) and 0 <= float(row['implicit_acc']) <= 1
    written = sorted(os.listdir(out / 'options'))
    assert written == ['sweep_beta_100.yml', 'sweep_beta_10000.yml']
    with open(out / 'options' / 'sweep_beta_10000.yml') as f:
        assert yaml.safe_load(f)['train']['preference_opt']['beta'] == 10000
    assert (out / 'sweep.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert main(['--options', option_file, option_file, '--sweep', 'train.preference_opt.beta=1,2']) == 2


def test_variants_of_one_objective_are_compared_under_their_own_labels(tiny_set, tmp_path):
    best_worst = _objective_options(tiny_set, 'dspo')
    multi = _objective_options(tiny_set, 'dspo')
    multi['train']['preference_opt'].update(pairs='top_bottom', top_n=2, weighting='hierarchical')
    runs = load_objective_options([write_options(tmp_path / 'a.yml', best_worst),
                                   write_options(tmp_path / 'b.yml', multi)])
    assert [(r['key'], r['label']) for r in runs] == [
        ('dspo', 'DSPO (beta 500.0)'),
        ('dspo_2', 'DSPO (beta 500.0, pairs top_bottom, top_n 2, weighting hierarchical)')]
    assert [os.path.basename(f) for f in PRESETS['demo_pairs']] == [
        'compare_dspo.yml', 'compare_dspo_top_bottom.yml', 'compare_dspo_hierarchical.yml']
    assert [r['key'] for r in load_objective_options([os.path.join(REPO, f) for f in PRESETS['demo_pairs']])] == \
        ['dspo', 'dspo_2', 'dspo_3']
