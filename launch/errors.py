"""User errors at the entry points: one line `prog: error: <message>` on stderr and exit code 2, no traceback.

    from launch.errors import cli

    if __name__ == "__main__":
        cli("pretrain/mae.py", main)()          # or: main = cli("pretrain/mae.py")(main)

User errors are the subclasses of `core.errors.UserError` (a config key, a dataset, weights, a run directory, a
resume that does not fit), plus a `FileNotFoundError`, `PermissionError`, `IsADirectoryError` or `NotADirectoryError`
that names its path, and a full disk (`ENOSPC`, `EDQUOT`): one line, exit code 2. A `core.errors.RunError` (the run
failed for a reason it explains, e.g. a streak of non-finite losses) is printed the same way with exit code 1.
Anything else is a bug and keeps its traceback. Under a launcher with several processes, ranks other than 0 prefix
their line with `[rank N]`, so a rank-specific problem (a shard only one rank reads) still shows.
"""

from __future__ import annotations

import difflib
import errno
import functools
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from core.errors import RunError, UserError

EXIT_USER_ERROR = 2  # argparse's convention for usage errors
EXIT_RUN_ERROR = 1
_PATH_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def user_message(exc: BaseException) -> str | None:
    """The one-line message for a user error or a run error, or None when `exc` is a bug (keep the traceback)."""
    if isinstance(exc, (UserError, RunError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"the disk is full{where} ({os.strerror(exc.errno)}): free space or choose another location"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP and exc.filename:
        return f"a symlink loop: {exc.filename} ({os.strerror(exc.errno)}); remove the loop or choose another path"
    if isinstance(exc, _PATH_ERRORS) and exc.filename:
        kind = next(t for t in _PATH_ERRORS if isinstance(exc, t))
        return f"{_PATH_WHAT[kind]}: {exc.filename}{_PATH_HINT.get(kind, '')}"
    return None


_PATH_WHAT = {FileNotFoundError: "no such file or directory", PermissionError: "permission denied",
              IsADirectoryError: "is a directory, not a file",
              NotADirectoryError: "a part of the path is not a directory"}
_PATH_HINT = {PermissionError: " (choose a location you can write, e.g. another run.output_dir)"}


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "", "0") and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def report(prog: str, message: str) -> None:
    """Print `prog: error: message` on stderr (every line of a multi-line message is kept)."""
    print(f"{prog}: error: {_rank_prefix()}{message}", file=sys.stderr, flush=True)


def cli(prog: str, main: Callable | None = None) -> Callable:
    """Wrap an entry point's `main(argv=None)`: user errors -> `prog: error: ...` on stderr, exit code 2.

    `cli(prog, main)` returns the wrapped function; `cli(prog)` is a decorator. The wrapper passes its arguments and
    return value through; `SystemExit` (e.g. `--help`) and bugs propagate unchanged.
    """
    if main is None:
        return functools.partial(cli, prog)

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
            message = user_message(exc)
            if message is None:
                raise
            report(prog, message)
            raise SystemExit(EXIT_RUN_ERROR if isinstance(exc, RunError) else EXIT_USER_ERROR) from None

    return wrapped


def check_keywords(target: Callable | type, given: Mapping[str, Any] | Iterable[str], key: str) -> None:
    """Raise a UserError naming `key.<name>` (with the closest valid name) for every name of `given` that `target`
    does not accept as a keyword argument. For free-form config keys passed on as `**kwargs`, e.g.
    `check_keywords(MaskedAutoencoder, cfg.model.overrides, "model.overrides")` before `create_mae(**overrides)`."""
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    bad = [n for n in given if n not in valid]
    if not bad:
        return
    parts = []
    for name in bad:
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"'{key}.{name}'" + (f" (did you mean '{key}.{close[0]}'?)" if close else ""))
    raise UserError(f"unknown config key {', '.join(parts)}; valid names under {key}: {', '.join(valid)}")


__all__ = ["UserError", "RunError", "EXIT_USER_ERROR", "EXIT_RUN_ERROR", "cli", "check_keywords", "report",
           "user_message"]
