"""The k-NN curve picture: a valid 900 x 540 PNG from metrics records (several points, one point, with and without
baselines, from a run directory), the baselines drawn where given, and a one-line error without knn records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pictures.knn_curve import (
    NoKnnRecords,
    baselines_in,
    knn_figure,
    knn_points,
    run_baselines,
    save_knn_curve,
    save_knn_curve_of_run,
)

RECORDS = [{"step": 0, "knn_top1_init": 0.281, "knn_top1_pixels": 0.312},
           {"step": 10, "loss": 1.2}, {"step": 120, "loss": 0.8, "knn_top1": 0.31},
           {"step": 240, "loss": 0.7, "knn_top1": 0.342}, {"step": 250, "knn_top1": None}]


def read_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_curve_png_is_written_at_the_expected_size(tmp_path):
    path = save_knn_curve(RECORDS, tmp_path / "sub" / "knn.png")
    assert path == tmp_path / "sub" / "knn.png"
    assert read_png(path).shape == (540, 900, 3)


def test_the_points_and_the_baselines_drawn():
    assert knn_points(RECORDS) == [(120, 0.31), (240, 0.342)]  # null values and records without knn are skipped
    assert baselines_in(RECORDS) == {"knn_top1_init": 0.281, "knn_top1_pixels": 0.312}
    ax = knn_figure(RECORDS).axes[0]
    curve, *hlines = ax.get_lines()
    assert list(curve.get_xdata()) == [120, 240] and list(curve.get_ydata()) == [0.31, 0.342]
    assert curve.get_marker() == "o"
    assert sorted(line.get_ydata()[0] for line in hlines) == [0.281, 0.312]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["knn_top1 (the run)", "encoder at init: 0.281", "raw pixels (8x8 average-pooled): 0.312"]
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def test_one_point_and_missing_baselines(tmp_path):
    one = [{"step": 240, "knn_top1": 0.3}]
    ax = knn_figure(one).axes[0]
    assert len(ax.get_lines()) == 1  # the run's single marker, no baseline lines
    ax = knn_figure(one, {"knn_top1_init": 0.25, "knn_top1_pixels": None}).axes[0]
    assert [line.get_ydata()[0] for line in ax.get_lines()[1:]] == [0.25]
    assert read_png(save_knn_curve(one, tmp_path / "one.png")).shape == (540, 900, 3)


def test_no_knn_records_is_a_one_line_user_error(tmp_path):
    from launch.errors import UserError

    with pytest.raises(NoKnnRecords, match="no knn_top1") as info:
        save_knn_curve([{"step": 1, "loss": 0.5}], tmp_path / "x.png")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    with pytest.raises(NoKnnRecords, match="metrics.jsonl hold no knn_top1"):
        save_knn_curve_of_run(tmp_path)


def test_run_directory_reads_metrics_and_the_baselines_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[1:]))  # no step-0 record
    (tmp_path / "knn_baselines.json").write_text(json.dumps({"knn_top1_init": 0.2, "knn_top1_pixels": None}))
    path = save_knn_curve_of_run(tmp_path)
    assert path == tmp_path / "knn_curve.png" and read_png(path).shape == (540, 900, 3)
    assert run_baselines(tmp_path, RECORDS[1:]) == {"knn_top1_init": 0.2}
    # the file's values win over the logged ones; a value the file lacks comes from the records
    assert run_baselines(tmp_path, RECORDS) == {"knn_top1_init": 0.2, "knn_top1_pixels": 0.312}
