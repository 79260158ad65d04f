"""Checkpoints: ordered by step number, the exported model and metrics.json published together, checkpoints
kept across a changed config (set aside, never used) and resumed when the config matches (dvc.yaml's
`--auto-resume`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from distill_pipe.metrics import read_history
from distill_pipe.trainer import Trainer
from test_trainer import MaskedTrainer, cfg, tiny_data, tiny_model
from test_train import STUDENT_INIT, base_project, proj, run, set_params  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path):
    t = MaskedTrainer(tiny_model(0), cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=2, keep_last=2),
                      tiny_data(12), out_dir=tmp_path, show_progress=False)
    ck = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000):
        t.step = step
        t.save_checkpoint()
    # as strings, step-1000000 sorts first and keep_last would have deleted the newest
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-1000000", "step-999999"]
    assert t.latest_checkpoint() == ck / "step-1000000"
    assert [p.name for p in t.checkpoints()] == ["step-999999", "step-1000000"]
    t.step = 1_000_001
    t.cfg.keep_last = 1
    t.save_checkpoint()
    assert [p.name for p in t.checkpoints()] == ["step-1000001"]
    t2 = MaskedTrainer(tiny_model(1), t.cfg, tiny_data(12), out_dir=tmp_path, show_progress=False)
    t2.load_checkpoint(t2.latest_checkpoint())
    assert t2.step == 1_000_001


def test_model_and_metrics_are_one_published_pair(proj):
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=6, eval_steps=1, save_steps=3, keep_last=1)
    out = run("kd")
    m = json.loads((out / "metrics.json").read_text())
    assert (out / "model").is_symlink() and (out / "metrics.json").is_symlink()
    assert json.loads((out / "model" / "distill_pipe.json").read_text())["step"] == m["best_step"]
    assert m["steps"] == 6  # refreshed after the last step, inside the export it describes
    # only the published export and the exports kept checkpoints refer to remain
    ck = json.loads((out / "checkpoints" / "step-000006" / "meta.json").read_text())
    assert {p.name for p in (out / "checkpoints" / "exports").iterdir()} == {f"step-{ck['best_step']:06d}"}


def test_auto_resume_sets_a_changed_config_aside_and_resumes_a_matching_one(proj):
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=4, save_steps=2)
    full = run("kd")
    weights = (full / "model" / "model.safetensors").read_bytes()
    ck = proj / "stages" / "train" / "kd" / "checkpoints"
    # a crashed run: it died after its checkpoint at step 2 (a finished run keeps only its last checkpoint)
    shutil.rmtree(full)
    with pytest.MonkeyPatch.context() as m:
        train = Trainer.train
        m.setattr(Trainer, "train", lambda self, until_step=None: train(self, until_step=2))
        run("kd")
    assert (ck / "latest").read_text() == "step-000002"
    run("kd", auto_resume=True)
    assert (full / "model" / "model.safetensors").read_bytes() == weights  # resumed, bit-equal
    # a changed config: the old checkpoints are kept aside, unused; the run starts from step 0
    set_params(proj, {"kd": {"init": STUDENT_INIT, "temperature": 3.0}}, max_steps=4, save_steps=2)
    run("kd", auto_resume=True)
    aside = [p for p in ck.parent.iterdir() if p.name.startswith("checkpoints-")]
    assert len(aside) == 1 and (aside[0] / "step-000004" / "trainer.pt").exists()
    m = json.loads((full / "metrics.json").read_text())
    assert m["student"]["train"]["temperature"] == 3.0 and m["steps"] == 4
    steps = [r["step"] for r in read_history(proj / "stages" / "dvclive" / "kd", "train")]
    assert steps == ["1", "2", "3", "4"]  # not the old run's history


def test_dvc_yaml_keeps_student_checkpoints_and_auto_resumes():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]
    assert "--auto-resume" in stage["cmd"]
    (out,) = stage["outs"]
    assert next(iter(out.values()))["persist"] is True


def test_resume_keeps_the_time_spent_waiting_for_data(tmp_path):
    """metrics.json's data_wait_seconds goes on from the checkpoint after a resume, as train_seconds does (it
    restarted at 0, so the wait share was wrong after a resume)."""
    c = cfg(batch_size=2, gradient_accumulation_steps=1, max_steps=6, save_steps=3)
    first = MaskedTrainer(tiny_model(0), c, tiny_data(12), out_dir=tmp_path, show_progress=False)
    first.train(until_step=3)  # stops right after its checkpoint at step 3
    assert first.data_wait_seconds > 0
    second = MaskedTrainer(tiny_model(1), c, tiny_data(12), out_dir=tmp_path, show_progress=False)
    second.load_checkpoint(second.latest_checkpoint())
    assert second.data_wait_seconds == first.data_wait_seconds
    assert second.train_seconds == first.train_seconds
    second.train()
    assert second.summary()["data_wait_seconds"] > first.data_wait_seconds
