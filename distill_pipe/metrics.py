"""What a training run reports: its step and eval metrics, live through dvclive, and its metrics.json.

`History` logs every optimizer step and every evaluation with dvclive (rank 0 only) into one folder:

    metrics.json                         the latest values ({"train": {...}, "eval": {...}}), the best eval
                                         ({"best": {"eval_loss", "eval_ppl", "step"}}) and the step
    plots/metrics/train/<name>.tsv       one row per optimizer step: loss ce kl lr grad_norm tokens tokens_per_s
    plots/metrics/eval/<name>.tsv        one row per evaluation: loss ce kl ppl tokens

dvc.yaml declares both as the train stage's metrics and plots, so `dvc exp show` and `dvc plots` (and the VS
Code extension) show them while a student trains. dvclive is told to write no dvc.yaml of its own and save no
experiment: `dvc exp run` commits these files with the stage. Checkpoints carry the folder up to their step
(checkpoint.py) and a resume appends to it, so a resumed run's history equals an uninterrupted one's.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

# history column -> dvclive metric
TRAIN_METRICS = {k: f"train/{k}" for k in ("loss", "ce", "kl", "lr", "grad_norm", "tokens", "tokens_per_s")}
EVAL_METRICS = {f"eval_{k}": f"eval/{k}" for k in ("loss", "ce", "kl", "ppl", "tokens")}


class History:
    """The live metrics of one run in `folder` (dvclive); does nothing off rank 0."""

    def __init__(self, folder: Path, is_main: bool = True):
        self.folder, self.is_main = Path(folder), is_main
        self._live = None

    def open(self, resume: bool) -> None:
        """Start logging: resume=True appends to the folder as a checkpoint left it, False starts it afresh."""
        if self.is_main and self._live is None:
            self._live = _live(self.folder, resume)

    def log_train(self, row: dict) -> None:
        """One optimizer step's metrics (row["step"] is the step just taken)."""
        if self._live is not None:
            self._log(row, TRAIN_METRICS)
            self._live.next_step()  # writes metrics.json and tells the VS Code extension a step is done

    def log_eval(self, row: dict, best: dict | None) -> None:
        """An evaluation at row["step"]; best: the best evaluation so far (the exported model's)."""
        if self._live is not None:
            self._log(row, EVAL_METRICS)
            if best is not None:
                self._live.summary["best"] = {"eval_loss": best["eval_loss"], "eval_ppl": best["eval_ppl"],
                                              "step": best["step"]}
            self._live.sync()

    def _log(self, row: dict, names: dict) -> None:
        self._live.step = row["step"]
        for key, name in names.items():
            self._live.log_metric(name, row[key])

    def close(self) -> None:
        if self._live is not None:
            self._live.end()
            self._live = None


def _live(folder: Path, resume: bool):
    from dvclive import Live

    class QuietLive(Live):
        def _init_dvc(self):
            # Outside a DVC repository dvclive would `dvc init` the enclosing git repository; log files only.
            from dvc.exceptions import NotDvcRepoError
            from dvc.repo import Repo

            try:
                Repo.find_root()
            except NotDvcRepoError:
                return
            super()._init_dvc()

    # dvcyaml=None: dvc.yaml already declares these files; save_dvc_exp: `dvc exp run` saves the experiment
    return QuietLive(str(folder), resume=resume, dvcyaml=None, save_dvc_exp=False)


def read_history(folder: Path, kind: str) -> list[dict]:
    """The rows History logged, as strings keyed by history column (step, loss, ... or step, eval_loss, ...),
    in step order; [] when nothing was logged. kind: "train" or "eval"."""
    names = {"train": TRAIN_METRICS, "eval": EVAL_METRICS}[kind]
    rows: dict[int, dict] = {}
    for key, name in names.items():
        path = Path(folder) / "plots" / "metrics" / f"{name}.tsv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                rows.setdefault(int(r["step"]), {"step": r["step"]})[key] = r[name.split("/")[-1]]
    return [rows[step] for step in sorted(rows)]


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
