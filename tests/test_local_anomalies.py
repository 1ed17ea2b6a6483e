"""The local-anomalies benchmark: its set disagrees with image-level labels where it should, its measures count."""
import numpy as np
import pytest

from dspo_basicsr.bench.local_anomalies import (
    blotch_rate,
    build_local_anomalies_set,
    label_disagreement,
    mean_ci95,
    paste_blotch,
    with_local_anomalies,
    write_results,
)
from dspo_basicsr.data.preference_set import PreferenceLMDB, write_preference_lmdb
from dspo_basicsr.demo.dspo import instance_pairs_by_psnr
from dspo_basicsr.preference import PreferenceSample


def _psnr(image, gt):
    return 10 * np.log10(255.0**2 / ((image.astype(float) - gt.astype(float))**2).mean())


def _sample(sid='s0', seed=0):
    rng = np.random.default_rng(seed)
    gt = rng.integers(60, 200, size=(32, 32, 3)).astype(np.uint8)
    # candidate 0 is the closest to the GT, 2 the farthest: image winner 0, loser 2
    candidates = [np.clip(gt + rng.normal(0, s, gt.shape), 0, 255).astype(np.uint8) for s in (2, 6, 12)]
    seg = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 8, 0), 8, 1).astype(np.uint16)
    return PreferenceSample(sid=sid, lq=gt[::4, ::4].copy(), candidates=candidates, seg=seg,
                            instances=instance_pairs_by_psnr(candidates, gt, seg), gt=gt)


def _with_pair(sample, pair):
    import dataclasses
    return dataclasses.replace(sample, meta={'pair': pair})


def test_blotches_make_instance_labels_disagree_with_the_image_pair():
    clean = _sample()
    assert label_disagreement(_with_pair(clean, [0, 2])) == 0  # clean: candidate 0 wins every instance
    sample = with_local_anomalies(clean, np.random.default_rng(0), share=0.4)
    assert sample.meta['pair'] == [0, 2]
    blotched = sample.meta['local_anomalies']
    assert blotched
    # the image-level winner still wins overall ...
    assert _psnr(sample.candidates[0], sample.gt) > _psnr(sample.candidates[2], sample.gt)
    # ... but loses every blotched instance, and only those
    rows = {row['id']: row for row in sample.instances}
    assert all(rows[i]['lose'] == 0 for i in blotched)
    assert all(rows[i]['win'] == 0 for i in rows if i not in blotched)
    assert label_disagreement(sample) == pytest.approx(len(blotched) / 16)
    assert np.array_equal(sample.candidates[1], clean.candidates[1])


def test_blotch_detector_flags_pasted_blotches_only():
    sample = _sample()
    gt, seg = sample.gt, sample.seg
    assert blotch_rate([sample.candidates[0]], [gt], [seg]) == 0
    blotched = paste_blotch(sample.candidates[0], (seg == 3) | (seg == 7), (30, -20, 0))
    assert blotch_rate([blotched], [gt], [seg]) == pytest.approx(2 / 16)


def test_mean_ci95_is_the_student_t_interval():
    mean, half = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert half == pytest.approx(2.776445 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5), rel=1e-5)
    assert np.isnan(mean_ci95([1.0])[1])


def test_benchmark_set_is_written_and_read_back(tmp_path):
    source = str(tmp_path / 'demo.lmdb')
    write_preference_lmdb(source, [_sample('a', 0), _sample('b', 1)], scale=4, progress=False)
    disagreement = build_local_anomalies_set(source, str(tmp_path / 'bench.lmdb'), seed=0)
    store = PreferenceLMDB(str(tmp_path / 'bench.lmdb'))
    samples = [store[sid] for sid in store.ids()]
    assert disagreement > 0
    assert all(s.meta['pair'] == [0, 2] and s.meta['local_anomalies'] for s in samples)


def test_results_table_and_plot(tmp_path):
    rows = [dict(objective=k, seed=s, win_rate=0.5 + 0.01 * s, defect_rate=0.1, psnr=20.0 + s, ssim=0.5, seconds=1.0)
            for k in ('dpo', 'dspo') for s in range(3)]
    table, plot = write_results(rows, str(tmp_path), note='note')
    assert '| DSPO | 3 | 0.5100 ± ' in table
    assert (tmp_path / 'runs.csv').read_text().count('\n') == 7
    assert (tmp_path / 'local_anomalies.png').stat().st_size > 0 and plot.endswith('.png')


def test_every_benchmarked_objective_has_an_option_file_the_runner_can_train():
    import os

    from dspo_basicsr.bench.local_anomalies import LABELS, OBJECTIVE_FILES, benchmark_options

    from conftest import REPO
    assert {'online', 'online_advantages'} <= set(OBJECTIVE_FILES) <= set(LABELS)
    for key, path in OBJECTIVE_FILES.items():
        opt = benchmark_options(os.path.join(REPO, path), 'bench.lmdb', 3, f'la_{key}', 5)
        assert opt['manual_seed'] == 3 and opt['train']['total_iter'] == 5
    advantages = benchmark_options(os.path.join(REPO, OBJECTIVE_FILES['online_advantages']), 'b.lmdb', 0, 'x', 5)
    assert advantages['model_type'] == 'OnlineGroupModel' and advantages['train']['online']['objective'] == 'advantages'
