"""Resolve a dataset spec (folder with dataset.json, `folder:split`, brace pattern, URL) to shard URLs and counts.

Spec forms:
- `data/sample` or `data/sample:test`: a folder holding dataset.json (see data/make_shards.py); split default train.
- `path/to/dataset.json` or `path/to/dataset.json:test`: the same, naming the file. A `shard_url` in the split's
  entry (or at the top) puts the shards elsewhere: `"pipe:aws s3 cp s3://bucket/in1k/{name} -"` (`{name}` is each
  listed shard name), so remote shards come with their counts.
- `/shards/train-{000000..000099}.tar` or a list of paths: local shards; counts come from a dataset.json next to
  them when it lists these shard names, else they are unknown (None).
- `pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -`, `https://host/train-{000000..000009}.tar`, any
  `scheme:` that webdataset's gopen knows (see docs/DATA.md): taken as given, counts unknown.
Several patterns can be joined with `::` (webdataset's convention). Shell globs (`*`, `?`, `[...]`) are not expanded
(the shell does not see a `key=value` argument's pattern, and a URL cannot be listed): a local spec with one that
names nothing is refused with the brace pattern of the shards the glob matches, or the brace form to write.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from core.errors import UserError

DEFAULT_SPLIT = "train"
EVAL_SPLITS = ("val", "test")  # looked for next to the training split when no evaluated split is named
REPO = Path(__file__).resolve().parents[1]  # relative dataset folders are also looked for here (data/sample)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, gs:, file: ...
_GLOB = re.compile(r"(?:\*|\?|\[[^\]]*\])+")  # a run of shell glob pieces


class DatasetError(UserError, ValueError):
    """A dataset spec that cannot be used: the message names the path or URL and what is wrong."""


@dataclass
class DatasetInfo:
    urls: list[str]
    num_samples: int | None = None  # None when shard sizes are unknown (plain patterns, remote URLs)
    num_classes: int = 0  # 0 when unlabelled or unknown
    class_names: list[str] | None = None
    shard_sizes: list[int] | None = None  # samples per shard, same order as urls
    split: str | None = None
    labelled: bool | None = None
    meta: dict = field(default_factory=dict, repr=False)  # the split's dataset.json entry, if any


def _is_url(s: str) -> bool:
    return bool(_URL.match(s)) and not os.path.exists(s) and not s.startswith("file:")


def _split_spec(spec: str) -> tuple[str, str | None]:
    """`folder:split` -> (folder, split); anything else -> (spec, None)."""
    if ":" in spec and not spec.startswith(("pipe:", "file:")) and "://" not in spec:
        head, _, tail = spec.rpartition(":")
        if tail and "/" not in tail and "{" not in tail and (Path(head).is_dir() or head.endswith(".json")):
            return head, tail
    return spec, None


def _from_json(meta_path: Path, split: str | None) -> DatasetInfo:
    try:
        meta = json.loads(meta_path.read_text())
    except OSError as exc:
        raise DatasetError(f"cannot read dataset description {meta_path}: {exc}") from exc
    except ValueError as exc:
        raise DatasetError(f"dataset description {meta_path} is not valid JSON: {exc}") from exc
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise DatasetError(f"{meta_path} has no 'splits' table (not written by data/make_shards.py?)")
    split = split or DEFAULT_SPLIT
    if split not in splits:
        raise DatasetError(f"{meta_path} has no split '{split}' (it has: {', '.join(sorted(splits)) or 'none'})")
    entry = splits[split]
    shards = entry["shards"]
    template = entry.get("shard_url") or meta.get("shard_url")
    if template:  # shards elsewhere (pipe:, http ...): "{name}" stands for each shard's name
        if "{name}" not in template:
            raise DatasetError(f"{meta_path}: shard_url {template!r} has no {{name}} in it")
        urls = [template.replace("{name}", s["name"]) for s in shards]
    else:
        urls = [str(meta_path.parent / s["name"]) for s in shards]
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise DatasetError(f"{len(missing)} shard(s) listed in {meta_path} are missing, e.g. {missing[0]}")
    names = entry.get("class_names")
    return DatasetInfo(
        urls=urls,
        num_samples=int(entry["num_samples"]),
        num_classes=int(entry.get("num_classes") or (len(names) if names else 0)),
        class_names=names,
        shard_sizes=[int(s["num_samples"]) for s in shards],
        split=split,
        labelled=entry.get("labelled"),
        meta=entry,
    )


def _brace_pattern(paths: list[str]) -> str | None:
    """One brace pattern for `paths` when they differ only in one run of equal-width digits counting up by one
    (`/d/train-{000000..000003}.tar`), or the path itself when there is one; else None."""
    if len(paths) == 1:
        return paths[0]
    head = os.path.commonprefix(paths)
    tail = os.path.commonprefix([p[len(head):][::-1] for p in paths])[::-1]
    head = head.rstrip("0123456789")  # the whole digit run varies, not only its last digits
    tail = tail[len(tail) - len(tail.lstrip("0123456789")):]
    middles = [p[len(head):len(p) - len(tail)] for p in paths]
    width = len(middles[0])
    if not all(m.isdigit() and len(m) == width for m in middles):
        return None
    numbers = sorted(int(m) for m in middles)
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return None
    return f"{head}{{{numbers[0]:0{width}d}..{numbers[-1]:0{width}d}}}{tail}"


def _not_found(missing: str) -> str:
    """What to say about a local shard that does not exist; for a shell glob, that it is not expanded and how to
    write the spec instead."""
    if not _GLOB.search(missing):
        return f"dataset not found: {missing}"
    matches = sorted(glob.glob(missing))
    brace = _brace_pattern(matches) if matches else None
    if brace:
        instead = f": {brace} (the {len(matches)} file{'s' if len(matches) > 1 else ''} the glob matches)"
    else:
        instead = (", e.g. " + _GLOB.sub("{000000..000099}", missing, count=1)
                   + (f" (the glob matches {len(matches)} files of no single numbered run)" if matches else ""))
    return (f"dataset not found: {missing}; shell globs (*, ?, [...]) are not expanded in a dataset spec: name the "
            f"shards with a brace pattern{instead}")


def _sizes_from_neighbour_json(urls: list[str]) -> DatasetInfo | None:
    """Counts for local shards when a dataset.json in their folder lists all of them."""
    folders = {Path(u).parent for u in urls}
    if len(folders) != 1:
        return None
    meta_path = next(iter(folders)) / "dataset.json"
    if not meta_path.exists():
        return None
    try:
        splits = json.loads(meta_path.read_text()).get("splits", {})
    except (OSError, ValueError):
        return None
    for split, entry in splits.items():
        sizes = {s["name"]: int(s["num_samples"]) for s in entry.get("shards", [])}
        if all(Path(u).name in sizes for u in urls):
            names = entry.get("class_names")
            shard_sizes = [sizes[Path(u).name] for u in urls]
            return DatasetInfo(urls=urls, num_samples=sum(shard_sizes), num_classes=len(names) if names else 0,
                               class_names=names, shard_sizes=shard_sizes, split=split,
                               labelled=entry.get("labelled"), meta=entry)
    return None


def locate(spec: str) -> str:
    """A local dataset spec as given, or relative to the repository when only that exists (so `data/sample` and
    `data/sample:test` work from any directory; a `:split` suffix is kept). Remote specs are returned unchanged."""
    spec = str(spec)
    head = spec.split(":")[0]
    if spec and not _is_url(spec) and not Path(head).is_absolute() and not Path(head).exists() \
            and (REPO / head).exists():
        return str(REPO / spec)
    return spec


def neighbour_split(train_spec: str) -> str | None:
    """`FOLDER:val`, else `FOLDER:test`, when the training data is a dataset folder holding such a split: where the
    evaluated split is taken from when none is named."""
    train_spec = locate(train_spec)
    folder = train_spec.rsplit(":", 1)[0] if ":" in train_spec else train_spec
    if not Path(folder).is_dir():
        return None
    for split in EVAL_SPLITS:
        try:
            resolve(f"{folder}:{split}")
        except DatasetError:
            continue
        return f"{folder}:{split}"
    return None


def resolve(spec: str | os.PathLike | Sequence[str], split: str | None = None) -> DatasetInfo:
    """Turn a dataset spec into shard URLs (+ counts and class names when a dataset.json describes them).

    Raises DatasetError naming the path when a folder, dataset.json, split or local shard is missing, or the
    pattern expands to nothing.
    """
    if isinstance(spec, (list, tuple)):
        urls = [u for s in spec for u in wds.shardlists.expand_urls(str(s))]
    else:
        spec = locate(str(spec))
        if not spec.strip():
            raise DatasetError("empty dataset spec")
        path, spec_split = _split_spec(spec)
        split = split or spec_split
        p = Path(path)
        if p.is_dir():
            meta_path = p / "dataset.json"
            if not meta_path.exists():
                raise DatasetError(f"{p} is a folder without dataset.json (write shards with data/make_shards.py, "
                                   f"or pass a shard pattern like {p}/train-{{000000..000009}}.tar)")
            return _from_json(meta_path, split)
        if path.endswith(".json"):
            if not p.exists():
                raise DatasetError(f"dataset description not found: {p}")
            return _from_json(p, split)
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise DatasetError(f"dataset spec {spec!r} expands to no shards")
    local = [u for u in urls if not _is_url(u)]
    if local:
        missing = [u for u in local if not os.path.exists(u.removeprefix("file:"))]
        if len(urls) == 1 and missing:
            raise DatasetError(_not_found(missing[0]))
        if missing:
            globbed = next((m for m in missing if _GLOB.search(m)), None)
            if globbed:
                raise DatasetError(_not_found(globbed))
            raise DatasetError(f"{len(missing)} of {len(urls)} shard(s) not found: {', '.join(missing[:3])}"
                               + (", ..." if len(missing) > 3 else ""))
        if len(local) == len(urls):
            info = _sizes_from_neighbour_json(urls)
            if info is not None:
                return info
    return DatasetInfo(urls=list(urls))
