"""One line where a traceback used to be (issue 26 items 7 and 8): a run directory through a symlink loop, a typo in
`model.name`, an empty `run.output_dir=`, and `models/convert.py` refusing a file it cannot read or write. Each is
run as the user runs it (the documented command plus the offending value) and must print one `prog: error:` line
naming the key or file, exit 2, and write nothing."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers_launch import ENTRY, PYTHON, ROOT, env

from models.convert import main as convert_main

CONVERT = str(ROOT / "models" / "convert.py")


def _one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _pretrain(cwd, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, ENTRY, *overrides, "run.steps=1", "run.trackers=none", "run.progress=false"],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def test_output_dir_through_a_symlink_loop(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    line = _one_error_line(_pretrain(tmp_path, f"run.output_dir={tmp_path / 'a' / 'run'}"), "pretrain/mae.py")
    assert f"run.output_dir {tmp_path / 'a' / 'run'} passes through a symlink loop" in line


def test_empty_output_dir_is_refused_and_nothing_is_written(tmp_path):
    line = _one_error_line(_pretrain(tmp_path, "run.output_dir="), "pretrain/mae.py")
    assert "run.output_dir is empty" in line and "run.output_dir=runs/my_run" in line
    assert list(tmp_path.iterdir()) == []


def test_model_name_typo_names_the_closest_variant(tmp_path):
    line = _one_error_line(_pretrain(tmp_path, "model.name=mae_vit_tiny_patch4_dec128d3b",
                                     f"run.output_dir={tmp_path / 'run'}"), "pretrain/mae.py")
    assert "model.name=mae_vit_tiny_patch4_dec128d3b is no MAE variant" in line
    assert "did you mean mae_vit_tiny_patch4_dec128d2b" in line
    assert not (tmp_path / "run").exists()


def test_convert_refuses_an_unreadable_file_in_one_line(tmp_path):
    """As a script: a file that is no checkpoint at all (torch's reader fails with a KeyError on it)."""
    junk = tmp_path / "mae_pretrain_vit_base_full.pth"
    junk.write_text("hello")
    proc = subprocess.run([PYTHON, CONVERT, "--input", str(junk), "--output", str(tmp_path / "encoder.safetensors")],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    line = _one_error_line(proc, "models/convert.py")
    assert f"cannot convert {junk}: " in line and not (tmp_path / "encoder.safetensors").exists()


@pytest.mark.parametrize("case", ["missing", "not_a_state_dict", "unknown_layout", "truncated_safetensors",
                                  "output_under_a_file"])
def test_convert_names_the_file_it_refuses(tmp_path, capsys, case):
    good = tmp_path / "good.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.norm1.weight": torch.ones(8)}}, good)
    src, out, named = {
        "missing": (tmp_path / "nothere.pth", tmp_path / "e.safetensors", tmp_path / "nothere.pth"),
        "not_a_state_dict": (tmp_path / "list.pth", tmp_path / "e.safetensors", tmp_path / "list.pth"),
        "unknown_layout": (tmp_path / "odd.pth", tmp_path / "e.safetensors", tmp_path / "odd.pth"),
        "truncated_safetensors": (tmp_path / "cut.safetensors", tmp_path / "e.safetensors",
                                  tmp_path / "cut.safetensors"),
        "output_under_a_file": (good, good / "e.safetensors", good / "e.safetensors"),
    }[case]
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"x": torch.zeros(2)}, tmp_path / "odd.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(SystemExit) as stop:
        convert_main(["--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("models/convert.py: error: ") and str(named) in err[0], err[0]


def test_any_symlink_loop_an_entry_point_meets_is_a_user_error():
    """Beyond run.output_dir (checked with the config): an ELOOP naming its path is one line, like a missing file."""
    import errno
    import os

    from launch.errors import user_message

    message = user_message(OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/data/loop/train"))
    assert message is not None and message.startswith("a symlink loop: /data/loop/train")
