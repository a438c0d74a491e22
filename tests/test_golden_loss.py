"""The golden loss file: the tiny pretraining run's per-step losses (fixed seed, CPU, fp32) stored in
tests/assets/golden_loss.json and checked to a tight tolerance, so a silent change to masking, initialisation, data
order, augmentation or the lr schedule fails this one obvious test.

When a change is meant to alter the numerics, regenerate the file and commit it with the change:

    TESSERA_WRITE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden_loss.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from helpers_launch import ROOT, read_metrics, tiny_args

GOLDEN = Path(__file__).parent / "assets" / "golden_loss.json"
STEPS = 12
# relative tolerance: fp32 matmul results may differ in the last bits between CPU kernels (e.g. AVX2 vs AVX-512);
# a change of masking, init, data or schedule moves these losses by far more (1e-2 and up)
RTOL = 1e-4


def test_tiny_run_losses_match_the_golden_file(tmp_path):
    from pretrain.mae import main

    args = tiny_args(tmp_path / "run", steps=STEPS)
    main(args)
    recorded = [a.replace(str(ROOT), "REPO") for a in args if not a.startswith("run.output_dir=")]
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == STEPS
    if os.environ.get("TESSERA_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"overrides": recorded, "torch": torch.__version__, "losses": losses},
                                     indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == recorded, \
        "the tiny run's overrides changed: regenerate the golden file (see this module's docstring)"
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(golden["losses"], dtype=torch.float64), rtol=RTOL, atol=0.0)
