"""The run directory's layout: the names of the files a run writes and other tools read, one definition each.

Writers (the session, the entry points' exports) and the one reader of weights (`launch/weights.py`) take the names
from here, so the layout is stated once.
"""

from __future__ import annotations

CONFIG = "config.yaml"  # the resolved config
RUN_RECORD = "run.json"  # provenance: command, commit, packages, hardware, batch arithmetic, times, final metrics
METRICS = "metrics.jsonl"  # one JSON object per logged step
SAMPLES = "samples.jsonl"  # data.log_samples=true: each step's sample keys and stream positions
CHECKPOINTS = "checkpoints"  # resumable state, checkpoints/step_NNNNNN/
LOCK = "run.lock"  # the run directory's claim (launch/run_dir.py)

ENCODER = "encoder.safetensors"  # the encoder under timm key names (every pretraining objective)
TEACHER_ENCODER = "teacher_encoder.safetensors"  # data2vec's EMA teacher
PRETRAINER = {"mae": "mae.safetensors", "simmim": "simmim.safetensors", "data2vec": "data2vec.safetensors"}
RECONSTRUCTIONS = "reconstructions.png"  # the final reconstruction grid
RECONSTRUCTION_STEPS = "reconstructions"  # reconstructions/step_NNNNNN.png during the run
KNN_BASELINES = "knn_baselines.json"  # the k-NN monitor's baselines (encoder at init, raw pixels)
KNN_CURVE = "knn_curve.png"

CLASSIFIER_META = "classifier.json"  # what rebuilds a classifier without its training config
CLASSIFIER_BEST = "classifier_best.safetensors"
CLASSIFIER_LAST = "classifier_last.safetensors"
EVAL = "eval.json"  # top1, top5, n_images of the final evaluation
FEATURES = "features"  # the linear probe's feature cache
PLAN = "plan.json"  # `--plan`'s prediction of the run (launch/plan.py), before it runs

__all__ = ["CONFIG", "RUN_RECORD", "METRICS", "SAMPLES", "CHECKPOINTS", "LOCK", "ENCODER", "TEACHER_ENCODER",
           "PRETRAINER", "RECONSTRUCTIONS", "RECONSTRUCTION_STEPS", "KNN_BASELINES", "KNN_CURVE", "CLASSIFIER_META",
           "CLASSIFIER_BEST", "CLASSIFIER_LAST", "EVAL", "FEATURES", "PLAN"]
