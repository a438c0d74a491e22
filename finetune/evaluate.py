"""Evaluate a saved classifier on a split:

    python finetune/evaluate.py checkpoint=RUN_DIR/classifier_best.safetensors data.test=DIR:SPLIT


Works for fine-tuned classifiers and linear probes (encoder + head) alike: the model is rebuilt from the
classifier.json beside the weights, the split is read with its own eval transform (size, normalisation and crop
from classifier.json), every image counted exactly once across ranks. Prints and writes top1, top5, n_images
(+ loss, checkpoint, data) as JSON; runs under `accelerate launch` too.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import ConfigError
from data.device_input import device_batches
from data.eval_stream import build_eval_loader
from data.info import locate
from data.transforms import eval_transform, uint8_output
from finetune.config import EvaluateConfig
from finetune.downstream import labelled_split
from finetune.evaluation import evaluate_model, write_eval_json
from launch.accel import build_accelerator
from launch.config import parse_cli
from launch.errors import cli
from launch.sections import OptimConfig, RunConfig
from launch.weights import classifier_model, read_weights

PROG = "finetune/evaluate.py"


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(EvaluateConfig, argv, PROG)
    w = read_weights(cfg.checkpoint, want="classifier")
    model, meta, ckpt_path = classifier_model(w), w.meta, w.path
    spec = locate(cfg.data.test)
    info = labelled_split(spec, "data.test")
    if info.num_classes != meta["num_classes"]:
        raise ConfigError(f"the classifier has {meta['num_classes']} classes but data.test={cfg.data.test} has "
                          f"{info.num_classes} (dataset.json)")

    run = RunConfig(output_dir=str(ckpt_path.parent), precision=cfg.run.precision, trackers=("none",))
    accelerator = build_accelerator(run, OptimConfig())
    model.to(accelerator.device)
    img_size = meta.get("img_size") or meta["encoder_cfg"]["img_size"]
    img_size = img_size if isinstance(img_size, int) else img_size[0]
    output = uint8_output(info.meta, meta["encoder_cfg"].get("in_chans", 3))  # 8-bit RGB: normalised on the device
    tf = eval_transform(img_size, meta["mean"], meta["std"], meta.get("crop_pct"), output=output)
    loader = build_eval_loader(spec, batch_size=cfg.data.eval_batch, transform=tf, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, num_workers=cfg.data.num_workers)
    batches = device_batches(loader, accelerator.device, mean=meta["mean"], std=meta["std"])
    result = evaluate_model(model, batches, accelerator, total=len(loader), progress=cfg.run.progress,
                            desc="evaluate")
    out = {"top1": result["top1"], "top5": result["top5"], "n_images": result["n_images"], "loss": result["loss"],
           "n_corrupt": result["n_corrupt"],
           "checkpoint": str(ckpt_path), "kind": meta["kind"], "step": meta.get("step"), "data": cfg.data.test,
           "encoder": meta.get("encoder")}
    split = cfg.data.test.rpartition(":")[2] if ":" in cfg.data.test else "data"
    output = Path(cfg.output) if cfg.output else ckpt_path.parent / f"eval-{ckpt_path.stem}-{split}.json"
    write_eval_json(output, out, accelerator)
    if accelerator.is_main_process:
        print(json.dumps({k: out[k] for k in ("top1", "top5", "n_images", "n_corrupt", "loss", "checkpoint", "data")},
                         indent=2))
        if out["n_corrupt"]:
            print(f"WARNING: {out['n_corrupt']} images of {cfg.data.test} could not be decoded and are not counted: "
                  f"top1/top5 are over {out['n_images']} of {out['n_images'] + out['n_corrupt']} images", flush=True)
        print(f"[evaluate] wrote {output}")
    return out


if __name__ == "__main__":
    cli(PROG, main)()
