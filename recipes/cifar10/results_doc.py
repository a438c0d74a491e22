"""The chain's outputs: docs/results/cifar10_<budget>.json (written and read back), the loss-curve PNG per budget, and
docs/RESULTS.md rendered from every budget's JSON through the `string.Template` files in `templates/`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from string import Template

from recipes.cifar10.loss_plot import draw_loss_curve

BUDGET_ORDER = ("gpu", "cpu", "micro")
TEMPLATES = Path(__file__).resolve().parent / "templates"
RUN_LABELS = (("probe_mae", "linear probe, MAE encoder"), ("probe_random", "linear probe, random encoder"),
              ("finetune_mae", "fine-tune from MAE"), ("finetune_scratch", "fine-tune from scratch (random init)"))
TARGETS = {True: "normalised-pixel targets", False: "raw-pixel targets"}  # by pretrain.norm_pix_loss


def render(name: str, **values) -> str:
    """templates/<name>.md.tmpl with `values` substituted (a missing value is a KeyError), without the final newline."""
    return Template((TEMPLATES / f"{name}.md.tmpl").read_text()).substitute(values).rstrip("\n")


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
    target = "normalised pixels" if p.get("norm_pix_loss") else "pixels"
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


def budget_section(r: dict) -> str:
    """The RESULTS.md section of one budget's result."""
    p, hw, runs, data = r["pretrain"], r["hardware"], r["runs"], r["data"]
    run_rows = []
    for key, label in RUN_LABELS:
        x = runs.get(key, {})
        run_rows.append(f"| {label} | {fmt(x.get('top1'))} | {fmt(x.get('top5'))} | {fmt(x.get('n_images'))} | "
                        f"{fmt(x.get('steps'))} x {fmt(x.get('global_batch'))} | {fmt_seconds(x.get('seconds'))} |")
    stage_rows = [f"| {s['stage']} | {fmt_seconds(s['seconds'])}{' (reused)' if s.get('reused') else ''} | "
                  f"`{s['command']}` |" for s in r["stages"]]
    reused = [s["stage"] for s in r["stages"] if s.get("reused")]
    reused_note = ""
    if reused:
        stage_total = fmt_seconds(sum(float(s["seconds"]) for s in r["stages"]))
        reused_note = " " + render("reused_note", stages=", ".join(reused), stage_total=stage_total)
    files = r.get("files", {})
    reconstructions = ""
    if files.get("reconstructions"):
        reconstructions = "\n\n" + render("reconstructions", file=files["reconstructions"])
    commit = r.get("git_commit") or "?"
    probe_split = data.get("probe_train_split", "train")
    return render(
        "budget", budget=r["budget"], summary=r["summary"], started=r["started"], finished=r["finished"],
        total_time=fmt_seconds(r["total_seconds"]), commit=commit,
        dirty_note=" " + render("dirty_note") if commit.endswith("+dirty") else "",
        cpu=hw["cpu"], cpu_cores=hw["cpu_cores"], memory_gb=fmt(hw.get("memory_gb"), 1),
        device="; ".join(hw["gpus"]) if hw.get("gpus") else "no GPU", threads=hw.get("threads") or "unset",
        python=hw["python"], torch=hw["versions"].get("torch"), timm=hw["versions"].get("timm"),
        reused_note=reused_note, run_rows="\n".join(run_rows),
        probe_gap=fmt(r["gaps"]["probe_top1_mae_minus_random"], unit=" points"),
        finetune_gap=fmt(r["gaps"]["finetune_top1_mae_minus_scratch"], unit=" points"),
        test_images=fmt(data.get("test_images")), probe_images=fmt(data["splits"].get(probe_split)),
        probe_split=probe_split, train_images=fmt(data["splits"].get("train")),
        variant=p["variant"], mask_ratio=p["mask_ratio"], targets=TARGETS.get(p.get("norm_pix_loss"), "pixel targets"),
        steps=fmt(p["steps"]), batch_size=fmt(p["batch_size"]), epochs=fmt(p["epochs"]),
        first_loss=fmt(p["first_loss"], 4), final_loss=fmt(p["final_loss"], 4),
        images_per_sec=fmt(p["median_images_per_sec"], 0), pretrain_time=fmt_seconds(p["seconds"]),
        loss_curve=files.get("loss_curve", f"cifar10_{r['budget']}_pretrain_loss.png"),
        reconstructions=reconstructions, command=r["command"], stage_rows="\n".join(stage_rows))


def write_results_md(docs: Path) -> Path:
    """docs/RESULTS.md from every budget's JSON in docs/results/ (the gpu note stands in for an unmeasured gpu)."""
    results = load_results(docs)
    sections = "\n\n".join(budget_section(results[b]) for b in BUDGET_ORDER if b in results)
    gpu_unmeasured = "" if "gpu" in results else "\n\n" + render("gpu_unmeasured")
    text = render("results", measured=", ".join(f"`{b}`" for b in results) or "none yet", sections=sections,
                  gpu_unmeasured=gpu_unmeasured)
    # studies measured outside the chain (docs/results/*_cpu.md: objectives, distillation) follow, as they were written
    extra = [f.read_text().strip() for f in sorted((docs / "results").glob("*.md"))]
    path = docs / "RESULTS.md"
    path.write_text("\n\n".join([text, *extra]) + "\n")
    return path
