"""What a training run reports: its step and eval history, and the content of its metrics.json.

`History` appends one row per optimizer step to `history/train.csv` and one per evaluation to
`history/eval.csv` (rank 0 only). Checkpoints carry the folder up to their step (checkpoint.py), so a resumed
run's history equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Sequence
from pathlib import Path

TRAIN_FIELDS = ("step", "loss", "ce", "kl", "lr", "grad_norm", "tokens", "tokens_per_s")
EVAL_FIELDS = ("step", "eval_loss", "eval_ce", "eval_kl", "eval_ppl", "eval_tokens")


class History:
    """history/{train,eval}.csv of one run; writes nothing off rank 0."""

    def __init__(self, folder: Path, is_main: bool = True):
        self.folder, self.is_main = Path(folder), is_main

    def log_train(self, row: dict) -> None:
        self._append("train", TRAIN_FIELDS, row)

    def log_eval(self, row: dict) -> None:
        self._append("eval", EVAL_FIELDS, row)

    def _append(self, name: str, fields: Sequence[str], row: dict) -> None:
        if not self.is_main:
            return
        path = self.folder / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in fields})


def _fmt(v):
    return f"{v:.8g}" if isinstance(v, float) else v


def run_metrics(trainer, static: dict) -> dict:
    """metrics.json of a run in the trainer's current state: the best and final evals, steps, tokens, timing,
    and `static` (what does not change during a run: the student, its data, the vocabulary compared)."""
    s, best, final = trainer.summary(), trainer.best_eval or {}, trainer.last_eval or {}
    return {
        "best_eval_loss": best.get("eval_loss"), "best_eval_ppl": best.get("eval_ppl"),
        "best_step": best.get("step"),
        "final_eval_loss": final.get("eval_loss"), "final_eval_ppl": final.get("eval_ppl"),
        "steps": s["steps"], "total_steps": s["total_steps"], "tokens": s["tokens"],
        "tokens_per_s": s["tokens_per_s"], "train_seconds": s["train_seconds"],
        "data_wait_seconds": s["data_wait_seconds"],
        "early_stopped": s["early_stopped"], "world_size": trainer.info.world_size,
        "global_batch": trainer.global_batch, **static}


def static_metrics(scfg, init_info: dict, source: dict, vocab: int) -> dict:
    """The parts of metrics.json that do not change during a run."""
    return {"vocab_compared": vocab, "data": {"kind": source["kind"], "path": source["path"], **source["identity"]},
            "student": {"name": scfg.name, "init": scfg.init, "init_info": init_info,
                        "train": dataclasses.asdict(scfg.train)}}
