"""Tiny CIFAR-10 / SVHN data sets written in torchvision's on-disk formats (random pixels)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.io

from cure_eval.data import get_dataset_spec


def write_cifar10(root: Path, n_per_batch: int = 6) -> np.ndarray:
    """``root/cifar-10-batches-py`` with five training batches and a test batch; returns the first batch's rows."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": [i % 10 for i in range(n_per_batch)], "data": data,
                         "filenames": [f"{i}.png" for i in range(n_per_batch)]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(get_dataset_spec("cifar10").class_names), "num_vis": 3072}, fh)
    assert first is not None
    return first


def write_svhn(root: Path, split: str, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``root/<split>_32x32.mat`` as SVHN ships it: X is (H, W, C, N), digit 0 stored as label 10."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n, dtype=np.uint8) % 10)[:, None]
    y[y == 0] = 10
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
    return X, y
