"""Cache of frozen-backbone outputs (features and q) per image, in memory or in an LMDB.

The backbone q_w of rank calibration is frozen and its input (a fixed, deterministically cropped image)
does not change between epochs, so its outputs are computed once and read back afterwards: later epochs
only run the rectifier. Values are float32 numpy bytes ``[q, f_1, ..., f_D]``; never pickle.
"""
import json
import os

import numpy as np
import torch

__all__ = ['BackboneFeatureCache']

_META_KEY = b'__feature_cache__'


class BackboneFeatureCache:
    """Backbone outputs keyed by image identity (path plus crop).

    Args:
        feature_dim (int): D.
        backend (str): ``'memory'`` or ``'lmdb'``.
        lmdb_path (str, optional): Folder of the LMDB (``backend='lmdb'``); reused across runs when its
            header matches ``feature_dim`` and ``backbone_id``.
        backbone_id (str): Identifies the backbone weights, so a cache from another backbone is refused.
        map_size (int): LMDB map size in bytes.
    """

    def __init__(self, feature_dim, backend='memory', lmdb_path=None, backbone_id='', map_size=1 << 34):
        if backend not in ('memory', 'lmdb'):
            raise ValueError(f"feature cache backend must be 'memory' or 'lmdb', got {backend!r}.")
        self.feature_dim = int(feature_dim)
        self.backend = backend
        self._memory = {}
        self._env = None
        if backend == 'lmdb':
            if not lmdb_path:
                raise ValueError("feature cache backend 'lmdb' needs lmdb_path (a folder to create or reuse).")
            import lmdb
            os.makedirs(lmdb_path, exist_ok=True)
            self._env = lmdb.open(lmdb_path, map_size=map_size, subdir=True, lock=True)
            header = {'feature_dim': self.feature_dim, 'backbone_id': backbone_id, 'dtype': 'float32'}
            with self._env.begin(write=True) as txn:
                stored = txn.get(_META_KEY)
                if stored is None:
                    txn.put(_META_KEY, json.dumps(header).encode())
                elif json.loads(stored) != header:
                    raise ValueError(f'feature cache {lmdb_path!r} was written for {json.loads(stored)}, not '
                                     f'{header}; delete the folder or point lmdb_path elsewhere.')

    def __len__(self):
        if self._env is not None:
            return self._env.stat()['entries'] - 1
        return len(self._memory)

    def get_many(self, keys):
        """Look keys up.

        Args:
            keys (list[str]): Image identities.

        Returns:
            list: Per key, a float32 array (1 + D,) ``[q, features...]`` or None when absent.
        """
        if self._env is None:
            return [self._memory.get(k) for k in keys]
        with self._env.begin() as txn:
            values = [txn.get(k.encode()) for k in keys]
        return [None if v is None else np.frombuffer(v, dtype=np.float32) for v in values]

    def put_many(self, keys, features, q):
        """Store backbone outputs.

        Args:
            keys (list[str]): Image identities, length B.
            features (Tensor): (B, D).
            q (Tensor): (B,).
        """
        rows = torch.cat([q.detach().float().reshape(-1, 1), features.detach().float()], dim=1).cpu().numpy()
        if rows.shape[1] != 1 + self.feature_dim:
            raise ValueError(f'feature cache holds {self.feature_dim}-dim features, got {rows.shape[1] - 1}.')
        if self._env is None:
            self._memory.update(zip(keys, rows))
            return
        with self._env.begin(write=True) as txn:
            for key, row in zip(keys, rows):
                txn.put(key.encode(), np.ascontiguousarray(row, dtype=np.float32).tobytes())

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None
