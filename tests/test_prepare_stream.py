"""Streaming prepare: equal to a naive whole-corpus reference, bounded reading (caps stop it), BOS, workers,
and corpus files that are not valid UTF-8."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from distill_pipe import data
from distill_pipe.config import load_config
from distill_pipe.models import load_tokenizer

from conftest import assert_one_line_error, make_tiny_llama, make_tokenizer
from conftest import run_cli as run

TOKENS = "stages/prepare/tokens.zarr"


def naive_reference(docs, tok, seq_len, caps, fraction, seed, bos=None):
    """Every document in memory, tokenized one by one, each split's stream cut whole: what prepare must equal.
    A text block that follows its file's previous block in the split continues it (no EOS, no BOS between)."""
    out = {}
    for split, cap in caps.items():
        stream, prev = [], None
        for d in docs:
            if d.text.strip() and data.document_split(d.name, fraction, seed, d.index) == split:
                if prev != (d.name, d.index - 1):
                    stream += ([tok.eos_token_id] if prev is not None else []) + ([bos] if bos is not None else [])
                stream += tok(d.text, add_special_tokens=False)["input_ids"]
                prev = (d.name, d.index)
        if prev is not None:
            stream.append(tok.eos_token_id)
        n = len(stream) // seq_len if cap is None else min(len(stream) // seq_len, cap // seq_len)
        out[split] = np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return out


def jsonl_corpus(path: Path, n: int, tail: str = "") -> Path:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    path.write_text("".join(json.dumps({"text": texts[i % len(texts)][:400 + 37 * i]}) + "\n" for i in range(n)) + tail)
    return path


@pytest.mark.parametrize("caps", [(None, None), (640, 160)])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_stream_equals_naive_reference(project, monkeypatch, caps, num_proc):
    # tiny batches and chunks: many tokenizer calls, many appended chunks, rows spanning batches
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 3000)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4 * 32 * 3)
    corpus = jsonl_corpus(project / "c.jsonl", 60)
    args = ["--set", f"data.source={corpus}", "--set", f"data.num_proc={num_proc}",
            "--set", f"data.max_train_tokens={'null' if caps[0] is None else caps[0]}",
            "--set", f"data.max_validation_tokens={'null' if caps[1] is None else caps[1]}"]
    code, out = run("prepare", *args)
    assert code == 0, out
    cfg = load_config(overrides=[a for a in args if a != "--set"])
    tok = load_tokenizer(cfg.teacher.model)
    ref = naive_reference(data.load_documents(cfg.data), tok, 32, dict(zip(data.SPLITS, caps)),
                          cfg.data.validation_fraction, cfg.data.seed)
    root = zarr.open_group(TOKENS, mode="r")
    for split in data.SPLITS:
        np.testing.assert_array_equal(root[split]["input_ids"][...], ref[split], err_msg=split)
        assert root.attrs["splits"][split]["num_sequences"] == len(ref[split])
    assert root.attrs["fingerprint"] == data.tokens_fingerprint({s: root[s]["input_ids"] for s in data.SPLITS},
                                                                root.attrs)
    assert root.attrs["corpus"]["read_all"] == (caps[0] is None)


def test_reading_stops_once_both_caps_are_reached(project, monkeypatch):
    # the broken last line is never read: both caps fill from the first records (reading runs at most two
    # tokenizer batches ahead of packing; batches of ~2000 characters here)
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 2000)
    corpus = jsonl_corpus(project / "c.jsonl", 200, tail="{not json\n")
    code, out = run("prepare", "--set", f"data.source={corpus}", "--set", "data.max_train_tokens=320",
                    "--set", "data.max_validation_tokens=64")
    assert code == 0, out
    attrs = zarr.open_group(TOKENS, mode="r").attrs
    assert attrs["corpus"]["read_all"] is False and attrs["corpus"]["documents"] < 200
    assert attrs["splits"]["train"]["tokens"] == 320 and attrs["splits"]["validation"]["tokens"] == 64
    # without the caps the whole file is read, and the broken line is found
    assert_one_line_error(*run("prepare", "--set", f"data.source={corpus}"), "c.jsonl:201 is not valid JSON")


def test_documents_start_with_bos_when_the_tokenizer_adds_one(tmp_path, project):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = make_tokenizer(tmp_path / "plain")
    backend = base.backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", bos_token="<bos>")
    assert tok("a")["input_ids"][0] == bos and data.adds_bos(tok) == bos
    teacher = tmp_path / "bos_teacher"
    make_tiny_llama(teacher, tok)
    code, out = run("prepare", "--set", f"teacher.model={teacher}")
    assert code == 0, out
    cfg = load_config(overrides=[f"teacher.model={teacher}"])
    tok = load_tokenizer(cfg.teacher.model)
    ref = naive_reference(data.load_documents(cfg.data), tok, 32, {"train": None, "validation": None},
                          cfg.data.validation_fraction, cfg.data.seed, bos=bos)
    root = zarr.open_group(TOKENS, mode="r")
    assert root.attrs["bos_token_id"] == bos
    for split in data.SPLITS:
        ids = root[split]["input_ids"][...]
        np.testing.assert_array_equal(ids, ref[split])
        assert ids[0, 0] == bos  # the first document of each split opens with BOS
    # a tokenizer that adds no BOS (the tiny default, SmolLM2's) gets none
    assert data.adds_bos(load_tokenizer(load_config().teacher.model)) is None


@pytest.fixture
def existing_output(project):
    assert run("prepare")[0] == 0
    marker = Path(TOKENS) / "zarr.json"
    return marker, marker.read_bytes()


def test_non_utf8_txt_file_is_an_error_naming_it(existing_output, project):
    marker, before = existing_output
    (project / "corpus" / "zz_latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert_one_line_error(*run("prepare"), "zz_latin1.txt is not valid UTF-8 (byte 3")
    assert marker.read_bytes() == before
    assert not list(Path(TOKENS).parent.glob("*.tmp-*"))  # the half-written output is gone


@pytest.mark.parametrize("name, content, fragment", [
    ("c.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "c.jsonl:2 is not valid UTF-8"),
    ("c.csv", b"text\nfine\ncaf\xe9\n", "c.csv record 1 is not valid UTF-8"),
])
def test_non_utf8_record_is_an_error_naming_file_and_record(existing_output, project, name, content, fragment):
    marker, before = existing_output
    path = project / name
    path.write_bytes(content)
    assert_one_line_error(*run("prepare", "--set", f"data.source={path}"), fragment)
    assert marker.read_bytes() == before


def test_hub_dataset_is_read_in_batches(project, monkeypatch):
    import datasets

    from pydoc_data.topics import topics

    texts = list(topics.values())[:40]
    monkeypatch.setattr(data, "RECORD_BATCH", 7)
    monkeypatch.setattr(data.models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict({"text": texts}))
    code, out = run("prepare", "--set", "data.source=some-org/some-corpus")
    assert code == 0, out
    attrs = zarr.open_group(TOKENS, mode="r").attrs
    assert attrs["corpus"]["documents"] == 40
    docs = data.load_documents(load_config(overrides=["data.source=some-org/some-corpus"]).data)
    assert [d.text for d in docs] == texts and docs[8].name == "some-org/some-corpus#8"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_prepare_are_cleared_and_a_lost_output_restored(existing_output, project):
    marker, before = existing_output
    out = Path(TOKENS)
    dead = _dead_pid()
    # killed between _swap_in's two renames: the previous output is only under .old-<pid>
    os.replace(out, out.with_name(out.name + f".old-{dead}"))
    (out.with_name(out.name + f".tmp-{dead}") / "train").mkdir(parents=True)  # a half-written output
    live = out.with_name(out.name + f".tmp-{os.getpid()}-other")  # not a pid suffix: never touched
    live.mkdir()
    running = out.with_name(out.name + f".tmp-{os.getpid()}")  # a running process's: never touched
    running.mkdir()
    data._clear_leftovers(out)
    assert marker.read_bytes() == before  # put back
    assert not out.with_name(out.name + f".old-{dead}").exists()
    assert not out.with_name(out.name + f".tmp-{dead}").exists()
    assert live.exists() and running.exists()
    # a second .old- beside an existing output is only removed
    stale = out.with_name(out.name + f".old-{dead}")
    stale.mkdir()
    data._clear_leftovers(out)
    assert not stale.exists() and marker.read_bytes() == before
