"""One loader worker's access to raw samples by (shard, offset): seek in local tar files, stream everything else.

Three ways, chosen per shard (`seekable` says whether `read` serves it):
- local uncompressed `.tar`: the header index (`data/tar_index.py`) is built on first use and kept (least recently
  used dropped beyond `CACHE_SAMPLES` indexed samples, 16 bytes each); files stay open (up to `OPEN_FILES`); a
  sample then costs one positioned read;
- local gzip `.tar.gz` up to `MEMORY_SHARD_BYTES` uncompressed (tiny-image shards such as the shipped sample): the
  shard is decompressed once into memory and indexed there (up to `MEMORY_BYTES` of such shards per worker, least
  recently used dropped): a gzip stream cannot be read by seeking, and decompressing it again every epoch in every
  worker costs more than the images' decoding;
- anything else (`pipe:`, http(s), other gopen schemes, larger or other compressed files): `stream` reads the whole
  shard once through webdataset (`wds.tarfile_samples`, gopen) and returns only the samples asked for. The caller
  asks for all it will need from that shard in the epoch (data/read_plan.py), so each such shard is read once per
  reader and epoch. The stream is read to its end so a `pipe:` command is never cut off mid-write.
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

from data.tar_index import (
    TarFormatError,
    TarIndex,
    gunzip_prefix,
    gzip_size,
    index_members,
    index_tar,
    is_compressed,
    parse_sample,
    read_sample,
)

log = logging.getLogger(__name__)
CACHE_SAMPLES = 4_000_000  # indexed samples kept per worker (64 MB)
OPEN_FILES = 64
MEMORY_SHARD_BYTES = 64 << 20  # a local gzip shard up to this size uncompressed is held in memory
MEMORY_BYTES = 256 << 20  # such shards held per worker
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def local_path(url: str) -> str | None:
    """The file path of a local shard URL (plain path or `file:`), None for anything webdataset must open."""
    if url.startswith("file:"):
        return url.removeprefix("file://") if url.startswith("file://") else url.removeprefix("file:")
    if _SCHEME.match(url) and not os.path.exists(url):
        return None
    return url


def _kind(url: str) -> str:
    """"file", "memory" or "stream" (see the module docstring)."""
    path = local_path(url)
    if path is None:
        return "stream"
    try:
        if not is_compressed(path):
            return "file"
        size = gzip_size(path)
    except OSError:
        return "stream"  # unreadable: the stream path reports it and yields nothing
    return "memory" if size is not None and size <= MEMORY_SHARD_BYTES else "stream"


class ShardReader:
    """Raw samples of `urls` for one reader (see the module docstring). `warn(message)` is told of read problems."""

    def __init__(self, urls: list[str], warn: Callable[[str], None] = log.warning):
        self.urls = urls
        self.warn = warn
        self._kinds: dict[int, str] = {}
        self._indices: collections.OrderedDict[int, TarIndex] = collections.OrderedDict()
        self._files: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._blobs: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._cached = 0  # samples in the cached indices
        self.indexed = 0  # index builds (tests, benchmarks)

    def seekable(self, shard: int) -> bool:
        """Whether `read` serves this shard (local tar, or small local gzip tar); else use `stream`."""
        if shard not in self._kinds:
            self._kinds[shard] = _kind(self.urls[shard])
        return self._kinds[shard] != "stream"

    def _blob(self, shard: int) -> bytes:
        blob = self._blobs.get(shard)
        if blob is None:
            blob, problem = gunzip_prefix(local_path(self.urls[shard]))
            if problem:
                self.warn(problem)
            self._blobs[shard] = blob
            self._indices.pop(shard, None)  # an index is only valid with its blob
            while sum(map(len, self._blobs.values())) > MEMORY_BYTES and len(self._blobs) > 1:
                old, _ = self._blobs.popitem(last=False)
                self._indices.pop(old, None)
        else:
            self._blobs.move_to_end(shard)
        return blob

    def _index(self, shard: int) -> TarIndex:
        index = self._indices.get(shard)
        if index is not None:
            self._indices.move_to_end(shard)
            return index
        url = self.urls[shard]
        try:
            if self._kinds[shard] == "memory":
                view = memoryview(self._blob(shard))
                index = index_members(lambda o, n: bytes(view[o:o + n]), len(view), url)
            else:
                index = index_tar(local_path(url))
        except OSError as exc:
            index = TarIndex(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), problem=f"{url}: {exc}")
        self.indexed += 1
        if index.problem:
            self.warn(index.problem)
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
        url = self.urls[shard]
        try:
            if self._kinds[shard] == "memory":
                start, end = int(index.starts[offset]), int(index.ends[offset])
                return parse_sample(memoryview(self._blob(shard))[start:end], url)
            return read_sample(self._fd(shard), index, offset, url)
        except (OSError, TarFormatError) as exc:
            self.warn(f"{url}: {exc}")
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
