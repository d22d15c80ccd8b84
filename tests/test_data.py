"""Data loaders: the embedded digits split, and torchvision's CIFAR-10/SVHN loaders on files
written here in torchvision's on-disk formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from cure_eval.data import check_images, get_dataset_spec, load_dataset, select_points
from cure_eval.data.synthetic import write_cifar10
from cure_eval.errors import CureEvalError, UsageError


def test_digits_split_is_fixed_and_disjoint() -> None:
    tr1, te1 = load_dataset("digits", "train"), load_dataset("digits", "test")
    tr2 = load_dataset("digits", "train")
    assert len(tr1) + len(te1) == 1797 and len(te1) == 360
    torch.testing.assert_close(tr1.tensors[0], tr2.tensors[0])
    x = te1.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # disjoint: no test image appears in the training set
    train_rows = {tuple(r.tolist()) for r in tr1.tensors[0].flatten(1)}
    assert sum(tuple(r.tolist()) in train_rows for r in x.flatten(1)) < 5  # a few exact duplicates exist in the data
    # every class in both splits (stratified)
    assert set(te1.tensors[1].tolist()) == set(range(10))


def test_select_points_is_seeded_and_validated() -> None:
    a, b = select_points(360, 50, seed=3), select_points(360, 50, seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 50
    assert not torch.equal(a, select_points(360, 50, seed=4))
    with pytest.raises(UsageError, match="larger than the test set"):
        select_points(360, 361, seed=0)


def test_cifar10_loader_reads_torchvision_format(tmp_path: Path) -> None:
    first = write_cifar10(tmp_path)
    train = load_dataset("cifar10", "train", data_dir=tmp_path)
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert len(train) == 30 and len(test) == 6
    x = train.tensors[0]
    assert x.shape == (30, 3, 32, 32)
    # CIFAR rows are channel-major 32×32 planes, scaled to [0, 1]
    expected = torch.from_numpy(first[0].reshape(3, 32, 32).astype(np.float32) / 255.0)
    torch.testing.assert_close(x[0], expected)
    assert train.tensors[1][:6].tolist() == list(range(6))
    check_images(x, get_dataset_spec("cifar10"))


def test_svhn_loader_reads_torchvision_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    X = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [3], [10]], dtype=np.uint8)  # SVHN stores digit 0 as 10
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    ds = load_dataset("svhn", "test", data_dir=tmp_path)
    x, labels = ds.tensors
    assert x.shape == (5, 3, 32, 32)
    assert labels.tolist() == [0, 1, 2, 3, 0]
    torch.testing.assert_close(x[1, 2], torch.from_numpy(X[:, :, 2, 1].astype(np.float32) / 255.0))  # X is (H, W, C, N)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_missing_data_offline_gives_one_line_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(CureEvalError) as info:
        load_dataset(name, "test", data_dir=tmp_path / "nowhere")
    msg = str(info.value)
    # the library's vocabulary; the CLIs say --download/--data-dir (test_defend's bad-input cases)
    assert "`download=True`" in msg and "`data_dir`" in msg and "\n" not in msg


def test_corrupt_cifar_file_is_reported(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(CureEvalError, match="unreadable"):
        load_dataset("cifar10", "test", data_dir=tmp_path)


def test_unknown_dataset_lists_valid_ones() -> None:
    with pytest.raises(UsageError, match="cifar10, digits, svhn"):
        get_dataset_spec("mnist")


def test_check_images_rejects_bad_input() -> None:
    spec = get_dataset_spec("digits")
    check_images(torch.rand(2, 1, 8, 8), spec)
    with pytest.raises(CureEvalError, match=r"\[0, 1\]"):
        check_images(torch.rand(2, 1, 8, 8) * 255, spec)
    with pytest.raises(CureEvalError, match="NaN"):
        check_images(torch.full((2, 1, 8, 8), float("nan")), spec)
    with pytest.raises(CureEvalError, match="shape"):
        check_images(torch.rand(2, 3, 8, 8), spec)
