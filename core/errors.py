"""The two error bases of Tessera. Every package raises its own subclasses; `launch/errors.py` catches them by type.

* `UserError`: bad input or a bad environment the user can fix (a config key, a dataset spec, a weights file, a run
  directory, a resume that does not fit). The message is one line naming the key, file or path and the way out; the
  entry points print `prog: error: <message>` and exit with code 2, without a traceback.
* `RunError`: the run itself failed for a reason it can explain (e.g. a streak of non-finite losses); printed the
  same way, exit code 1.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input the user can fix; `str(exc)` is one line naming the key, file or path and what to do."""


class RunError(Exception):
    """The run failed for a reason the message explains (exit code 1, no traceback)."""


class ConfigError(UserError, ValueError):
    """A configuration problem: the message names the key and where it came from (file or command line)."""


class WeightsError(UserError):
    """Weights that cannot be used: the message names the file or run directory and what was expected."""


__all__ = ["UserError", "RunError", "ConfigError", "WeightsError"]
