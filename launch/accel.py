"""Accelerator set-up shared by the entry points: precision, trackers, CPU/gloo and DeepSpeed-on-CPU workarounds.

What `accelerate launch` (or `torchrun`) decides stays with it: number of processes, DDP vs DeepSpeed, the ZeRO
stage. `build_accelerator` adds what the launcher cannot know:
* precision `auto`: the launcher's `mixed_precision` if it set one, else bf16 on a GPU that supports it, else fp32;
* the gloo backend when there is no CUDA (without it Accelerate leaves the backend unset and, under DeepSpeed,
  every rank believes it is alone), and `cpu=True` for a multi-process launch without CUDA and DeepSpeed (so a
  `--multi_gpu` launch on a CPU box is MULTI_CPU, not unsynchronised ranks);
* the launcher's DeepSpeed JSON (`deepspeed_config_file` in the yaml, `ACCELERATE_DEEPSPEED_CONFIG_FILE`) found from
  any directory: a relative path that is not under the current directory is taken relative to the repository (the
  shipped yamls name `launch/deepspeed/zero2.json`), and a file found in neither place is one `UserError` line
  (`resolve_deepspeed_config_file`), not a traceback on every rank;
* DeepSpeed on a CPU box: skip the JIT build of DeepSpeed's shared-memory comm op (~100 s of g++), and check that
  `transformers` is importable (Accelerate's DeepSpeed path imports it);
* `configure_deepspeed`: DeepSpeed's micro-batch, accumulation and clipping filled from our config before `prepare`
  (the DataLoader is not prepared, so DeepSpeed cannot infer the batch size). The optimizer stays a torch AdamW
  (never a DeepSpeed-config optimizer, which would JIT-compile a CPU kernel).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from core.errors import UserError
from launch.sections import OptimConfig, RunConfig

REPO = Path(__file__).resolve().parents[1]
DS_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def uses_deepspeed_env() -> bool:
    """True when the launcher asked for DeepSpeed (`accelerate launch` with a DeepSpeed config sets this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def resolve_precision(precision: str) -> str:
    """`auto` -> the launcher's mixed_precision if given, else bf16 on a bf16-capable GPU, else `no` (fp32)."""
    if precision != "auto":
        return precision
    from_launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if from_launcher:
        return from_launcher
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _inline_json(value: str) -> bool:
    """Accelerate also takes the DeepSpeed config as base64-encoded JSON; such a value is not a path."""
    try:
        return isinstance(json.loads(base64.urlsafe_b64decode(value)), dict)
    except (ValueError, TypeError):
        return False


def resolve_deepspeed_config_file(environ: dict | None = None) -> Path | None:
    """Point the launcher's DeepSpeed config file at an absolute path before Accelerate reads it (on every rank).

    A path that exists as given (absolute, or relative to the current directory) is kept; a relative one that does
    not is looked up in the repository (the shipped launch/accelerate/zero*.yaml name launch/deepspeed/zero*.json), so
    the launch files work from any directory. Raises `UserError` naming the file when it is in neither place or is
    not a JSON object. Returns the file, or None when there is none (no DeepSpeed, or an inline config)."""
    environ = os.environ if environ is None else environ
    value = environ.get(DS_FILE_ENV, "")
    if not value or value == "none" or environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    given = Path(value).expanduser()
    candidates = [given] if given.is_absolute() else [given, REPO / given]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        if _inline_json(value):
            return None
        where = str(given) if given.is_absolute() else f"{Path.cwd()} (the current directory) or in {REPO}"
        raise UserError(f"the DeepSpeed config file {value} (deepspeed_config_file in the accelerate yaml, or "
                        f"{DS_FILE_ENV}) is not in {where}; give the path of an existing DeepSpeed JSON "
                        f"(e.g. {REPO / 'launch' / 'deepspeed' / 'zero2.json'})")
    try:
        config = json.loads(found.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the DeepSpeed config file {found} cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"the DeepSpeed config file {found} holds a {type(config).__name__}, not a JSON object")
    environ[DS_FILE_ENV] = str(found.resolve())
    return found.resolve()


def deepspeed_cpu_workarounds() -> None:
    """Make DeepSpeed run on a CPU-only machine (docs/LAUNCH.md, "DeepSpeed on CPU")."""
    try:
        importlib.import_module("transformers")
    except ImportError:
        raise SystemExit(
            "DeepSpeed through Accelerate needs the `transformers` package (Accelerate imports it): "
            "pip install transformers"
        ) from None
    importlib.import_module("deepspeed.comm.torch")
    # `import deepspeed.comm.torch as m` yields torch itself through a star-export; take the module from sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def build_accelerator(run: RunConfig, optim: OptimConfig, *, logging_subdir: str = "logs") -> Accelerator:
    """An `Accelerator` for `run` with `optim.grad_accum_steps` micro-steps per optimizer step. Under DeepSpeed, call
    `configure_deepspeed` with the micro-batch before `prepare` (the batch depends on the world size known here)."""
    resolve_deepspeed_config_file()
    cuda = torch.cuda.is_available()
    if uses_deepspeed_env() and not cuda:
        deepspeed_cpu_workarounds()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gloo = InitProcessGroupKwargs(backend="gloo", timeout=timedelta(minutes=30))
    handlers = [gloo] if distributed and not cuda else []
    trackers = [t for t in run.trackers if t != "none"]
    if "tensorboard" in trackers and importlib.util.find_spec("tensorboard") is None:
        trackers.remove("tensorboard")
    project = ProjectConfiguration(
        project_dir=str(run.output_dir),
        logging_dir=str(Path(run.output_dir) / logging_subdir),
        automatic_checkpoint_naming=False,  # we name checkpoints by step (Accelerate's counter collides after resume)
    )
    # Without CUDA, a multi-process launch must be MULTI_CPU (gloo); otherwise Accelerate would start a process group
    # yet leave every model unwrapped (distributed type NO) and the ranks would train apart without syncing gradients.
    cpu = distributed and not cuda and not uses_deepspeed_env()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(run.precision),
        gradient_accumulation_steps=optim.grad_accum_steps,
        log_with=trackers or None,
        project_config=project,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    if uses_fsdp_env() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        reduce_in_fp32(accelerator)
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise SystemExit(
            f"{accelerator.num_processes} processes but no distributed backend: gradients would not be synchronised. "
            "On CPU launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu (see docs/LAUNCH.md)"
        )
    return accelerator


def uses_fsdp_env() -> bool:
    """True when the launcher asked for FSDP (`distributed_type: FSDP` in the accelerate yaml sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Make a CPU-only multi-process launch with an FSDP launch file (launch/accelerate/fsdp2.yaml) FSDP.

    Accelerate 1.16 picks FSDP only for an accelerator device (`AcceleratorState` sets it under MULTI_GPU/NPU/...); on
    a CPU box the same launch becomes MULTI_CPU, i.e. plain DDP, silently. torch's `fully_shard` itself runs on CPU
    over gloo (all-gather and reduce-scatter, bf16 included), so the state is switched to FSDP with the plugin the
    launcher's variables describe (`FSDP_VERSION`, wrap policy, state-dict type), as Accelerate does on a GPU. Only
    the distributed type and the plugin change: the process group (gloo) and the device (cpu) stay Accelerate's.
    """
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables the launcher exported
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def reduce_in_fp32(accelerator: Accelerator) -> None:
    """FSDP2 with bf16/fp16: gradients reduce-scattered in fp32 (the parameters are still all-gathered and computed
    in the low precision). Accelerate's policy reduces in the compute dtype; summing many ranks' gradients in bf16
    (8 bits of mantissa) loses what fp32 keeps, so Tessera reduces in fp32 as torchtitan does by default."""
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin, "mixed_precision_policy", None)
    if plugin.fsdp_version == 2 and policy is not None and getattr(policy, "reduce_dtype", None) not in (
            None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def fsdp_summary(accelerator: Accelerator) -> dict | None:
    """For run.json under FSDP: the version, the modules that are shard units (their names; "" is the root) and the
    mixed-precision dtypes; None otherwise. Call after `prepare`."""
    if accelerator.distributed_type != DistributedType.FSDP or not accelerator._models:
        return None
    from torch.distributed.fsdp import FSDPModule

    model = accelerator._models[0]
    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    dtype = (lambda d: str(d).replace("torch.", "") if d is not None else "float32")
    return {"version": accelerator.state.fsdp_plugin.fsdp_version,
            "units": [name for name, m in model.named_modules() if isinstance(m, FSDPModule)],
            "param_dtype": dtype(getattr(policy, "param_dtype", None)),
            "reduce_dtype": dtype(getattr(policy, "reduce_dtype", None))}


def configure_deepspeed(accelerator: Accelerator, micro_batch: int, optim: OptimConfig) -> dict | None:
    """Fill the DeepSpeed config's batch, accumulation and clipping from our config (before `prepare`); a no-op
    (None) without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if "optimizer" in config or "scheduler" in config:
        raise SystemExit(
            "the DeepSpeed config must not define `optimizer` or `scheduler`: Tessera uses torch AdamW and sets the lr "
            "itself each step; remove those blocks from the DeepSpeed JSON"
        )
    config["train_micro_batch_size_per_gpu"] = int(micro_batch)
    config["gradient_accumulation_steps"] = int(optim.grad_accum_steps)
    config["train_batch_size"] = int(micro_batch) * int(optim.grad_accum_steps) * accelerator.num_processes
    config["gradient_clipping"] = float(optim.clip_grad) if optim.clip_grad else 0.0
    zero = config.setdefault("zero_optimization", {})
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":  # "auto" needs model.config.hidden_size, which a timm ViT has not
            zero[key] = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}.get(key, 1e5)
    accelerator.gradient_accumulation_steps = int(optim.grad_accum_steps)
    return config


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage under DeepSpeed, else None."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def input_dtype(accelerator: Accelerator) -> torch.dtype:
    """dtype to cast inputs to: DeepSpeed converts the model to bf16/fp16 but not the inputs; DDP autocasts."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    return torch.float32


__all__ = [
    "build_accelerator",
    "configure_deepspeed",
    "deepspeed_cpu_workarounds",
    "resolve_deepspeed_config_file",
    "resolve_precision",
    "uses_deepspeed_env",
    "uses_fsdp_env",
    "fsdp_on_cpu",
    "fsdp_summary",
    "reduce_in_fp32",
    "zero_stage",
    "input_dtype",
]
