"""The CIFAR-10 evidence in one command: shards -> MAE pretraining -> linear probe -> fine-tuning -> results table.

    python launch/cifar10_chain.py --budget cpu      # ~30 min on a 2-core CPU: the MAE-vs-random gap at small budget
    python launch/cifar10_chain.py --budget gpu      # one H100: the quality recipe (pretraining + fine-tuning ~25 min)
    python launch/cifar10_chain.py --budget micro    # a 2-3 minute smoke test on the shipped sample (data/sample)

Stages, each the project's own entry point run as a subprocess (`launch/` never imports `pretrain/` or `finetune/`):
  1. data       unpack the CIFAR-10 JPEG tarball (once, to --cifar-dir) and write WebDataset shards with
                `data/make_shards.py` (train, test, and for the cpu budget a class-balanced `probe_train` subset);
                the micro budget uses `data/sample` as it is.
  2. pretrain   `pretrain/mae.py pretrain/configs/cifar10_<budget>.yaml` -> encoder.safetensors, metrics.jsonl
  3. probe      `finetune/linprobe.py finetune/configs/cifar10_linprobe_<budget>.yaml`, MAE encoder and encoder=random
  4. finetune   `finetune/finetune.py finetune/configs/cifar10_finetune_<budget>.yaml`, from MAE and from scratch
                (encoder=random): the same recipe, steps and batch size
  5. table      docs/results/cifar10_<budget>.json (every number, command and wall-clock), the pretraining loss
                curve as a PNG (drawn with PIL), and docs/RESULTS.md rebuilt from every budget's JSON.

All recipe settings live in the YAML files; this script adds only paths (data, run directories, encoder). Stages whose
result already exists in --work are reused (their recorded wall-clock is kept); `--fresh` starts over. Extra
`key=value` overrides reach one stage with `--pretrain-arg`, `--probe-arg`, `--finetune-arg` (repeatable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARBALL = "/work/shared/datasets/cifar10-jpg.tar.gz"
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
BUDGET_ORDER = ("gpu", "cpu", "micro")


class ChainError(RuntimeError):
    """A stage of the chain failed; the message names the stage, its exit code and its log."""


# ------------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    name: str
    variant: str  # MAE variant; encoder=random uses it as arch= so both sides have the same architecture
    source: str  # "cifar": shards from the tarball; "sample": the shipped data/sample shards
    probe_per_class: int | None  # probe trains on this many images per class (None: the whole train split)
    summary: str

    @property
    def pretrain_config(self) -> str:
        return f"pretrain/configs/cifar10_{self.name}.yaml"

    @property
    def probe_config(self) -> str:
        return f"finetune/configs/cifar10_linprobe_{self.name}.yaml"

    @property
    def finetune_config(self) -> str:
        return f"finetune/configs/cifar10_finetune_{self.name}.yaml"


BUDGETS = {
    "micro": Budget("micro", "mae_vit_tiny_patch4_dec128d2b", "sample", None,
                    "smoke test on the shipped 4,000/1,000-image sample; checks the plumbing, not the quality"),
    "cpu": Budget("cpu", "mae_vit_tiny_patch4_dec128d2b", "cifar", 1000,
                  "about 30 minutes on a 2-core CPU: does the MAE-vs-random gap show at a small budget?"),
    "gpu": Budget("gpu", "mae_vit_tiny_patch2_dec192d4b", "cifar", None,
                  "one H100, pretraining + fine-tuning in about 25 minutes: the quality targets"),
}


# ------------------------------------------------------------------------------------------------- running stages


def run_stage(name: str, cmd: list[str], stage_dir: Path, env: dict[str, str], done_file: Path | None,
              reuse: bool = True) -> dict:
    """Run `cmd` from the repository root, echo and log its output, and record the command and wall-clock.

    With `reuse`, a stage whose `done_file` exists and whose recorded command is the same is not run again. A stage
    that is run starts from an emptied `stage_dir` (old checkpoints must not be resumed), except one that was
    interrupted with the same command: that keeps its folder, so the entry point resumes from its last checkpoint."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    record_path = stage_dir / "chain_stage.json"
    shown = shell_join(cmd)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        same = record.get("command") == shown
        complete = record.get("returncode") == 0 and (done_file is None or done_file.exists())
        if same and complete and reuse:
            print(f"[chain] {name}: reusing {done_file} ({record['seconds']:.0f} s when it ran)", flush=True)
            return {**record, "reused": True}
        if not same or complete:  # another command, or a finished stage to redo: no resuming from its checkpoints
            print(f"[chain] {name}: starting afresh in {stage_dir}", flush=True)
            shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
    record_path.write_text(json.dumps({"stage": name, "command": shown, "returncode": None}))  # started
    print(f"[chain] {name}: {shown}", flush=True)
    log_path = stage_dir / "chain_stage.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):  # chunks, not lines, so the children's tqdm bars still render
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    record = {"stage": name, "command": shown, "seconds": round(seconds, 1), "returncode": rc,
              "finished": now_iso(), "log": str(log_path)}
    record_path.write_text(json.dumps(record, indent=1))
    if rc != 0:
        tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
        raise ChainError(f"stage '{name}' failed with exit code {rc} after {seconds:.0f} s; full log: {log_path}\n"
                         f"--- last lines ---\n{tail}")
    if done_file is not None and not done_file.exists():
        raise ChainError(f"stage '{name}' exited 0 but did not write {done_file}; log: {log_path}")
    print(f"[chain] {name}: done in {seconds:.0f} s", flush=True)
    return {**record, "reused": False}


def shell_join(cmd: list[str]) -> str:
    """The command as one would type it from the repository root (the interpreter shown as `python`)."""
    parts = ["python" if i == 0 and c == sys.executable else c for i, c in enumerate(cmd)]
    return shlex.join(parts)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------------------------- data


def ensure_cifar(tarball: Path, cifar_dir: Path) -> Path:
    """`cifar_dir` with train/ and test/ ImageFolder trees, unpacked from `tarball` when missing.

    Unpacks into a private folder and renames it into place, so a concurrent unpack by someone else is harmless."""
    if (cifar_dir / "train").is_dir() and (cifar_dir / "test").is_dir():
        return cifar_dir
    if not tarball.is_file():
        raise ChainError(f"CIFAR-10 tarball not found: {tarball} (and {cifar_dir} has no train/ and test/); "
                         "pass --tarball or --cifar-dir")
    tmp = cifar_dir.parent / f"{cifar_dir.name}.{os.getpid()}"
    print(f"[chain] data: unpacking {tarball} -> {cifar_dir}", flush=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
    if not (tmp / "train").is_dir() or not (tmp / "test").is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ChainError(f"{tarball} does not hold train/ and test/ folders")
    try:
        tmp.rename(cifar_dir)
    except OSError:  # someone else finished first (or an empty folder is in the way)
        if not (cifar_dir / "train").is_dir():
            if cifar_dir.exists() and not any(cifar_dir.iterdir()):
                cifar_dir.rmdir()
                tmp.rename(cifar_dir)
            else:
                raise ChainError(f"cannot move the unpacked data to {cifar_dir}: it exists without train/") from None
        shutil.rmtree(tmp, ignore_errors=True)
    return cifar_dir


def class_subset(train_dir: Path, out_dir: Path, per_class: int) -> Path:
    """An ImageFolder of symbolic links to the first `per_class` images (sorted names) of every class."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for cls in sorted(d for d in train_dir.iterdir() if d.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.is_file())
        if len(files) < per_class:
            raise ChainError(f"class folder {cls} has {len(files)} images, fewer than the {per_class} asked for")
        (out_dir / cls.name).mkdir(parents=True)
        for f in files[:per_class]:
            (out_dir / cls.name / f.name).symlink_to(f.resolve())
    return out_dir


def split_sizes(shard_dir: Path) -> dict[str, int]:
    meta = shard_dir / "dataset.json"
    if not meta.is_file():
        return {}
    splits = json.loads(meta.read_text()).get("splits", {})
    return {k: int(v.get("num_samples", 0)) for k, v in splits.items()}


def prepare_data(budget: Budget, args, env) -> tuple[Path, str, list[dict]]:
    """(dataset folder, probe training split, stage records)."""
    if budget.source == "sample":
        return REPO / "data" / "sample", "train", []
    cifar = ensure_cifar(Path(args.tarball), Path(args.cifar_dir))
    shards = Path(args.work) / "shards"
    # shard sizes: 20 train shards, so up to 20 loader workers (x ranks) each read their own
    want = {"train": (cifar / "train", CIFAR_TRAIN, 2500), "test": (cifar / "test", CIFAR_TEST, 1000)}
    probe_split = "train"
    if budget.probe_per_class:
        probe_split = "probe_train"
        want[probe_split] = (None, budget.probe_per_class * 10, 1000)
    have = split_sizes(shards)
    records = []
    for split, (src, n, shard_size) in want.items():
        if have.get(split) == n:
            print(f"[chain] data: reusing {shards}:{split} ({n} images)", flush=True)
            continue
        if src is None:
            src = class_subset(cifar / "train", Path(args.work) / "probe_subset", budget.probe_per_class)
        cmd = [sys.executable, "data/make_shards.py", "--input", str(src), "--output", str(shards), "--split", split,
               "--shard-size", str(shard_size), "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--overwrite"]
        records.append(run_stage(f"shards:{split}", cmd, Path(args.work) / f"shards_{split}", env, None, reuse=False))
    got = split_sizes(shards)
    for split, (_, n, _) in want.items():
        if got.get(split) != n:
            raise ChainError(f"{shards}:{split} holds {got.get(split)} images, expected {n} (see the make_shards log)")
    return shards, probe_split, records


# ------------------------------------------------------------------------------------------------- the chain


def chain(args) -> dict:
    budget = BUDGETS[args.budget]
    work = Path(args.work or f"/tmp/tessera-cifar10-{budget.name}").resolve()
    args.work = str(work)
    marker = work / ".cifar10_chain"  # --fresh deletes only folders this script made
    if args.fresh and work.exists() and any(work.iterdir()):
        if not marker.exists():
            raise ChainError(f"--fresh would delete {work}, which this script did not create (no {marker.name}); "
                             "pick another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    reuse = not args.fresh
    t_start = time.perf_counter()
    started = now_iso()

    data_dir, probe_split, stages = prepare_data(budget, args, env)
    py = sys.executable

    pt_dir = work / "pretrain"
    pt_cmd = [py, "pretrain/mae.py", budget.pretrain_config, f"data.train={data_dir}", f"run.output_dir={pt_dir}",
              *args.pretrain_arg]
    reuse = reuse and not stages  # new shards: every later stage runs again
    stages.append(run_stage("pretrain", pt_cmd, pt_dir, env, pt_dir / "encoder.safetensors", reuse))
    reuse = reuse and stages[-1]["reused"]  # a new encoder: every later stage runs again
    encoder = pt_dir / "encoder.safetensors"

    runs = {}
    for key, script, config, encoder_args, extra in (
            ("probe_mae", "finetune/linprobe.py", budget.probe_config, [f"encoder={encoder}"], args.probe_arg),
            ("probe_random", "finetune/linprobe.py", budget.probe_config,
             ["encoder=random", f"arch={budget.variant}"], args.probe_arg),
            ("finetune_mae", "finetune/finetune.py", budget.finetune_config, [f"encoder={encoder}"], args.finetune_arg),
            ("finetune_scratch", "finetune/finetune.py", budget.finetune_config,
             ["encoder=random", f"arch={budget.variant}"], args.finetune_arg)):
        run_dir = work / key
        split_args = [f"data.train_split={probe_split}"] if key.startswith("probe") else []
        cmd = [py, script, config, f"data.path={data_dir}", *split_args, *encoder_args, f"run.output_dir={run_dir}",
               *extra]
        stages.append(run_stage(key, cmd, run_dir, env, run_dir / "eval.json", reuse))
        runs[key] = json.loads((run_dir / "eval.json").read_text())

    total = time.perf_counter() - t_start
    result = collect(budget, args, data_dir, probe_split, pt_dir, runs, stages, total, started)
    write_outputs(result, pt_dir, Path(args.docs))
    return result


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return rows


def collect(budget: Budget, args, data_dir: Path, probe_split: str, pt_dir: Path, runs: dict, stages: list[dict],
            total: float, started: str) -> dict:
    """Every number of the run in one JSON-able dict (the table and RESULTS.md are rendered from it)."""
    metrics = [m for m in read_metrics(pt_dir / "metrics.jsonl") if isinstance(m.get("loss"), (int, float))]
    curve = [[int(m["step"]), round(float(m["loss"]), 5)] for m in metrics if math.isfinite(m["loss"])]
    ips = [m["images_per_sec"] for m in metrics if isinstance(m.get("images_per_sec"), (int, float))]
    pt_cfg = read_yaml(pt_dir / "config.yaml")
    sizes = split_sizes(data_dir)
    seconds = {s["stage"]: s["seconds"] for s in stages}
    pretrain = {
        "variant": pt_cfg.get("model", {}).get("name"), "mask_ratio": pt_cfg.get("model", {}).get("mask_ratio"),
        "norm_pix_loss": pt_cfg.get("model", {}).get("norm_pix_loss"),
        "steps": curve[-1][0] if curve else None, "batch_size": pt_cfg.get("data", {}).get("batch_size"),
        "epochs": metrics[-1].get("epoch") if metrics else None, "first_loss": curve[0][1] if curve else None,
        "final_loss": curve[-1][1] if curve else None, "median_images_per_sec": median(ips),
        "seconds": seconds.get("pretrain"), "loss_curve": curve,
    }
    rows = {}
    for key, ev in runs.items():
        rows[key] = {k: ev.get(k) for k in ("top1", "top5", "n_images", "best_top1", "steps", "global_batch",
                                             "peak_lr", "path", "pool", "global_pool")}
        rows[key]["seconds"] = seconds.get(key)
    gaps = {"probe_top1_mae_minus_random": diff(rows["probe_mae"]["top1"], rows["probe_random"]["top1"]),
            "finetune_top1_mae_minus_scratch": diff(rows["finetune_mae"]["top1"], rows["finetune_scratch"]["top1"])}
    return {
        "budget": budget.name, "summary": budget.summary, "started": started, "finished": now_iso(),
        "total_seconds": round(total, 1), "command": shlex.join(["python", *args.argv_record]),
        "data": {"path": str(data_dir), "splits": sizes, "probe_train_split": probe_split,
                 "test_images": sizes.get("test")},
        "configs": {"pretrain": budget.pretrain_config, "probe": budget.probe_config,
                    "finetune": budget.finetune_config, "variant": budget.variant},
        "pretrain": pretrain, "runs": rows, "gaps": gaps, "stages": stages,
        "hardware": hardware(os.environ.get("OMP_NUM_THREADS") if args.threads is None else str(args.threads)),
        "git_commit": git_commit(),
    }


def diff(a, b):
    return round(a - b, 2) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def hardware(threads: str | None = None) -> dict:
    """What the numbers were measured on: CPU model and cores, memory, GPU (nvidia-smi), the stages' thread count
    (OMP_NUM_THREADS as passed to them), library versions."""
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    gpus = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout
            gpus = [g.strip() for g in out.splitlines() if g.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    versions = {}
    for pkg in ("torch", "timm", "accelerate", "webdataset"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_cores": cores,
            "memory_gb": mem_gb, "gpus": gpus, "threads": threads,
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def git_commit() -> str | None:
    """The checkout's commit, with `+dirty` when files differ from it (untracked ones included)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


# ------------------------------------------------------------------------------------------------- outputs


def write_outputs(result: dict, pt_dir: Path, docs: Path) -> None:
    """docs/results/cifar10_<budget>.json + loss-curve PNG (+ reconstruction grid), then docs/RESULTS.md."""
    out = docs / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"cifar10_{result['budget']}"
    png = draw_budget_curve(result, out)
    result["files"] = {"loss_curve": png.name}
    recon = pt_dir / "reconstructions.png"
    if recon.is_file() and recon.stat().st_size < 100_000:
        shutil.copyfile(recon, out / f"{name}_reconstructions.png")
        result["files"]["reconstructions"] = f"{name}_reconstructions.png"
    (out / f"{name}.json").write_text(dump_result(result))
    write_results_md(docs)
    print(f"[chain] wrote {out / (name + '.json')}, {png} and {docs / 'RESULTS.md'}", flush=True)


def dump_result(result: dict) -> str:
    """Indented JSON, with the long loss curve kept on one line so the file stays small."""
    curve = result["pretrain"]["loss_curve"]
    slim = {**result, "pretrain": {**result["pretrain"], "loss_curve": "@CURVE@"}}
    return json.dumps(slim, indent=1).replace('"@CURVE@"', json.dumps(curve, separators=(",", ":"))) + "\n"


def draw_budget_curve(result: dict, out: Path) -> Path:
    """docs/results/cifar10_<budget>_pretrain_loss.png from the loss curve stored in the result."""
    p = result["pretrain"]
    target = {True: "normalised pixels", False: "pixels"}.get(p.get("norm_pix_loss"), "pixels")
    return draw_loss_curve(p["loss_curve"], out / f"cifar10_{result['budget']}_pretrain_loss.png",
                           title=f"MAE pretraining loss, CIFAR-10, {result['budget']} budget ({p['variant']})",
                           ylabel=f"loss (MSE on masked patches, {target})")


def render_all(docs: Path) -> Path:
    """Redraw every budget's loss curve from its JSON and rebuild RESULTS.md (no training)."""
    for result in load_results(docs).values():
        draw_budget_curve(result, docs / "results")
    return write_results_md(docs)


def load_results(docs: Path) -> dict[str, dict]:
    found = {}
    for budget in BUDGET_ORDER:
        path = docs / "results" / f"cifar10_{budget}.json"
        if path.is_file():
            found[budget] = json.loads(path.read_text())
    return found


def fmt(x, digits: int = 2, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) and not isinstance(x, bool) else f"{x}{unit}"


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def results_table(r: dict) -> str:
    """The accuracy table of one budget's result (markdown)."""
    runs, test_n = r["runs"], r["data"].get("test_images")
    probe_split = r["data"].get("probe_train_split", "train")
    lines = ["| run | top-1 (%) | top-5 (%) | test images | steps x batch | wall-clock |",
             "|---|---:|---:|---:|---:|---:|"]
    labels = (("probe_mae", "linear probe, MAE encoder"), ("probe_random", "linear probe, random encoder"),
              ("finetune_mae", "fine-tune from MAE"), ("finetune_scratch", "fine-tune from scratch (random init)"))
    for key, label in labels:
        x = runs.get(key, {})
        lines.append(f"| {label} | {fmt(x.get('top1'))} | {fmt(x.get('top5'))} | {fmt(x.get('n_images'))} | "
                     f"{fmt(x.get('steps'))} x {fmt(x.get('global_batch'))} | {fmt_seconds(x.get('seconds'))} |")
    g = r["gaps"]
    lines += ["", f"Gap, linear probe (MAE - random): **{fmt(g['probe_top1_mae_minus_random'], unit=' points')}**; "
                  f"gap, fine-tuning (MAE - scratch): **{fmt(g['finetune_top1_mae_minus_scratch'], unit=' points')}**."
                  f" Accuracies are on all {fmt(test_n)} images of the test split, each counted once; the probes"
                  f" train on the {fmt(r['data']['splits'].get(probe_split))} images of split `{probe_split}`, "
                  f"fine-tuning streams the {fmt(r['data']['splits'].get('train'))} of `train`."]
    return "\n".join(lines)


def budget_section(r: dict) -> str:
    p, hw = r["pretrain"], r["hardware"]
    device = "; ".join(hw["gpus"]) if hw.get("gpus") else "no GPU"
    stages = "\n".join(f"| {s['stage']} | {fmt_seconds(s['seconds'])}{' (reused)' if s.get('reused') else ''} | "
                       f"`{s['command']}` |" for s in r["stages"])
    files = r.get("files", {})
    pics = f"![pretraining loss](results/{files['loss_curve']})" if files.get("loss_curve") else ""
    if files.get("reconstructions"):
        pics += (f"\n\nReconstructions after pretraining (original | masked | reconstruction | reconstruction with the "
                 f"visible patches pasted back), test images:\n\n"
                 f"![reconstructions](results/{files['reconstructions']})")
    reused = [s["stage"] for s in r["stages"] if s.get("reused")]
    if reused:
        total_sum = sum(float(s["seconds"]) for s in r["stages"])
        reuse_note = (f" **Stages {', '.join(reused)} were reused from an earlier run**, so this total leaves them "
                      f"out; the recorded stage times add up to {fmt_seconds(total_sum)}.")
    else:
        reuse_note = ""
    return f"""## Budget `{r['budget']}`: {r['summary']}

Run {r['started']} to {r['finished']}, **total wall-clock {fmt_seconds(r['total_seconds'])}** (all stages, data
preparation included), commit `{r.get('git_commit') or '?'}`{dirty_note(r.get('git_commit'))}.
Machine: {hw['cpu']}, {hw['cpu_cores']} cores, {fmt(hw.get('memory_gb'), 1)} GB memory, {device};
OMP_NUM_THREADS={hw.get('threads') or 'unset'};
Python {hw['python']}, torch {hw['versions'].get('torch')}, timm {hw['versions'].get('timm')}.{reuse_note}

{results_table(r)}

Pretraining: `{p['variant']}`, mask ratio {p['mask_ratio']}, {norm_pix_text(p)},
{fmt(p['steps'])} steps of {fmt(p['batch_size'])} images
({fmt(p['epochs'])} epochs), loss {fmt(p['first_loss'], 4)} at the first logged step -> {fmt(p['final_loss'], 4)} at the
last, median {fmt(p['median_images_per_sec'], 0)} images/s, {fmt_seconds(p['seconds'])}.

{pics}

Command: `{r['command']}`. Stages as they ran (from the repository root; paths are the run's):

| stage | wall-clock | command |
|---|---:|---|
{stages}
"""


def dirty_note(commit: str | None) -> str:
    return " (plus changes not yet committed)" if commit and commit.endswith("+dirty") else ""


def norm_pix_text(p: dict) -> str:
    return {True: "normalised-pixel targets", False: "raw-pixel targets"}.get(p.get("norm_pix_loss"), "pixel targets")


def write_results_md(docs: Path) -> Path:
    results = load_results(docs)
    sections = "\n".join(budget_section(results[b]) for b in BUDGET_ORDER if b in results)
    measured = ", ".join(f"`{b}`" for b in results) or "none yet"
    text = RESULTS_HEADER.format(measured=measured) + "\n" + sections + "\n" + RESULTS_RECIPE
    if "gpu" not in results:
        text += GPU_UNMEASURED
    path = docs / "RESULTS.md"
    path.write_text(text)
    return path


RESULTS_HEADER = """# Results: MAE on CIFAR-10

Written by `python launch/cifar10_chain.py --budget cpu|gpu|micro` (shards -> MAE pretraining -> linear probe ->
fine-tuning -> this file); rebuilt from `docs/results/cifar10_<budget>.json` on every run, so do not edit it by
hand. Every number below comes from the run named in its section. Budgets measured so far: {measured}.

The comparison in every budget: the linear probe of the MAE encoder against the same probe on a randomly initialised
encoder of the same architecture (`encoder=random`), and fine-tuning from the MAE encoder against fine-tuning from
random initialisation with the same recipe, steps and batch (`encoder=random`). Test accuracy is over the whole test
split (10,000 images for CIFAR-10).
"""

RESULTS_RECIPE = """
## The recipe, and why

Configs: `pretrain/configs/cifar10_<budget>.yaml`, `finetune/configs/cifar10_linprobe_<budget>.yaml`,
`finetune/configs/cifar10_finetune_<budget>.yaml`. Each file's comments give the step arithmetic and, for the CPU
budget, the short trial runs (2,000-image probe and test subsets, one epoch of pretraining) behind each choice;
those trial numbers are not results and are not repeated here.

- **Model.** 32 px input, ViT-Tiny (192-d, 12 blocks, 3 heads). Patch 4 (64 tokens) at the CPU budget: with mask
  0.75 the encoder sees 16 tokens, so a pretraining step costs about one full-image forward pass. Patch 2 (256
  tokens) for the GPU budget: CIFAR objects are a few pixels wide, and the published CIFAR MAE runs that reach ~90%
  fine-tuned use patch 2. Small decoders (128-d x 2 blocks at patch 4, 192-d x 4 at patch 2): with so few tokens a
  512-d x 8 decoder would cost more than the encoder.
- **Masking and target.** Random masking, ratio 0.75 (the MAE default). CPU budget: per-patch normalised pixel
  targets (`norm_pix_loss`), because raw-pixel targets are first learned as flat patch colours, which a random
  encoder already separates about as well; the normalised target forces local structure and gave the larger probe
  gap in the trials. GPU budget: raw pixels, as the patch-2 reproductions (a 2x2 patch normalised is mostly noise).
- **Schedule.** CPU: most of the chain's time goes to pretraining (the gap to random comes from there), at a high
  lr with a short warmup: AdamW, batch 64, lr 1e-3, 40 warmup steps, cosine to 0, ~2.3 epochs. GPU: 250 epochs,
  batch 1024, lr 1.2e-3, 10 warmup epochs.
- **Linear probe.** The MAE probe (frozen encoder -> BatchNorm without affine -> linear, LARS, no weight decay) on
  cached features (one encoder pass per image, eval transform). Feature: mean of the patch tokens (`pool=avg`); a
  short MAE run barely trains the CLS token. LARS moves the head by lr x 1e-3 x |w| per step, so with thousands
  rather than the recipe's 16k-image batches the probe needs a far higher lr than blr 0.1 to converge (the configs
  say how it was set). At the CPU budget the probe trains on a class-balanced 10,000-image subset of the training
  set (1,000 per class; feature extraction is the cost) and is tested on all 10,000 test images.
- **Fine-tuning** (the same file, steps and batch for MAE and for scratch): AdamW (0.9, 0.999), wd 0.05, layer-wise
  lr decay 0.85 (MAE-Lite's value for ViT-Tiny; 0.75 over 12 blocks leaves the first block 3% of the lr), global
  average pooling, cosine to 1e-6. The CPU budget is a third of an epoch, so it drops mixup/cutmix/RandAugment/
  erasing/drop path, which pay off only over many epochs, and uses lr 1e-3 at batch 64. The GPU recipe keeps the
  MAE set (RandAugment m9, mixup 0.8, cutmix 1.0, erasing 0.25, smoothing 0.1, drop path 0.1) for 100 epochs.
"""

GPU_UNMEASURED = """
## Budget `gpu`: settings for one H100 (UNMEASURED)

No session with a GPU has run the chain yet, so there are no GPU numbers here. The settings in
`pretrain/configs/cifar10_gpu.yaml` and `finetune/configs/cifar10_{linprobe,finetune}_gpu.yaml` are what we would
run: ViT-Tiny/2 (`mae_vit_tiny_patch2_dec192d4b`), mask 0.75, batch 1024, bf16, 250 pretraining epochs; fine-tuning
100 epochs at batch 512 with the full MAE augmentation; the probe on cached patch-token-mean features of all 50,000
training images. Targets: fine-tuned from MAE >= 93% top-1, linear probe >= 70%, both clearly above the random
encoder, pretraining + fine-tuning inside 25 minutes on one H100. The throughput behind the epoch counts is an
estimate (not a measurement): whoever runs `python launch/cifar10_chain.py --budget gpu` first should check the
images/s the pretraining prints and adjust `run.steps` so the two stages fit the 25 minutes.
"""


# ------------------------------------------------------------------------------------------------- loss-curve PNG
# A line chart by hand with PIL: matplotlib is not a dependency, and no kept library draws charts with PIL alone.


def nice_step(span: float, target_ticks: int = 6) -> float:
    """A tick spacing of 1, 2 or 5 times a power of ten giving about `target_ticks` intervals over `span`."""
    if not span > 0:
        return 1.0
    raw = span / max(1, target_ticks)
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * power * (1 + 1e-9):
            return m * power
    return 10.0 * power


def nice_ticks(lo: float, hi: float, target_ticks: int = 6) -> list[float]:
    """Round tick positions covering [lo, hi]: multiples of `nice_step` from floor(lo) to ceil(hi)."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target_ticks)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def tick_label(v: float, step: float) -> str:
    if step >= 1 and abs(v - round(v)) < 1e-9:
        return f"{int(round(v)):,}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{decimals}f}"


def moving_average(ys: list[float], half: int) -> list[float]:
    """Centred mean over ys[i-half : i+half+1], cut at the ends (no lag, unlike a trailing mean)."""
    prefix = [0.0]
    for y in ys:
        prefix.append(prefix[-1] + y)
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _font(size: int):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_loss_curve(points: list[list[float]], path: Path, title: str = "", xlabel: str = "optimizer step",
                    ylabel: str = "reconstruction loss (MSE on masked patches)", size=(900, 540)) -> Path:
    """A PNG line chart of (step, loss) points: axes, round ticks, grid, labels, raw values and a moving average."""
    w, h = size
    left, right, top, bottom = 92, 24, 46, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(13)
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(float(y))]
    d.text((left, 14), title, fill="black", font=font)
    x0, y0, x1, y1 = left, top, w - right, h - bottom  # plot area
    if not pts:
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0 + 20, (y0 + y1) // 2), "no loss values logged", fill="black", font=font)
        img.save(path)
        return path
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(min(0.0, min(xs)), max(xs), 8)
    yt = nice_ticks(min(ys), max(ys), 6)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    xstep, ystep = (xt[1] - xt[0]) if len(xt) > 1 else 1.0, (yt[1] - yt[0]) if len(yt) > 1 else 1.0
    for x in xt:
        d.line([(px(x), y0), (px(x), y1)], fill=(228, 228, 228))
        d.line([(px(x), y1), (px(x), y1 + 5)], fill="black")
        label = tick_label(x, xstep)
        tw = d.textlength(label, font=small)
        d.text((px(x) - tw / 2, y1 + 8), label, fill="black", font=small)
    for y in yt:
        d.line([(x0, py(y)), (x1, py(y))], fill=(228, 228, 228))
        d.line([(x0 - 5, py(y)), (x0, py(y))], fill="black")
        label = tick_label(y, ystep)
        tw = d.textlength(label, font=small)
        d.text((x0 - 9 - tw, py(y) - 8), label, fill="black", font=small)
    d.rectangle([x0, y0, x1, y1], outline="black")
    tw = d.textlength(xlabel, font=font)
    d.text(((x0 + x1) / 2 - tw / 2, h - 30), xlabel, fill="black", font=font)
    vertical = Image.new("RGBA", (int(d.textlength(ylabel, font=font)) + 4, 22), (255, 255, 255, 0))
    ImageDraw.Draw(vertical).text((2, 0), ylabel, fill="black", font=font)
    vertical = vertical.rotate(90, expand=True)
    img.paste(vertical, (8, int((y0 + y1) / 2 - vertical.height / 2)), vertical)

    raw = [(px(x), py(y)) for x, y in pts]
    half = len(pts) // 80
    window = 2 * half + 1
    smooth = [(px(x), py(y)) for x, y in zip(xs, moving_average(ys, half))]
    if len(raw) == 1:
        cx, cy = raw[0]
        d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(31, 119, 180))
    else:
        d.line(raw, fill=(160, 196, 228), width=1)
        d.line(smooth, fill=(31, 119, 180), width=2)
    legend = f"per logged step (light), centred mean of {window} (dark)" if window > 1 else "per logged step"
    tw = d.textlength(legend, font=small)
    d.text((x1 - tw - 8, y0 + 6), legend, fill=(60, 60, 60), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


# ------------------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu", help="which recipe/budget to run (default: cpu)")
    p.add_argument("--work", default=None, 
                   help="scratch folder for shards and runs (default: /tmp/tessera-cifar10-BUDGET)")
    p.add_argument("--tarball", default=DEFAULT_TARBALL, help=f"CIFAR-10 JPEG tarball (default: {DEFAULT_TARBALL})")
    p.add_argument("--cifar-dir", default="/tmp/cifar10", 
                   help="where the tarball is (or gets) unpacked (default: /tmp/cifar10)")
    p.add_argument("--docs", default=str(REPO / "docs"), 
                   help="folder receiving RESULTS.md and results/ (default: docs/)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--pretrain-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra pretraining override")
    p.add_argument("--probe-arg", action="append", default=[], metavar="KEY=VALUE", help="extra linear-probe override")
    p.add_argument("--finetune-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra fine-tuning override")
    p.add_argument("--render-only", action="store_true",
                   help="only redraw the loss curves and rebuild docs/RESULTS.md from docs/results/*.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    args.argv_record = ["launch/cifar10_chain.py", *(sys.argv[1:] if argv is None else argv)]
    if args.render_only:
        print(f"[chain] wrote {render_all(Path(args.docs))}")
        return None
    try:
        result = chain(args)
    except ChainError as exc:
        raise SystemExit(f"cifar10_chain: {exc}") from None
    r = result["runs"]
    print(f"[chain] {args.budget}: probe MAE {fmt(r['probe_mae']['top1'])} vs random {fmt(r['probe_random']['top1'])}; "
          f"fine-tune MAE {fmt(r['finetune_mae']['top1'])} vs scratch {fmt(r['finetune_scratch']['top1'])}; "
          f"total {fmt_seconds(result['total_seconds'])}", flush=True)
    return result


if __name__ == "__main__":
    main()
