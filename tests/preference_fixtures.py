"""Small preference samples whose pixel values encode their coordinates, shared by the preference tests.

Candidate ``n`` holds ``(y, x, 10 + n)`` at SR pixel (y, x), the LQ ``(y, x, 200)`` at LQ pixel (y, x), the
ground truth ``(y, x, 250)``; the label map is a grid of ``BLOCK`` x ``BLOCK`` instances with ids above 255.
After any crop, flip or rotation, a pixel's value still says where it came from.
"""
import lmdb
import numpy as np

from dspo_basicsr.preference import PreferenceSample

SCALE = 4
BLOCK = 16


def block_id(y, x):
    """Instance id of SR pixel (y, x): ids 300, 301, ... > 255, so the uint16 storage is exercised."""
    return 300 + (np.asarray(y) // BLOCK) * 10 + np.asarray(x) // BLOCK


def coordinate_sample(sid, sr_h=64, sr_w=48, num_candidates=3, scale=SCALE, with_gt=True, seed=0):
    """A sample whose images encode coordinates, with a grid label map and a mixed instance table.

    Args:
        sid (str): Sample id.
        sr_h (int), sr_w (int): SR size, multiples of ``scale`` and ``BLOCK``, at most 256.
        num_candidates (int): N.
        scale (int): SR / LQ ratio.
        with_gt (bool): Store a ground truth.
        seed (int): Seed of the instance preferences and the extras.

    Returns:
        PreferenceSample
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:sr_h, 0:sr_w]

    def image(h, w, third):
        y, x = np.mgrid[0:h, 0:w]
        return np.stack([y, x, np.full_like(y, third)], axis=-1).astype(np.uint8)

    seg = block_id(yy, xx).astype(np.uint16)
    instances = []
    for index, iid in enumerate(np.unique(seg).tolist()):
        if index % 3 == 2:
            win, lose = -1, -1
        else:
            win, lose = (int(v) for v in rng.choice(num_candidates, 2, replace=False))
        instances.append({'id': iid, 'win': win, 'lose': lose, 'scores': [float(v) for v in rng.random(num_candidates)],
                          'feedback': f'instance {iid}: less noise, ça va'})
    return PreferenceSample(
        sid=sid, lq=image(sr_h // scale, sr_w // scale, 200),
        candidates=[image(sr_h, sr_w, 10 + n) for n in range(num_candidates)], seg=seg, instances=instances,
        prompt=f'a photo of {sid}, 高清', negative_prompt='dotted, noise, blur',
        gt=image(sr_h, sr_w, 250) if with_gt else None,
        meta={'candidates': [{'guidance_scale': 5.5, 'seed': n} for n in range(num_candidates)],
              'default_candidate': 0},
        extras={'ram_embedding': rng.standard_normal((5, 8)).astype(np.float32),
                'tags': np.arange(6, dtype=np.int64)})


def noise_sample(sid, sr_h, sr_w, num_candidates=2, scale=SCALE, seed=0):
    """A sample of incompressible noise images (exercises map growth), one instance covering everything."""
    rng = np.random.default_rng(seed)
    return PreferenceSample(
        sid=sid, lq=rng.integers(0, 256, (sr_h // scale, sr_w // scale, 3), dtype=np.uint8),
        candidates=[rng.integers(0, 256, (sr_h, sr_w, 3), dtype=np.uint8) for _ in range(num_candidates)],
        seg=np.zeros((sr_h, sr_w), np.uint16), instances=[{'id': 0, 'win': 0, 'lose': 1}])


def lmdb_put(path, key, value):
    """Overwrite (or with ``value=None`` delete) one key of a finished set, to corrupt it."""
    env = lmdb.open(path, subdir=True, lock=True)
    try:
        with env.begin(write=True) as txn:
            if value is None:
                txn.delete(key.encode())
            else:
                txn.put(key.encode(), value)
    finally:
        env.close()


def lmdb_get(path, key):
    """One raw value of a set."""
    env = lmdb.open(path, subdir=True, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return txn.get(key.encode())
    finally:
        env.close()
