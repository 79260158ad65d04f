"""A finished run is light on disk: once its best model is exported it keeps the model, its metrics and lineage,
and what `train --auto-resume` needs to see it is finished; model, optimizer and RNG state go. A rerun trains
nothing and republishes the same model, also after a kill in the middle of the cleanup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill_pipe.checkpoint import Checkpointer
from distill_pipe.trainer import Trainer
from test_train import LIVE, STUDENT_INIT, base_project, proj, run, set_params  # noqa: F401 - fixtures

TRAIN_STEP = Trainer.train_step
TRAINING_STATE = (".metadata", ".distcp", "rng-rank")  # DCP's index and shards (model + AdamW), RNG files


def snapshot(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def training_state(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if any(m in p.name for m in TRAINING_STATE)]


def forbid_training(monkeypatch) -> None:
    def no_step(self, batches):
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(Trainer, "train_step", no_step)


def test_a_finished_run_keeps_its_model_and_lineage_and_no_training_state(proj, monkeypatch):
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=4, save_steps=2, keep_last=2)
    out = run("kd")
    assert training_state(out) == []
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["exports", "latest", "step-000004"]
    assert sorted(p.name for p in (ck / "step-000004").iterdir()) == ["dvclive", "meta.json", "trainer.pt"]
    m = json.loads((out / "metrics.json").read_text())
    assert {p.name for p in (ck / "exports").iterdir()} == {f"step-{m['best_step']:06d}"}
    assert m["data"]["kind"] == "teacher-logit store" and m["steps"] == 4  # the lineage evaluate checks
    before, history = snapshot(out), snapshot(LIVE / "kd")
    forbid_training(monkeypatch)
    run("kd", auto_resume=True)
    assert snapshot(out) == before and snapshot(LIVE / "kd") == history  # the same model, republished
    run("kd", resume=True)
    assert snapshot(out) == before
    # a changed max_steps: the finished folder is set aside (small now) and the run starts from step 0
    monkeypatch.setattr(Trainer, "train_step", TRAIN_STEP)
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=6, save_steps=2, keep_last=2)
    run("kd", auto_resume=True)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    [aside] = [p for p in out.iterdir() if p.name.startswith("checkpoints-")]
    assert training_state(aside) == [] and training_state(out) == []


@pytest.mark.parametrize("killed_at", [1, 2, 3])  # before the index goes, with shards left, with RNG left
def test_a_kill_during_the_cleanup_leaves_a_run_that_republishes(proj, monkeypatch, killed_at):
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=4, save_steps=2, keep_last=2)
    finish = Checkpointer.finish

    def dying_finish(self):
        calls, unlink = [], Path.unlink

        def counted(path, *a, **kw):
            calls.append(path)
            if len(calls) == killed_at:
                raise KeyboardInterrupt("killed during the cleanup")
            return unlink(path, *a, **kw)

        with monkeypatch.context() as m:
            m.setattr(Path, "unlink", counted)
            finish(self)

    monkeypatch.setattr(Checkpointer, "finish", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        run("kd")
    monkeypatch.setattr(Checkpointer, "finish", finish)
    out = proj / "stages" / "train" / "kd"
    published = snapshot(out / "model")
    assert training_state(out)  # the cleanup did not complete
    forbid_training(monkeypatch)
    run("kd", auto_resume=True)
    assert snapshot(out / "model") == published and training_state(out) == []
