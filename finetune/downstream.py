"""What a downstream run (fine-tuning, probing) reads before it builds anything, once for both: its labelled splits
with one class count, the encoder's weights (`launch/weights.py`), the normalisation (`data/norm_stats.py`), and the
evaluation transform and loader of the test split.

`data.test` None means the val split next to `data.train`, else its test split. Problems fail early, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from data.device_input import device_batches
from data.eval_stream import build_eval_loader
from data.info import DatasetError, DatasetInfo, locate, neighbour_split, resolve
from data.norm_stats import norm_stats
from data.synthetic import SyntheticLoader
from data.train_stream import build_train_loader
from data.transforms import default_crop_pct, eval_transform, uint8_output
from launch.batch_memory import check_micro_batch
from launch.weights import Weights, read_weights


def labelled_split(spec: str, key: str, num_classes: int | None = None) -> DatasetInfo:
    """`DatasetInfo` of a split that has labels and `num_classes` classes (when given); `key` names the config key."""
    try:
        info = resolve(spec)
    except DatasetError as exc:
        raise ConfigError(f"{key}={spec}: {exc}") from None
    if info.labelled is False or not info.num_classes:
        raise ConfigError(f"{key}={spec} has no labels (dataset.json lists no classes); probing, fine-tuning and "
                          "evaluation need a labelled split")
    if num_classes is not None and num_classes != info.num_classes:
        raise ConfigError(f"num_classes={num_classes} disagrees with the dataset: {key}={spec} has "
                          f"{info.num_classes} classes (dataset.json)")
    return info


@dataclass
class Downstream:
    train: DatasetInfo
    test: DatasetInfo
    train_spec: str
    test_spec: str
    num_classes: int
    source: Weights  # the encoder
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    crop_pct: float
    output: str  # "uint8" (8-bit RGB, normalised on the device) or "float"

    def eval_transform(self):
        return eval_transform(self.img_size, self.mean, self.std, self.crop_pct, output=self.output)

    def eval_batches(self, rt, spec: str, batch_size: int, num_workers: int):
        """(device batches of `spec`, every image once across ranks, and their count on this rank)."""
        loader = build_eval_loader(spec, batch_size=batch_size, transform=self.eval_transform(), rank=rt.rank,
                                   world_size=rt.world, num_workers=num_workers)
        return device_batches(loader, rt.device, mean=self.mean, std=self.std, dtype=rt.dtype), len(loader)

    def train_loader(self, rt, data, transform, seed: int):
        """The training stream of `data.train` for the process `rt` (micro_batch, rank, world, device), or random
        images with `data.loader=synthetic`; the micro-batch checked against the split and the memory first."""
        check_micro_batch(rt.micro_batch, self.train.num_samples if data.loader == "stream" else None,
                          (len(self.mean), self.img_size, self.img_size),
                          data.num_workers if data.loader == "stream" else 0, world_size=rt.world,
                          dtype="uint8" if self.output == "uint8" or data.loader != "stream" else "float32")
        if data.loader == "synthetic":
            return SyntheticLoader(batch_size=rt.micro_batch, channels=len(self.mean), img_size=self.img_size,
                                   num_classes=self.num_classes, seed=seed, rank=rt.rank, world_size=rt.world)
        return build_train_loader(self.train_spec, batch_size=rt.micro_batch, transform=transform, seed=seed,
                                  rank=rt.rank, world_size=rt.world, num_workers=data.num_workers,
                                  shuffle_buffer=data.shuffle_buffer, pin_memory=self.pin(rt, data))

    def train_batches(self, rt, session, data, transform, seed: int):
        """`train_loader`, registered with the session (its position is saved and restored), as device batches."""
        loader = self.train_loader(rt, data, transform, seed)
        session.register_loader(loader)
        return device_batches(loader, rt.device, mean=self.mean, std=self.std, dtype=rt.dtype,
                              pin_memory=self.pin(rt, data), prefetch=data.prefetch)

    @staticmethod
    def pin(rt, data) -> bool:
        return data.pin_memory if data.pin_memory is not None else rt.device.type == "cuda"

    def meta(self, kind: str, enc_cfg: dict, pool: str) -> dict:
        """The classifier.json of a classifier trained on this data from this encoder (`finetune/export.py`)."""
        return {"kind": kind, "encoder_cfg": enc_cfg, "num_classes": self.num_classes, "pool": pool,
                "img_size": self.img_size, "mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                "class_names": self.train.class_names, "encoder": self.source.describe()}


def resolve_downstream(cfg) -> Downstream:
    """The splits, encoder and normalisation of a fine-tuning or probing config (checked, see the module doc)."""
    train_spec = locate(cfg.data.train)
    train = labelled_split(train_spec, "data.train", cfg.num_classes)
    test_spec = locate(cfg.data.test) if cfg.data.test else neighbour_split(train_spec)
    if test_spec is None:
        raise ConfigError(f"data.test is not set and {cfg.data.train} has no val or test split beside it; name the "
                          f"evaluated split: data.test=FOLDER:SPLIT")
    test = labelled_split(test_spec, "data.test", cfg.num_classes)
    if train.num_classes != test.num_classes:
        raise ConfigError(f"data.train has {train.num_classes} classes but data.test={test_spec} has "
                          f"{test.num_classes}")
    if train.class_names and test.class_names and train.class_names != test.class_names:
        raise ConfigError(f"data.train and data.test={test_spec} list different class names (label indices would "
                          f"not match)")
    source = read_weights(cfg.encoder, want="encoder", weights=cfg.encoder_weights, arch=cfg.arch,
                          num_heads=cfg.num_heads, seed=cfg.run.seed)
    chans = int(source.encoder_cfg.get("in_chans", 3))
    if train.meta.get("channels") and int(train.meta["channels"]) != chans:
        raise ConfigError(f"the encoder ({cfg.encoder}) takes {chans}-channel images but data.train={cfg.data.train} "
                          f"holds {train.meta['channels']}-channel ones (its dataset.json); give an encoder "
                          f"pretrained on such images")
    mean, std, _ = norm_stats(cfg.data.mean, cfg.data.std, train.meta, chans)
    size = cfg.model.img_size or source.encoder_cfg["img_size"]
    size = size if isinstance(size, int) else size[0]
    crop_pct = cfg.data.crop_pct if cfg.data.crop_pct is not None else default_crop_pct(size)
    return Downstream(train, test, train_spec, test_spec, train.num_classes, source, mean, std, size, crop_pct,
                      uint8_output(train.meta, chans))


__all__ = ["Downstream", "resolve_downstream", "labelled_split"]
