"""The same preference samples stored as plain PNG folders: the baseline of ``scripts/bench_lmdb.py``.

Layout of ``ROOT/``: ``index.json`` (the LMDB header fields plus ``ids``) and, per sample,
``ROOT/{sid}/lq.png``, ``c{n}.png``, ``seg.png``, ``gt.png`` (optional), ``meta.json`` and
``x_{name}.npy``. Files are read with BasicSR's disk-backend pattern (bytes, then ``cv2.imdecode``) and
decoded and checked by the same functions as the LMDB set, so a comparison measures storage alone.
"""
import json
import os

from dspo_basicsr.data.preference_lmdb_dataset import PreferenceLMDBDataset
from dspo_basicsr.data.preference_sample import (
    PreferenceDataError,
    check_sample,
    decode_json,
    decode_npy,
    decode_png,
    encode_json,
    encode_npy,
    encode_png,
    sample_from_meta,
    stored_meta,
)
from dspo_basicsr.data.preference_set import FORMAT_NAME, FORMAT_VERSION


def write_preference_png_folders(root, samples, scale, png_compression=None):
    """Write samples as one folder of PNG / JSON / ``.npy`` files each (not atomic; a benchmark baseline).

    Args:
        root (str): Destination folder (must not exist).
        samples (Iterable[PreferenceSample]): The samples.
        scale (int): SR / LQ size ratio.
        png_compression (int | None): As in :func:`write_preference_lmdb`; None (default) uses OpenCV's
            defaults, as ``cv2.imwrite`` and the preference-data pipeline's work folders do.

    Returns:
        PreferencePNGFolders: The reader of the folders.
    """
    os.makedirs(root)
    ids, num_candidates = [], None
    seg_compression = None if png_compression is None else max(png_compression, 1)
    for sample in samples:
        counts = check_sample(sample, root, scale=scale, num_candidates=num_candidates)
        num_candidates = len(sample.candidates)
        folder = os.path.join(root, sample.sid)
        os.makedirs(folder)
        files = {'lq.png': encode_png(sample.lq, png_compression), 'seg.png': encode_png(sample.seg, seg_compression),
                 'meta.json': encode_json(stored_meta(sample, counts))}
        files.update({f'c{n}.png': encode_png(c, png_compression) for n, c in enumerate(sample.candidates)})
        if sample.gt is not None:
            files['gt.png'] = encode_png(sample.gt, png_compression)
        files.update({f'x_{name}.npy': encode_npy(a) for name, a in sample.extras.items()})
        for name, data in files.items():
            with open(os.path.join(folder, name), 'wb') as f:
                f.write(data)
        ids.append(sample.sid)
    index = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'num_samples': len(ids),
             'num_candidates': num_candidates, 'scale': scale, 'ids': ids}
    with open(os.path.join(root, 'index.json'), 'w', encoding='utf-8') as f:
        json.dump(index, f)
    return PreferencePNGFolders(root)


class PreferencePNGFolders:
    """Reader of :func:`write_preference_png_folders` output, with :class:`PreferenceLMDB`'s interface."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        with open(os.path.join(self.path, 'index.json'), encoding='utf-8') as f:
            index = json.load(f)
        self._ids = index.pop('ids')
        self.header = index

    def ids(self):
        return list(self._ids)

    def __len__(self):
        return len(self._ids)

    def _read(self, sid, name):
        try:
            with open(os.path.join(self.path, sid, name), 'rb') as f:
                return f.read()
        except FileNotFoundError:
            raise PreferenceDataError(self.path, sid, f'{sid}/{name}', 'the file is missing.') from None

    def __getitem__(self, sid):
        meta = decode_json(self._read(sid, 'meta.json'), self.path, sid, f'{sid}/meta.json')
        stored = meta['stored']

        def image(name):
            return decode_png(self._read(sid, name), self.path, sid, f'{sid}/{name}', channels=3)

        lq = image('lq.png')
        candidates = [image(f'c{n}.png') for n in range(stored['num_candidates'])]
        seg = decode_png(self._read(sid, 'seg.png'), self.path, sid, f'{sid}/seg.png', channels=1)
        gt = image('gt.png') if stored['gt'] else None
        extras = {name: decode_npy(self._read(sid, f'x_{name}.npy'), self.path, sid, f'{sid}/x_{name}.npy')
                  for name in stored['extras']}
        sample = sample_from_meta(sid, meta, lq, candidates, seg, gt, extras)
        check_sample(sample, self.path, scale=self.header['scale'], num_candidates=self.header['num_candidates'])
        return sample


class PreferencePNGFolderDataset(PreferenceLMDBDataset):
    """:class:`PreferenceLMDBDataset` (same crops, augmentation and items) over PNG folders; not registered."""

    reader_class = PreferencePNGFolders


def synthetic_samples(num_samples, num_candidates=4, sr_size=256, scale=4, num_instances=8, seed=0):
    """Photo-like synthetic samples (smooth shading, edges, mild noise) for benchmarks and tests.

    Args:
        num_samples (int): How many samples.
        num_candidates (int): N.
        sr_size (int): H = W of the candidates, a multiple of ``scale``.
        scale (int): SR / LQ size ratio.
        num_instances (int): Instances per label map (Voronoi cells of random seeds).
        seed (int): Random seed.

    Yields:
        PreferenceSample: Samples ``bench_00000``, ``bench_00001``, ...
    """
    import cv2
    import numpy as np

    from dspo_basicsr.data.preference_sample import PreferenceSample

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:sr_size, 0:sr_size].astype(np.float32) / sr_size
    for index in range(num_samples):
        base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) * np.cos(5 * yy * rng.uniform(0.5, 2))
                         for _ in range(3)], axis=-1) * 90 + 128
        seeds = rng.uniform(0, sr_size, (num_instances, 2))
        distance = (yy[..., None] * sr_size - seeds[:, 0]) ** 2 + (xx[..., None] * sr_size - seeds[:, 1]) ** 2
        seg = distance.argmin(-1).astype(np.uint16)
        base += (seg[..., None] * 13 % 40).astype(np.float32)
        candidates = [np.clip(base + rng.normal(0, 3 + 2 * n, base.shape), 0, 255).astype(np.uint8)
                      for n in range(num_candidates)]
        lq = cv2.resize(candidates[0], (sr_size // scale, sr_size // scale), interpolation=cv2.INTER_AREA)
        instances = []
        for iid in range(num_instances):
            win, lose = rng.choice(num_candidates, 2, replace=False) if iid % 4 else (-1, -1)
            instances.append({'id': iid, 'win': int(win), 'lose': int(lose)})
        yield PreferenceSample(sid=f'bench_{index:05d}', lq=lq, candidates=candidates, seg=seg, instances=instances,
                               prompt='a photo, high quality', negative_prompt='dotted, noise, blur, lowres, smooth',
                               meta={'default_candidate': 0})


def measure_samples_per_second(dataset, num_workers, batch_size=4, epochs=2):
    """Throughput of a DataLoader over ``dataset``, by the clock and by CPU time.

    The CPU-time rate (samples per CPU-second of this process and its workers) stays meaningful on a
    machine shared with other jobs, where the wall-clock rate mostly measures the others' load.

    Args:
        dataset (PreferenceLMDBDataset): The dataset (its ``collate_fn`` batches).
        num_workers (int): DataLoader worker processes.
        batch_size (int): Batch size.
        epochs (int): Timed passes over the dataset (after one warm-up batch). The workers' CPU time
            includes their start-up and warm-up, so use enough passes to make that negligible.

    Returns:
        tuple[float, float]: Samples per second of wall-clock time, samples per CPU-second.
    """
    import gc
    import resource
    import time

    from torch.utils.data import DataLoader

    def cpu_seconds(who):
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    children_start = cpu_seconds(resource.RUSAGE_CHILDREN)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        collate_fn=dataset.collate_fn, persistent_workers=num_workers > 0)
    next(iter(loader))  # starts the workers, which open the set
    count, start, self_start = 0, time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    for _ in range(epochs):
        for batch in loader:
            count += len(batch['sid'])
    wall, self_cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - self_start
    del loader, batch
    gc.collect()  # joins the workers, so that their CPU time (start-up included) is in RUSAGE_CHILDREN
    return count / wall, count / (self_cpu + cpu_seconds(resource.RUSAGE_CHILDREN) - children_start)


def folder_megabytes(path):
    """Total size in MB of the files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, name)) for name in files)
    return total / 1e6
