"""The run around the loop, owned once for every entry point: start-up, the run directory, what survives a restart,
resume, the run record, and the end of the run.

    rt = start_run(cfg.run, cfg.optim, micro=cfg.data.micro_batch, global_=cfg.data.global_batch)  # before the model
    ... build the model (identical on every rank: seeded with run.seed), prepare it ...
    session = Session(rt, cfg, name="pretrain", fingerprint=model_fingerprint(model), record={"peak_lr": lr})
    session.register("teacher", teacher)           # anything with state_dict()/load_state_dict()
    session.register_loader(loader)                # its position is saved as the step's, restored on resume
    start = session.begin()                        # resume (checked) or fresh; config.yaml, run.json, trackers
    ... TrainLoop(..., session=session).fit(start) ...
    session.finish({"loss": ...})                  # or session.stopped(result)

Seeding, one policy: `start_run` seeds every rank with `run.seed` (the model is built identically everywhere); a fresh
run then reseeds each rank with `run.seed + rank` (per-rank dropout, drop path, mixup); a resumed run gets every RNG
state back from the checkpoint instead, or, on another number of processes, restarts each rank's streams from
(run.seed, step, rank) (`launch/elastic.py`). Per-sample randomness (augmentation, masks) comes from each sample's
own seed in the data stream, whatever the process count.

The number of processes may change between starts (`launch/elastic.py`): the global batch of the checkpoint is kept
(micro-batch x accumulation chosen to fit, said at start-up), the weights and optimizer state reshard (DDP: full
files; FSDP2: PyTorch DCP; DeepSpeed: converted to its universal checkpoint), and run.json keeps one segment per start
with its world size.

What survives a restart is registered once and saved by the session itself, never pickled: tensors go to
`tessera_registered.safetensors`, everything else to `tessera_state.json` (with the step, the data position, the loop's
counters, `values` such as the best top-1, the resolved config and the model's shape fingerprint).

A resume compares the resolved config with the saved one: the keys of `RESUME_MAY_CHANGE` may change (each change is
said in one line); any other change (the model, the objective, the data, the seed, ...) refuses the resume in one line
naming the keys, both values and the way out. A refused resume writes nothing into the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed

from core.errors import UserError
from launch import run_files
from launch.accel import build_accelerator, configure_deepspeed, fsdp_summary, input_dtype, zero_stage
from launch.checkpoint import CheckpointManager, ResumeMismatch, config_changes, fingerprint_changes
from launch.config import save_config, to_dict
from launch.elastic import newest_saved_state, plan_batch, reseed_ranks, rng_policy_line
from launch.metrics import MetricsLogger
from launch.run_dir import RunDirClaim, claim_run_dir
from launch.run_record import end_record, start_record
from launch.sections import OptimConfig, RunConfig
from launch.signals import StopFlag, StopRequested

# Config keys (dotted, or a section's prefix ending in ".") that may change when a run resumes: how long it runs, how
# it logs, evaluates, saves and reads data, the monitors, and the optimiser's schedule (a lower lr after a spike). Any
# other change refuses the resume.
RESUME_MAY_CHANGE = (
    "run.steps", "run.log_every", "run.eval_every", "run.save_every", "run.keep_checkpoints", "run.resume",
    "run.overwrite", "run.trackers", "run.wandb_project", "run.max_nonfinite", "run.compile", "run.progress",
    "run.output_dir", "data.num_workers", "data.prefetch", "data.pin_memory", "data.eval_batch", "data.micro_batch",
    "data.log_samples", "optim.grad_accum_steps", "optim.lr", "optim.blr", "optim.min_lr", "optim.warmup_steps",
    "optim.weight_decay", "optim.clip_grad", "knn.", "vis.", "probe.rebuild_cache",
)
SEP = "/"  # between the levels of a registered object's state in the saved names
_CLAIMS: dict[Path, Session] = {}  # this process's open sessions by run directory


@dataclass
class Runtime:
    """What start-up decided: the accelerator, the batch arithmetic and the dtype inputs are cast to."""

    accelerator: Accelerator
    micro_batch: int  # images per process per micro-step
    global_batch: int  # images per optimizer step over all processes and accumulation micro-steps
    accum: int  # micro-steps per optimizer step (the config's, or what a resume on another world size chose)
    dtype: torch.dtype  # inputs' dtype (bf16/fp16 under DeepSpeed, which converts the model but not its inputs)
    batch_note: str | None = None  # how a resume on another number of processes split the kept global batch

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def zero_stage(self) -> int | None:
        return zero_stage(self.accelerator)

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def sharded(self) -> bool:
        """Parameters are partitioned over the ranks (ZeRO-3, FSDP): no rank can run the model alone."""
        return self.zero_stage == 3 or self.fsdp

    def say(self, line: str) -> None:
        """One line on the main process's stdout."""
        if self.is_main:
            print(line, flush=True)


def start_run(run: RunConfig, optim: OptimConfig, *, micro: int | None, global_: int | None) -> Runtime:
    """The accelerator (launcher's process count, precision, DeepSpeed, FSDP), micro/global batch and accumulation,
    DeepSpeed's batch fields, and every rank seeded with `run.seed` (call before building the model). A run that will
    resume keeps its checkpoint's global batch on any number of processes (`launch/elastic.plan_batch`)."""
    accelerator = build_accelerator(run, optim)
    plan = plan_batch(newest_saved_state(run), accelerator.num_processes, micro, global_, optim.grad_accum_steps)
    accelerator.gradient_accumulation_steps = plan.accum
    configure_deepspeed(accelerator, plan.micro, replace(optim, grad_accum_steps=plan.accum))
    set_seed(run.seed)
    return Runtime(accelerator, plan.micro, plan.global_batch, plan.accum, input_dtype(accelerator), plan.note)


def flat(d: dict, prefix: str = "", sep: str = ".") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}{sep}", sep))
        else:
            out[prefix + str(k)] = v
    return out


def nest(items: dict, sep: str = SEP) -> dict:
    """The inverse of `flat(..., sep=SEP)`."""
    out: dict = {}
    for key, value in items.items():
        node = out
        *path, leaf = key.split(sep)
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE)


class Session:
    """A run's directory, checkpoints, metrics and record, on every rank (see the module docstring)."""

    def __init__(self, rt: Runtime, cfg: Any, *, name: str, fingerprint: dict, record: dict | None = None):
        self.rt, self.cfg, self.name, self.fingerprint = rt, cfg, name, fingerprint
        self.run_dir = Path(cfg.run.output_dir)
        self.config = to_dict(cfg)
        self.values: dict[str, Any] = {}
        self._objects: dict[str, Any] = {}
        self._loader = None
        acc = rt.accelerator
        self._record_fields = {"entry": name, "world_size": rt.world, "distributed_type": acc.distributed_type.value,
                               "precision": acc.mixed_precision, "zero_stage": rt.zero_stage,
                               "micro_batch": rt.micro_batch, "grad_accum_steps": rt.accum,
                               "global_batch": rt.global_batch, "steps": cfg.run.steps,
                               **({"fsdp": fsdp} if (fsdp := fsdp_summary(acc)) else {}), **(record or {})}
        self._record: dict | None = None
        self.start_step = 0
        self.loop_state: dict = {}  # the loop's counters of the resumed checkpoint
        self.resumed_from: Path | None = None
        self.claim = self._claim()
        _CLAIMS[self.run_dir.resolve()] = self
        self.ckpt = CheckpointManager(rt.accelerator, self.run_dir, keep=cfg.run.keep_checkpoints)
        self.metrics: MetricsLogger | None = None
        self.stop: StopFlag | None = None  # SIGTERM/SIGUSR1 from `begin` on (the loop polls it at step boundaries)

    # ------------------------------------------------------------------------------------------ set-up

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        """A stop signal before the first step (StopRequested): the run stops, says so, exit status 0. A run that
        ends by another exception: its record says "failed" (with the error's first line), the directory is released;
        a run that ended normally has already closed."""
        if isinstance(exc, StopRequested):
            self.rt.say(f"[{self.name}] stopped by {exc} before its first step; nothing new to save. Re-run the same "
                        f"command to {'resume' if self.resumed else 'start'}.")
            self._end("stopped", self.start_step, None)
            return True
        if exc is not None and self.claim is not None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self._end("failed", self.start_step, {"error": f"{type(exc).__name__}: {first}"[:500]})
        return False

    def _claim(self) -> RunDirClaim | None:
        claim, error = None, None
        if (old := _CLAIMS.pop(self.run_dir.resolve(), None)) is not None:
            old.close()  # this process's earlier run of the directory ended by an exception (tests, notebooks)
        if self.rt.is_main:
            try:
                claim = claim_run_dir(self.run_dir, resume=self.cfg.run.resume, overwrite=self.cfg.run.overwrite)
            except UserError as exc:
                error = str(exc)
        if self.rt.world > 1:  # every rank stops with the main process's message
            error = broadcast_object_list([error], from_process=0)[0]
        if error is not None:
            raise UserError(error)
        return claim

    def register(self, name: str, obj: Any) -> None:
        """Save `obj.state_dict()` in every checkpoint and restore it on resume (before `begin`)."""
        self._objects[name] = obj

    def register_loader(self, loader: Any) -> None:
        """The training loader: its state at the step is saved and restored. The position is a cursor of global
        samples, `step x global batch`, independent of the world size (not the loader's own counter, which runs
        ahead by the batches prefetched)."""
        self._loader = loader

    def keep(self, name: str, default: Any) -> Any:
        """A plain value (number, string) kept across restarts in `session.values[name]`; returns it."""
        return self.values.setdefault(name, default)

    # ------------------------------------------------------------------------------------------ begin

    def begin(self) -> int:
        """Resume from the newest complete checkpoint (checked, see the module docstring) or start fresh; write
        config.yaml and run.json, start the trackers. Returns the step to start from."""
        try:
            chosen = self.ckpt.choose() if self.cfg.run.resume else None
            if chosen is not None:
                self._check_resume(chosen, self.ckpt.read_state(chosen))
        except BaseException:
            self.close()  # a refused resume leaves the directory as it was (the lock goes)
            raise
        if chosen is not None:
            self._restore(chosen)
        else:
            set_seed(self.cfg.run.seed + self.rt.rank)  # per-rank randomness; identical weights were built before
        self.metrics = MetricsLogger(self.run_dir, self.rt.accelerator)
        if self.rt.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for partial in self.run_dir.glob("*.tmp[0-9]*"):  # a file a killed process was writing (atomic writes)
                partial.unlink(missing_ok=True)
            save_config(self.cfg, self.run_dir / run_files.CONFIG)
            self.metrics.truncate_after(self.start_step)
            self._record = start_record(self.run_dir / run_files.RUN_RECORD, self._record_fields, self.start_step)
        self._init_trackers()
        self.stop = StopFlag(self.rt.world)
        self.stop.waiting = True  # until the first batch arrives, a stop signal ends the run at once (the loop)
        return self.start_step

    def _check_resume(self, path: Path, saved: dict) -> None:
        """Refuse a resume the saved run does not allow (one line naming what changed and the way out)."""
        way = ("keep the saved values, or start a new run (another run.output_dir, or run.resume=false "
               "run.overwrite=true to move the old checkpoints aside)")
        changes = config_changes(saved.get("config") or {}, self.config)
        refused = [c for c in changes if not may_change(c.split(":")[0])]
        if refused:
            raise ResumeMismatch(f"cannot resume {self.run_dir} from {path.name}: {'; '.join(refused)} "
                                 f"(these change the model, the objective or the data); {way}")
        shapes = fingerprint_changes(saved.get("fingerprint") or {}, self.fingerprint)
        if saved.get("fingerprint") and shapes:
            raise ResumeMismatch(f"cannot resume {self.run_dir} from {path.name}: the model's shape changed "
                                 f"({'; '.join(shapes)}); {way}")
        if saved.get("global_batch") not in (None, self.rt.global_batch):
            raise ResumeMismatch(f"cannot resume {self.run_dir} from {path.name}: it was saved with a global batch of "
                                 f"{saved['global_batch']} images and this run has {self.rt.global_batch}; give "
                                 f"data.global_batch={saved['global_batch']} (the lr schedule and the data position "
                                 f"assume it)")
        if changes:
            self.rt.say(f"[{self.name}] resuming with changed settings: {'; '.join(changes)}")

    def _restore(self, path: Path) -> None:
        state, tensors = self.ckpt.load(path)
        registered = state.get("registered") or {}
        for name, obj in self._objects.items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + SEP)}
            own.update(flat(registered.get(name) or {}, sep=SEP))
            obj.load_state_dict(nest(own))
        self.values.update(state.get("values") or {})
        if self._loader is not None and state.get("loader"):
            self._loader.load_state_dict(state["loader"])
        self.start_step = int(state["step"])
        self.loop_state = {k: state[k] for k in ("nonfinite_total", "nonfinite_consecutive", "last_good_checkpoint")
                           if k in state}
        self.loop_state["path"] = str(path)
        self.resumed_from = path
        self.rt.say(f"[{self.name}] resuming at step {self.start_step} from {path}")
        saved_world = state.get("world_size")
        if saved_world not in (None, self.rt.world):  # no RNG state for the new ranks (launch/elastic.py)
            reseed_ranks(self.cfg.run.seed, self.start_step, self.rt.rank)
            self.rt.say(f"[{self.name}] resuming step {self.start_step} of a run saved on {saved_world} processes, "
                        f"now on {self.rt.world}: {self.rt.batch_note or f'global batch {self.rt.global_batch} kept'}"
                        f"; lr schedule unchanged; {rng_policy_line(self.start_step)}")
        elif self.rt.batch_note:
            self.rt.say(f"[{self.name}] batch: {self.rt.batch_note}")

    def _init_trackers(self) -> None:
        run = self.cfg.run
        scalars = {k: v for k, v in flat(self.config).items() if isinstance(v, (int, float, str, bool))}
        wandb = "wandb" in run.trackers
        self.rt.accelerator.init_trackers(run.wandb_project if wandb else self.name, config=scalars,
                                          init_kwargs={"wandb": {"name": self.run_dir.name}} if wandb else {})

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    # ------------------------------------------------------------------------------------------ during the run

    def save(self, step: int, loop_state: dict) -> Path:
        """A checkpoint at `step` (every rank): Accelerate's state, the registered objects, the data position."""
        tensors, registered = {}, {}
        for name, obj in self._objects.items():
            for key, value in flat(obj.state_dict(), f"{name}{SEP}", SEP).items():
                if isinstance(value, torch.Tensor):
                    tensors[key] = value
                else:
                    registered.setdefault(name, {})[key[len(name) + 1:]] = value
        state = {**loop_state, "values": self.values, "config": self.config, "fingerprint": self.fingerprint,
                 "global_batch": self.rt.global_batch, "micro_batch": self.rt.micro_batch,
                 "grad_accum_steps": self.rt.accum, "registered": {n: nest(v) for n, v in registered.items()}}
        if self._loader is not None:
            loader = {k: v for k, v in self._loader.state_dict().items() if k != "batches"}
            state["loader"] = {**loader, "cursor": step * self.rt.global_batch}
        return self.ckpt.save(step, state, tensors)

    def log(self, step: int, values: dict) -> None:
        self.metrics.log(step, values)

    # ------------------------------------------------------------------------------------------ the end

    def finish(self, step: int, final: dict | None = None) -> None:
        """The run finished: run.json's end (status, step, final metrics), trackers ended, directory released."""
        self._end("finished", step, final)

    def stopped(self, done) -> dict:
        """After a loop stopped by a signal: say where the checkpoint is, end the record, release; the summary."""
        if done.checkpoint is None:
            self.rt.say(f"[{self.name}] stopped by {done.stopped_by} before its first step; nothing new to save. "
                        f"Re-run the same command to {'resume' if self.resumed else 'start'}.")
        else:
            self.rt.say(f"[{self.name}] stopped by {done.stopped_by} at step {done.step}; checkpoint saved in "
                        f"{done.checkpoint}. Re-run the same command to resume.")
        self._end("stopped", done.step, None)
        return {"step": done.step, "stopped_by": done.stopped_by, "run_dir": str(self.run_dir)}

    def _end(self, status: str, step: int, final: dict | None) -> None:
        if self.rt.is_main and self._record is not None:
            self._record = end_record(self.run_dir / run_files.RUN_RECORD, self._record, status=status, step=step,
                                      final=final)
        self.close()

    def close(self) -> None:
        """End the trackers, restore the signal handlers and release the run directory (safe to call twice)."""
        if self.stop is not None:
            self.stop.restore()
            self.stop = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        _CLAIMS.pop(self.run_dir.resolve(), None)


__all__ = ["Runtime", "Session", "start_run", "flat", "nest", "RESUME_MAY_CHANGE", "may_change"]
