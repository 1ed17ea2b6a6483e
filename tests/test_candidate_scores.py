"""Per-candidate instance scores: written by the scorers, checked by the format, carried to the loss."""
import random

import numpy as np
import pytest
import torch

from dspo_basicsr.data.preference_lmdb_dataset import collate_preference_batch, preference_item
from dspo_basicsr.losses import top_bottom_pairs
from dspo_basicsr.preference import PreferenceDataError, PreferenceLMDB, write_preference_lmdb
from dspo_basicsr.preference.instance_scoring import (
    METRIC_PRESETS,
    BIQAInstanceScorer,
    HumanInstanceScorer,
    InstanceContext,
    MetricInstanceScorer,
    ScorerItemError,
    VLMInstanceScorer,
    build_instance_scorer,
    score_sample_instances,
)

from preference_fixtures import SCALE, coordinate_sample


def _context():
    """Three candidates with growing noise inside instance 0 (left half); instance 1 is the right half."""
    rng = np.random.default_rng(0)
    gt = (rng.random((32, 32, 3)) * 200 + 20).astype(np.uint8)
    seg = np.zeros((32, 32), np.uint16)
    seg[:, 16:] = 1
    candidates = [np.clip(gt + rng.normal(0, sigma, gt.shape), 0, 255).astype(np.uint8) for sigma in (20, 5, 40)]
    return InstanceContext('s1', lq=gt[::4, ::4], candidates=candidates, seg=seg, gt=gt)


def test_metric_presets_and_scores_that_pick_the_pair():
    assert set(METRIC_PRESETS) == {'fidelity', 'perception'}
    assert set(METRIC_PRESETS['fidelity']) == {'psnr', 'ssim'}
    assert {'lpips', 'dists', 'musiq', 'maniqa', 'clipiqa', 'niqe'} == set(METRIC_PRESETS['perception'])
    scorer = build_instance_scorer({'type': 'metric', 'preset': 'fidelity', 'min_crop': 16})
    assert scorer.metrics == METRIC_PRESETS['fidelity'] and scorer.describe()['preset'] == 'fidelity'
    result = scorer.score_instance(_context(), 0)
    scores = result['candidate_scores']
    assert len(scores) == 3 and result['win'] == 1 and result['lose'] == 2  # less noise scores higher
    assert int(np.argmax(scores)) == result['win'] and int(np.argmin(scores)) == result['lose']
    with pytest.raises(ValueError, match="preset 'sharp'"):
        MetricInstanceScorer(preset='sharp')
    with pytest.raises(ValueError, match='not both'):
        MetricInstanceScorer(metrics=METRIC_PRESETS['fidelity'], preset='fidelity')


def test_biqa_vlm_and_human_scorers_write_candidate_scores():
    context = _context()
    instances, _ = score_sample_instances(BIQAInstanceScorer(lambda crops: crops.mean(dim=(1, 2, 3)), min_crop=8),
                                          context, top_k=1)
    expected = [float(c[:, :16].mean() / 255.0) for c in context.candidates]
    assert instances[0]['candidate_scores'] == pytest.approx(expected, rel=1e-5)

    class RatingClient:
        def compare(self, lq_crop, crops, context=''):
            return {'best': 1, 'worst': 2, 'reason': 'sharper', 'scores': [0.5, 0.9, 0.1]}

    assert VLMInstanceScorer(RatingClient()).score_instance(context, 0)['candidate_scores'] == [0.5, 0.9, 0.1]

    annotations = {'format': 'dspo-human-annotation', 'version': 1, 'samples': {'s1': {'instances': {
        '0': {'win': 1, 'lose': 2, 'scores': [2, 3, 0]}}}}}
    assert HumanInstanceScorer(annotations).score_instance(context, 0)['candidate_scores'] == [2.0, 3.0, 0.0]
    annotations['samples']['s1']['instances']['0']['scores'] = [2, 3]
    with pytest.raises(ScorerItemError, match='one number per candidate'):
        HumanInstanceScorer(annotations).score_instance(context, 0)


def test_score_tables_reach_the_batch_and_rank_to_the_stored_pairs(tmp_path):
    sample = coordinate_sample('a')
    rows = sample.instances
    rows[0]['candidate_scores'] = [0.2, None, 0.9]          # candidate 1 unscored
    rows[0]['win'], rows[0]['lose'] = 2, 0
    paired_without_scores = next(i for i, r in enumerate(rows) if r['win'] >= 0 and i > 0)
    unpaired = next(i for i, r in enumerate(rows) if r['win'] < 0)
    store = write_preference_lmdb(str(tmp_path / 's.lmdb'), [sample], scale=SCALE, progress=False)
    item = preference_item(PreferenceLMDB(store.path)['a'], SCALE)
    table = item['scores']
    assert table.shape == (len(rows), 3) and table.dtype == torch.float32
    assert torch.equal(table[0].nan_to_num(-1), torch.tensor([0.2, -1.0, 0.9]))
    row = rows[paired_without_scores]
    expected = torch.full((3,), float('nan'))
    expected[row['win']], expected[row['lose']] = 1.0, 0.0
    assert torch.equal(table[paired_without_scores].nan_to_num(-1), expected.nan_to_num(-1))
    assert torch.isnan(table[unpaired]).all()
    # Ranking the table with top_n = 1 gives back every stored pair.
    win, lose = top_bottom_pairs(table[None], 1)
    assert torch.equal(win[0, :, 0], item['win']) and torch.equal(lose[0, :, 0], item['lose'])
    # Batches pad the score tables with NaN.
    crop = preference_item(PreferenceLMDB(store.path)['a'], SCALE, gt_size=16, rng=random.Random(0))
    full = preference_item(PreferenceLMDB(store.path)['a'], SCALE, gt_size=16, rng=random.Random(1))
    batch = collate_preference_batch([crop, full])
    m = [len(crop['win']), len(full['win'])]
    assert batch['scores'].shape == (2, max(m), 3)
    assert torch.isnan(batch['scores'][0, m[0]:]).all() and torch.isnan(batch['scores'][1, m[1]:]).all()


def test_the_format_checks_candidate_scores(tmp_path):
    sample = coordinate_sample('a')
    sample.instances[0]['candidate_scores'] = [0.1, 0.2]
    with pytest.raises(PreferenceDataError, match='candidate_scores must list one finite number'):
        write_preference_lmdb(str(tmp_path / 'bad.lmdb'), [sample], scale=SCALE, progress=False)
    sample.instances[0]['candidate_scores'] = [0.1, float('nan'), 0.3]
    with pytest.raises(PreferenceDataError, match=r"sample 'a'.*candidate_scores"):
        write_preference_lmdb(str(tmp_path / 'bad.lmdb'), [sample], scale=SCALE, progress=False)
