"""Smoke test of the benchmark scripts on CPU, as documented, with tiny sizes: the MAE step ours vs HF ViTMAE (JSON
fields, FLOP counter against the analytic count, the same architecture on both sides), the real entry point through
data.loader=synthetic and end to end (its own metrics.jsonl and run.json), the loader comparison, photo-like bench
shards, the GPU run on CPU, and the FLOP counter's CPU attention mapping against a hand count. Timings themselves are
not checked (tests do not time things).
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
import torch.nn.functional as F
import yaml

from benchmarks import common as C
from benchmarks import entry_loop, loader_throughput, make_bench_shards, pretrain_step


def test_count_flops_counts_cpu_attention_and_matmuls():
    b, h, s, d = 2, 3, 5, 8
    q = torch.randn(b, h, s, d)
    a, w = torch.randn(7, 11), torch.randn(11, 13)
    # forward SDPA: Q K^T and A V, 2 FLOPs per multiply-add each; plus one 7x11 @ 11x13 matmul
    expected = 2 * (2 * b * h * s * s * d) + 2 * 7 * 11 * 13
    assert C.count_flops(lambda: (F.scaled_dot_product_attention(q, q, q), a @ w)) == expected


def test_parse_overrides_types():
    assert pretrain_step.overrides(["depth=2", "mlp_ratio=2.5", "norm_pix_loss=false", "x=abc"]) == \
        {"depth": 2, "mlp_ratio": 2.5, "norm_pix_loss": False, "x": "abc"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        pretrain_step.overrides(["depth"])


def test_pretrain_step_cpu_json(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--device", "cpu", "--variant", "mae_vit_tiny_patch4_dec128d2b", "--override", "depth=1",
            "decoder_depth=1", "--batch", "4", "--steps", "2", "--warmup", "1", "--mask-type", "block",
            "--out", str(out)]
    payload = pretrain_step.main(argv)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(payload["results"], default=str))
    impls = [r["impl"] for r in payload["results"]]
    transformers_present = "hf_skipped" not in payload["results"][0]
    assert impls == (["tessera", "hf_vitmae"] if transformers_present else ["tessera"])
    for r in payload["results"]:
        assert r["images_per_sec"] > 0 and len(r["step_ms"]) == 2 and r["mask_type"] == "block"
        assert r["peak_mem_gb"] > 0 and r["peak_mem_kind"] == "cpu_process_peak_rss"
        # FlopCounterMode (one forward + backward) against models/flops.py's analytic count
        assert r["counted_over_analytic"] == pytest.approx(1.0, abs=0.02)
        assert r["achieved_tflops"] > 0 and r["mfu"] is None  # a CPU has no known peak: no MFU
    if transformers_present:
        first, hf = payload["results"]
        # the same architecture: as many parameters and FLOPs (that it computes the same loss: test_hf_agreement.py)
        assert hf["params_m"] == pytest.approx(first["params_m"])
        assert hf["train_gflops_counted"] == pytest.approx(first["train_gflops_counted"], rel=0.02)
        assert first["ours_over_hf"] == pytest.approx(first["images_per_sec"] / payload["results"][1]["images_per_sec"])
    # provenance: the fields of a run's run.json
    assert torch.__version__.startswith(payload["provenance"]["packages"]["torch"])
    assert payload["provenance"]["hardware"]["cpu_cores"] >= 1 and "host" not in payload["provenance"]["hardware"]


@pytest.mark.slow
def test_entry_loop_times_the_real_pretraining_loop(tmp_path):
    payload = entry_loop.main(["--entry", "pretrain", "--data", "data/sample", "model.overrides.depth=1",
                               "model.overrides.decoder_depth=1", "data.micro_batch=8", "data.num_workers=0",
                               "run.steps=4", "--window", "2", "--work", str(tmp_path), "--out",
                               str(tmp_path / "loop.json")])
    res = payload["results"]
    assert json.loads((tmp_path / "loop.json").read_text())["results"] == json.loads(json.dumps(res))
    for mode, loader in (("synthetic", "synthetic"), ("e2e", "stream")):
        # the loop's own log windows (steps 2 and 4), the first dropped; the run's record says what ran
        assert [w["step"] for w in res[mode]["windows"]] == [2, 4] and res[mode]["windows_kept"] == 1
        assert res[mode]["images_per_sec"] == res[mode]["windows"][1]["images_per_sec"] > 0
        assert 0.0 <= res[mode]["data_wait"] <= 1.0 and res[mode]["tflops"] > 0
        assert res[mode]["run"]["global_batch"] == 8 and res[mode]["run"]["world_size"] == 1
        assert yaml.safe_load((tmp_path / f"{mode}0" / "config.yaml").read_text())["data"]["loader"] == loader
    assert res["e2e_over_synthetic"] == pytest.approx(res["e2e"]["images_per_sec"] / res["synthetic"]["images_per_sec"])


def test_bench_shards_texture_and_resize(tmp_path):
    common = ["--images", "6", "--shards", "2", "--workers", "1", "--min-px", "80", "--max-px", "96"]
    smooth = make_bench_shards.main(["--output", str(tmp_path / "smooth"), "--texture", "0", *common])
    photo = make_bench_shards.main(["--output", str(tmp_path / "photo"), *common])
    small = make_bench_shards.main(["--output", str(tmp_path / "small"), "--resize", "40", *common])
    size = {name: sum(m.size for f in (tmp_path / name).glob("*.tar") for m in tarfile.open(f)
                      if m.name.endswith(".jpg")) for name in ("smooth", "photo")}
    assert size["photo"] > 2 * size["smooth"]  # texture: far more entropy-coded bytes at the same pixel size
    assert smooth["num_samples"] == photo["num_samples"] == small["num_samples"] == 6
    again = make_bench_shards.main(["--output", str(tmp_path / "photo"), *common])  # same recipe: reused
    assert again["num_samples"] == 6
    import webdataset as wds

    from data.decode import decode_image
    from data.info import resolve

    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(resolve(str(tmp_path / "small")).urls),
                                        wds.tarfile_to_samples())))
    assert min(decode_image(sample).size) == 40


def test_loader_throughput_compares_both_paths(tmp_path):
    payload = loader_throughput.main(["--cases", "sample", "--rounds", "1", "--batches", "1", "--batch-size", "8",
                                      "--out", str(tmp_path / "loader.json")])
    case = payload["cases"][0]
    assert case["float"]["batch_dtype"] == "torch.float32" and case["uint8"]["batch_dtype"] == "torch.uint8"
    assert case["float"]["cpu_ms_per_image"] > 0 and case["uint8"]["cpu_ms_per_image"] > 0


@pytest.mark.slow
def test_gpu_run_on_cpu_writes_its_files(tmp_path):
    """run_gpu.sh's CPU check, two of its cases as documented: every case's JSON and log in the archive, the status of
    each case, and the tables the cases printed in the summary."""
    out = tmp_path / "out"
    env = dict(os.environ, CHECK="1", SCRATCH=str(tmp_path / "scratch"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/run_gpu.sh", str(out), "step_b16_hf", "loader_cpu"], cwd=C.ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [line.split(" rc=")[:1] + line.split(" rc=")[1].split()[:1]
            for line in (out / "status.txt").read_text().splitlines()] == [["step_b16_hf", "0"], ["loader_cpu", "0"]]
    assert sorted(f.name for f in out.iterdir()) == ["bench_cpu.tar.gz", "status.txt", "summary_cpu.md"]
    with tarfile.open(out / "bench_cpu.tar.gz") as tar:
        assert sorted(n for n in tar.getnames() if n != ".") == [f"./{c}.{e}" for c in ("loader_cpu", "step_b16_hf")
                                                                  for e in ("json", "log")]
        step = json.load(tar.extractfile("./step_b16_hf.json"))
    assert step["results"][0]["impl"] == "tessera" and step["provenance"]["git"]["commit"]
    md = (out / "summary_cpu.md").read_text()
    assert "## step_b16_hf (rc 0)" in md and "| tessera |" in md and "## loader_cpu (rc 0)" in md
    assert "| 32 px sample -> 32 |" in md


@pytest.mark.parametrize("entry,name,recipe", [
    ("pretrain", "in1k_vit_base_1gpu", "in1k_vit_base"), ("pretrain", "in1k_vit_large_1gpu", "in1k_vit_large"),
    ("pretrain", "in1k_vit_huge_1gpu", "in1k_vit_huge"), ("finetune", "in1k_vit_base_1gpu", "in1k_vit_base"),
    ("linprobe", "linprobe_in1k_vit_base_1gpu", "linprobe_in1k_vit_base")])
def test_one_gpu_configs_keep_the_recipe(entry, name, recipe):
    """run_gpu.sh's configs: one process, micro-batch 512-1024, the recipe's global batch, lr and schedule."""
    from finetune.config import FinetuneConfig, LinprobeConfig
    from launch.config import load_config
    from launch.sections import resolve_batch
    from pretrain.config import PretrainConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}[entry]
    folder = "pretrain" if entry == "pretrain" else "finetune"
    one, base = (load_config(cls, [f"{folder}/configs/{n}.yaml"]) for n in (name, recipe))
    micro, global_batch = resolve_batch(one.data.micro_batch, one.data.global_batch, 1, one.optim.grad_accum_steps)
    base_micro = base.data.micro_batch
    base_global = base.data.global_batch or base_micro * 8 * base.optim.grad_accum_steps  # the recipes' 8 GPUs
    assert 512 <= micro <= 1024 and global_batch == base_global
    assert one.optim.peak_lr(global_batch) == pytest.approx(base.optim.peak_lr(base_global))
    assert (one.run.steps, one.optim.warmup_steps) == (base.run.steps, base.optim.warmup_steps)
    assert one.data.num_workers == 14  # cores - 2 on a 16-core host, as the comment says
