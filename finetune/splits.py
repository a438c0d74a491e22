"""Dataset checks every downstream run does before it builds anything: labelled splits and a consistent class count.

`labelled_split(path, split, num_classes)` resolves `path:split` with `data.info.resolve` and fails early, naming
the split, when it has no labels, or when the configured `num_classes` disagrees with dataset.json.
`norm_stats` picks the normalisation: the config's, else the dataset's (dataset.json `mean`/`std`), else ImageNet's.
"""

from __future__ import annotations

from pathlib import Path

from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from launch.config import ConfigError


def split_spec(path: str, split: str) -> str:
    """`DIR:SPLIT` for a dataset folder or dataset.json, else the spec unchanged (a pattern names its own shards)."""
    if Path(path).is_dir() or path.endswith(".json"):
        return f"{path}:{split}"
    return path


def labelled_split(path: str, split: str, num_classes: int | None = None):
    """`DatasetInfo` of a split that has labels and `num_classes` classes (when given)."""
    from data.info import DatasetError, resolve

    spec = split_spec(path, split)
    try:
        info = resolve(spec)
    except DatasetError as exc:
        raise ConfigError(f"dataset split '{split}': {exc}") from None
    if info.labelled is False or not info.num_classes:
        raise ConfigError(f"split '{split}' of {path} has no labels (dataset.json lists no classes); probing, "
                          "fine-tuning and evaluation need a labelled split")
    if num_classes is not None and num_classes != info.num_classes:
        raise ConfigError(f"num_classes={num_classes} disagrees with the dataset: split '{split}' of {path} has "
                          f"{info.num_classes} classes (dataset.json)")
    return info


def check_same_classes(train_info, test_info) -> int:
    if train_info.num_classes != test_info.num_classes:
        raise ConfigError(f"train split has {train_info.num_classes} classes but test split has "
                          f"{test_info.num_classes}")
    if train_info.class_names and test_info.class_names and train_info.class_names != test_info.class_names:
        raise ConfigError("train and test splits list different class names (label indices would not match)")
    return train_info.num_classes


def norm_stats(mean, std, info) -> tuple[tuple[float, ...], tuple[float, ...]]:
    meta = getattr(info, "meta", {}) or {}
    m = tuple(mean) if mean is not None else tuple(meta.get("mean") or IMAGENET_MEAN)
    s = tuple(std) if std is not None else tuple(meta.get("std") or IMAGENET_STD)
    return m, s


__all__ = ["split_spec", "labelled_split", "check_same_classes", "norm_stats"]
