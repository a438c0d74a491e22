"""Where the launcher's DeepSpeed JSON is found (issue 26 item 9, `launch.accel.resolve_deepspeed_config_file`): as
given when it exists there (the current directory first), else relative to the repository; anything else is one
UserError line naming the file. The launches themselves run in tests/test_launch_files.py."""

from __future__ import annotations

import pytest

from core.errors import UserError
from launch.accel import REPO, resolve_deepspeed_config_file

SHIPPED = "launch/deepspeed/zero2.json"


def _env(value: str) -> dict:
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": value}


def test_a_relative_path_is_looked_up_here_then_in_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = _env(SHIPPED)
    assert resolve_deepspeed_config_file(environ) == REPO / SHIPPED
    assert environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(REPO / SHIPPED)  # what Accelerate then reads
    (tmp_path / "launch" / "deepspeed").mkdir(parents=True)
    (tmp_path / SHIPPED).write_text('{"zero_optimization": {"stage": 2}}')  # the user's own, same relative name
    assert resolve_deepspeed_config_file(environ := _env(SHIPPED)) == tmp_path / SHIPPED
    assert environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(tmp_path / SHIPPED)


def test_a_file_in_neither_place_or_not_json_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("my_ds.json", str(tmp_path / "absent.json")):
        with pytest.raises(UserError) as err:
            resolve_deepspeed_config_file(_env(value))
        assert value in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json cannot be read as JSON"):
        resolve_deepspeed_config_file(_env("bad.json"))


def test_nothing_to_resolve_without_deepspeed_or_a_file():
    assert resolve_deepspeed_config_file({}) is None
    assert resolve_deepspeed_config_file({"ACCELERATE_USE_DEEPSPEED": "true"}) is None
    assert resolve_deepspeed_config_file({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "x.json"}) is None
