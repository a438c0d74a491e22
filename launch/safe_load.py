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
"""

from __future__ import annotations

import argparse
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


def unsafe_file(path: Path) -> str | None:
    """Why `path` cannot be read without running code, or None when it is plain data (or not a pickle at all). A
    pickle under the name of a data file (.safetensors, .json, .yaml) is refused too: something replaced the file."""
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


__all__ = ["unsafe_file", "is_pickle_file", "PICKLE_SUFFIXES"]
