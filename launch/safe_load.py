"""Reading a run directory back without running code from it.

A checkpoint holds files that Accelerate and DeepSpeed write with `torch.save` (pickles) and read back themselves;
DeepSpeed reads its own with `weights_only=False`, which would run whatever code a planted file carries. So before
anything of a checkpoint is loaded, `unsafe_file(path)` reads every pickle-based file with torch's weights-only
unpickler (which builds only tensors, plain containers and the few classes allowed below, and calls nothing else),
memory-mapped so the tensors are not read: a file it refuses is named and the resume is refused. Tessera itself writes
only safetensors, JSON and YAML (read with `safetensors`, `json`, `yaml.safe_load`).

Allowed beyond torch's own weights-only set: what Accelerate's RNG state files hold (numpy arrays and dtypes, its
RNG encoding) and what DeepSpeed's ZeRO checkpoints hold (its loss-scaler state, ZeRO stage enum and fragment
addresses); none of these runs code when rebuilt.

PyTorch distributed checkpoints (DCP: FSDP2's model and optimizer folders, `.metadata` + `__R_0.distcp`) are
checked as DCP reads them: the `.metadata` file is a protocol-4 pickle that torch's weights-only unpickler cannot
read (it stops at the FRAME opcode), so it is read by a restricted `pickle.Unpickler` (the standard library's
"restricting globals" pattern, written by hand because neither torch nor DCP offers a safe reader) that builds only
DCP's own metadata records (`DCP_GLOBALS`: dataclasses of names, offsets, sizes and dtypes, an enum of memory
formats, `torch.Size`, dtypes, layouts by name, the checkpoint's path) and refuses any other global. Then every
non-tensor item of the `.distcp` files, which DCP itself unpickles with `weights_only=False`, is read with the
weights-only unpickler from its byte range; tensor items DCP already reads with `weights_only=True`.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import re
import sys
import warnings
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DATA_SUFFIXES = (".safetensors", ".json", ".jsonl", ".yaml", ".yml")  # read without pickle; never a pickle
ZIP_MAGIC = b"PK\x03\x04"


def _allowed_globals() -> list:
    """The classes and functions a checkpoint of Accelerate or DeepSpeed may name (imported only when installed)."""
    allowed: list = [argparse.Namespace]
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS

        allowed += list(TORCH_SAFE_GLOBALS)
    except ImportError:
        pass
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",))):
        mod = sys.modules.get(module)  # a DeepSpeed run has imported them; nothing is imported for the check
        allowed += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return allowed


def is_pickle_file(path: Path) -> bool:
    """A file torch.save wrote (zip) or any other pickle (by its name or its first bytes)."""
    if path.suffix in PICKLE_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or head[:1] == b"\x80"  # zip (torch.save) or a pickle protocol >= 2 header


DCP_METADATA = ".metadata"
DCP_SUFFIX = ".distcp"


def _dcp_globals() -> dict[tuple[str, str], object]:
    """The globals a DCP `.metadata` pickle may name: plain-data records (no code runs when they are rebuilt: the
    dataclasses get their fields set, the enum and `torch.Size` are built from integers, `_get_layout` looks a
    layout up by name, a path is built from strings)."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], object] = {}
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath, pathlib.Path):
        allowed[("pathlib", cls.__name__)] = cls
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


class _DcpMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, allowed):
        super().__init__(file)
        self.allowed = allowed

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not a DCP metadata record")
        return found


def read_dcp_metadata(path: Path):
    """The `Metadata` of a DCP folder's `.metadata` file, rebuilt without running code; raises
    `pickle.UnpicklingError` when the file names anything else (or is no pickle)."""
    with Path(path).open("rb") as fh:
        return _DcpMetadataUnpickler(fh, _dcp_globals()).load()


def _dcp_items(folder: Path):
    """(metadata, [(relative file, offset, length, is_bytes, transforms)]) of a DCP folder."""
    md = read_dcp_metadata(folder / DCP_METADATA)
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    bytes_fqns = {fqn for fqn, m in md.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    items = [(info.relative_path, int(info.offset), int(info.length), index.fqn in bytes_fqns,
              getattr(info, "transform_descriptors", None)) for index, info in (md.storage_data or {}).items()]
    return md, items


def unsafe_dcp(folder: Path) -> str | None:
    """Why the DCP checkpoint in `folder` cannot be loaded without running code, or None (see the module doc)."""
    try:
        _, items = _dcp_items(folder)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        return f"its {DCP_METADATA} calls {named.group(1)} when loaded" if named else None  # else damaged
    except (EOFError, ValueError, TypeError, AttributeError, OSError):
        return None  # damaged, not code: the checkpoint's own check (`dcp_problem`) says so and falls back
    for file, offset, length, is_bytes, transforms in items:
        if transforms:
            return f"{file} stores items through DCP storage transforms {transforms}, which Tessera does not check"
        if not is_bytes:
            continue
        try:
            with (folder / file).open("rb") as fh:
                fh.seek(offset)
                blob = fh.read(length)
            with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            return f"{file} holds an item that calls {named.group(1) if named else 'code'} when loaded"
        except (RuntimeError, EOFError, ValueError, OSError):
            continue  # damaged, not code (the checkpoint's own check reads the sizes)
    return None


def dcp_problem(folder: Path) -> str | None:
    """What is wrong with a DCP folder's files (missing, shorter than its metadata says), or None; headers only."""
    try:
        _, items = _dcp_items(folder)
    except Exception as exc:  # noqa: BLE001 - any failure to read the metadata is the problem named
        return f"{DCP_METADATA} is unreadable ({type(exc).__name__}: {str(exc).strip()[:160]})"
    for file, offset, length, _, _ in items:
        path = folder / file
        if not path.is_file():
            return f"{file} is missing (named by {DCP_METADATA})"
        if path.stat().st_size < offset + length:
            return f"{file} has {path.stat().st_size} bytes, {offset + length} expected (truncated)"
    return None


def unsafe_file(path: Path) -> str | None:
    """Why `path` cannot be read without running code, or None when it is plain data (or not a pickle at all). A
    pickle under the name of a data file (.safetensors, .json, .yaml) is refused too: something replaced the file. A
    distributed checkpoint's files are checked through its `.metadata` (`unsafe_dcp`)."""
    if path.name == DCP_METADATA:
        return unsafe_dcp(path.parent)
    if path.suffix == DCP_SUFFIX:  # read through its folder's .metadata (checked there; one missing is damage)
        return None
    if not is_pickle_file(path):
        return None
    with path.open("rb") as fh:
        head = fh.read(9)
    if path.suffix in DATA_SUFFIXES:
        # a safetensors file starts with its header's length (8 bytes, any value) and then "{"; a pickle with 0x80 and
        # its protocol (2 to 5)
        data = path.suffix == ".safetensors" and head[8:9] == b"{"
        if not data and head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return f"it is a pickle, not the {path.suffix} file that belongs there"
        return None
    mmap = head[:4] == ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols other than its own
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        return f"it is a pickle that calls {named.group(1) if named else 'code'} when loaded"
    except (RuntimeError, EOFError, ValueError, OSError):
        return None  # damaged (e.g. truncated), not code: the checkpoint's own check says so and falls back
    return None


__all__ = ["unsafe_file", "is_pickle_file", "PICKLE_SUFFIXES", "read_dcp_metadata", "unsafe_dcp", "dcp_problem",
           "DCP_METADATA", "DCP_SUFFIX"]
