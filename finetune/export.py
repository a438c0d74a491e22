"""Writing a trained classifier: `<name>.safetensors` plus `classifier.json` beside it (read back by
`launch/weights.py`).

classifier.json holds what is needed to rebuild the model without the training config: `kind` ("vit": a timm
VisionTransformer with its head, from fine-tuning; "distilled": timm's VisionTransformerDistilled, DeiT's two heads,
averaged in eval mode; "cnn": a timm CNN trained from scratch; "probe": frozen encoder + BatchNorm/Linear head), the
encoder architecture (`encoder_cfg`; a `hybrid` key names a hybrid ViT, `models/hybrid.py`, a `cnn` key a timm CNN),
class count and names, pooling (`pool`), input size and normalisation, and where the encoder came from. Fine-tuning
also records `timm`: the `timm.create_model` name and kwargs that rebuild the exported weights in timm
(`pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=N)`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from launch.run_files import CLASSIFIER_META

FORMAT = "tessera-classifier/1"


def save_classifier(state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict) -> Path:
    """Write weights (atomically) and the classifier.json of their directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    (path.parent / CLASSIFIER_META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    return path


__all__ = ["save_classifier", "FORMAT"]
