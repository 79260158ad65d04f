"""Lineage checked on every read: CE-only training and evaluate refuse data other than the store's, a
checkpoint is refused against another store; each a one-line error naming the fix."""

from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli
from distill_pipe.trainer import CheckpointError
from test_train import STUDENT_INIT, base_project, proj, run, set_params  # noqa: F401 - fixtures


def test_students_and_evaluate_refuse_data_the_store_was_not_made_from(proj):
    set_params(proj, {"ce": {"init": STUDENT_INIT, "alpha": 1.0}, "kd": {"init": STUDENT_INIT}}, max_steps=2,
               save_steps=1)
    run("ce")  # tokens.zarr is the store's data: accepted
    run("kd")
    # another split of the corpus: the store's validation documents are now in tokens.zarr's train split
    assert run_cli("prepare", "--set", "data.seed=1")[0] == 0
    code, out = run_cli("train", "--student", "ce", "--auto-resume")
    assert_one_line_error(code, out, "is not the data stages/teacher_logits/logits.zarr was made from")
    assert "`distill-pipe teacher-logits --replace-changed`" in out
    # the fix named: the store follows the new tokens ...
    assert run_cli("teacher-logits", "--replace-changed")[0] == 0
    # ... and then the students trained on the old data are refused by evaluate, naming the student
    code, out = run_cli("evaluate")
    assert_one_line_error(code, out, "student ce was trained on another data than")
    # the KD student's checkpoint was made from the old store: --resume refuses it, naming why
    with pytest.raises(CheckpointError, match=r"data.data.fingerprint.* differ; it trained on another store"):
        run("kd", resume=True)
    # the fix named: retrain (dvc repro runs --auto-resume); evaluate then accepts both
    for name in ("ce", "kd"):
        code, out = run_cli("train", "--student", name, "--auto-resume")
        assert code == 0, out
    code, out = run_cli("evaluate", "--set", "evaluate.max_sequences=2")
    assert code == 0, out
