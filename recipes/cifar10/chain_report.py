"""The CIFAR-10 chain's report writer: the record docs/results/cifar10_<budget>.json, the loss curve, the
reconstruction grid and the budget's block of docs/RESULTS.md, rendered from the stored records alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from launch import run_files
from recipes.loss_plot import draw_loss_curve
from recipes.page import fmt, fmt_seconds, stage_rows, write_blocks
from recipes.record import collect, commit, save_record, stage

RUN_LABELS = (("probe_mae", "linear probe, MAE encoder"), ("probe_random", "linear probe, random encoder"),
              ("probe_pixels", "linear probe, raw pixels"), ("attentive_mae", "attentive probe, MAE encoder"),
              ("attentive_random", "attentive probe, random encoder"),
              ("attentive_pixels", "attentive probe, raw pixels"),
              ("finetune_mae", "fine-tune from MAE"), ("finetune_scratch", "fine-tune from scratch (random init)"))
RECONSTRUCTIONS_MAX_BYTES = 100_000  # a larger grid stays in the run directory


def write_results(header: dict, stages: list[dict], run_dirs: dict[str, Path], folders: dict[str, Path],
                  docs: Path) -> dict:
    """Collect and store the record with its pictures, rewrite the page's blocks; returns the record."""
    name, out, grid = header["name"], docs / "results", run_dirs["pretrain"] / run_files.RECONSTRUCTIONS
    record = {**collect(header, stages, run_dirs, folders), "files": {"loss_curve": f"{name}_pretrain_loss.png"}}
    if grid.is_file() and grid.stat().st_size < RECONSTRUCTIONS_MAX_BYTES:
        record["files"]["reconstructions"] = f"{name}_reconstructions.png"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out / record["files"]["reconstructions"])
    draw_curve(save_record(out / f"{name}.json", record))
    render_page(docs)
    return record


def render_page(docs: Path, redraw: bool = False) -> Path:
    """docs/RESULTS.md's block of every stored budget (and, with `redraw`, their loss curves) from the records."""
    paths = sorted((docs / "results").glob("cifar10_*.json"))
    for path in paths if redraw else []:
        draw_curve(path)
    return write_blocks(docs / "RESULTS.md", {path.stem: budget_section(json.loads(path.read_text()))
                                              for path in paths})


def draw_curve(path: Path) -> Path:
    """The loss curve of the stored record at `path`, beside it."""
    p = stage(record := json.loads(path.read_text()), "pretrain")
    target = "normalised pixels" if p["model"].get("norm_pix_loss") else "pixels"
    return draw_loss_curve(p["metrics"]["loss_curve"], path.parent / record["files"]["loss_curve"],
                           title=f"MAE pretraining loss, CIFAR-10, {record['budget']} budget ({p['model']['name']})",
                           ylabel=f"loss (MSE on masked patches, {target})")


def quality_table(r: dict, m: dict) -> str:
    """What the features hold, three yardsticks side by side: the k-NN monitor at the end of pretraining (the encoder
    at init and raw pixels are its baselines, on the same bank and queries), the linear and the attentive probe."""
    top1 = {key: stage(r, key).get("eval", {}).get("top1") for key in
            ("probe_mae", "probe_random", "probe_pixels", "attentive_mae", "attentive_random", "attentive_pixels")}
    knn = {"mae": m.get("knn_top1"), "random": m.get("knn_top1_init"), "pixels": m.get("knn_top1_pixels")}
    pct = {k: None if v is None else round(100 * v, 2) for k, v in knn.items()}
    rows = "\n".join(f"| {label} | {fmt(pct[k])} | {fmt(top1[f'probe_{k}'])} | {fmt(top1[f'attentive_{k}'])} |"
                     for k, label in (("mae", "MAE encoder"), ("random", "random encoder (at init)"),
                                      ("pixels", "raw pixels")))
    ft = {key: stage(r, key).get("eval", {}).get("top1") for key in ("finetune_mae", "finetune_scratch")}
    return f"""What the features hold, top-1 (%) on the test split (k-NN: the pretraining run's monitor, its bank and
queries; the probes: all test images):

| features | k-NN | linear probe | attentive probe |
|---|---:|---:|---:|
{rows}

Fine-tuning: from MAE {fmt(ft['finetune_mae'])}, from scratch {fmt(ft['finetune_scratch'])}.

"""


def budget_section(r: dict) -> str:
    """The budget's section: provenance, the four runs, the gaps, the pretraining, the stages as they ran."""
    prov, hw, data = r["provenance"], r["provenance"]["hardware"], r["data"]
    p, m = stage(r, "pretrain"), stage(r, "pretrain")["metrics"]
    ev = {key: stage(r, key).get("eval", {}) for key, _ in RUN_LABELS}
    rows = "\n".join(f"| {label} | {fmt(ev[key].get('top1'))} | {fmt(ev[key].get('top5'))} | "
                     f"{fmt(ev[key].get('n_images'))} | {fmt(ev[key].get('steps'))} x "
                     f"{fmt(ev[key].get('global_batch'))} | {fmt_seconds(stage(r, key).get('seconds'))} |"
                     for key, label in RUN_LABELS if stage(r, key))  # a record from before a stage existed

    def gap(a, b):
        x, y = ev[a].get("top1"), ev[b].get("top1")
        return fmt(round(x - y, 2) if x is not None and y is not None else None, unit=" points")

    reused = [s["stage"] for s in r["stages"] if s.get("reused")]
    reused_note = (f" **Stages {', '.join(reused)} were reused from an earlier run**, so this total leaves them out; "
                   f"the recorded stage times add up to {fmt_seconds(sum(s['seconds'] for s in r['stages']))}."
                   if reused else "")
    recon = r["files"].get("reconstructions")
    recon_note = ("\n\nReconstructions after pretraining (original | masked | reconstruction | reconstruction with the "
                  f"visible patches pasted back), test images:\n\n![reconstructions](results/{recon})" if recon else "")
    gpus = "; ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in hw.get("gpus", [])) or "no GPU"
    sha = commit(r)
    dirty = " (plus changes not yet committed)" if sha.endswith("+dirty") else ""
    curve, split = m["loss_curve"], data["probe_split"]
    quality = quality_table(r, m) if stage(r, "attentive_mae") else ""
    return f"""## Budget `{r['budget']}`: {r['summary']}

Run {r['started']} to {r['finished']}, **total wall-clock {fmt_seconds(r['total_seconds'])}** (all stages, data
preparation included), commit `{sha.removesuffix('+dirty')}`{dirty}.
Machine: {hw['cpu']}, {hw['cpu_cores']} cores, {fmt(hw.get('memory_gb'), 1)} GB memory, {gpus};
OMP_NUM_THREADS={r.get('threads') or 'unset'};
Python {prov['python']}, torch {prov['packages'].get('torch')}, timm {prov['packages'].get('timm')}.{reused_note}

| run | top-1 (%) | top-5 (%) | test images | steps x batch | wall-clock |
|---|---:|---:|---:|---:|---:|
{rows}

Gap, linear probe (MAE - random): **{gap('probe_mae', 'probe_random')}**; gap, fine-tuning (MAE - scratch): \
**{gap('finetune_mae', 'finetune_scratch')}**. Accuracies are on all {fmt(data['splits'].get('test'))} images of the \
test split, each counted once; the probes train on the {fmt(data['splits'].get(split))} images of split `{split}`, \
fine-tuning streams the {fmt(data['splits'].get('train'))} of `train`.

{quality}Pretraining: `{p['model']['name']}`, mask ratio {p['model']['mask_ratio']}, \
{'normalised-pixel' if p['model'].get('norm_pix_loss') else 'raw-pixel'} targets,
{fmt(m['steps'])} steps of {fmt(p['run']['global_batch'])} images
({fmt(m['epoch'])} epochs), loss {fmt(curve[0][1], 4)} at the first logged step -> {fmt(curve[-1][1], 4)} at the
last, median {fmt(m['images_per_sec'], 0)} images/s, {fmt_seconds(p['seconds'])}.

![pretraining loss](results/{r['files']['loss_curve']}){recon_note}

Command: `{r['command']}`. Stages as they ran (from the repository root; WORK, CIFAR_DIR and TARBALL stand for the \
run's --work, --cifar-dir and --tarball):

{stage_rows(r)}"""
