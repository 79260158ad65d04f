"""The GGUF conversion cache: a hit returns what was saved, a damaged entry is rebuilt, an unwritable cache
only costs time. (That the cached builtin model and tokenizer equal a fresh conversion: test_builtin.py.)"""

import json

from distill_pipe import models


def _source(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_PIPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF not really")
    return models.resolve(str(tmp_path / "m.gguf"))


def _save(obj, folder):
    folder.mkdir(parents=True)
    (folder / "obj.json").write_text(json.dumps(obj))


def _load(folder):
    return json.loads((folder / "obj.json").read_text())


def test_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    src = _source(tmp_path, monkeypatch)
    calls = []

    def convert():
        calls.append(1)
        return {"w": [1, 2]}

    assert models._through_gguf_cache(src, "model", _load, convert, _save) == {"w": [1, 2]}
    assert models._through_gguf_cache(src, "model", _load, convert, _save) == {"w": [1, 2]}
    assert len(calls) == 1
    (entry,) = (tmp_path / "cache" / "gguf").iterdir()
    assert [p.name for p in entry.iterdir()] == ["model"]  # no temporary folder left behind
    # another GGUF file (another sha256) is another entry
    (tmp_path / "m.gguf").write_bytes(b"GGUF changed")
    models._hash_files.cache_clear()
    models._through_gguf_cache(src, "model", _load, convert, _save)
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


def test_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    src = _source(tmp_path, monkeypatch)
    models._hash_files.cache_clear()
    folder = models._gguf_cache(src, "tokenizer")
    folder.mkdir(parents=True)
    (folder / "obj.json").write_text("{not json")

    def load(f):
        try:
            return _load(f)
        except json.JSONDecodeError as e:
            raise ValueError(e) from e

    assert models._through_gguf_cache(src, "tokenizer", load, lambda: {"ok": True}, _save) == {"ok": True}
    assert _load(folder) == {"ok": True}


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    src = _source(tmp_path, monkeypatch)
    models._hash_files.cache_clear()
    (tmp_path / "cache").write_text("a file where the cache folder should be")

    def save(obj, folder):
        folder.mkdir(parents=True)  # fails: a parent is a file

    assert models._through_gguf_cache(src, "model", _load, lambda: {"ok": 1}, save) == {"ok": 1}
