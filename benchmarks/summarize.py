"""One table from every benchmark JSON in a folder (e.g. the JSONs inside run_gpu.py's archive).

    python benchmarks/summarize.py FOLDER [--markdown summary.md]

Rows: one per model of each pretrain_step file and one per mode (synthetic, e2e) of each entry_loop file, named by
the file; ours/HF and end-to-end/synthetic ratios are listed under the table.
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
           ("precision", "prec"), ("compile", "compile"), ("sdpa", "sdpa"), ("mask_type", "mask"),
           ("grad_ckpt", "ckpt"), ("images_per_sec", "img/s"), ("step_ms", "ms/step"), ("peak_mem_gb", "mem GB"),
           ("mfu", "MFU")]


def rows_of(case: str, doc: dict) -> list[dict]:
    rows = []
    results = doc.get("results", [])
    if isinstance(results, dict):  # entry_loop: {"synthetic": {...}, "e2e": {...}, "e2e_over_synthetic": x}
        return [{"case": case, "what": mode, "images_per_sec": r["images_per_sec"]}
                for mode, r in results.items() if isinstance(r, dict)]
    for r in results:
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
        res = doc["results"]
        first = res[0] if isinstance(res, list) and res else {}
        if "ours_over_hf" in first:
            notes.append(f"{path.stem}: ours / HF images/s = {first['ours_over_hf']:.3f}")
        if isinstance(res, dict) and "e2e_over_synthetic" in res:
            notes.append(f"{path.stem}: end-to-end / synthetic = {res['e2e_over_synthetic']:.3f}")
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
