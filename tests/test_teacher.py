"""Stage one end to end on a tiny teacher: fidelity, resume after SIGKILL, 2 ranks vs 1, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from distill_pipe.config import load_config
from distill_pipe.models import load_causal_lm
from distill_pipe.store import open_store

from conftest import assert_one_line_error as one_line_error
from conftest import run_cli as run


def reference_logprobs(teacher_dir, ids):
    """An independent fp32 forward of the teacher: log-softmax of its logits."""
    model = load_causal_lm(str(teacher_dir), dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.as_tensor(ids, dtype=torch.long)).logits.float(), -1)


def store_arrays(path):
    """Every payload array of every split, for equality between runs."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    for split in ("train", "validation"):
        for name, arr in root[split].arrays():
            out[f"{split}/{name}"] = arr[...]
    return out


@pytest.fixture
def prepared(project):
    assert run("prepare")[0] == 0
    return project


@pytest.mark.parametrize("codec, tol", [("factored", 2e-3), ("dense-bf16", 3e-2), ("dense-u8", None)])
def test_store_matches_independent_teacher_forward(prepared, tiny_teacher, codec, tol):
    code, out = run("teacher-logits", "--set", f"teacher_logits.codec={codec}", "--set", "teacher_logits.shard_size=3",
                    "--set", "teacher_logits.batch_size=2")
    assert code == 0, out
    cfg = load_config()
    store = open_store(cfg.paths.logits)
    assert store.info["teacher"]["spec"] == str(tiny_teacher)
    assert store.info["codec"]["name"] == codec
    for split in ("train", "validation"):
        ids = store.input_ids(split)[...]
        tokens = zarr.open_group(cfg.paths.tokens, mode="r")[split]["input_ids"][...]
        np.testing.assert_array_equal(ids, tokens)
        ref = reference_logprobs(tiny_teacher, ids[:4])
        for i in range(min(4, len(ids))):
            got = store.logprobs(split, i)
            p, q = ref[i].exp(), got.exp()
            tv = 0.5 * (p - q).abs().sum(-1).mean().item()
            if tol is None:
                assert tv < 5e-3, tv
            else:
                assert (got - ref[i]).abs().max().item() < tol and tv < 1e-2


def test_rerun_is_a_no_op_and_other_inputs_are_refused(prepared):
    assert run("teacher-logits", "--set", "teacher_logits.shard_size=4")[0] == 0
    cfg = load_config()
    before = store_arrays(cfg.paths.logits)
    code, out = run("teacher-logits", "--set", "teacher_logits.shard_size=4")
    assert code == 0, out
    after = store_arrays(cfg.paths.logits)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    # another codec must not be mixed into the same store
    one_line_error(*run("teacher-logits", "--set", "teacher_logits.codec=dense-u8",
                        "--set", "teacher_logits.shard_size=4"), "was made from another codec")
    one_line_error(*run("teacher-logits", "--set", "teacher_logits.shard_size=5"), "shard_size")
    assert all(np.array_equal(before[k], v) for k, v in store_arrays(cfg.paths.logits).items())
    # unless asked to
    assert run("teacher-logits", "--overwrite", "--set", "teacher_logits.codec=dense-u8",
               "--set", "teacher_logits.shard_size=4")[0] == 0
    assert open_store(cfg.paths.logits).info["codec"]["name"] == "dense-u8"


def _spawn(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "distill_pipe", "teacher-logits", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)


def _done_count(path):
    """Completed shards, counted from the done flags' chunk files (cheap enough to poll every few ms)."""
    return sum(len(list((Path(path) / split / "done" / "c").glob("*"))) for split in ("train", "validation"))


@pytest.mark.parametrize("kill_after_shards", [0, 2, 9])
def test_sigkill_and_rerun_equals_uninterrupted(prepared, kill_after_shards):
    args = ["--set", "teacher_logits.shard_size=1", "--set", "teacher_logits.batch_size=1",
            "--set", "teacher_logits.codec=dense-bf16"]
    cfg = load_config()
    assert run("teacher-logits", *args, "--set", "paths.logits=reference.zarr")[0] == 0
    reference = store_arrays("reference.zarr")
    n_shards = sum(len(v) for k, v in reference.items() if k.endswith("/done"))
    assert n_shards > kill_after_shards + 2

    proc = _spawn(*args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if Path(cfg.paths.logits).exists() and _done_count(cfg.paths.logits) >= kill_after_shards:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = _done_count(cfg.paths.logits)
    assert done_at_kill < n_shards, "the run finished before it could be killed; the test proves nothing"

    code, out = run("teacher-logits", *args)  # a plain rerun, no --overwrite
    assert code == 0, out
    resumed = store_arrays(cfg.paths.logits)
    assert resumed.keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


def test_two_ranks_equal_one(prepared):
    # shard_size 3: the ranks get different numbers of shards (and a partial last shard), so the
    # lockstep of FSDP all-gathers with throwaway forwards is exercised
    args = ["--set", "teacher_logits.shard_size=3", "--set", "teacher_logits.batch_size=2"]
    assert run("teacher-logits", *args, "--set", "paths.logits=one.zarr")[0] == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "distill_pipe", "teacher-logits", *args, "--set", "paths.logits=two.zarr"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = store_arrays("one.zarr"), store_arrays("two.zarr")
    assert one.keys() == two.keys()
    for k in one:
        if one[k].dtype == np.float16:
            np.testing.assert_allclose(two[k].astype(np.float32), one[k].astype(np.float32), atol=1e-3, rtol=0)
        else:
            np.testing.assert_array_equal(two[k], one[k], err_msg=k)
    a, b = open_store("one.zarr"), open_store("two.zarr")
    for split in a.splits:
        for i in range(a.num_sequences(split)):
            assert (a.logprobs(split, i) - b.logprobs(split, i)).abs().max().item() < 1e-5 * 100  # fp16 hidden


FAILING_RANK_SCRIPT = """
import os, sys
from distill_pipe.store import reader, writer
where = os.environ["FAIL_AT"]
calls = {"n": 0}
def third_call_on_rank_1(fn):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 3:
            raise OSError(f"injected {where} failure on rank 1")
        return fn(*args, **kwargs)
    return wrapped
if where == "read":  # before the step's forward: the other rank is entering its FSDP all-gathers
    reader.LogitStore.input_ids = third_call_on_rank_1(reader.LogitStore.input_ids)
else:  # after the forward, in the shard writer
    writer.ShardWriter.submit = third_call_on_rank_1(writer.ShardWriter.submit)
from distill_pipe.cli import main
sys.argv = ["distill-pipe", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("fail_at", ["read", "write"])
def test_a_failing_rank_stops_every_rank_and_a_rerun_resumes(prepared, fail_at):
    """Rank 1 fails mid-run, before its forward (store read) or after it (shard write): both ranks exit
    promptly (no hang in FSDP collectives) with one-line errors; the shards finished before the failure
    are kept and a plain rerun completes the store, equal to an uninterrupted one."""
    args = ["--set", "teacher_logits.shard_size=3", "--set", "teacher_logits.batch_size=1",
            "--set", "data.max_train_tokens=640", "--set", "data.max_validation_tokens=320"]
    assert run("prepare", *args[4:])[0] == 0
    assert run("teacher-logits", *args, "--set", "paths.logits=one.zarr")[0] == 0
    Path("fail.py").write_text(FAILING_RANK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FAIL_AT": fail_at,
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "fail.py", "teacher-logits", *args, "--set", "paths.logits=two.zarr"],
                          capture_output=True, text=True, env=env, timeout=120)  # a hang would hit the timeout
    assert proc.returncode != 0
    # (rank 0's progress bar may share a line with rank 1's error)
    errors = [ln[ln.index("error: "):] for ln in proc.stderr.splitlines() if "error: " in ln]
    assert any(f"injected {fail_at} failure on rank 1" in ln for ln in errors), proc.stderr[-3000:]
    assert any("another rank failed" in ln for ln in errors), proc.stderr[-3000:]
    partial = open_store("two.zarr")
    kept = sum(len(partial.completed_shards(s)) for s in partial.splits)
    assert 0 < kept < sum(partial.num_shards(s) for s in partial.splits)
    assert run("teacher-logits", *args, "--set", "paths.logits=two.zarr")[0] == 0
    one, two = store_arrays("one.zarr"), store_arrays("two.zarr")
    for k in one:
        if one[k].dtype == np.float16:  # the 2-rank FSDP forward rounds like test_two_ranks_equal_one's
            np.testing.assert_allclose(two[k].astype(np.float32), one[k].astype(np.float32), atol=1e-3, rtol=0)
        else:
            np.testing.assert_array_equal(two[k], one[k], err_msg=k)


def test_tokens_from_another_tokenizer_refused_before_compute(prepared, tmp_path):
    from conftest import make_tiny_llama, make_tokenizer

    other = tmp_path / "other_teacher"
    tok = make_tokenizer(other, vocab_size=280)
    make_tiny_llama(other, tok)
    one_line_error(*run("teacher-logits", "--set", f"teacher.model={other}"), "outside the teacher's vocabulary")
    assert not Path(load_config().paths.logits).exists()


def test_missing_tokens(project):
    one_line_error(*run("teacher-logits"), "run `distill-pipe prepare` first")


def test_incomplete_tokens(prepared):
    shutil.rmtree(Path(load_config().paths.tokens) / "validation")
    one_line_error(*run("teacher-logits"), "not a complete tokens store")


def test_seq_len_above_teacher_positions(prepared, tmp_path):
    from conftest import make_tiny_llama
    from transformers import AutoTokenizer

    short = tmp_path / "short_teacher"
    tok = AutoTokenizer.from_pretrained(str(load_config().teacher.model))
    make_tiny_llama(short, tok, max_pos=16)
    one_line_error(*run("teacher-logits", "--set", f"teacher.model={short}"), "exceeds the teacher's max positions (16)")


def test_output_under_a_file_is_a_clear_error(prepared):
    Path("blocker").write_text("a file, not a folder")
    one_line_error(*run("teacher-logits", "--set", "paths.logits=blocker/logits.zarr"), "blocker")
    assert Path("blocker").read_text() == "a file, not a folder"


def test_inspect_reports_and_verify_names_a_corrupt_shard(prepared):
    assert run("teacher-logits", "--set", "teacher_logits.shard_size=4")[0] == 0
    path = load_config().paths.logits
    code, out = run("inspect", path, "--verify")
    assert code == 0, out
    assert "factored" in out and "shards complete" in out and "B/token" in out and "verify      ok" in out
    shard = Path(path) / "train" / "hidden" / "c" / "1" / "0" / "0"
    assert shard.is_file()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = run("inspect", path, "--verify")
    assert code == 1
    assert "train shard 1:" in out and "train shard 0:" not in out


def test_inspect_not_a_store(project):
    Path("plain").mkdir()
    one_line_error(*run("inspect", "plain"), "not a distill-pipe logit store")
