"""Shared test helpers: tiny image folders and smoke configs."""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10  # noqa: E402


def make_folder(root, classes=('cat', 'dog'), per_class=12, splits=('train',), size=(32, 32), seed=0, fmt='png'):
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                h, w = size if size else rng.integers(20, 48, 2)
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f'{i:04d}.{fmt}'))
    return str(root)


def smoke_config(root, data_dir, **over):
    c = cifar10.get_config('smoke')
    c.data.root, c.data.data_dir = str(root), str(data_dir)
    c.batch_size = 8
    c.total_steps, c.warmup_steps = 12, 2
    c.log_every_steps = 2
    c.ckpt.every_steps = 4
    c.image_summary_every_epochs = 1.0
    c.knn.every_epochs = 0.0  # the tiny folders have no test split
    return override(c, **over)


def override(c, **over):
    """Sets dotted keys: override(c, **{'model.variant': 'Ti/4'})."""
    for k, v in over.items():
        node = c
        *parents, leaf = k.split('.')
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def rel(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def assert_identical(a, b):
    """Two param trees with the same paths and bitwise-equal leaves."""
    from colormae_jax.interop import torch_hf as interop
    fa, fb = interop._flat(a), interop._flat(b)
    assert fa.keys() == fb.keys()
    for p in fa:
        np.testing.assert_array_equal(np.asarray(fa[p]), np.asarray(fb[p]), err_msg=interop.path_str(p))
