"""Smoke test of the benchmark scripts on CPU: the pretraining step benchmark for two steps on a 1-block model
(JSON fields, FLOP counter against the analytic count, HF ViTMAE starting equal), and the FLOP counter's CPU
attention mapping against a hand count. Timings themselves are not checked (tests do not time things).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common as C
from benchmarks import pretrain_step


def test_count_flops_counts_cpu_attention_and_matmuls():
    b, h, s, d = 2, 3, 5, 8
    q = torch.randn(b, h, s, d)
    a, w = torch.randn(7, 11), torch.randn(11, 13)
    # forward SDPA: Q K^T and A V, 2 FLOPs per multiply-add each; plus one 7x11 @ 11x13 matmul
    expected = 2 * (2 * b * h * s * s * d) + 2 * 7 * 11 * 13
    assert C.count_flops(lambda: (F.scaled_dot_product_attention(q, q, q), a @ w)) == expected


def test_parse_overrides_types():
    assert C.parse_overrides(["depth=2", "mlp_ratio=2.5", "norm_pix_loss=false", "x=abc"]) == \
        {"depth": 2, "mlp_ratio": 2.5, "norm_pix_loss": False, "x": "abc"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        C.parse_overrides(["depth"])


def test_pretrain_step_cpu_json(tmp_path):
    out = tmp_path / "step.json"
    argv = ["--device", "cpu", "--variant", "mae_vit_tiny_patch4_dec128d2b", "--override", "depth=1",
            "decoder_depth=1", "--batch", "4", "--steps", "2", "--warmup", "1", "--out", str(out)]
    payload = pretrain_step.main(argv)
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(payload["results"], default=str))
    impls = [r["impl"] for r in payload["results"]]
    transformers_present = "hf_skipped" not in payload["results"][0]
    assert impls == (["tessera", "hf_vitmae"] if transformers_present else ["tessera"])
    for r in payload["results"]:
        assert r["images_per_sec"] > 0 and len(r["step_ms"]) == 2
        assert r["peak_mem_gb"] > 0 and r["peak_mem_kind"] == "cpu_rss_peak"
        # FlopCounterMode (one forward + backward) against models/flops.py's analytic count
        assert r["counted_over_analytic"] == pytest.approx(1.0, abs=0.02)
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / payload["peak"]["peak_tflops"])
        assert torch.isfinite(torch.tensor(r["loss_last"]))
    if transformers_present:
        first = payload["results"][0]
        assert first["hf_loss_abs_diff"] < 1e-5 and first["hf_pred_max_abs_diff"] < 1e-4
        assert first["ours_over_hf"] > 0
    assert payload["machine"]["torch"] == torch.__version__
