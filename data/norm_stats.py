"""The normalisation a run uses, one rule for every entry point: the config's `data.mean`/`data.std` when given, else
the training split's dataset.json statistics (written by data/make_shards.py) when they have the images' channel
count, else ImageNet's for 3 channels, else 0.5 per channel."""

from __future__ import annotations

from data.transforms import IMAGENET_MEAN, IMAGENET_STD


def norm_stats(mean, std, meta: dict | None, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from: "config", "dataset.json", "ImageNet" or "0.5")."""
    meta = meta or {}
    if mean is not None and std is not None:
        return tuple(mean), tuple(std), "config"
    stats = meta if meta.get("channels", channels) == channels and meta.get("mean") and meta.get("std") else {}
    if stats:
        source, default_mean, default_std = "dataset.json", stats["mean"], stats["std"]
    elif channels == 3:
        source, default_mean, default_std = "ImageNet", IMAGENET_MEAN, IMAGENET_STD
    else:
        source, default_mean, default_std = "0.5", (0.5,) * channels, (0.5,) * channels
    chosen_mean = tuple(mean) if mean is not None else tuple(default_mean)
    chosen_std = tuple(std) if std is not None else tuple(default_std)
    return chosen_mean, chosen_std, source if mean is None and std is None else "config"


__all__ = ["norm_stats"]
