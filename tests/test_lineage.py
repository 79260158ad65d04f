"""Lineage checked on every read: CE-only training and evaluate refuse data other than the store's, a
checkpoint is refused against another store; each a one-line error naming the fix. Every identity lineage
compares follows what the student sees (each data param changed in turn, the previous release's outputs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
import zarr

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


# ---------------------------------------------------------------- a changed data param reaches every identity

TOKENS, STORE = "stages/prepare/tokens.zarr", "stages/teacher_logits/logits.zarr"


def set_data(root: Path, **data) -> None:
    """Edit params.yaml's data section (what `dvc exp run -S data.key=value` does)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(data)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def upstream(overwrite: bool = False) -> None:
    """prepare, then the teacher stage replacing a store made from other data (--overwrite: whatever it holds;
    the two flags together are refused)."""
    for cmd in (["prepare"], ["teacher-logits", "--overwrite" if overwrite else "--replace-changed"]):
        code, out = run_cli(*cmd)
        assert code == 0, out


def tokens_fingerprint() -> str:
    return zarr.open_group(TOKENS, mode="r").attrs["fingerprint"]


def store_data_fingerprint() -> str:
    from distill_pipe.store import open_store

    return open_store(STORE).info["data"]["fingerprint"]


def test_a_changed_seq_len_retrains_the_students_and_evaluate_refuses_the_old_ones(proj):
    """The issue's scenario: with token caps, seq_len 16 and 32 keep the same tokens in the same order (the
    same row bytes). After `-S data.seq_len=32` and the reruns of prepare and the teacher stage, `train
    --auto-resume` must not take the finished 16-token checkpoint for this data (it did: one fingerprint for
    both, nothing trained, the old model republished), and evaluate must refuse a student still on 16."""
    set_params(proj, {"kd": {"init": STUDENT_INIT}, "stale": {"init": STUDENT_INIT}}, max_steps=2, save_steps=1)
    set_data(proj, seq_len=16, max_train_tokens=384, max_validation_tokens=96)
    upstream()
    for name in ("kd", "stale"):
        code, out = run_cli("train", "--student", name, "--auto-resume")
        assert code == 0, out
    before = tokens_fingerprint(), store_data_fingerprint()
    assert before[0] == before[1]
    old_rows = zarr.open_group(TOKENS, mode="r")["train"]["input_ids"][...]

    set_data(proj, seq_len=32)
    upstream()
    new_rows = zarr.open_group(TOKENS, mode="r")["train"]["input_ids"][...]
    assert old_rows.tobytes() == new_rows.tobytes()  # the hard case: the same tokens, cut otherwise
    after = tokens_fingerprint(), store_data_fingerprint()
    assert after[0] == after[1] and after[0] != before[0]

    code, out = run_cli("train", "--student", "kd", "--auto-resume")
    assert code == 0, out
    kd = proj / "stages" / "train" / "kd"
    assert len(list(kd.glob("checkpoints-*"))) == 1  # the 16-token run: kept aside, unused
    m = json.loads((kd / "metrics.json").read_text())
    assert m["data"]["shape"] == {"seq_len": 32, "train": 12, "validation": 3}
    assert m["steps"] == 2 and m["tokens"] == 2 * 2 * 31  # trained again, on 32-token rows
    code, out = run_cli("evaluate", "--set", "evaluate.max_sequences=2")
    assert_one_line_error(code, out, "student stale was trained on another data than")
    code, out = run_cli("train", "--student", "stale", "--auto-resume")  # the fix named
    assert code == 0, out
    code, out = run_cli("evaluate", "--set", "evaluate.max_sequences=2")
    assert code == 0, out


# The tiny teacher's tokenizer has no chat template: one in params (the same as tests/test_chat.py's).
TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ': ' + m['content'] + '<eos>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'a: ' }}{% endif %}")


@pytest.fixture(scope="module")
def other_tokenizer_teacher(tmp_path_factory) -> Path:
    from conftest import make_tiny_llama, make_tokenizer

    folder = tmp_path_factory.mktemp("other_tokenizer")
    make_tiny_llama(folder, make_tokenizer(folder, vocab_size=280))
    return folder


def _baseline(root: Path, fmt: str) -> Path:
    """A project on a .jsonl whose records hold both a text and a conversation, prepared (seq_len 16, caps
    of 2048 / 512 tokens), its store made, a KD and a CE-only student trained one step each."""
    from pydoc_data.topics import topics

    texts = list(topics.values())[30:70]
    (root / "corpus.jsonl").write_text("".join(json.dumps({
        "text": t[:200], "messages": [{"role": "user", "content": t[:80]},
                                      {"role": "assistant", "content": t[80:300]}]}) + "\n" for t in texts))
    set_data(root, source="corpus.jsonl", format=fmt, chat_template=TINY_TEMPLATE, seq_len=16,
             max_train_tokens=2048, max_validation_tokens=512)
    set_params(root, {"kd": {"init": STUDENT_INIT}, "ce": {"init": STUDENT_INIT, "alpha": 1.0}}, max_steps=1,
               save_steps=1, eval_steps=1)
    upstream(overwrite=True)
    from distill_pipe import data

    root_ = zarr.open_group(TOKENS, mode="r")  # the recorded fingerprint is recomputed from the arrays
    masks = {s: root_[s]["target_mask"] for s in data.SPLITS} if fmt == "chat" else None
    assert root_.attrs["fingerprint"] == data.tokens_fingerprint({s: root_[s]["input_ids"] for s in data.SPLITS},
                                                                 root_.attrs, masks)
    for name in ("kd", "ce"):
        code, out = run_cli("train", "--student", name)
        assert code == 0, out
    return root


@pytest.fixture(scope="module")
def baselines(base_project, tmp_path_factory):
    made = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            import os

            root = tmp_path_factory.mktemp(f"lineage_{fmt}") / "p"
            shutil.copytree(base_project, root)
            cwd = os.getcwd()
            os.chdir(root)
            try:
                made[fmt] = _baseline(root, fmt)
            finally:
                os.chdir(cwd)
        return made[fmt]

    return get


def trained_identity(folder: Path) -> dict:
    """The data identity a student trained on, as train recorded it: metrics.json's `data` less kind and path."""
    data = json.loads((folder / "metrics.json").read_text())["data"]
    return {k: v for k, v in data.items() if k not in ("kind", "path")}


@pytest.mark.parametrize("fmt, change", [
    ("text", {"seq_len": 32}),  # the same tokens (the caps are multiples of both), rows of another length
    ("text", {"validation_fraction": 0.4}),
    ("text", {"seed": 1}),
    ("text", {"max_train_tokens": 1024}),
    ("text", {"max_validation_tokens": 256}),
    ("text", {"format": "chat"}),
    ("chat", {"targets": "all"}),
    ("chat", {"chat_template": TINY_TEMPLATE.replace(": '", ":: '")}),
    ("chat", {"seq_len": 32}),
    ("text", {"tokenizer": True}),
], ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_each_data_change_reaches_every_identity_lineage_compares(baselines, other_tokenizer_teacher, tmp_path,
                                                                  monkeypatch, fmt, change):
    """One data param changed at a time (the tokenizer: a teacher with another one), prepare and the teacher
    stage rerun as `dvc repro` does: the tokens fingerprint, the store's recorded data identity, the run's data
    identity (the `data` part of the fingerprint a checkpoint is resumed by, as the student recorded it in
    metrics.json when it trained) and evaluate's lineage check all see the change."""
    from distill_pipe.config import load_config
    from distill_pipe.evaluate import EvaluateError, check_student_lineage
    from distill_pipe.store import open_store
    from distill_pipe.train import _open_data

    root = tmp_path / "p"
    shutil.copytree(baselines(fmt), root)
    monkeypatch.chdir(root)
    before = tokens_fingerprint(), store_data_fingerprint()
    if "tokenizer" in change:
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["teacher"]["model"] = str(other_tokenizer_teacher)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    else:
        set_data(root, **change)
    upstream()
    assert tokens_fingerprint() != before[0]
    assert store_data_fingerprint() == tokens_fingerprint() != before[1]
    cfg = load_config()
    store = open_store(STORE)
    for name in ("kd", "ce"):
        folder = root / "stages" / "train" / name
        assert trained_identity(folder) != _open_data(cfg, cfg.student(name).train)["identity"], name
        with pytest.raises(EvaluateError, match=f"student {name} was trained on another "):
            check_student_lineage(name, folder, store)


def test_a_data_param_that_changes_nothing_the_student_sees_keeps_every_identity(baselines, tmp_path,
                                                                                monkeypatch):
    """The other side: identities follow the data, not the params (a cap above what the corpus holds, a
    chat template on text records, num_proc): nothing is retrained for them."""
    from distill_pipe.config import load_config
    from distill_pipe.evaluate import check_student_lineage
    from distill_pipe.store import open_store
    from distill_pipe.train import _open_data

    root = tmp_path / "p"
    shutil.copytree(baselines("text"), root)
    monkeypatch.chdir(root)
    before = tokens_fingerprint()
    set_data(root, chat_template=TINY_TEMPLATE + " ", targets="all", num_proc=2)
    upstream()
    assert tokens_fingerprint() == store_data_fingerprint() == before
    cfg, store = load_config(), open_store(STORE)
    for name in ("kd", "ce"):
        folder = root / "stages" / "train" / name
        assert trained_identity(folder) == _open_data(cfg, cfg.student(name).train)["identity"]
        check_student_lineage(name, folder, store)


def _previous_release_fingerprint(attrs, digests, mask_digests, shapes):
    """The data fingerprint as the release before this one computed it: the rows' bytes, not their shape."""
    import hashlib

    h = hashlib.sha256(attrs["tokenizer"]["fingerprint"].encode())
    for split in ("train", "validation"):
        h.update(split.encode() + digests[split].digest())
        if mask_digests is not None:
            h.update(b"target_mask" + mask_digests[split].digest())
    return "sha256:" + h.hexdigest()[:32]


def test_outputs_of_the_previous_release_are_never_taken_for_current_data(proj, monkeypatch):
    """tokens.zarr, store, checkpoints and students as the previous release wrote them (its fingerprint, no
    shape in a run's identity): each is found different or refused in one line naming the rerun."""
    from distill_pipe import data, train

    set_params(proj, {"kd": {"init": STUDENT_INIT}, "ce": {"init": STUDENT_INIT, "alpha": 1.0}}, max_steps=2,
               save_steps=1)
    set_data(proj, seq_len=16, max_train_tokens=384, max_validation_tokens=96)
    real_open_data = train._open_data

    def open_data_without_shape(cfg, tc):
        source = real_open_data(cfg, tc)
        source["identity"].pop("shape")
        return source

    with monkeypatch.context() as old:  # the previous release
        old.setattr(data, "_combine_fingerprint", _previous_release_fingerprint)
        old.setattr(train, "_open_data", open_data_without_shape)
        upstream()
        for name in ("kd", "ce"):
            code, out = run_cli("train", "--student", name, "--auto-resume")
            assert code == 0, out
    old_fp = tokens_fingerprint()
    assert store_data_fingerprint() == old_fp

    # nothing rerun: its students are refused by evaluate, its checkpoints by --resume and set aside by --auto-resume
    code, out = run_cli("evaluate", "--set", "evaluate.max_sequences=2")
    assert_one_line_error(code, out, "student ce was trained by an earlier distill-pipe")  # the first, by name
    assert "`distill-pipe train --student ce`" in out
    with pytest.raises(CheckpointError, match=r"data.shape.seq_len.* differ; it trained on another store"):
        run("kd", resume=True)
    for name in ("ce", "kd"):
        code, out = run_cli("train", "--student", name, "--auto-resume")
        assert code == 0, out
        assert len(list((proj / "stages" / "train" / name).glob("checkpoints-*"))) == 1
    assert run_cli("evaluate", "--set", "evaluate.max_sequences=2")[0] == 0

    # prepare rerun: the same data has a new fingerprint; the old store is refused, or replaced on request
    assert run_cli("prepare")[0] == 0
    assert tokens_fingerprint() != old_fp
    code, out = run_cli("teacher-logits")
    assert_one_line_error(code, out, "was made from another data; pass --overwrite to replace it")
    assert store_data_fingerprint() == old_fp  # untouched
    assert run_cli("teacher-logits", "--replace-changed")[0] == 0
    assert store_data_fingerprint() == tokens_fingerprint()
