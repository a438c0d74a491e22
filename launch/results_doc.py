"""The chain's outputs: docs/results/cifar10_<budget>.json (written and read back), the loss-curve PNG per budget, and
docs/RESULTS.md rendered from every budget's JSON."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from launch.loss_plot import draw_loss_curve

BUDGET_ORDER = ("gpu", "cpu", "micro")


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
