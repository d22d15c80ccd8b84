"""Datasets as [0, 1] image tensors.

Every dataset is returned as float images in [0, 1] with shape ``(N, C, H, W)`` and integer
labels. Normalisation is *not* applied here: it lives inside the model (see
:class:`cure_eval.models.Normalize`), so every attack and every ε is in [0, 1] pixel space.

* ``digits``: scikit-learn's handwritten digits (1797 real 8×8 grey images shipped inside
  scikit-learn), split 80/20 with a fixed seed; works offline.
* ``cifar10`` / ``svhn``: torchvision's own loaders reading from ``data_dir``; they download only
  when asked to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import CureEvalError, UsageError

log = logging.getLogger(__name__)

#: Seed of the fixed digits train/test split. Changing it changes every digits number.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and an attack need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: default ℓ∞ radius in 1/255 units (the CLI's ``--eps`` unit)
    default_eps: float
    #: default finite-difference step of the geometry measurements: ℓ2 length of ``h·z`` in [0, 1]
    #: pixel space, the pixel-space length of CURE's default step (``cure.pixel_step``; CURE's own
    #: ``h`` is in normalised-input units, see ``cure_eval_plugins.methods.cure``)
    default_h: float
    #: default PGD step size in 1/255 units (2/255 as in torchattacks and the paper's CIFAR
    #: setting; ε/8 on digits, so that PGD(20) and longer can cross the 32/255 ball. PGD(7) cannot:
    #: 7 × 4/255 = 28/255 < 32/255, the audit warns, and on digits it scores above FGSM: a weak
    #: column the worst case does not rely on)
    pgd_alpha: float = 2.0
    #: light augmentation used for training (random crop padding, horizontal flip)
    crop_padding: int = 0
    hflip: bool = False
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)


_SPECS: dict[str, DatasetSpec] = {
    # mean/std of the 1797 images scaled by 1/16; ε = 32/255: 8×8 digits are robust at small ε.
    # h = 1.0 is the ℓ2 length of a 32/255 sign step on 64 pixels: curvature at the attack's scale.
    "digits": DatasetSpec(
        name="digits", num_classes=10, in_chans=1, image_size=8, mean=(0.3053,), std=(0.3760,),
        default_eps=32.0, default_h=1.0, pgd_alpha=4.0, class_names=tuple(str(i) for i in range(10)),
    ),
    # Normalisation constants of the CURE reference code (docs/references.md §2). h = 0.6 is the
    # pixel-space length of the reference code's h = 3 in normalised units.
    "cifar10": DatasetSpec(
        name="cifar10", num_classes=10, in_chans=3, image_size=32,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
        default_eps=8.0, default_h=0.6, crop_padding=4, hflip=True,
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
    ),
    # The paper evaluates SVHN at ε = 12/255 (docs/references.md §1); h = 1.25 in the paper's units.
    "svhn": DatasetSpec(
        name="svhn", num_classes=10, in_chans=3, image_size=32,
        mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970),
        default_eps=12.0, default_h=0.5, crop_padding=4, hflip=False,
        class_names=tuple(str(i) for i in range(10)),
    ),
}


def list_datasets() -> list[str]:
    return sorted(_SPECS)


def get_dataset_spec(name: str) -> DatasetSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UsageError(
            f"unknown dataset {name!r}: choose one of {', '.join(list_datasets())}"
        ) from None


def load_dataset(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> TensorDataset:
    """Load ``split`` (``"train"`` or ``"test"``) of dataset ``name`` as a TensorDataset.

    Args:
        name: ``digits``, ``cifar10`` or ``svhn``.
        split: ``train`` or ``test``.
        data_dir: folder holding torchvision's on-disk files (``cifar-10-batches-py/``,
            ``train_32x32.mat``/``test_32x32.mat``). Default: ``./data``.
        download: let torchvision fetch missing files (needs internet).
    """
    spec = get_dataset_spec(name)
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}: use train or test")
    if spec.name == "digits":
        x, y = _load_digits(split)
    else:
        root = Path(data_dir if data_dir is not None else "data")
        if spec.name == "cifar10":
            x, y = _load_cifar10(root, split, download)
        else:
            x, y = _load_svhn(root, split, download)
    return TensorDataset(x, y)


def _load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return torch.from_numpy(images[chosen]), torch.from_numpy(labels[chosen])


def _missing(dataset: str, root: Path, files: str) -> CureEvalError:
    return CureEvalError(
        f"{dataset} not found in {root} (expected {files}): pass `download=True` to fetch it "
        f"(needs internet), or copy the files into `data_dir`"
    )


def _load_cifar10(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        # torchvision's own loader, with md5 checks of the extracted files switched off
        # (check_integrity(path, None) only checks that the file exists): a corrupt file fails
        # in pickle.load and is reported below. The downloaded archive is still md5-checked.
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    folder = root / CIFAR10.base_folder
    if not download and not folder.is_dir():
        raise _missing("CIFAR-10", root, f"{CIFAR10.base_folder}/")
    try:
        ds = _CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise _missing("CIFAR-10", root, f"{CIFAR10.base_folder}/data_batch_1..5, test_batch") from exc
    except Exception as exc:  # corrupt pickle, truncated file
        raise CureEvalError(f"CIFAR-10 files in {folder} are unreadable ({exc}): delete them and pass `download=True`") from exc
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    return x.contiguous(), y


def _load_svhn(root: Path, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import SVHN

    class _SVHN(SVHN):
        def _check_integrity(self) -> bool:  # presence only, see _CIFAR10; downloads are md5-checked
            return os.path.isfile(os.path.join(self.root, self.filename))

    filename = SVHN.split_list[split][1]
    if not download and not (root / filename).is_file():
        raise _missing("SVHN", root, filename)
    try:
        # torchvision's SVHN.download fetches even when the file is there: only when it is missing
        ds = _SVHN(str(root), split=split, download=download and not (root / filename).is_file())
    except RuntimeError as exc:
        raise _missing("SVHN", root, filename) from exc
    except Exception as exc:
        raise CureEvalError(f"SVHN file {root / filename} is unreadable ({exc}): delete it and pass `download=True`") from exc
    x = torch.from_numpy(np.ascontiguousarray(ds.data)).float().div_(255.0)
    y = torch.as_tensor(ds.labels, dtype=torch.long)
    return x.contiguous(), y


def select_points(num_available: int, n: int | None, seed: int) -> torch.Tensor:
    """Indices of a fixed, seeded subset of ``n`` test points (sorted, identical across runs).

    The subset depends only on ``(num_available, n, seed)``, so every attack and every run of the
    same command sees the same points.
    """
    if n is None or n == num_available:
        return torch.arange(num_available)
    if n <= 0:
        raise UsageError(f"the number of test points must be positive, got {n}")
    if n > num_available:
        raise UsageError(f"{n} test points is larger than the test set ({num_available} points): ask for {num_available} or fewer")
    gen = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(num_available, generator=gen)[:n]).values


def check_images(x: torch.Tensor, spec: DatasetSpec | None = None) -> None:
    """Raise a clear error unless ``x`` is a finite float batch in [0, 1] of the spec's shape."""
    if not torch.is_floating_point(x):
        raise CureEvalError(f"images must be float tensors in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4:
        raise CureEvalError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    if spec is not None and tuple(x.shape[1:]) != spec.input_shape:
        raise CureEvalError(
            f"images have shape {tuple(x.shape[1:])} but {spec.name} models take {spec.input_shape}"
        )
    if not torch.isfinite(x).all():
        raise CureEvalError("images contain NaN or infinite values: clean the data first")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise CureEvalError(
            f"images must lie in [0, 1] (found [{lo:.3g}, {hi:.3g}]): divide by 255 and move "
            f"normalisation into the model"
        )
