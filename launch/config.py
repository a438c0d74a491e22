"""Typed configuration: dataclasses with defaults, YAML files holding only the differences, `key=value` overrides.

    cfg = load_config(PretrainConfig, ["pretrain/configs/cifar10.yaml", "optim.blr=1e-3", "model.name=mae_vit_tiny"])

* Every section is a dataclass; fields carry a help text (`opt(default, "help")`) and checks live in `__post_init__`.
* YAML files and overrides are merged in order (later wins). Dotted keys reach nested sections.
* Values are converted by the field's declared type, so `1e-3` is a float even though YAML reads it as a string,
  `steps=1e5` is the int 100000, `betas=0.9,0.95` is a tuple. Unknown keys and values that do not fit the type
  are a `ConfigError` naming the key and the file (or "command line") it came from, with a close match if any.
* A top-level config may map old spellings to their keys (`RENAMED = {"data.path": "data.train and data.test"}`):
  an old key is refused with a message naming the new one.
* A section (or the top level) may say which of its keys do not apply given the others (`def inapplicable(self) ->
  {field: why}`, e.g. `optim.betas` when `optim.name=lars`): such a key, given on the command line, is refused in one
  line (a YAML file's keys are a recipe's, written for a family of runs, and may not all apply to each).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from core.errors import ConfigError

T = TypeVar("T")
COMMAND_LINE = "command line"


def opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def section(cls: type, help: str = "", **defaults: Any) -> Any:
    """A nested dataclass field whose default is `cls(**defaults)`: a shared section with other defaults, no subclass.

        run: RunConfig = section(RunConfig, "how the run runs", output_dir="runs/pretrain", steps=240)
    """
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"section({cls.__name__}): unknown fields {sorted(unknown)}")
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"help": help})


# ----------------------------------------------------------------------------------------------- conversion


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _parse_scalar_text(text: str) -> Any:
    """Read one command-line value the way YAML would (`[1, 2]`, `null`, `true`), falling back to the raw text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    def fail(why: str) -> ConfigError:
        return ConfigError(f"config key '{key}' (from {source}): {why}")

    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            return None
        return _coerce(value, inner, key, source)
    tp = inner
    origin = get_origin(tp)

    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value not in choices:
            parsed = _parse_scalar_text(value)
            value = parsed if parsed in choices else value
        if value not in choices:
            raise fail(f"{value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail(f"expected a boolean (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise fail(f"expected an integer, got the boolean {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value) if isinstance(value, (str, float)) else None
        except ValueError:
            number = None
        if number is None or not number.is_integer():
            raise fail(f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise fail(f"expected a number, got the boolean {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise fail(f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            parsed = _parse_scalar_text(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail(f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    raise fail(f"unsupported field type {tp!r}")


# ----------------------------------------------------------------------------------------------- building


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(key: str, cls: type, source: str, prefix: str) -> ConfigError:
    names = [prefix + n for n in _field_names(cls)]
    close = difflib.get_close_matches(prefix + key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{key}' (from {source}){hint}")


def _section_default(cls: type, name: str) -> Any:
    """The default instance of a nested section field (its factory's product), so overrides start from it."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type[T], values: Mapping[str, Any], sources: Mapping[str, str], prefix: str = "",
           base: Any = None) -> T:
    """`cls(**values)` with conversion; fields not given keep `base`'s values (or the class defaults)."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init}
    # `EXCLUSIVE` names groups of keys that say one thing two ways (micro vs global batch): giving one key of a group
    # clears the others' defaults, giving two is an error.
    for group in getattr(cls, "EXCLUSIVE", ()):
        given = [k for k in group if k in values]
        if len(given) > 1:
            keys = " and ".join(prefix + k for k in given)
            where = ", ".join(sorted({sources.get(prefix + k, COMMAND_LINE) for k in given}))
            raise ConfigError(f"config keys {keys} (from {where}) say the same thing two ways: give only one")
        if given:
            kwargs.update({k: None for k in group if k not in given})
    for name, value in values.items():
        key = prefix + name
        source = sources.get(key, sources.get(prefix.rstrip("."), COMMAND_LINE))
        if name not in hints or name not in _field_names(cls):
            raise _unknown(name, cls, source, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{key}' (from {source}): is a section; give its keys, "
                                  f"e.g. {key}.<name>=...")
            nested_base = getattr(base, name) if base is not None else _section_default(cls, name)
            kwargs[name] = _build(tp, value, sources, key + ".", base=nested_base)
        else:
            kwargs[name] = _coerce(value, tp, key, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        where = sorted({sources[k] for k in sources if k.startswith(prefix)} or {"defaults"})
        section_name = prefix.rstrip(".") or cls.__name__
        raise ConfigError(f"invalid config section '{section_name}' (from {', '.join(where)}): {exc}") from None


def _merge(dst: dict, src: Mapping, sources: dict, source: str, prefix: str = "") -> None:
    """Merge `src` into `dst` (later wins), recording each dotted key's source. A key given both as a section (with
    sub-keys) and as a plain value is an error naming both sources: neither may silently discard the other (`run=5`
    after `run.steps=7`, or before it). An empty YAML section (`run:` with nothing under it) changes nothing."""
    for k, v in src.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key {k!r} (from {source}) must be a string")
        key = prefix + k
        old = dst.get(k)
        if isinstance(v, Mapping):
            if k in dst and old is not None and not isinstance(old, dict):
                raise _section_and_value(key, value=old, value_source=sources.get(key, source),
                                         section_source=source)
            node = dst.setdefault(k, {})
            if not isinstance(node, dict):
                node = dst[k] = {}
            sources.setdefault(key, source)
            _merge(node, v, sources, source, key + ".")
        elif isinstance(old, dict):
            if v is None:
                continue
            raise _section_and_value(key, value=v, value_source=source, section_source=sources.get(key, source))
        else:
            dst[k] = v
            sources[key] = source


def _section_and_value(key: str, *, value: Any, value_source: str, section_source: str) -> ConfigError:
    where = value_source if value_source == section_source else f"{value_source} and {section_source}"
    return ConfigError(f"config key '{key}' (from {where}) is given both a value ({value!r}) and sub-keys "
                       f"({key}.<name>=...); give only its keys, e.g. {key}.<name>=...")


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start} cannot be decoded); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _given_leaves(merged: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys of the values given (YAML files and overrides), sections excluded."""
    out = []
    for k, v in merged.items():
        if isinstance(v, Mapping) and v:
            out.extend(_given_leaves(v, f"{prefix}{k}."))
        else:
            out.append(prefix + k)
    return out


def _refuse_renamed(cls: type, given: list[str], sources: Mapping[str, str]) -> None:
    renamed = getattr(cls, "RENAMED", {})
    for key in given:
        if key in renamed:
            raise ConfigError(f"config key '{key}' (from {sources.get(key, COMMAND_LINE)}) is an old spelling: use "
                              f"{renamed[key]}")


def _inapplicable(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Dotted key -> why it does not apply, from every section's `inapplicable()`."""
    out = {}
    if hasattr(cfg, "inapplicable"):
        out.update({prefix + k: why for k, why in cfg.inapplicable().items()})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_inapplicable(value, f"{prefix}{f.name}."))
    return out


def _refuse_inapplicable(cfg: Any, given: list[str], sources: Mapping[str, str]) -> None:
    """Refuse the keys given on the command line that do not apply; a YAML file's keys are a recipe's (written for a
    family of runs: `data.shuffle_buffer` of a streaming recipe stays harmless under `data.loader=synthetic`)."""
    rules = _inapplicable(cfg)
    for key in given:
        if key in rules and sources.get(key, COMMAND_LINE) == COMMAND_LINE:
            raise ConfigError(f"config key '{key}' (from {sources.get(key, COMMAND_LINE)}) does not apply here: "
                              f"{rules[key]}")


def _merge_argv(argv: Sequence[str]) -> tuple[dict, dict[str, str]]:
    """The nested values of `argv`'s YAML files and `key=value` overrides, merged in order, and each key's source."""
    merged: dict = {}
    sources: dict[str, str] = {}
    for arg in argv:
        if "=" in arg and not arg.endswith((".yaml", ".yml")):
            key, _, text = arg.partition("=")
            key = key.strip().lstrip("-")
            if not key:
                raise ConfigError(f"override {arg!r} has no key")
            _merge(merged, _nest(key, text), sources, COMMAND_LINE)
        elif arg.endswith((".yaml", ".yml")):
            _merge(merged, read_yaml(arg), sources, str(arg))
        else:
            raise ConfigError(f"argument {arg!r} is neither a YAML file (.yaml) nor a key=value override")
    return merged, sources


def load_config(cls: type[T], argv: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then each YAML file and `key=value` override of `argv` in order. Old spellings and keys
    that do not apply to the resulting run are refused."""
    merged, sources = _merge_argv(argv)
    given = _given_leaves(merged)
    _refuse_renamed(cls, given, sources)
    cfg = _build(cls, merged, sources)
    _refuse_inapplicable(cfg, given, sources)
    return cfg


def applicable_values(cls: type, argv: Sequence[str]) -> dict:
    """The nested values `argv` gives, less the keys that do not apply to the config they make (e.g. data.pin_memory
    once data.loader=synthetic): the same run, which `load_config` accepts when written as one YAML file. For tools
    that add overrides to a user's command (the planner, `launch/plan.py`)."""
    merged, sources = _merge_argv(argv)
    rules = _inapplicable(_build(cls, merged, sources))
    for key in _given_leaves(merged):
        if key in rules:
            *path, leaf = key.split(".")
            node = merged
            for part in path:
                node = node[part]
            del node[leaf]
    return merged


def config_from_dict(cls: type[T], values: Mapping[str, Any], source: str = "dict") -> T:
    """Rebuild a config from `to_dict` output (e.g. the copy stored in a checkpoint); strict like `load_config`."""
    merged: dict = {}
    sources: dict[str, str] = {}
    _merge(merged, values, sources, source)
    return _build(cls, merged, sources)


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config (tuples become lists), ready for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: `name (type) = default  help`; what `--help` prints."""
    lines = []
    hints = get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix + f.name + "."))
            continue
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(f"  {prefix}{f.name} ({tname}) = {getattr(default, f.name)!r}  {f.metadata.get('help', '')}")
    return lines


def parse_cli(cls: type[T], argv: Sequence[str] | None, prog: str) -> T:
    """`load_config` for an entry point: `--help` lists every key; `--plan` (and its `--plan-*` options) predicts the
    run's speed, time and memory instead of running it (launch/plan.py); a config error prints `prog: error:
    <message>` on stderr and exits with code 2 (argparse's convention), no traceback."""
    import sys

    from launch.errors import EXIT_USER_ERROR, report

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--plan" or a.startswith("--plan-") for a in argv):  # predict the run instead (launch/plan.py)
        from launch.plan import plan_cli

        raise SystemExit(plan_cli(cls, argv, prog))
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [CONFIG.yaml ...] [key=value ...]\n\nkeys:")
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    try:
        return load_config(cls, argv)
    except ConfigError as exc:
        report(prog, str(exc))
        raise SystemExit(EXIT_USER_ERROR) from None


__all__ = [
    "ConfigError",
    "opt",
    "section",
    "load_config",
    "applicable_values",
    "config_from_dict",
    "to_dict",
    "save_config",
    "read_yaml",
    "describe",
    "parse_cli",
]
