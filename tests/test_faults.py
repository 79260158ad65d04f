"""Faults injected into real runs: broken shards repaired by one command (`teacher-logits --repair`).

Every case ends either in a one-line error naming a fix that works, or in a result bit-equal to an
uninterrupted run."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_one_line_error, run_cli, write_project


def store_arrays(path) -> dict:
    """Every array of every split (payload, input_ids, done flags), for bit equality between runs."""
    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": arr[...] for split in ("train", "validation") for name, arr in root[split].arrays()}


def assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


LOGITS = Path("stages/teacher_logits/logits.zarr")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_teacher) -> dict:
    """prepare + teacher-logits once per codec (3 sequences per shard); tests work on copies."""
    out = {}
    for codec in ("factored", "dense-u8"):
        root = write_project(tmp_path_factory.mktemp(f"faults_{codec}"), tiny_teacher, doc_chars=1500, seq_len=16,
                             teacher_logits={"codec": codec, "shard_size": 3, "batch_size": 2})
        cwd = os.getcwd()
        os.chdir(root)
        try:
            assert run_cli("prepare")[0] == 0
            code, log = run_cli("teacher-logits")
            assert code == 0, log
        finally:
            os.chdir(cwd)
        out[codec] = root
    return out


def shard_file(payload: str, split: str, k: int) -> Path:
    arr = zarr.open_group(str(LOGITS), mode="r")[split][payload]
    return LOGITS / split / payload / "c" / str(k) / Path(*["0"] * (arr.ndim - 1))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("codec, payload, fault", [("factored", "hidden", "corrupt"), ("factored", "hidden", "truncated"),
                                                   ("factored", "hidden", "missing"),
                                                   ("dense-u8", "logprobs_u8", "truncated")])
def test_a_broken_shard_is_named_and_repaired_by_one_command(stores, tmp_path, monkeypatch, caplog, codec, payload,
                                                              fault):
    root = tmp_path / "p"
    shutil.copytree(stores[codec], root)
    monkeypatch.chdir(root)
    before = store_arrays(LOGITS)
    target = shard_file(payload, "train", 1)
    {"corrupt": corrupt, "truncated": truncate, "missing": Path.unlink}[fault](target)
    code, out = run_cli("inspect", str(LOGITS), "--verify")
    assert code == 1 and "train shard 1:" in out and "teacher-logits --repair" in out, out
    # a reader (training, evaluation) names the shard and the repair command in one line
    from distill_pipe.store import StoreCorruptError, open_store

    with pytest.raises(StoreCorruptError, match=r"train shard 1 is corrupt .*`distill-pipe teacher-logits --repair`"):
        open_store(LOGITS).teacher_batch("train", [3, 4])
    caplog.set_level(logging.INFO)
    code, out = run_cli("teacher-logits", "--repair")
    assert code == 0, out
    assert "repair: train shard 1 fails" in caplog.text and "repair: 1 of" in caplog.text, caplog.text
    code, out = run_cli("inspect", str(LOGITS), "--verify")
    assert code == 0 and "verify      ok" in out, out
    assert_same_arrays(store_arrays(LOGITS), before)  # recomputed bit for bit


def test_repair_fixes_wrong_values_and_input_ids(stores, tmp_path, monkeypatch, caplog):
    """Faults that checksums cannot see: a shard whose values were rewritten (NaN), and input_ids that no
    longer match tokens.zarr."""
    root = tmp_path / "p"
    shutil.copytree(stores["factored"], root)
    monkeypatch.chdir(root)
    before = store_arrays(LOGITS)
    g = zarr.open_group(str(LOGITS), mode="r+")
    hidden = g["validation"]["hidden"]
    hidden[0:1] = np.full((1, *hidden.shape[1:]), np.nan, dtype=hidden.dtype)
    ids = g["train"]["input_ids"]
    ids[7:8] = (ids[7:8] + 1) % 300
    code, out = run_cli("inspect", str(LOGITS), "--verify")
    assert code == 1 and "validation shard 0: hidden holds NaN/inf" in out, out
    code, out = run_cli("teacher-logits", "--repair")
    assert code == 0, out
    log = caplog.text
    assert "validation shard 0 fails" in log and "train shard 2 fails (input_ids differ from tokens.zarr)" in log, log
    assert run_cli("inspect", str(LOGITS), "--verify")[0] == 0
    assert_same_arrays(store_arrays(LOGITS), before)


def test_plain_rerun_error_names_the_repair_command(stores, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(stores["dense-u8"], root)
    monkeypatch.chdir(root)
    shard_file("logprobs_u8", "validation", 0).unlink()
    code, out = run_cli("evaluate")
    assert_one_line_error(code, out, "teacher-logits --repair")
