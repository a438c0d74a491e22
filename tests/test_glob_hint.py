"""A shell glob in a dataset spec (issue 26 item 8b): it is not expanded, and when it names nothing the one-line
error says so and gives the brace pattern to write instead: the pattern of the shards the glob matches when they are
one numbered run (and that pattern then resolves to them), else the brace form."""

from __future__ import annotations

import subprocess

import pytest
from helpers_launch import ENTRY, PYTHON, ROOT, SAMPLE, env

from data.info import DatasetError, resolve


def test_pretraining_with_a_glob_names_the_brace_pattern(tmp_path):
    """`python pretrain/mae.py 'data.train=data/sample/train-*.tar.gz'`: exit 2, one line with the pattern to use,
    which then resolves to the sample's 4 train shards."""
    proc = subprocess.run([PYTHON, ENTRY, "data.train=data/sample/train-*.tar.gz", f"run.output_dir={tmp_path}/run",
                           "run.steps=1", "run.trackers=none", "run.progress=false"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("pretrain/mae.py: error: ")]
    assert "shell globs (*, ?, [...]) are not expanded" in line
    brace = "data/sample/train-{000000..000003}.tar.gz"
    assert f"brace pattern: {brace} (the 4 files the glob matches)" in line
    assert resolve(str(ROOT / brace)).num_samples == 4000


@pytest.mark.parametrize("names, glob, want", [
    (["s-000008.tar", "s-000009.tar", "s-000010.tar", "s-000011.tar"], "s-*.tar", "s-{000008..000011}.tar"),
    (["s-000003.tar"], "s-00000?.tar", "s-000003.tar"),
    (["s-000000.tar", "s-000002.tar"], "s-[0-9]*.tar", "e.g. s-{000000..000099}.tar (the glob matches 2 files"),
    ([], "none-*.tar", "e.g. none-{000000..000099}.tar"),
])
def test_the_hint_for_each_kind_of_match(tmp_path, names, glob, want):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        resolve(str(tmp_path / glob))
    message = str(err.value)
    assert message.startswith(f"dataset not found: {tmp_path / glob}; shell globs") and "\n" not in message
    assert want.replace("s-", f"{tmp_path}/s-").replace("none-", f"{tmp_path}/none-") in message


def test_a_spec_without_glob_characters_keeps_its_message():
    with pytest.raises(DatasetError) as err:
        resolve(f"{SAMPLE}/train-000009.tar.gz")
    assert str(err.value) == f"dataset not found: {SAMPLE}/train-000009.tar.gz"
