"""The first few images of a dataset (e.g. for a reconstruction grid), reading only as much of it as they need.

    images = first_images("pipe:aws s3 cp s3://bucket/val-{000000..000099}.tar -", 8, eval_transform(224, mean, std))

Shards are opened one after the other, in spec order, and reading stops as soon as `n` images decoded: with remote
data and no dataset.json nothing counts or downloads the other shards, and a `pipe:` command still running when
enough images are in is stopped (SIGTERM) rather than left to finish its download. Corrupt images and unreadable
shards are skipped (logged). No randomness is used: the same spec always gives the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import webdataset as wds

from data.decode import CorruptSample, decode_image
from data.info import DatasetInfo, resolve

log = logging.getLogger(__name__)


def _close(stream) -> None:
    """Close a gopen stream; stop its `pipe:` process first if it is still running (we stopped reading)."""
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
    try:
        stream.close()
    except Exception as exc:  # noqa: BLE001 - a pipe stopped early reports its signal as an error: expected
        log.debug("closing %s: %s", stream, exc)


def _warn(exc: Exception) -> bool:
    log.warning("first_images: skipping unreadable data: %s", exc)
    return True


def first_images(spec, n: int, transform: Callable, *, decode_size: int | None = None) -> torch.Tensor | None:
    """The first `n` decodable images of `spec` (anything `data.info.resolve` takes, or a DatasetInfo), transformed
    and stacked as [k, C, H, W] with k = min(n, images available); None when there is none (or n <= 0)."""
    if n <= 0:
        return None
    info = spec if isinstance(spec, DatasetInfo) else resolve(spec)
    images: list[torch.Tensor] = []
    for url in info.urls:
        try:
            stream = wds.gopen(url)
        except Exception as exc:  # noqa: BLE001 - an unreadable shard: try the next one
            _warn(exc)
            continue
        try:
            files = ({**f, "__url__": url} for f in wds.tariterators.tar_file_iterator(stream, handler=_warn))
            for sample in wds.tariterators.group_by_keys(files, handler=_warn):
                try:
                    images.append(transform(decode_image(sample, decode_size)))
                except CorruptSample as exc:
                    _warn(exc)
                    continue
                if len(images) == n:
                    return torch.stack(images)
        except Exception as exc:  # noqa: BLE001 - a shard that breaks off: keep what it gave, go on
            _warn(exc)
        finally:
            _close(stream)
    return torch.stack(images) if images else None


__all__ = ["first_images"]
