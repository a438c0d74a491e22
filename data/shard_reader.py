"""One loader worker's access to raw samples by (shard, offset): seek in local tar files, stream everything else.

- Local uncompressed `.tar` (`seekable`): the header index (`data/tar_index.py`) is built on first use and kept
  (least recently used dropped beyond `CACHE_SAMPLES` indexed samples, 16 bytes each); files stay open (up to
  `OPEN_FILES`); a sample then costs one positioned read.
- Anything else (`pipe:`, http(s), other gopen schemes, compressed `.tar.gz`): `stream` reads the whole shard once
  through webdataset (`wds.tarfile_samples`, gopen) and returns only the samples asked for. The caller asks for all
  it will need from that shard in the epoch (data/read_plan.py), so each such shard is read once per reader and
  epoch. The stream is read to its end so a `pipe:` command is never cut off mid-write.
A sample missing from its shard (truncated or unreadable file) comes back as None: the caller's placeholder.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Callable, Iterable

import numpy as np
import webdataset as wds

from data.tar_index import TarFormatError, TarIndex, index_tar, is_compressed, read_sample

log = logging.getLogger(__name__)
CACHE_SAMPLES = 4_000_000  # indexed samples kept per worker (64 MB)
OPEN_FILES = 64
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or `file:`), None for anything webdataset must open."""
    if url.startswith("file:"):
        return url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    if _SCHEME.match(url) and not os.path.exists(url):
        return None
    return url


class ShardReader:
    """Raw samples of `urls` for one reader (see the module docstring). `warn(message)` is told of read problems."""

    def __init__(self, urls: list[str], warn: Callable[[str], None] = log.warning):
        self.urls = urls
        self.warn = warn
        self._seekable: dict[int, bool] = {}
        self._indices: collections.OrderedDict[int, TarIndex] = collections.OrderedDict()
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._cached = 0  # samples in the cached indices
        self.indexed = 0  # index builds (tests, benchmarks)

    def seekable(self, shard: int) -> bool:
        if shard not in self._seekable:
            path = local_path(self.urls[shard])
            try:
                self._seekable[shard] = path is not None and not is_compressed(path)
            except OSError:
                self._seekable[shard] = False  # unreadable: the stream path reports it and yields nothing
        return self._seekable[shard]

    def _index(self, shard: int) -> TarIndex:
        index = self._indices.get(shard)
        if index is not None:
            self._indices.move_to_end(shard)
            return index
        try:
            index = index_tar(local_path(self.urls[shard]))
        except OSError as exc:
            index = TarIndex(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), problem=str(exc))
        self.indexed += 1
        if index.problem:
            self.warn(f"shard {self.urls[shard]}: {index.problem}")
        self._indices[shard] = index
        self._cached += len(index)
        while self._cached > CACHE_SAMPLES and len(self._indices) > 1:
            self._cached -= len(self._indices.popitem(last=False)[1])
        return index

    def _fd(self, shard: int) -> int:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(local_path(self.urls[shard]), os.O_RDONLY)
            if len(self._files) > OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        else:
            self._files.move_to_end(shard)
        return fd

    def read(self, shard: int, offset: int) -> dict | None:
        """Sample `offset` of a seekable shard, or None when the file does not hold it."""
        index = self._index(shard)
        if offset >= len(index):
            return None
        try:
            return read_sample(self._fd(shard), index, offset, self.urls[shard])
        except (OSError, TarFormatError) as exc:
            self.warn(f"shard {self.urls[shard]}: {exc}")
            return None

    def stream(self, shard: int, offsets: Iterable[int]) -> dict[int, dict | None]:
        """One pass over the shard: {offset: sample, or None where the shard ends before it}."""
        wanted = set(offsets)
        got: dict[int, dict | None] = dict.fromkeys(wanted)

        def on_error(exc: Exception) -> bool:
            self.warn(f"error reading shard {self.urls[shard]}: {exc}")
            return True

        for i, sample in enumerate(wds.tarfile_samples(iter([{"url": self.urls[shard]}]), handler=on_error)):
            if i in wanted:
                got[i] = sample
        return got

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])


__all__ = ["ShardReader", "local_path"]
