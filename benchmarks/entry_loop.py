"""The real training loops timed: an entry point itself (`pretrain/mae.py`, `finetune/classify.py`,
`finetune/linprobe.py`), fed by its shard loader (end to end) and by synthetic batches (everything else identical),
one after the other in one process.

    python benchmarks/entry_loop.py --entry pretrain --data /tmp/bench-shards \
        pretrain/configs/in1k_vit_base_1gpu.yaml run.steps=60 --window 10 --out loop.json
    python benchmarks/entry_loop.py --entry finetune --data /tmp/bench-shards finetune/configs/in1k_vit_base_1gpu.yaml \
        encoder=random data.test_split=train run.steps=40
    python benchmarks/entry_loop.py --entry pretrain --data data/sample data.micro_batch=64   # CPU check

Both runs call the entry point's `main` with the given config and `key=value` overrides (what users run: the
shared loop, the entry point's step function, `device_batches`, compilation per `run.compile`, the optimizer); the
synthetic run only swaps the training loader for one that yields random uint8 batches already in (pinned) host
memory. Throughput is
the loop's own `images_per_sec` of each log window (`run.log_every = --window`; the loop reads the device at log
steps, so windows are synchronised), the first `--skip` windows dropped (compilation, allocator warm-up); the
median window is reported. Ratio end-to-end / synthetic: the share of the step rate the input path keeps.
Checkpoints: only the final one (outside the timed windows); pictures and periodic evaluation off (fine-tuning
still evaluates once after the loop, outside the windows: point data.test_split at a small split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not sibling files
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402


class SyntheticLoader:
    """Random uint8 batches shaped like the shard loader's, cycled from a few pre-made (pinned on CUDA) sets."""

    def __init__(self, batch_size: int, img_size: int, seed: int = 0, sets: int = 3):
        g = torch.Generator().manual_seed(seed)
        pin = torch.cuda.is_available()
        self.sets = []
        for _ in range(sets):
            img = torch.randint(0, 256, (batch_size, 3, img_size, img_size), dtype=torch.uint8, generator=g)
            self.sets.append(img.pin_memory() if pin else img)
        self.labels = torch.zeros(batch_size, dtype=torch.long)
        self.batches = 0

    def __iter__(self):
        while True:
            self.batches += 1
            yield {"image": self.sets[self.batches % len(self.sets)], "label": self.labels, "n_corrupt": 0}

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state.get("batches", 0))


def output_size(transform) -> int:
    """The side of the images a crop transform (or a Compose holding one) produces."""
    for t in [transform, *getattr(transform, "transforms", [])]:
        size = getattr(t, "size", None)
        if size is not None:
            return int(size if isinstance(size, int) else size[0])
    raise ValueError(f"cannot tell the output size of {transform!r}")


ENTRIES = {  # entry point module, its data key, overrides that switch off work outside the loop's step
    "pretrain": ("pretrain.mae", "data.train", ["vis.every=0", "vis.num_images=0"]),
    "finetune": ("finetune.classify", "data.path", ["eval_every=0"]),
    "linprobe": ("finetune.linprobe", "data.path", ["probe.cached=false", "probe.eval_every=0"]),
}


def run_once(entry_name: str, config_args: list[str], synthetic: bool, out_dir: Path, window: int) -> dict:
    """One run of the entry point; returns its per-window images/s."""
    import importlib

    module, _, quiet = ENTRIES[entry_name]
    entry = importlib.import_module(module)
    real = entry.build_train_loader
    if synthetic:
        entry.build_train_loader = lambda spec, *, batch_size, transform, **kw: SyntheticLoader(
            batch_size, output_size(transform))
    try:
        argv = [*config_args, f"run.output_dir={out_dir}", f"run.log_every={window}", "run.save_every=0",
                "run.resume=false", "run.progress=false", "run.trackers=[none]", *quiet]
        summary = entry.main(argv)
    finally:
        entry.build_train_loader = real
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["images_per_sec"] for r in records if "images_per_sec" in r]
    return {"summary": summary, "images_per_sec_windows": windows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="*", help="a YAML config and/or key=value overrides, as for the entry point")
    p.add_argument("--entry", choices=sorted(ENTRIES), default="pretrain")
    p.add_argument("--data", required=True, help="the dataset (data.train or data.path) of the end-to-end run")
    p.add_argument("--window", type=int, default=10, help="steps per timed window (run.log_every)")
    p.add_argument("--skip", type=int, default=1, help="leading windows dropped (compilation, warm-up)")
    p.add_argument("--modes", default="synthetic,e2e", help="comma list: synthetic, e2e (in this order)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the modes this many times, alternating (A B A B: a changing load hits both alike); "
                        "the median over every kept window is reported")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config_args = [*args.config, f"{ENTRIES[args.entry][1]}={args.data}"]
    rows, results = [], {}
    kept: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tessera-loop-") as tmp:
        for rep in range(args.repeat):
            for mode in args.modes.split(","):
                res = run_once(args.entry, config_args, mode == "synthetic", Path(tmp) / f"{mode}{rep}", args.window)
                windows = res["images_per_sec_windows"]
                kept.setdefault(mode, []).extend(windows[args.skip:] or windows[-1:])
                results.setdefault(mode, {"runs": []})["runs"].append(res)
        for mode, values in kept.items():
            results[mode].update(images_per_sec=statistics.median(values), windows_kept=len(values),
                                 images_per_sec_windows=[w for r in results[mode]["runs"]
                                                         for w in r["images_per_sec_windows"]],
                                 summary=results[mode]["runs"][-1]["summary"])
            rows.append({"mode": mode, "img_s": results[mode]["images_per_sec"], "windows": len(values),
                         "spread": f"{min(values):.1f}-{max(values):.1f}",
                         "loss": results[mode]["summary"].get("loss")})
    if "synthetic" in results and "e2e" in results:
        results["e2e_over_synthetic"] = results["e2e"]["images_per_sec"] / results["synthetic"]["images_per_sec"]
        rows.append({"mode": "e2e / synthetic", "img_s": results["e2e_over_synthetic"]})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print_table(rows, [("mode", ENTRIES[args.entry][0]), ("img_s", "images/s (median window)"),
                       ("windows", "windows"), ("spread", "min-max"), ("loss", "last loss")])
    payload = {"benchmark": f"entry_loop_{args.entry}", "args": vars(args), "machine": machine_info(device),
               "results": results}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
