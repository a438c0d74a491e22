"""One table from every benchmark JSON in a folder (what run_gpu.sh prints last).

    python benchmarks/summarize.py $OUT [--markdown summary.md]

Rows: one per model/mode of each file (pretrain_step, finetune_step) and one per input of pretrain_e2e, named by
the file; ours/HF, compiled/eager and end-to-end/synthetic ratios are listed under the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from benchmarks.common import print_table  # noqa: E402

COLUMNS = [("case", "case"), ("what", "model/input"), ("variant", "variant"), ("batch", "batch"),
           ("precision", "prec"), ("compile", "compile"), ("sdpa", "sdpa"), ("fused_adamw", "fused AdamW"),
           ("grad_ckpt", "ckpt"), ("images_per_sec", "img/s"), ("step_ms", "ms/step"), ("peak_mem_gb", "mem GB"),
           ("mfu", "MFU")]


def rows_of(case: str, doc: dict) -> list[dict]:
    rows = []
    for r in doc.get("results", []):
        row = dict(r, case=case)
        row["what"] = r.get("impl") or r.get("mode")
        row["step_ms"] = r.get("step_ms_median", r.get("step_ms_mean"))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    rows, notes = [], []
    machine = None
    for path in sorted(Path(args.folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{path.name}: unreadable ({exc})")
            continue
        if "results" not in doc:
            continue
        machine = machine or doc.get("machine")
        rows += rows_of(path.stem, doc)
        first = doc["results"][0] if doc["results"] else {}
        if "ours_over_hf" in first:
            notes.append(f"{path.stem}: ours / HF images/s = {first['ours_over_hf']:.3f}")
        if "compiled_over_eager" in first:
            notes.append(f"{path.stem}: compiled / eager images/s = {first['compiled_over_eager']:.3f} "
                         f"(first compiled step {doc['results'][1]['first_step_s']:.1f} s)")
        if "e2e_over_synthetic" in doc:
            notes.append(f"{path.stem}: end-to-end / synthetic = {doc['e2e_over_synthetic']:.3f}")
    if machine:
        print(f"machine: {machine.get('gpu') or machine.get('cpu')}, torch {machine.get('torch')}, timm "
              f"{machine.get('timm')}, transformers {machine.get('transformers')}, {machine.get('date_utc')} UTC")
    text = print_table(rows, COLUMNS)
    for n in notes:
        print(n)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n\n" + "\n".join(notes) + "\n")
    return text


if __name__ == "__main__":
    main()
