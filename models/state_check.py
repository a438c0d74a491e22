"""Compare a state dict with a model and fail with a message that names every disagreeing key and shape."""

import torch
import torch.nn as nn

from core.errors import UserError

_SHOW = 20  # entries listed per category before "... and N more"


class CheckpointMismatch(UserError, ValueError):
    """A state dict does not fit a model. `.missing`, `.unexpected`, `.mismatched` hold the details."""

    def __init__(self, model_name: str, missing: dict, unexpected: dict, mismatched: dict):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if mismatched:
            lines = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in mismatched.items()]
            parts.append(_section(f"{len(mismatched)} shape mismatch(es)", lines))
        if missing:
            parts.append(_section(f"{len(missing)} missing key(s)", [f"{k} {list(s)}" for k, s in missing.items()]))
        if unexpected:
            parts.append(_section(f"{len(unexpected)} unexpected key(s)",
                                  [f"{k} {list(s)}" for k, s in unexpected.items()]))
        super().__init__(f"checkpoint does not fit {model_name}:\n" + "\n".join(parts))


def _section(title: str, lines: list[str]) -> str:
    shown = lines[:_SHOW] + ([f"... and {len(lines) - _SHOW} more"] if len(lines) > _SHOW else [])
    return f"  {title}:\n" + "\n".join(f"    {line}" for line in shown)


def _matches(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") or (p.endswith("*") and key.startswith(p[:-1])) for p in prefixes)


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], allow_missing=(), ignore_unexpected=()) -> dict:
    """Raise CheckpointMismatch unless `sd` fits `model` exactly (up to the allowed prefixes).

    allow_missing / ignore_unexpected: key prefixes (module names such as "head", or "decoder*" for a glob).
    Returns {"missing": [...allowed missing keys], "ignored": [...ignored unexpected keys]}.
    """
    own = model.state_dict()
    missing = {k: tuple(v.shape) for k, v in own.items() if k not in sd and not _matches(k, allow_missing)}
    unexpected = {k: tuple(v.shape) for k, v in sd.items() if k not in own and not _matches(k, ignore_unexpected)}
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)}
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(type(model).__name__, missing, unexpected, mismatched)
    return {"missing": sorted(k for k in own if k not in sd), "ignored": sorted(k for k in sd if k not in own)}
