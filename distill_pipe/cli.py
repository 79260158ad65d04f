"""Command line: each command is a few lines: params -> typed config -> stage entry.

Every command takes `--params FILE` (default params.yaml) and repeatable `--set section.key=value`.
User errors (ValueError, OSError) print one line and exit 1; set DISTILL_PIPE_DEBUG=1 for a traceback.
Works as a torchrun target: `torchrun --nproc_per_node=2 -m distill_pipe teacher-logits`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil causal language models from precomputed teacher logits stored in Zarr.")

ParamsOpt = Annotated[Optional[Path], typer.Option("--params", help="params file (default: params.yaml)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a param: section.key=value (repeatable)")]


@app.callback()
def _root() -> None:
    """Distil causal language models from precomputed teacher logits stored in Zarr."""


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def command(fn):
    """Register a command that turns user errors into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            if os.environ.get("DISTILL_PIPE_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(1) from None

    return app.command(name=fn.__name__.replace("_cmd", "").replace("_", "-"))(wrapper)


def _config(params: Path | None, overrides: list[str] | None):
    from distill_pipe.config import load_config

    return load_config(params, overrides or [])


@command
def prepare(params: ParamsOpt = None, set_: SetOpt = None):
    """Tokenize the corpus with the teacher's tokenizer and write packed sequences to tokens.zarr."""
    from distill_pipe.data import run_prepare

    run_prepare(_config(params, set_))


@command
def teacher_logits(params: ParamsOpt = None, set_: SetOpt = None,
                   overwrite: Annotated[bool, typer.Option(help="replace an existing store")] = False,
                   replace_changed: Annotated[bool, typer.Option(
                       help="replace the store only if it was made from other inputs, else resume it (dvc.yaml)")] = False,
                   repair: Annotated[bool, typer.Option(
                       help="verify every shard, recompute only those that fail, verify again")] = False):
    """Run the teacher over tokens.zarr and write its compressed logits to the store (resumable, repairable)."""
    from distill_pipe.teacher import run_teacher_logits

    with _process_group():
        run_teacher_logits(_config(params, set_), overwrite=overwrite, replace_changed=replace_changed,
                           repair=repair)


@command
def train(student: Annotated[str, typer.Option("--student", help="name of an entry of params `students`")],
          params: ParamsOpt = None, set_: SetOpt = None,
          resume: Annotated[bool, typer.Option(help="continue from the student's latest checkpoint")] = False,
          auto_resume: Annotated[bool, typer.Option(
              help="continue the checkpoint if its config matches, else keep it aside and start from step 0 "
                   "(dvc.yaml)")] = False):
    """Train a student against the stored teacher logits (or plain LM training when alpha is 1)."""
    from distill_pipe.train import run_train

    with _process_group():
        run_train(_config(params, set_), student, resume=resume, auto_resume=auto_resume)


@command
def evaluate(params: ParamsOpt = None, set_: SetOpt = None):
    """Compare the teacher (from the store), each student and its initialisation on the validation split."""
    from distill_pipe.evaluate import run_evaluate

    run_evaluate(_config(params, set_))


@command
def inspect(store: Annotated[str, typer.Argument(help="store path or fsspec URL")],
            verify: Annotated[bool, typer.Option(help="decode every shard and name any that fail")] = False):
    """Describe a logit store: lineage, codec, splits, completion, bytes on disk and per token."""
    from distill_pipe.store import open_store
    from distill_pipe.store.inspect import describe

    opened = open_store(store)
    failures = opened.verify() if verify else None
    typer.echo(describe(opened, failures=failures))
    if failures:
        raise typer.Exit(1)


@contextlib.contextmanager
def _process_group():
    """Leave the torchrun process group at the end: with a barrier on success, without one on an error
    (another rank may never reach it)."""
    from distill_pipe import distributed

    try:
        yield
    except BaseException:
        distributed.shutdown(barrier=False)
        raise
    distributed.shutdown()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
