"""Checkpoints that cannot run code: every file of a checkpoint is read without unpickling arbitrary objects, so a
checkpoint folder copied from someone else that holds one is refused in one line (exit 1, nothing changed), and
a checkpoint of the previous release (its numpy RNG state pickled) names what to do."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_pipe.trainer import Trainer
from conftest import assert_one_line_error, run_cli
from test_train import STUDENT_INIT, base_project, run, set_params  # noqa: F401 - fixtures


class Payload:
    """Unpickling this runs code: it creates `marker` (what a hostile checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(base_project, tmp_path_factory) -> Path:
    """A project whose student `kd` stopped at step 2 of 4 (its latest checkpoint: step 2)."""
    root = tmp_path_factory.mktemp("safety") / "p"
    shutil.copytree(base_project, root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        set_params(root, {"kd": {"init": STUDENT_INIT}}, max_steps=4, save_steps=2)
        with pytest.MonkeyPatch.context() as m:  # a run killed after its checkpoint at step 2
            train = Trainer.train
            m.setattr(Trainer, "train", lambda self, until_step=None: train(self, until_step=2))
            run("kd")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def proj(trained, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(trained, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def snapshot(folder: Path) -> dict:
    """Every file's bytes and every link's target under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file():
            out[key] = p.read_bytes()
    return out


def poison(ck: Path, where: str, marker: Path) -> None:
    if where == "trainer.pt":
        state = torch.load(ck / "trainer.pt", weights_only=False)  # our own file: trusted here
        torch.save({**state, "last_eval": Payload(marker)}, ck / "trainer.pt")
    elif where == "rng":
        state = torch.load(ck / "rng-rank0.pt", weights_only=False)
        torch.save({**state, "python": Payload(marker)}, ck / "rng-rank0.pt")
    elif where == "dcp metadata":  # torch.distributed.checkpoint's own index of the model and optimizer files
        (ck / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif where == "previous release":  # the RNG state as distill-pipe 0.1 wrote it: numpy's, pickled
        import random

        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   ck / "rng-rank0.pt")


@pytest.mark.parametrize("flag", ["--resume", "--auto-resume"])
@pytest.mark.parametrize("where", ["trainer.pt", "rng", "dcp metadata", "previous release"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(proj, where, flag):
    student = proj / "stages" / "train" / "kd"
    marker = proj / "code-ran"
    poison(student / "checkpoints" / "step-000002", where, marker)
    before = snapshot(student)
    code, out = run_cli("train", "--student", "kd", flag)
    assert code == 1
    assert_one_line_error(code, out, "step-000002")
    assert not marker.exists(), "loading the checkpoint ran code"
    if where == "previous release":
        assert "earlier distill-pipe" in out and "delete" in out, out
    assert snapshot(student) == before  # nothing deleted, nothing rewritten


def test_checkpoint_files_load_with_weights_only(proj):
    """What the trainer writes is tensors, numbers, strings, lists and dicts: torch's safe loader reads it."""
    ck = proj / "stages" / "train" / "kd" / "checkpoints" / "step-000002"
    for name in ("trainer.pt", "rng-rank0.pt"):
        torch.load(ck / name, weights_only=True)
    code, out = run_cli("train", "--student", "kd", "--resume")
    assert code == 0, out
