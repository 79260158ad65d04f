"""Faults injected into real runs: broken shards repaired by one command (`teacher-logits --repair`).

Every case ends either in a one-line error naming a fix that works, or in a result bit-equal to an
uninterrupted run."""

from __future__ import annotations

import logging
import os
import re
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
        out[codec] = run_stages(write_project(tmp_path_factory.mktemp(f"faults_{codec}"), tiny_teacher, doc_chars=1500,
                                              seq_len=16, teacher_logits={"codec": codec, "shard_size": 3,
                                                                          "batch_size": 2}))
    return out


def run_stages(root: Path) -> Path:
    """prepare and teacher-logits in the project `root`, in this process."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_cli("prepare")[0] == 0
        code, log = run_cli("teacher-logits")
        assert code == 0, log
    finally:
        os.chdir(cwd)
    return root


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


def corrupt_end(path: Path) -> None:
    """Flip bytes at the end of the object, where a zarr shard keeps its index (offset, size of each chunk)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 12, len(data) - 4):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


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


@pytest.mark.parametrize("codec, payload, fault, repair", [("factored", "hidden", "truncated", False),
                                                           ("factored", "hidden", "index", False),
                                                           ("dense-u8", "logprobs_u8", "truncated", False),
                                                           ("factored", "hidden", "truncated", True),
                                                           ("dense-u8", "logprobs_u8", "index", True)])
def test_a_damaged_unfinished_shard_is_recomputed_without_being_read(stores, tmp_path, monkeypatch, caplog, codec,
                                                                      payload, fault, repair):
    """A shard never flagged done whose object is damaged (a kill or a full disk in the middle of its write): the
    rerun, plain or --repair, rewrites it whole and never reads it (zarr read the old object to merge into it, and
    its checksum stopped every rerun with a traceback); the store ends bit-equal to the uninterrupted one."""
    root = tmp_path / "p"
    shutil.copytree(stores[codec], root)
    monkeypatch.chdir(root)
    before = store_arrays(LOGITS)
    zarr.open_group(str(LOGITS), mode="r+")["train"]["done"][1] = 0
    {"truncated": truncate, "index": corrupt_end}[fault](shard_file(payload, "train", 1))
    caplog.set_level(logging.INFO)
    code, out = run_cli("teacher-logits", *(["--repair"] if repair else []))
    assert code == 0, out
    assert re.search(r", 1 of \d+ shards to compute", caplog.text), caplog.text  # that shard alone
    assert_same_arrays(store_arrays(LOGITS), before)
    assert run_cli("inspect", str(LOGITS), "--verify")[0] == 0


def test_unreadable_input_ids_of_an_unfinished_shard(stores, tmp_path, monkeypatch):
    """The run reads a shard's input_ids from the store: unreadable ones stop a plain rerun with one line naming the
    repair, and the repair rewrites them from tokens.zarr and completes the store."""
    root = tmp_path / "p"
    shutil.copytree(stores["dense-u8"], root)
    monkeypatch.chdir(root)
    before = store_arrays(LOGITS)
    zarr.open_group(str(LOGITS), mode="r+")["train"]["done"][1] = 0
    truncate(LOGITS / "train" / "input_ids" / "c" / "1" / "0")
    assert_one_line_error(*run_cli("teacher-logits"), "distill-pipe teacher-logits --repair")
    code, out = run_cli("teacher-logits", "--repair")
    assert code == 0, out
    assert_same_arrays(store_arrays(LOGITS), before)


@pytest.mark.parametrize("error, fix", [("RuntimeError", "check the storage and rerun `distill-pipe teacher-logits`"),
                                        ("PermissionError", "make it writable")])
def test_a_failing_shard_write_is_one_line_and_the_rerun_completes(kill_project, zygote, tmp_path, error, fix):
    """Whatever the shard writer's thread raises (an unexpected error, a read-only destination) reaches the user
    as one line naming the fix, exit 1; the plain rerun then completes the store."""
    root = tmp_path / "p"
    shutil.copytree(kill_project, root)
    store = root / LOGITS
    assert zygote.run(root, "teacher-logits")[0] == [0]
    reference = store_arrays(store)
    shutil.rmtree(store)
    codes, out = zygote.run(root, "teacher-logits",
                            fail={"distill_pipe.store.writer.write_shard": (0, error, "injected write failure")})
    assert codes == [1], out
    assert_one_line_error(1, out, fix)
    assert f"({error}: injected write failure)" in out, out
    assert zygote.run(root, "teacher-logits")[0] == [0]
    assert_same_arrays(store_arrays(store), reference)


def test_plain_rerun_error_names_the_repair_command(stores, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(stores["dense-u8"], root)
    monkeypatch.chdir(root)
    shard_file("logprobs_u8", "validation", 0).unlink()
    code, out = run_cli("evaluate")
    assert_one_line_error(code, out, "teacher-logits --repair")


# ---------------------------------------------------------------- the factored head

def store_files(path: Path) -> dict:
    """Every file of a store: metadata parsed (a rewritten zarr.json may order its keys otherwise), data as bytes."""
    import json

    return {p.relative_to(path).as_posix(): json.loads(p.read_text()) if p.name == "zarr.json" else p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def transform_stores(tmp_path_factory, tiny_teacher) -> dict:
    """Factored stores whose hidden states are coded in a transform: klt-int8 (fitted) and int8 rotated (seeded)."""
    out = {}
    for name, params in (("klt-int8", {"hidden_dtype": "klt-int8", "step": 0.2}),
                         ("rotate", {"hidden_dtype": "int8", "rotate": True})):
        out[name] = run_stages(write_project(tmp_path_factory.mktemp(f"head_{name}"), tiny_teacher, doc_chars=400,
                                             seq_len=16, teacher_logits={"codec": "factored", "codec_params": params,
                                                                         "shard_size": 8, "batch_size": 8}))
    return out


def flip_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, 9):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def set_head_attr(path: Path) -> None:
    """A value changed, the JSON intact: nothing but the teacher can tell."""
    import json

    meta = json.loads(path.read_text())
    meta["attributes"]["logit_scale"] = 2.0
    path.write_text(json.dumps(meta))


HEAD_FAULTS = {"weight-bytes": ("weight/c/0/0", corrupt), "weight-deleted": ("weight", shutil.rmtree),
               "attributes-bytes": ("zarr.json", flip_json), "weight-metadata-bytes": ("weight/zarr.json", flip_json),
               "attributes-changed": ("zarr.json", set_head_attr)}


@pytest.mark.parametrize("fault", list(HEAD_FAULTS))
def test_a_damaged_head_is_named_and_repaired_from_the_teacher(stores, tmp_path, monkeypatch, caplog, fault):
    """head/weight's bytes or metadata damaged, head/weight deleted, the head's attributes damaged or changed:
    train and evaluate refuse the store in one line naming the repair (all but a changed value, which only the
    teacher can tell: the plain rerun of the teacher names it), and `teacher-logits --repair` rewrites the head
    from the teacher, the store then equal to the original file for file."""
    root = tmp_path / "p"
    shutil.copytree(stores["factored"], root)
    monkeypatch.chdir(root)
    set_students(root, 1)
    before = store_files(LOGITS)
    where, damage = HEAD_FAULTS[fault]
    damage(LOGITS / "head" / where)
    if fault != "attributes-changed":
        for args in (("train", "--student", "ref"), ("evaluate",)):
            assert_one_line_error(*run_cli(*args), "distill-pipe teacher-logits --repair")
        assert_one_line_error(*run_cli("inspect", str(LOGITS)), "distill-pipe teacher-logits --repair")
    assert_one_line_error(*run_cli("teacher-logits"), "distill-pipe teacher-logits --repair")
    caplog.set_level(logging.INFO)
    code, out = run_cli("teacher-logits", "--repair")
    assert code == 0, out
    assert f"repair: head/{where.split('/')[0]}" in caplog.text, caplog.text
    assert store_files(LOGITS) == before
    assert run_cli("inspect", str(LOGITS), "--verify")[0] == 0


@pytest.mark.parametrize("fault", ["transform-deleted", "transform-bytes", "weight-bytes"])
def test_klt_transforms_cannot_be_refitted_and_a_store_without_them_is_refused(transform_stores, tmp_path,
                                                                             monkeypatch, fault):
    """klt-int8's transforms were fitted when the store was created and its hidden states are coded in their basis:
    lost, the repair refuses in one line naming --overwrite and changes nothing (train says the same); with them
    intact, a damaged weight is rewritten from the teacher and the transforms kept, bit for bit."""
    root = tmp_path / "p"
    shutil.copytree(transform_stores["klt-int8"], root)
    monkeypatch.chdir(root)
    set_students(root, 1)
    before = store_files(LOGITS)
    {"transform-deleted": lambda: shutil.rmtree(LOGITS / "head" / "transform"),
     "transform-bytes": lambda: corrupt(LOGITS / "head" / "encode_transform" / "c" / "0" / "0"),
     "weight-bytes": lambda: corrupt(LOGITS / "head" / "weight" / "c" / "0" / "0")}[fault]()
    damaged = store_files(LOGITS)
    if fault == "weight-bytes":
        assert_one_line_error(*run_cli("train", "--student", "ref"), "distill-pipe teacher-logits --repair")
        assert run_cli("teacher-logits", "--repair")[0] == 0
        assert store_files(LOGITS) == before
        return
    for args in (("train", "--student", "ref"), ("teacher-logits",), ("teacher-logits", "--repair")):
        assert_one_line_error(*run_cli(*args), "distill-pipe teacher-logits --overwrite")
    assert store_files(LOGITS) == damaged  # nothing rewritten


def test_a_rotation_is_made_again_from_its_seed(transform_stores, tmp_path, monkeypatch):
    """int8 with rotate: the transforms come from the codec's seed, so the repair makes them again, bit for bit."""
    root = tmp_path / "p"
    shutil.copytree(transform_stores["rotate"], root)
    monkeypatch.chdir(root)
    before = store_files(LOGITS)
    shutil.rmtree(LOGITS / "head" / "transform")
    assert_one_line_error(*run_cli("evaluate"), "distill-pipe teacher-logits --repair")
    assert run_cli("teacher-logits", "--repair")[0] == 0
    assert store_files(LOGITS) == before


# ---------------------------------------------------------------- SIGKILLs at random moments, real processes

KILLS = 10


def tokens_snapshot(path: Path) -> tuple[dict, dict]:
    root = zarr.open_group(str(path), mode="r")
    return ({f"{s}/{n}": a[...] for s in ("train", "validation") for n, a in root[s].arrays()}, dict(root.attrs))


def test_sigkills_in_prepare_then_rerun_give_identical_tokens(kill_project, zygote, tmp_path):
    import time

    from faultkit import kill_and_rerun

    root = tmp_path / "p"
    shutil.copytree(kill_project, root)
    tokens = root / "stages" / "prepare" / "tokens.zarr"
    ref_arrays, ref_attrs = tokens_snapshot(tokens)
    shutil.rmtree(tokens)
    t0 = time.perf_counter()
    assert zygote.run(root, "prepare")[0] == [0]
    duration = time.perf_counter() - t0
    rng = np.random.default_rng(13)
    stats = kill_and_rerun(zygote, root, ("prepare",), ("prepare",), kills=KILLS, rng=rng, marker="",
                           max_delay=duration, restart=lambda: None)
    assert stats["kills"] == KILLS
    arrays, attrs = tokens_snapshot(tokens)
    assert_same_arrays(arrays, ref_arrays)
    assert attrs == ref_attrs


@pytest.mark.parametrize("world", [1, 2])
def test_sigkills_in_teacher_logits_then_rerun_give_an_identical_store(kill_project, zygote, tmp_path, world):
    from faultkit import kill_and_rerun

    from distill_pipe.store import open_store

    root = tmp_path / "p"
    shutil.copytree(kill_project, root)
    store = root / LOGITS
    slow = {"distill_pipe.teacher._step": 0.1}
    codes, out = zygote.run(root, "teacher-logits", world=world)
    assert codes == [0] * world, out
    reference = store_arrays(store)
    shutil.rmtree(store)
    stats = kill_and_rerun(zygote, root, ("teacher-logits",), ("teacher-logits",), kills=KILLS,
                           rng=np.random.default_rng(world), marker="inside distill_pipe.teacher._step", max_delay=0.3, max_count=4,
                           world=world, slow=slow, restart=lambda: shutil.rmtree(store, ignore_errors=True))
    assert stats["kills"] == KILLS
    print(f"teacher-logits world {world}: {stats}")
    assert_same_arrays(store_arrays(store), reference)
    assert open_store(store).verify() == []


def test_a_full_disk_mid_store_leaves_a_store_the_rerun_completes(kill_project, zygote, tmp_path):
    """RLIMIT_FSIZE below a shard object's size: the shard write fails (EFBIG, as on a full disk) after some
    shards were written; a one-line error names the fix and the plain rerun completes the store."""
    root = tmp_path / "p"
    shutil.copytree(kill_project, root)
    store = root / LOGITS
    args = ("teacher-logits", "--set", "teacher_logits.codec=dense-bf16")
    assert zygote.run(root, *args)[0] == [0]
    reference = store_arrays(store)
    shard_bytes = min(p.stat().st_size for p in (store / "train" / "logits_bf16" / "c").rglob("*") if p.is_file())
    shutil.rmtree(store)
    # some shards first: a run killed part-way
    zygote.start(root, *args, slow={"distill_pipe.teacher._step": 0.1})
    assert zygote.wait_for("shards to compute")
    import time

    time.sleep(1.0)
    zygote.kill()
    zygote.wait()
    codes, out = zygote.run(root, *args, fsize=shard_bytes // 2)
    assert codes == [1], out
    assert_one_line_error(1, out, "free space (or fix the storage) and rerun `distill-pipe teacher-logits`")
    assert zygote.run(root, *args)[0] == [0]
    assert_same_arrays(store_arrays(store), reference)


def assert_published_model_is_whole(out: Path) -> None:
    """model/ absent (no eval yet) or a complete folder; metrics.json names the step model/ holds."""
    import json

    if not (out / "model").exists():
        return
    note = json.loads((out / "model" / "distill_pipe.json").read_text())
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["best_step"] == note["step"]


def set_students(root: Path, world: int) -> None:
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(batch_size=2 // world, max_steps=12, eval_steps=2, save_steps=1, keep_last=1,
                           warmup_steps=1, max_eval_sequences=4, calibration_tokens=32)
    init = {"config": {"num_hidden_layers": 1}}
    params["students"] = {"ref": {"init": init}, "k": {"init": init}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def student_snapshot(out: Path) -> dict:
    import json

    from safetensors.numpy import load_file

    from distill_pipe.metrics import read_history

    live = out.parent.parent / "dvclive" / out.name  # paths.dvclive beside paths.train
    hist = {n: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_history(live, n)]
            for n in ("train", "eval")}
    m = json.loads((out / "metrics.json").read_text())
    return {"history": hist, "weights": load_file(out / "model" / "model.safetensors"),
            "metrics": {k: m[k] for k in ("best_eval_loss", "best_step", "final_eval_loss", "steps", "tokens")}}


def assert_same_student(a: dict, b: dict) -> None:
    assert a["history"] == b["history"] and a["metrics"] == b["metrics"]
    assert_same_arrays(a["weights"], b["weights"])


@pytest.fixture(scope="module")
def store_project(kill_project, zygote, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kills_store") / "p"
    shutil.copytree(kill_project, root)
    codes, out = zygote.run(root, "teacher-logits")
    assert codes == [0], out
    return root


@pytest.mark.parametrize("world", [1, 2])
def test_sigkills_in_train_then_resume_give_the_uninterrupted_student(store_project, zygote, tmp_path, world):
    from faultkit import kill_and_rerun

    root = tmp_path / "p"
    shutil.copytree(store_project, root)
    set_students(root, world)
    codes, out = zygote.run(root, "train", "--student", "ref", world=world)
    assert codes == [0] * world, out
    reference = student_snapshot(root / "stages" / "train" / "ref")
    out_k = root / "stages" / "train" / "k"
    at_kill = []  # the checkpoint each kill left: the kills must spread over the run, not all hit start-up

    def after_kill():
        assert_published_model_is_whole(out_k)
        latest = out_k / "checkpoints" / "latest"
        at_kill.append(latest.read_text() if latest.exists() else None)

    stats = kill_and_rerun(zygote, root, ("train", "--student", "k", "--resume"), ("train", "--student", "k", "--resume"),
                           kills=KILLS, rng=np.random.default_rng(10 + world),
                           marker="inside distill_pipe.trainer:Trainer.train_step", max_delay=0.5, max_count=4,
                           world=world, slow={"distill_pipe.trainer:Trainer.train_step": 0.1},
                           after_kill=after_kill, restart=lambda: shutil.rmtree(out_k))
    assert stats["kills"] == KILLS
    print(f"train world {world}: {stats}, checkpoints at the kills: {at_kill}")
    assert len(set(at_kill)) >= 3, at_kill
    assert_same_student(student_snapshot(out_k), reference)


KILL_POINTS = [
    ("distill_pipe.models.save_pretrained_quietly", 2),  # inside an export: its folder half-written
    ("distill_pipe.checkpoint._symlink_atomic", 3),  # an export complete, not yet published
    ("torch.save", 5),  # inside a checkpoint save: DCP files written, trainer.pt not
    ("distill_pipe.checkpoint._write_atomic", 3),  # a checkpoint renamed into place, `latest` not yet moved
]


@pytest.mark.parametrize("target, nth", KILL_POINTS)
def test_sigkill_inside_a_checkpoint_save_or_an_export(store_project, zygote, tmp_path, target, nth):
    root = tmp_path / "p"
    shutil.copytree(store_project, root)
    set_students(root, 1)
    codes, out = zygote.run(root, "train", "--student", "ref")
    assert codes == [0], out
    out_k = root / "stages" / "train" / "k"
    zygote.start(root, "train", "--student", "k", slow={target: 5.0})
    assert zygote.wait_for(f"inside {target}", count=nth), zygote.output()[-3000:]
    zygote.kill()
    assert zygote.wait() == [-9]
    assert_published_model_is_whole(out_k)
    codes, out = zygote.run(root, "train", "--student", "k", "--resume")
    assert codes == [0], out
    assert_same_student(student_snapshot(out_k), student_snapshot(root / "stages" / "train" / "ref"))
