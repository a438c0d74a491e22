"""Typed config loading: YAML differences, dotted overrides, type conversion, and errors that name key and file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from launch.config import (
    ConfigError,
    config_from_dict,
    describe,
    load_config,
    opt,
    parse_cli,
    save_config,
    section,
    to_dict,
)
from launch.sections import OptimConfig, RunConfig


@dataclass
class Inner:
    lr: float = opt(1e-3, "learning rate")
    steps: int = opt(10, "steps")
    betas: tuple[float, float] = opt((0.9, 0.95), "betas")
    names: tuple[str, ...] = opt(("a",), "names")
    clip: float | None = opt(None, "clip")
    mode: Literal["fast", "slow"] = opt("fast", "mode")
    flag: bool = opt(False, "flag")

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


@dataclass
class Outer:
    name: str = opt("run", "name")
    inner: Inner = section(Inner)


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_defaults_when_nothing_given():
    cfg = load_config(Outer, [])
    assert cfg == Outer()
    assert cfg.inner.betas == (0.9, 0.95)


def test_yaml_then_overrides_in_order(tmp_path):
    a = write(tmp_path, "a.yaml", {"name": "from_a", "inner": {"steps": 5, "lr": 0.5}})
    b = write(tmp_path, "b.yaml", {"inner": {"steps": 7}})
    cfg = load_config(Outer, [a, b, "inner.lr=0.25"])
    assert cfg.name == "from_a"  # a only
    assert cfg.inner.steps == 7  # b beats a
    assert cfg.inner.lr == 0.25  # command line beats both
    assert cfg.inner.mode == "fast"  # untouched default


def test_values_converted_by_field_type(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; the field type makes it a float.
    f = write(tmp_path, "c.yaml", "inner:\n  lr: 1e-3\n  steps: 1e3\n")
    cfg = load_config(Outer, [f, "inner.betas=0.8,0.99", "inner.names=[x, y]", "inner.flag=yes", "inner.clip=1"])
    assert isinstance(cfg.inner.lr, float) and cfg.inner.lr == 1e-3
    assert isinstance(cfg.inner.steps, int) and cfg.inner.steps == 1000
    assert cfg.inner.betas == (0.8, 0.99)
    assert cfg.inner.names == ("x", "y")
    assert cfg.inner.flag is True
    assert cfg.inner.clip == 1.0 and isinstance(cfg.inner.clip, float)
    assert load_config(Outer, ["inner.clip=none"]).inner.clip is None
    assert load_config(Outer, ["name=123"]).name == "123"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("inner.steps=1.5", "expected an integer"),
        ("inner.lr=fast", "expected a number"),
        ("inner.flag=maybe", "expected a boolean"),
        ("inner.mode=medium", "not one of"),
        ("inner.betas=0.9", "expected 2 values"),
        ("inner.steps=true", "expected an integer"),
    ],
)
def test_wrong_types_rejected_naming_key(override, needle):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [override])
    assert needle in str(err.value)
    assert f"'{key}'" in str(err.value)
    assert "command line" in str(err.value)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    f = write(tmp_path, "typo.yaml", {"inner": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [f])
    msg = str(err.value)
    assert "'inner.lrr'" in msg and f in msg and "inner.lr" in msg
    with pytest.raises(ConfigError, match="unknown config key 'nme'.*command line"):
        load_config(Outer, ["nme=x"])


def test_wrong_type_in_file_names_the_file(tmp_path):
    f = write(tmp_path, "bad.yaml", {"inner": {"steps": "many"}})
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [f])
    assert f in str(err.value) and "'inner.steps'" in str(err.value)


def test_section_given_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="is a section"):
        load_config(Outer, ["inner=3"])


@pytest.mark.parametrize("argv", [["inner.steps=7", "inner=5"], ["inner=5", "inner.steps=7"]])
def test_section_given_a_value_and_keys_is_one_error_in_either_order(argv):
    """`inner=5` must not silently discard `inner.steps=7` (nor be silently discarded by it)."""
    with pytest.raises(ConfigError) as err:
        load_config(Outer, argv)
    assert "'inner'" in str(err.value) and "sub-keys" in str(err.value) and "command line" in str(err.value)


def test_section_value_in_a_file_and_keys_on_the_command_line_name_both(tmp_path):
    f = write(tmp_path, "scalar.yaml", "inner: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [f, "inner.steps=7"])
    assert f in str(err.value) and "command line" in str(err.value)


def test_empty_section_in_a_later_file_keeps_earlier_keys(tmp_path):
    f = write(tmp_path, "empty_section.yaml", "inner:\n")
    assert load_config(Outer, ["inner.steps=7", f]).inner.steps == 7


def test_non_utf8_yaml_is_a_config_error_naming_file_and_byte(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [str(p)])
    assert str(p) in str(err.value) and "not UTF-8" in str(err.value) and "0xe9" in str(err.value)


def test_post_init_checks_become_config_errors(tmp_path):
    f = write(tmp_path, "neg.yaml", {"inner": {"steps": -1}})
    with pytest.raises(ConfigError) as err:
        load_config(Outer, [f])
    assert "steps must be >= 0" in str(err.value) and f in str(err.value)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, [str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="neither a YAML file"):
        load_config(Outer, ["just-a-word"])
    f = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, [f])
    f = write(tmp_path, "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, [f])


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(Outer, [write(tmp_path, "empty.yaml", "")]) == Outer()


def test_round_trip_through_saved_yaml_and_dict(tmp_path):
    cfg = load_config(Outer, ["inner.lr=0.2", "inner.betas=0.5,0.6", "inner.clip=3"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(Outer, [str(path)]) == cfg
    assert config_from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'inner.extra'"):
        config_from_dict(Outer, {"inner": {"extra": 1}}, source="checkpoint")


def test_mutable_defaults_are_not_shared():
    a, b = Outer(), Outer()
    assert a.inner is not b.inner


def test_describe_lists_every_leaf_key():
    lines = "\n".join(describe(Outer))
    for key in ("name", "inner.lr", "inner.betas", "inner.mode", "inner.flag"):
        assert f"  {key} (" in lines
    assert "learning rate" in lines


def test_parse_cli_exits_with_message(capsys):
    with pytest.raises(SystemExit) as err:
        parse_cli(Outer, ["inner.nope=1"], prog="prog")
    assert err.value.code == 2
    out = capsys.readouterr()
    assert out.err.startswith("prog: error: unknown config key 'inner.nope'") and out.err.count("\n") == 1
    with pytest.raises(SystemExit) as err:
        parse_cli(Outer, ["--help"], prog="prog")
    assert err.value.code == 0
    assert "inner.lr" in capsys.readouterr().out


def test_shared_sections_validate_and_scale_lr():
    assert OptimConfig().peak_lr(4096) == pytest.approx(1.5e-4 * 16)
    assert OptimConfig(lr=0.01).peak_lr(4096) == 0.01
    with pytest.raises(ValueError, match="grad_accum_steps"):
        OptimConfig(grad_accum_steps=0)
    with pytest.raises(ValueError, match="unknown trackers"):
        RunConfig(trackers=("tensorbored",))


@dataclass
class CustomDefault:
    inner: Inner = opt(Inner(lr=0.5, steps=3), "a section whose default is not the class default")


def test_section_instance_default_survives_partial_override():
    cfg = load_config(CustomDefault, ["inner.steps=4"])
    assert cfg.inner.steps == 4
    assert cfg.inner.lr == 0.5  # from the field's default instance, not Inner()'s 1e-3
    assert load_config(CustomDefault, []).inner == Inner(lr=0.5, steps=3)


# ------------------------------------------------------------------------ launch/errors.py: user errors at the CLI


def _cli_exit(capsys, exc, **env):
    import os

    from launch.errors import cli

    def main(argv=None):
        raise exc

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(SystemExit) as err:
            cli("prog", main)([])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = capsys.readouterr()
    return err.value.code, out.err


@pytest.mark.parametrize("exc,needle", [
    (ConfigError("config key 'x' is bad"), "config key 'x' is bad"),
    (FileNotFoundError(2, "No such file or directory", "/nope/s.tar"), "no such file or directory: /nope/s.tar"),
    (PermissionError(13, "Permission denied", "/ro/run"), "permission denied: /ro/run (choose a location you can"),
    (NotADirectoryError(20, "Not a directory", "/etc/hostname/run"), "not a directory: /etc/hostname/run"),
    (OSError(28, "No space left on device", "/runs/x/metrics.jsonl"), "the disk is full writing /runs/x/metrics"),
])
def test_cli_turns_user_errors_into_one_line_exit_2(capsys, exc, needle):
    code, err = _cli_exit(capsys, exc)
    assert code == 2 and err.startswith("prog: error: ") and needle in err and err.count("\n") == 1


def test_cli_names_dataset_and_custom_user_errors(capsys):
    from data.info import DatasetError
    from launch.errors import UserError

    assert _cli_exit(capsys, DatasetError("dataset not found: /d"))[1] == "prog: error: dataset not found: /d\n"

    class RunDirBusy(UserError):
        pass

    assert _cli_exit(capsys, RunDirBusy("in use by pid 7"))[1] == "prog: error: in use by pid 7\n"


def test_cli_keeps_bugs_and_exits_as_they_are(capsys):
    from launch.errors import cli

    def buggy(argv=None):
        return {}["missing"]

    with pytest.raises(KeyError):
        cli("prog", buggy)([])
    with pytest.raises(FileNotFoundError):  # no path named: not something the user can act on
        cli("prog", lambda argv=None: (_ for _ in ()).throw(FileNotFoundError("gone")))([])
    assert cli("prog")(lambda argv=None: 5)([]) == 5  # decorator form, return value passed through


def test_cli_prefixes_other_ranks(capsys):
    code, err = _cli_exit(capsys, ConfigError("bad"), RANK="1", WORLD_SIZE="2")
    assert code == 2 and err == "prog: error: [rank 1] bad\n"


def test_check_keywords_names_the_typo_and_the_valid_names():
    from launch.errors import UserError, check_keywords

    def build(depth=12, embed_dim=768, num_heads=12):
        return None

    check_keywords(build, {"depth": 2}, "model.overrides")
    with pytest.raises(UserError) as err:
        check_keywords(build, {"detph": 3}, "model.overrides")
    assert "'model.overrides.detph' (did you mean 'model.overrides.depth'?)" in str(err.value)
    assert "embed_dim" in str(err.value)
