"""What both CIFAR-10 recipes share around their stages: the command-line options, the --work folder, the stages'
environment, the record's header (times, command, threads), and the one-line error exit."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from recipes.cifar10.shards import TARBALL_ENV
from recipes.stages import REPO, InputError, StageError, now_iso, public

MARKER = ".tessera_recipe"  # in --work: a recipe made the folder, so --fresh may delete it


def parser(prog: str, doc: str, work: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help=f"folder for shards and runs (default: {work})")
    p.add_argument("--tarball", default=None, help=f"CIFAR-10 JPEG tarball (default: ${TARBALL_ENV})")
    p.add_argument("--cifar-dir", default=str(REPO / "runs" / "cifar10_jpeg"),
                   help="where the tarball is (or gets) unpacked (default: runs/cifar10_jpeg)")
    p.add_argument("--docs", default=str(REPO / "docs"), help="folder of RESULTS.md and results/ (default: docs/)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of every stage (default: inherited)")
    p.add_argument("--fresh", action="store_true", help="delete --work first and rerun every stage")
    p.add_argument("--render-only", action="store_true", help="only redraw the page and its pictures from the records")
    return p


def start(args) -> tuple[Path, dict[str, str], str, float]:
    """(--work, made with its marker: --fresh empties only such a folder; the stages' environment; the start time)."""
    work = Path(args.work)
    if args.fresh and work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise InputError(f"--fresh would delete {work}, which no recipe created (no {MARKER}); pick another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(args.threads),
                                                     "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}))
    return work, env, now_iso(), time.perf_counter()


def folders(args) -> dict[str, Path]:
    """The folders a recorded command names instead of their paths."""
    named = {"WORK": args.work, "CIFAR_DIR": args.cifar_dir, "DOCS": args.docs, "TARBALL": args.tarball}
    return {label: Path(path).resolve() for label, path in named.items() if path}


def absolute(argv: list[str], named: dict[str, Path]) -> list[str]:
    """`argv` with each argument that names one of the `named` folders or files (alone or as `--opt=PATH`) written
    as its resolved path, so that `public` can name it: a relative `--tarball ../x.tar.gz` too."""
    def one(arg: str) -> str:
        opt, eq, value = arg.rpartition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        return f"{opt}{eq}{Path(value).resolve()}" if value and Path(value).resolve() in named.values() else arg
    return [one(a) for a in argv]


def header(prog: str, args, env: dict, started: str, t0: float, **fields) -> dict:
    """The record's header: `fields`, the times, the recipe's own command as the page shows it, the thread count."""
    return {**fields, "started": started, "finished": now_iso(), "total_seconds": round(time.perf_counter() - t0, 1),
            "command": public(shlex.join(["python", prog, *absolute(args.argv, folders(args))]), folders(args)),
            "threads": env.get("OMP_NUM_THREADS")}


def run(p: argparse.ArgumentParser, argv: list[str] | None, work, main, render):
    """Parse, then `render(docs)` (--render-only) or `main(args)`; an input or stage problem exits in one line."""
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.work = str(Path(args.work or work(args)).resolve())
    try:
        if args.render_only:
            print(f"[recipe] wrote {render(Path(args.docs))}", flush=True)
            return None
        return main(args)
    except InputError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    except StageError as exc:
        raise SystemExit(f"{p.prog}: error: {exc}") from None
