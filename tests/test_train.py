"""The train stage end to end on the tiny teacher: outputs, CE-only without a store, resume after a real
SIGKILL, 2 torchrun ranks vs 1, and bad input (tokenizer, incomplete store, empty eval split, config)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill_pipe.config import ConfigError, config_from_dict, load_config
from distill_pipe.trainer import CheckpointError

from conftest import build_store_project

REPO = Path(__file__).resolve().parents[1]
STUDENT_INIT = {"config": {"num_hidden_layers": 1}}


def set_params(root: Path, students: dict, **train) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(dict(batch_size=2, max_steps=4, eval_steps=2, save_steps=2, warmup_steps=1,
                                max_eval_sequences=6, calibration_tokens=64, keep_last=2), **train)
    params["students"] = students
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def base_project(tmp_path_factory, tiny_teacher) -> Path:
    """prepare + teacher-logits on the tiny teacher, once per module; tests work on copies."""
    return build_store_project(tmp_path_factory.mktemp("train_project"), tiny_teacher, {"codec": "dense-bf16"})


@pytest.fixture
def proj(base_project, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(base_project, root)
    monkeypatch.chdir(root)
    return root


def run(student: str, resume: bool = False, overrides: tuple[str, ...] = (), **kw) -> Path:
    from distill_pipe.train import run_train

    return run_train(load_config(None, list(overrides)), student, resume=resume, **kw)


LIVE = Path("stages/dvclive")  # paths.dvclive: each student's live metrics (dvclive) in LIVE/<student>


def rows(live: Path, kind: str, drop=("tokens_per_s",)) -> list[dict]:
    """A student's history rows (kind: train or eval), from its dvclive folder."""
    from distill_pipe.metrics import read_history

    return [{k: v for k, v in r.items() if k not in drop} for r in read_history(live, kind)]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


# ---------------------------------------------------------------- outputs


def test_kd_student_outputs_load_and_generate(proj):
    set_params(proj, {"kd": {"init": STUDENT_INIT, "alpha": 0.5, "temperature": 2.0}})
    out = run("kd")
    assert out == Path("stages/train/kd")
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["tokens"] == 4 * 2 * 15 and not m["early_stopped"]
    assert m["best_eval_loss"] <= m["final_eval_loss"] and m["best_eval_ppl"] > 1
    assert m["student"]["init"] == STUDENT_INIT and m["student"]["train"]["alpha"] == 0.5
    assert m["data"]["kind"] == "teacher-logit store" and m["vocab_compared"] == 300
    train_rows, eval_rows = rows(LIVE / "kd", "train"), rows(LIVE / "kd", "eval")
    assert [r["step"] for r in train_rows] == ["1", "2", "3", "4"] and [r["step"] for r in eval_rows] == ["2", "4"]
    assert all(float(r["kl"]) > 0 for r in train_rows)
    best = min(eval_rows, key=lambda r: float(r["eval_loss"]))
    assert m["best_step"] == int(best["step"])
    # finished: the last checkpoint only, without model and optimizer state (test_finished_run.py)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["exports", "latest", "step-000004"]
    assert (out / "model").is_symlink() and (out / "metrics.json").is_symlink()
    assert json.loads((out / "init.json").read_text())["kind"] == "config"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert json.loads((out / "model" / "distill_pipe.json").read_text())["step"] == m["best_step"]
    ids = tok("The quick", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 5
    # a second run without --resume refuses to touch the checkpoints
    with pytest.raises(CheckpointError, match="pass --resume to continue it, or delete"):
        run("kd")


def test_store_on_an_fsspec_url(proj):
    """paths.logits as a URL (memory:// here, s3:// in docs/dvc.md): stage one writes there, a rerun finds
    it complete, `inspect` reads it, and stage two trains from it exactly as from the local store."""
    import uuid

    from conftest import run_cli

    set_params(proj, {"kd": {"init": STUDENT_INIT, "alpha": 0.5, "temperature": 2.0}})
    url = f"memory://logits-{uuid.uuid4().hex}.zarr"
    from distill_pipe.store import open_store

    import fsspec

    fs = fsspec.filesystem("memory")
    written = []
    for _ in range(2):  # the second run finds the store complete and rewrites nothing
        code, out = run_cli("teacher-logits", "--set", f"paths.logits={url}")
        assert code == 0, out
        store = open_store(url)
        assert all(store.completed_shards(s) == set(range(store.num_shards(s))) for s in store.splits)
        written.append({f: fs.info(f)["created"] for f in fs.find(url)})
    assert len(written[0]) > 10 and written[0] == written[1]
    code, out = run_cli("inspect", url, "--verify")
    assert code == 0 and "verify      ok" in out, out
    local = run("kd")
    from_url = run("kd", overrides=(f"paths.logits={url}", "paths.train=stages/train_url",
                                    "paths.dvclive=stages/dvclive_url"))
    assert rows(Path("stages/dvclive_url/kd"), "eval") == rows(LIVE / "kd", "eval")
    assert all(torch.equal(v, weights(local / "model")[k]) for k, v in weights(from_url / "model").items())


def test_ce_student_trains_from_tokens_without_a_store(proj):
    set_params(proj, {"ce": {"init": STUDENT_INIT, "alpha": 1.0}})
    shutil.rmtree(proj / "stages" / "teacher_logits")
    out = run("ce")
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["kind"].startswith("tokens") and m["steps"] == 4
    assert all(float(r["kl"]) == 0 and r["loss"] == r["ce"] for r in rows(LIVE / "ce", "train"))


def test_padded_student_vocab_is_sliced_to_the_tokenizer(proj, tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    from conftest import make_tiny_llama

    folder = tmp_path / "padded"
    make_tiny_llama(folder, AutoTokenizer.from_pretrained(tiny_teacher), layers=1, vocab_size=320, seed=1)
    set_params(proj, {"pad": {"init": {"pretrained": str(folder)}}}, max_steps=2)
    m = json.loads((run("pad") / "metrics.json").read_text())
    assert m["vocab_compared"] == 300 and m["steps"] == 2


# ---------------------------------------------------------------- resume


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from distill_pipe import trainer
    step = trainer.Trainer.train_step
    def slow_step(self, batches):  # slow enough to be killed between checkpoints
        time.sleep(0.3)
        return step(self, batches)
    trainer.Trainer.train_step = slow_step
    from distill_pipe.config import load_config
    from distill_pipe.train import run_train
    run_train(load_config(), sys.argv[1])
""")


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(proj):
    students = {"a": {"init": STUDENT_INIT}, "b": {"init": STUDENT_INIT}}
    set_params(proj, students, max_steps=10, save_steps=2, eval_steps=3, early_stop_patience=3)
    run("a")  # uninterrupted
    (proj / "kill.py").write_text(KILL_SCRIPT)
    latest = proj / "stages" / "train" / "b" / "checkpoints" / "latest"
    proc = subprocess.Popen([sys.executable, "kill.py", "b"], cwd=proj, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        while not (latest.exists() and latest.read_text() >= "step-000004"):
            assert proc.poll() is None and time.time() < deadline, "training subprocess ended before a checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest.read_text()
    assert killed_at < "step-000010", "the run finished before the kill"
    run("b", resume=True)
    a, b = proj / "stages" / "train" / "a", proj / "stages" / "train" / "b"
    assert rows(LIVE / "a", "train") == rows(LIVE / "b", "train")
    assert rows(LIVE / "a", "eval") == rows(LIVE / "b", "eval")
    wa, wb = weights(a / "model"), weights(b / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    for key in ("best_eval_loss", "final_eval_loss", "steps", "tokens", "early_stopped", "best_step"):
        assert ma[key] == mb[key], key


def test_resume_with_a_changed_config_is_an_error(proj):
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=2)
    run("kd")
    # keys that do not change what is computed may differ (a smaller loss chunk is the fix for an OOM)
    set_params(proj, {"kd": {"init": STUDENT_INIT}}, max_steps=2, loss_chunk_size=3, save_steps=1, keep_last=1)
    run("kd", resume=True)
    set_params(proj, {"kd": {"init": STUDENT_INIT, "temperature": 4.0}}, max_steps=2)
    with pytest.raises(CheckpointError, match=r"different config \(train.temperature differ\)"):
        run("kd", resume=True)
    set_params(proj, {"kd": {"init": {"config": {"num_hidden_layers": 2}}}}, max_steps=2)
    with pytest.raises(CheckpointError, match=r"init.config.num_hidden_layers differ"):
        run("kd", resume=True)


# ---------------------------------------------------------------- distributed


TORCHRUN_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from distill_pipe import distributed, trainer
    if "--slow" in sys.argv:  # slow enough to be killed between checkpoints
        step = trainer.Trainer.train_step
        def slow_step(self, batches):
            time.sleep(0.5)
            return step(self, batches)
        trainer.Trainer.train_step = slow_step
    from distill_pipe.config import load_config
    from distill_pipe.train import run_train
    run_train(load_config(), sys.argv[1], resume="--resume" in sys.argv)
    distributed.shutdown()
""")


def torchrun(proj: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "ddp.py", *args], cwd=proj, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, **popen)


def test_two_torchrun_ranks_with_fsdp_equal_one_process(proj):
    # same global batch (2 ranks x 1 vs 1 x 2) and the last step has a padding micro-batch on one rank
    students = {"one": {"init": STUDENT_INIT, "batch_size": 2}, "two": {"init": STUDENT_INIT, "batch_size": 1}}
    set_params(proj, students, max_steps=3, save_steps=2, eval_steps=1, max_eval_sequences=5)
    run("one")
    (proj / "ddp.py").write_text(TORCHRUN_SCRIPT)
    proc = torchrun(proj, "two")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    one, two = proj / "stages" / "train" / "one", proj / "stages" / "train" / "two"
    m2 = json.loads((two / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m2["global_batch"] == 2
    w1, w2 = weights(one / "model"), weights(two / "model")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=2e-6)
    e1, e2 = rows(LIVE / "one", "eval"), rows(LIVE / "two", "eval")
    assert [r["eval_tokens"] for r in e1] == [r["eval_tokens"] for r in e2]
    for a, b in zip(e1, e2, strict=True):
        assert float(a["eval_loss"]) == pytest.approx(float(b["eval_loss"]), rel=1e-5)
    assert (two / "checkpoints" / "step-000003" / "trainer.pt").exists()


def test_fsdp_sigkill_then_resume_reproduces_the_uninterrupted_run(proj):
    """2 torchrun ranks under FSDP2: SIGKILL the whole job after a DCP checkpoint, rerun with --resume, and
    the history and weights equal an uninterrupted 2-rank run's."""
    students = {"a": {"init": STUDENT_INIT, "batch_size": 1}, "b": {"init": STUDENT_INIT, "batch_size": 1}}
    set_params(proj, students, max_steps=8, save_steps=2, eval_steps=3, max_eval_sequences=4)
    (proj / "ddp.py").write_text(TORCHRUN_SCRIPT)
    proc = torchrun(proj, "a")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    latest = proj / "stages" / "train" / "b" / "checkpoints" / "latest"
    proc = torchrun(proj, "b", "--slow")
    try:
        deadline = time.time() + 240
        while not (latest.exists() and latest.read_text() >= "step-000004"):
            assert proc.poll() is None and time.time() < deadline, "training job ended before a checkpoint"
            time.sleep(0.05)
        # torchrun starts each rank in its own session: kill the ranks themselves, then torchrun
        import psutil  # a dependency of dvc

        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) >= 2
        for p in ranks:
            p.kill()
        proc.kill()
    finally:
        proc.communicate()
    killed_at = latest.read_text()
    assert killed_at < "step-000008", "the run finished before the kill"
    assert len(list(latest.parent.joinpath(killed_at).glob("*.distcp"))) == 2  # one shard file per rank
    proc = torchrun(proj, "b", "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed_at = int(killed_at.split("-")[1])
    assert f"| {resumed_at}/8 [" in err, err[-3000:]  # the bar starts at the checkpoint: resumed, not restarted
    a, b = proj / "stages" / "train" / "a", proj / "stages" / "train" / "b"
    assert rows(LIVE / "a", "train") == rows(LIVE / "b", "train")
    assert rows(LIVE / "a", "eval") == rows(LIVE / "b", "eval")
    wa, wb = weights(a / "model"), weights(b / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- bad input


def test_student_with_another_tokenizer_is_refused(proj, tmp_path):
    from conftest import make_tiny_llama, make_tokenizer

    folder = tmp_path / "other"
    folder.mkdir()
    make_tiny_llama(folder, make_tokenizer(folder, vocab_size=280), layers=1)
    set_params(proj, {"x": {"init": {"pretrained": str(folder)}}})
    with pytest.raises(ValueError, match="tokenizer differs from the one .* was made with"):
        run("x")
    set_params(proj, {"x": {"init": {"pretrained": str(folder)}, "alpha": 1.0}})
    with pytest.raises(ValueError, match="tokenizer differs"):
        run("x")


def test_incomplete_store_raises_store_incomplete_error(proj):
    from distill_pipe.store import StoreIncompleteError, create_store, make_codec, open_store

    src = open_store("stages/teacher_logits/logits.zarr")
    attrs = {k: src.info[k] for k in ("teacher", "tokenizer", "data")}
    create_store("stages/teacher_logits/logits.zarr", attrs=attrs,
                 splits={s: np.asarray(src.input_ids(s)[...]) for s in src.splits}, codec=make_codec("dense-bf16"),
                 shard_size=8, vocab_size=300, overwrite=True)
    set_params(proj, {"kd": {"init": STUDENT_INIT}})
    with pytest.raises(StoreIncompleteError):
        run("kd")


def test_empty_eval_split_is_a_one_line_error(proj):
    import zarr

    from distill_pipe.data import write_tokens

    tokens = zarr.open_group("stages/prepare/tokens.zarr", mode="r")
    arrays = {"train": tokens["train"]["input_ids"][...], "validation": np.zeros((0, 16), np.int32)}
    write_tokens(Path("stages/prepare/tokens.zarr"), arrays, dict(tokens.attrs))
    set_params(proj, {"ce": {"init": STUDENT_INIT, "alpha": 1.0}})
    with pytest.raises(ValueError, match=r"validation split of .* is empty") as e:
        run("ce")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, match", [("alpha", 1.5, "alpha must be in"), ("alpha", -0.1, "alpha must be in"),
                                               ("temperature", 0.0, "temperature must be > 0")])
def test_invalid_alpha_or_temperature_via_config(key, value, match):
    raw = {"students": {"kd": {"init": STUDENT_INIT, key: value}}}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)
