"""The images a picture is drawn on: image files, a folder of images, or a dataset spec (folder with dataset.json
[:split], shard pattern), the first N of them through the eval transform."""

from __future__ import annotations

from pathlib import Path

import torch

from launch.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff")


def existing_path(spec: str) -> str:
    """`spec` as given, or relative to the repository root when only that exists (`data/sample:test` from anywhere;
    a `:split` suffix is kept)."""
    head = spec.split(":")[0]
    if spec and not Path(head).exists() and (REPO / head).exists():
        return str(REPO / spec)
    return spec


def _image_files(parts: list[str]) -> list[Path] | None:
    """The image files `parts` name (files, or one folder of images without dataset.json); None for a dataset."""
    if all(p.lower().endswith(IMAGE_SUFFIXES) for p in parts):
        files = [Path(existing_path(p)) for p in parts]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"image file(s) not found: {', '.join(missing)}")
        return files
    folder = Path(existing_path(parts[0]))
    if len(parts) == 1 and folder.is_dir() and not (folder / "dataset.json").exists():
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        return files
    return None


def load_images(spec: str, n: int, transform) -> tuple[torch.Tensor, list[str]]:
    """The first `n` images of `spec` (files, a folder of images, or a dataset spec), transformed:
    ([N,C,H,W], names)."""
    from PIL import Image, UnidentifiedImageError

    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ConfigError("images= is empty")
    files = _image_files(parts)
    if files is not None:
        tensors, names = [], []
        for f in files[:n]:
            try:
                with Image.open(f) as im:
                    tensors.append(transform(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                raise ConfigError(f"cannot read image {f}: {exc}") from None
            names.append(f.name)
        return torch.stack(tensors), names

    from data.eval_stream import build_eval_loader
    from data.info import DatasetError

    try:
        loader = build_eval_loader(existing_path(parts[0]) if len(parts) == 1 else parts, batch_size=n,
                                   transform=transform, rank=0, world_size=1, num_workers=0)
        for batch in loader:
            images = batch["image"][batch["valid"]][:n].float()
            labels = batch["label"][batch["valid"]][:n].tolist()
            return images, [f"#{i} (label {lab})" for i, lab in enumerate(labels)]
    except DatasetError as exc:
        raise ConfigError(f"images={spec}: {exc}") from None
    raise ConfigError(f"images={spec}: the dataset is empty")
