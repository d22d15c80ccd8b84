"""Datasets in [0, 1] units (:mod:`~cure_eval.data.datasets`) and synthetic dataset files in
torchvision's formats for tests and benchmarks (:mod:`~cure_eval.data.synthetic`)."""

from __future__ import annotations

from .datasets import (
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    DatasetSpec,
    check_images,
    get_dataset_spec,
    list_datasets,
    load_dataset,
    select_points,
)

__all__ = [
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DatasetSpec",
    "check_images",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "select_points",
]
