"""PreferenceLMDBDataset: aligned crops, shared augmentation, compact relabelling, collate padding, workers."""
import random

import pytest
import torch
from torch.utils.data import DataLoader

import dspo_basicsr  # noqa: F401,I001  (adapts basicsr 1.4.2 before it is imported)
from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset, collate_preference_batch, preference_item
from dspo_basicsr.preference import write_preference_lmdb

from basicsr.data import build_dataset
from basicsr.utils.registry import DATASET_REGISTRY

from preference_fixtures import BLOCK, SCALE, block_id, coordinate_sample


@pytest.fixture(scope='module')
def set_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('pref') / 'pref.lmdb')
    samples = [coordinate_sample('a', 64, 48, seed=0), coordinate_sample('b', 48, 64, seed=1),
               coordinate_sample('c', 64, 64, seed=2)]
    samples[2].meta['pair'] = [2, 0]
    write_preference_lmdb(path, samples, progress=False)
    return path


def _dataset(set_path, **opt):
    return PreferenceLMDBDataset(dict({'dataroot': set_path, 'phase': 'train', 'gt_size': 32, 'use_hflip': True,
                                       'use_rot': True}, **opt))


def _coords(image):
    """(3, H, W) float image in [0, 1] -> (H, W) y and x it came from, and its third channel."""
    values = torch.round(image * 255).long()
    return values[0], values[1], values[2]


def test_registered_and_built_by_basicsr(set_path):
    assert DATASET_REGISTRY.get('PreferenceLMDBDataset') is PreferenceLMDBDataset
    dataset = build_dataset({'type': 'PreferenceLMDBDataset', 'dataroot': set_path, 'phase': 'train', 'name': 'p',
                             'gt_size': 32})
    assert len(dataset) == 3 and dataset.scale == SCALE


def test_crops_are_aligned_across_candidates_label_map_lq_and_gt(set_path):
    dataset = _dataset(set_path)
    random.seed(0)
    flips_seen = set()
    for _ in range(40):
        item = dataset[random.randrange(3)]
        n, _, h, w = item['candidates'].shape
        assert (h, w) == (32, 32) and item['lq'].shape == (3, 8, 8) and item['gt'].shape == (3, 32, 32)
        ys, xs, _ = _coords(item['candidates'][0])
        assert ys.min() % SCALE == 0 and xs.min() % SCALE == 0  # SR crop offsets are multiples of scale
        for k in range(n):
            cy, cx, third = _coords(item['candidates'][k])
            assert torch.equal(cy, ys) and torch.equal(cx, xs) and bool((third == 10 + k).all())
        gy, gx, third = _coords(item['gt'])
        assert torch.equal(gy, ys) and torch.equal(gx, xs) and bool((third == 250).all())
        # Every SR pixel lies inside the LQ pixel at (i // scale, j // scale).
        ly, lx, third = _coords(item['lq'])
        rows, cols = torch.arange(h) // SCALE, torch.arange(w) // SCALE
        assert torch.equal(ly[rows][:, cols], ys // SCALE) and torch.equal(lx[rows][:, cols], xs // SCALE)
        assert bool((third == 200).all())
        # The label map went through the same crop and flips: its ids match the coordinates.
        original = item['instance_ids'][item['seg']]
        assert torch.equal(original, torch.as_tensor(block_id(ys.numpy(), xs.numpy())))
        flips_seen.add((bool(xs[0, 0] > xs[0, -1]), bool(ys[0, 0] > ys[-1, 0]), bool(xs[0, 1] == xs[0, 0])))
    assert len(flips_seen) >= 4  # flips and transposes were actually exercised


def test_relabelling_drops_vanished_instances(set_path):
    store = _dataset(set_path).store
    sample = store['a']
    rng = random.Random(3)
    item = preference_item(sample, SCALE, gt_size=32, rng=rng)
    ids = item['instance_ids'].tolist()
    table = [row['id'] for row in sample.instances]
    assert len(ids) < len(table)  # a 32x32 crop of 16x16 blocks misses some instances
    assert ids == [i for i in table if i in ids]  # kept in table order
    seg = item['seg']
    assert seg.dtype == torch.long and set(seg.unique().tolist()) == set(range(len(ids)))
    counts = torch.bincount(seg.flatten(), minlength=len(ids)).float()
    assert torch.equal(item['area'], counts) and item['area'].dtype == torch.float32
    rows = {row['id']: row for row in sample.instances}
    assert item['win'].tolist() == [rows[i]['win'] for i in ids]
    assert item['lose'].tolist() == [rows[i]['lose'] for i in ids]
    paired = [m for m, i in enumerate(ids) if rows[i]['win'] >= 0]
    largest = max(paired, key=lambda m: (counts[m], -m))
    assert item['pair'].tolist() == [rows[ids[largest]]['win'], rows[ids[largest]]['lose']]


def test_pair_from_meta_and_no_pair(set_path):
    store = _dataset(set_path).store
    assert preference_item(store['c'], SCALE, gt_size=32, rng=random.Random(0))['pair'].tolist() == [2, 0]
    sample = store['a']
    for row in sample.instances:
        row['win'] = row['lose'] = -1
    assert preference_item(sample, SCALE, rng=random.Random(0))['pair'].tolist() == [-1, -1]


def test_max_instances_keeps_paired_largest_and_ignores_the_rest(set_path):
    sample = _dataset(set_path).store['a']
    item = preference_item(sample, SCALE, max_instances=3)  # whole image: 12 instances of 256 pixels
    rows = {row['id']: row for row in sample.instances}
    ids = item['instance_ids'].tolist()
    assert len(ids) == 3 and all(rows[i]['win'] >= 0 for i in ids)
    assert ids == [row['id'] for row in sample.instances if row['win'] >= 0][:3]
    assert set(item['seg'].unique().tolist()) == {-1, 0, 1, 2}
    assert item['area'].tolist() == [BLOCK * BLOCK] * 3


def test_validation_phase_returns_whole_images_unaugmented(set_path):
    item = _dataset(set_path, phase='val')[1]
    ys, xs, _ = _coords(item['candidates'][0])
    assert item['candidates'].shape[-2:] == (48, 64) and item['lq'].shape == (3, 12, 16)
    assert ys[0, 0] == 0 and xs[0, -1] == 63 and item['sid'] == 'b' and item['lq_path'].endswith('/b')
    assert item['extras']['ram_embedding'].shape == (5, 8) and item['extras']['tags'].dtype == torch.float32


def test_option_errors(set_path):
    with pytest.raises(ValueError, match='multiple of scale 4'):
        _dataset(set_path, gt_size=30)
    with pytest.raises(ValueError, match='differs from the scale 4'):
        _dataset(set_path, scale=2)
    with pytest.raises(ValueError, match="sample 'b'.*smaller than the LQ patch"):
        _dataset(set_path, gt_size=64, use_rot=False)[1]


def test_collate_pads_instance_tables(set_path):
    dataset = _dataset(set_path, phase='val')
    items = [dataset[0], dataset[1]]
    sizes = [len(item['win']) for item in items]
    assert sizes == [12, 12]
    items[1] = preference_item(dataset.store['b'], SCALE, gt_size=16, rng=random.Random(1))  # a crop: fewer instances
    items[0] = preference_item(dataset.store['a'], SCALE, gt_size=16, rng=random.Random(2))
    m = [len(item['win']) for item in items]
    batch = collate_preference_batch(items)
    assert dataset.collate_fn is collate_preference_batch
    assert batch['candidates'].shape == (2, 3, 3, 16, 16) and batch['seg'].shape == (2, 16, 16)
    assert batch['win'].shape == (2, max(m)) and batch['pair'].shape == (2, 2)
    for b, item in enumerate(items):
        for key, pad in (('win', -1), ('lose', -1), ('instance_ids', -1), ('area', 0)):
            assert torch.equal(batch[key][b, :m[b]], item[key])
            assert bool((batch[key][b, m[b]:] == pad).all())
    assert batch['sid'] == ['a', 'b'] and batch['prompt'] == [items[0]['prompt'], items[1]['prompt']]
    assert batch['extras']['ram_embedding'].shape == (2, 5, 8)
    with pytest.raises(ValueError, match="cannot batch 'lq'.*gt_size"):
        collate_preference_batch([dataset[0], dataset[1]])


def test_dataloader_with_two_workers(set_path):
    dataset = _dataset(set_path)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=dataset.collate_fn)
    sids = []
    for batch in loader:
        assert batch['candidates'].shape[1:] == (3, 3, 32, 32)
        assert batch['win'].shape == batch['area'].shape == batch['instance_ids'].shape
        sids += batch['sid']
    assert sorted(sids) == ['a', 'b', 'c']


def test_our_train_loader_uses_the_collate_fn(set_path):
    from dspo_basicsr.utils.dataloader import build_dataloader
    dataset_opt = {'phase': 'train', 'batch_size_per_gpu': 3, 'num_worker_per_gpu': 2}
    dataset = _dataset(set_path)
    loader = build_dataloader(dataset, dataset_opt, num_gpu=0, seed=0)
    batch = next(iter(loader))
    assert batch['win'].shape[0] == 3 and batch['sid'] and isinstance(batch['prompt'], list)
