"""Random-pixel CIFAR-10 and SVHN files in torchvision's own on-disk formats.

For offline tests and for timing the real data path at full size (``benchmarks/gpu_check.py``
writes the 50 000 + 10 000 images of CIFAR-10) without downloading anything. The loaders in
:mod:`cure_eval.data` read them exactly as they read the real files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .datasets import get_dataset_spec

CIFAR10_FOLDER = "cifar-10-batches-py"


def write_cifar10(root: str | Path, n_per_batch: int = 6, *, n_test: int | None = None, seed: int = 0) -> np.ndarray:
    """``root/cifar-10-batches-py``: five training batches of ``n_per_batch`` images and a test batch
    of ``n_test`` (default ``n_per_batch``); labels cycle through the classes. Returns the first
    batch's rows (``(n_per_batch, 3072)`` uint8, channel-major as CIFAR-10 stores them)."""
    folder = Path(root) / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    first = np.empty((0, 3072), dtype=np.uint8)
    for name in batches:
        n = n_per_batch if name != "test_batch" or n_test is None else n_test
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        if name == batches[0]:
            first = data
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": [i % 10 for i in range(n)], "data": data,
                         "filenames": [f"{i}.png" for i in range(n)]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(get_dataset_spec("cifar10").class_names), "num_vis": 3072}, fh)
    return first


def write_svhn(root: str | Path, split: str, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``root/<split>_32x32.mat`` as SVHN ships it: X is (H, W, C, N), digit 0 stored as label 10."""
    import scipy.io

    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n, dtype=np.uint8) % 10)[:, None]
    y[y == 0] = 10
    Path(root).mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(Path(root) / f"{split}_32x32.mat", {"X": X, "y": y})
    return X, y
