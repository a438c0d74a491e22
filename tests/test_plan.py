"""`--plan` (launch/plan.py): the arithmetic against hand computations, the plan's JSON schema through the real entry
points, its options and errors, and the loop's records it reads (hook_sec; hooks left out of the windows)."""

from __future__ import annotations

import json

import pytest
from conftest import DOWNSTREAM
from helpers_launch import tiny_args

from launch import plan_math as pm
from launch.plan_measure import FIT_SHARE, largest_micro_batch, window_stats
from launch.plan_report import check_plan

QUICK = ["--plan-steps", "5", "--plan-loader-sec", "0.2"]  # size options: one timed window, a short loader stretch
SMALL_KNN = ["knn.bank_size=40", "knn.query_size=20"]


# ------------------------------------------------------------------------------------------ arithmetic by hand


def test_bound_with_workers_is_the_slower_side_and_predicts_data_wait():
    # step 100 img/s with 10% of its window counted as wait, loader 50 img/s: per 100 images the workers take 2 s,
    # the main process computes 0.9 s and waits 1.1 s -> 55% of the window
    b = pm.bound(100.0, 50.0, workers=2, host_wait=0.1)
    assert (b.by, b.images_per_sec, b.loader_over_step) == ("loader", 50.0, 0.5)
    assert b.data_wait == pytest.approx(0.55)
    b = pm.bound(100.0, 300.0, workers=2, host_wait=0.1)
    assert (b.by, b.images_per_sec, b.data_wait) == ("step", 100.0, 0.1)


def test_bound_without_workers_adds_the_loader_to_the_step():
    # 0.01 s of step + 0.0025 s of loading per image in one process: 80 img/s, 20% of the time in next(batches)
    b = pm.bound(100.0, 400.0, workers=0)
    assert b.images_per_sec == pytest.approx(80.0)
    assert b.data_wait == pytest.approx(0.2)
    assert b.by == "step"
    assert pm.bound(100.0, 50.0, workers=0).by == "loader"


def test_cadence_counts():
    assert pm.count_evaluations(240, 120) == 1  # step 120; step 240 is the run's end
    assert pm.count_evaluations(241, 120) == 2
    assert pm.count_evaluations(240, 0) == 0
    assert pm.count_saves(240, 120) == 2  # 120, 240
    assert pm.count_saves(250, 120) == 3  # 120, 240, and the last step
    assert pm.count_saves(240, 0) == 1  # only at the end
    assert pm.epochs(240, 64, 4000) == pytest.approx(3.84)
    assert pm.epochs(240, 64, None) is None


def test_loader_cores_beside_the_step():
    assert pm.loader_in_run(1000.0, workers=2, cores=2, step_threads=1) == 1000.0  # one core left
    assert pm.loader_in_run(1000.0, workers=4, cores=16, step_threads=1) == 4000.0  # one core per worker
    assert pm.loader_in_run(1000.0, workers=2, cores=2, step_threads=2) == 1000.0  # at least one core
    assert pm.cores_to_balance(100.0, 30.0) == 4


def test_wall_clock_sums_its_parts():
    w = pm.WallClock(start_sec=10, steps_sec=150, warmup_sec=2, evaluations=1, evaluation_sec=12, end_hooks_sec=11,
                     saves=2, save_sec=0.5, end_sec=1)
    assert w.total_sec == pytest.approx(10 + 150 + 2 + 12 + 11 + 1 + 1)
    assert pm.steps_seconds(240, 64, 128.0) == pytest.approx(120.0)


def test_target_from_flops_hand_computed():
    # MAE ViT-B/16: 58.69 GFLOP per training image; 30% of an H100's 989 TFLOP/s bf16 -> 5,055 img/s per GPU
    per_gpu = pm.step_from_flops(58.69e9, 989.0, 0.30)
    assert per_gpu == pytest.approx(0.30 * 989e12 / 58.69e9)
    assert per_gpu == pytest.approx(5055.4, rel=1e-4)
    # 8 GPUs: 40,443 img/s of step; 300 img/s per core x 14 cores x 8 = 33,600 img/s of loader: the loader bounds
    t = pm.Target("H100", 8, per_gpu, loader_cores=14, per_core=300.0)
    # 360 s of evaluations measured here at 336 img/s take a hundredth of that at 33,600 img/s
    out = pm.target_time(t, steps=1000, global_batch=4096, evaluation_sec=360.0, here_rate=336.0, price=2.5)
    assert out["bound"] == "loader" and out["images_per_sec"] == pytest.approx(33600.0)
    hours = (1000 * 4096 / 33600 + 3.6) / 3600  # 121.9 s of steps + 3.6 s of evaluations
    assert out["hours"] == pytest.approx(hours)
    assert out["device_hours"] == pytest.approx(8 * hours)
    assert out["cost"] == pytest.approx(2.5 * 8 * hours)
    assert pm.target_time(t, steps=10, global_batch=8, evaluation_sec=0.0, here_rate=1.0, price=None)["cost"] is None


def test_window_stats_by_hand():
    # windows of 5 steps x 8 images: 40 images in 2 s (warm-up), 1 s, 0.5 s; hooks logged at steps 10 and 15
    records = [{"step": 5, "images_per_sec": 20.0, "data_wait": 0.5, "hook_sec": 0.0},
               {"step": 10, "images_per_sec": 40.0, "data_wait": 0.2, "hook_sec": 3.0},
               {"step": 10, "test_top1": 50.0},
               {"step": 15, "images_per_sec": 80.0, "data_wait": 0.5, "hook_sec": 1.5}]
    ws = window_stats(records, global_batch=8)
    assert ws.images_per_sec == pytest.approx(80 / 1.5)  # 10 timed steps x 8 images in 1.5 s
    assert ws.step_sec == pytest.approx(0.15)
    assert ws.host_wait == pytest.approx((0.2 * 1 + 0.5 * 0.5) / 1.5)
    assert ws.warmup_extra_sec == pytest.approx(2 - 40 / (80 / 1.5))  # 2 s against 0.75 s at the steady rate
    assert ws.loop_sec == pytest.approx(3.5)
    assert ws.hook_sec == {5: 0.0, 10: 3.0, 15: 1.5}


def test_largest_micro_batch_search_and_extrapolation():
    budget = 1000

    def gpu(m):  # 100 + 10 per image; out of memory past the budget
        peak = 100 + 10 * m
        return peak if peak <= budget else None

    found = largest_micro_batch(gpu, start=8, budget=budget, device_type="cuda")
    # fits up to 85 (peak 950 = 95% of the budget): 8, 16, 32, 64 fit, 128 does not; bisection 96 no, 80 yes, 88 no
    assert found.method == "search" and found.micro_batch == 80
    assert [m for m, _ in found.probes] == [8, 16, 32, 64, 128, 96, 80, 88]
    assert largest_micro_batch(gpu, start=128, budget=budget, device_type="cuda").micro_batch == 80
    cpu = largest_micro_batch(lambda m: 100 + 10 * m, start=8, budget=budget, device_type="cpu")
    assert cpu.method == "extrapolated"
    assert cpu.micro_batch == int((FIT_SHARE * budget - 180) / 10) + 8  # the line through (8, 180) and (16, 260)


# ------------------------------------------------------------------------------------------ through the entry points


def read_plan(path) -> dict:
    plan = json.loads(path.read_text())
    assert check_plan(plan) == []
    return plan


def test_pretraining_plan_schema_and_figures(tmp_path, capsys):
    from pretrain import mae

    out = tmp_path / "plan.json"
    args = tiny_args(tmp_path / "run", *SMALL_KNN, steps=40, workers=1) + ["run.eval_every=20", "run.save_every=25"]
    with pytest.raises(SystemExit) as done:
        mae.main([*args, "--plan", *QUICK, "--plan-for", "H100x8", "--plan-for", "cpu", "--plan-price", "2",
                  "--plan-out", str(out)])
    assert done.value.code == 0
    plan = read_plan(out)
    run, m, p = plan["run"], plan["measured"], plan["predicted"]
    assert (run["steps"], run["micro_batch"], run["global_batch"], run["evaluations"], run["saves"]) == (40, 8, 8, 1, 2)
    assert run["epochs"] == pytest.approx(40 * 8 / 4000)
    assert m["loader"]["workers"] == 1 and m["step"]["timed_steps"] == 5
    assert m["memory"]["kind"] == "rss" and m["memory"]["fits"] is True
    assert m["evaluation"]["mid_sec"] > 0 and m["evaluation"]["end_hooks_sec"] > 0  # k-NN (+ pictures) measured
    wc = p["wall_clock"]
    assert wc["steps_sec"] == pytest.approx(40 * 8 / p["bound"]["images_per_sec"])
    assert wc["total_sec"] == pytest.approx(wc["start_sec"] + wc["steps_sec"] + wc["warmup_sec"] + wc["evaluation_sec"]
                                            + wc["end_hooks_sec"] + 2 * wc["save_sec"] + wc["end_sec"])
    assert p["run_tflop"] == pytest.approx(run["flops_per_image"] * 40 * 8 / 1e12)
    h100, cpu = p["targets"]
    # run.precision=no: the H100's fp32 (TF32) peak, 494 TFLOP/s, at the default 30%; 8 GPUs x micro-batch 8
    assert (h100["name"], h100["count"], h100["precision"], h100["mfu"]) == ("H100", 8, "fp32", 0.30)
    assert h100["global_batch"] == 64 and h100["step_images_per_sec"] == pytest.approx(
        8 * 0.30 * 494e12 / run["flops_per_image"])
    assert cpu["step_images_per_sec"] == pytest.approx(p["bound"]["images_per_sec"])  # this machine's, loader in
    assert cpu["bound"] == p["bound"]["by"]
    assert p["bound"]["images_per_sec"] == pytest.approx(m["together"]["images_per_sec"])  # the run with its loader
    assert m["together"]["timed_steps"] == 5 and p["bound"]["data_wait"] == m["together"]["data_wait"]
    assert cpu["cost"] == pytest.approx(2 * cpu["device_hours"])
    text = capsys.readouterr().out
    assert "[measured]" in text and "[predicted]" in text and f"plan written to {out}" in text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the plan runs elsewhere


def test_max_batch_on_cpu_is_an_extrapolation_from_two_probes(tmp_path):
    from pretrain import mae

    out = tmp_path / "plan.json"
    args = tiny_args(tmp_path / "run", steps=10) + ["knn.enabled=false"]
    with pytest.raises(SystemExit):
        mae.main([*args, "--plan", *QUICK, "--plan-max-batch", "--plan-out", str(out)])
    plan = read_plan(out)
    search = plan["predicted"]["max_micro_batch"]  # predicted, not measured: no probe ran out of memory
    assert "max_micro_batch" not in plan["measured"] and search["method"] == "extrapolated"
    assert [m for m, _ in search["probes"]] == [8, 16] and all(peak > 0 for _, peak in search["probes"])


def test_finetuning_plan_counts_its_test_evaluations(tiny, tmp_path):
    from finetune import classify

    out = tmp_path / "plan.json"
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tmp_path / 'run'}",
            *DOWNSTREAM, "run.steps=30", "run.eval_every=10", "run.save_every=0"]
    with pytest.raises(SystemExit) as done:
        classify.main([*args, "--plan", *QUICK, "--plan-out", str(out)])
    assert done.value.code == 0
    plan = read_plan(out)
    assert (plan["run"]["evaluations"], plan["run"]["saves"], plan["run"]["loader"]) == (2, 1, "stream")
    assert plan["measured"]["evaluation"]["mid_sec"] > 0  # the test split, evaluated during the planning run
    assert plan["measured"]["loader"]["workers"] == 0
    assert plan["predicted"]["wall_clock"]["evaluations"] == 2


def test_cached_probe_plan_has_no_loader(tiny, tmp_path):
    from finetune import linprobe

    out = tmp_path / "plan.json"
    args = [f"data.train={tiny['data']}", f"encoder={tiny['encoder']}", f"run.output_dir={tmp_path / 'run'}",
            *DOWNSTREAM]
    with pytest.raises(SystemExit):
        linprobe.main([*args, "--plan", *QUICK, "--plan-max-batch", "--plan-out", str(out)])
    plan = read_plan(out)
    assert plan["measured"]["loader"] is None and plan["measured"]["together"] is None
    assert plan["predicted"]["bound"]["by"] == "step"
    assert any("cached features" in n for n in plan["notes"])


def test_plan_drops_keys_that_synthetic_batches_make_inapplicable(tmp_path):
    """in1k-style configs give data.shuffle_buffer, which data.loader=synthetic refuses: the planning run drops it."""
    from launch.config import applicable_values, load_config
    from pretrain.config import PretrainConfig

    values = applicable_values(PretrainConfig, ["data.shuffle_buffer=100", "data.loader=synthetic", "run.steps=7"])
    assert "shuffle_buffer" not in values["data"] and values["run"]["steps"] == "7"
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(values))
    assert load_config(PretrainConfig, [str(path)]).run.steps == 7


@pytest.mark.parametrize("extra, message", [
    (["--plan-frobnicate"], "unknown planning option --plan-frobnicate"),
    (["--plan-for", "Z9000x2"], "--plan-for Z9000x2: no peak TFLOP/s known for Z9000"),
    (["--plan-steps", "0"], "--plan-steps and --plan-world must be >= 1"),
])
def test_plan_errors_are_one_line(tmp_path, capsys, extra, message):
    from pretrain import mae

    args = tiny_args(tmp_path / "run", *SMALL_KNN, steps=10)
    with pytest.raises(SystemExit) as done:
        mae.main([*args, "--plan", *QUICK, *extra])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pretrain/mae.py: error: ") and message in err and "\n" not in err


def test_schema_reports_what_is_missing_or_mistyped(tmp_path):
    assert "format: missing" in check_plan({})
    problems = check_plan({"format": "tessera-plan/1", "entry": 3})
    assert "entry: int, expected ['str']" in problems and "run: missing" in problems


# ------------------------------------------------------------------------------------------ the loop's records


def test_loop_logs_hook_time_and_keeps_record_order(tmp_path):
    """Every due hook runs before the step's record: its seconds go into `hook_sec`, not into the window's clock,
    and a hook's own record (the pictures have none, the k-NN monitor merges) still follows the step's."""
    from pretrain import mae

    mae.main(tiny_args(tmp_path, *SMALL_KNN, steps=4) + ["run.eval_every=2", "run.log_every=2"])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "images_per_sec" in r]
    assert [r["step"] for r in logs] == [2, 4]
    assert all(r["hook_sec"] > 0 and "knn_top1" in r for r in logs)  # pictures + k-NN at 2, k-NN at the end
    assert all(0.0 <= r["data_wait"] <= 1.0 for r in logs)


def test_compare_reads_the_run_in_the_plans_terms(tmp_path):
    """launch/plan_compare.py: the run's windows after the first, time-weighted, and the bound they imply."""
    from launch.plan_compare import compare, live_windows

    # windows of 10 steps x 8 images: 80 images in 4 s (dropped), 2 s at data_wait 0.5, 1 s at data_wait 0.2
    records = [{"step": 10, "images_per_sec": 20.0, "data_wait": 0.9, "hook_sec": 0.0},
               {"step": 20, "images_per_sec": 40.0, "data_wait": 0.5, "hook_sec": 3.0},
               {"step": 30, "images_per_sec": 80.0, "data_wait": 0.2}]
    live = live_windows(records, global_batch=8)
    assert live["images_per_sec"] == pytest.approx(160 / 3)
    assert live["data_wait"] == pytest.approx((0.5 * 2 + 0.2 * 1) / 3)
    assert live["hook_sec"] == {20: 3.0}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "run.json").write_text(json.dumps({"global_batch": 8, "start_time": "2026-01-01T00:00:00+00:00",
                                                   "end_time": "2026-01-01T00:01:40+00:00"}))
    plan = {"predicted": {"bound": {"by": "loader", "images_per_sec": 50.0, "data_wait": 0.45},
                          "wall_clock": {"total_sec": 110.0, "start_sec": 8.0}},
            "measured": {"step": {"host_wait": 0.01}, "evaluation": {"mid_sec": 2.5}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    c = compare(tmp_path)
    assert c["bound"] == ("loader", "loader")  # 0.4 live wait against a 0.01 floor
    assert c["wall_sec"] == (102.0, 100.0)  # without --wall: run.json's span against the plan less its start-up
    assert compare(tmp_path, wall=115.0)["wall_sec"] == (110.0, 115.0)
