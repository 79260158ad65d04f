"""The GGUF conversion cache: a hit returns what was saved, a damaged entry is rebuilt, an unwritable cache
only costs time, concurrent processes convert once. (That the cached builtin model and tokenizer equal a
fresh conversion: test_builtin.py.)"""

import json
import multiprocessing as mp
import time

from distill_pipe import models


def _source(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_PIPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF not really")
    models._hash_files.cache_clear()
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
    assert [p.name for p in entry.iterdir() if not p.name.endswith(".lock")] == [models._gguf_cache(src, "model").name]
    # another GGUF file (another sha256) is another entry
    (tmp_path / "m.gguf").write_bytes(b"GGUF changed")
    models._hash_files.cache_clear()
    models._through_gguf_cache(src, "model", _load, convert, _save)
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2
    # the cache can be turned off
    monkeypatch.setenv("DISTILL_PIPE_GGUF_CACHE", "0")
    models._through_gguf_cache(src, "model", _load, convert, _save)
    assert len(calls) == 3


class Damaged(Exception):
    """Not an OSError/ValueError: e.g. safetensors' own error for a truncated file."""


def test_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    src = _source(tmp_path, monkeypatch)
    folder = models._gguf_cache(src, "tokenizer")
    folder.mkdir(parents=True)
    (folder / "obj.json").write_text("{not json")
    stale = folder.parent / f".{folder.name}.tmp-otherhost-123"  # left by a killed conversion
    stale.mkdir()

    def load(f):
        try:
            return _load(f)
        except json.JSONDecodeError as e:
            raise Damaged(e) from e

    assert models._through_gguf_cache(src, "tokenizer", load, lambda: {"ok": True}, _save) == {"ok": True}
    assert _load(folder) == {"ok": True} and not stale.exists()


def test_unwritable_cache_still_loads(tmp_path, monkeypatch):
    src = _source(tmp_path, monkeypatch)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    assert models._through_gguf_cache(src, "model", _load, lambda: {"ok": 1}, _save) == {"ok": 1}


def _convert_slowly_and_count(counter: str):
    with open(counter, "a") as f:
        f.write("x")
    time.sleep(1.0)
    return {"w": 7}


def _worker(tmp_path: str, out: str):
    import functools
    import os
    from pathlib import Path

    os.environ["DISTILL_PIPE_CACHE"] = str(Path(tmp_path) / "cache")
    src = models.resolve(str(Path(tmp_path) / "m.gguf"))
    obj = models._through_gguf_cache(src, "model", _load,
                                     functools.partial(_convert_slowly_and_count, str(Path(tmp_path) / "count")),
                                     _save)
    Path(out).write_text(json.dumps(obj))


def test_concurrent_processes_convert_once(tmp_path, monkeypatch):
    """Like torchrun ranks on a cold cache: one converts, the others wait for the lock and read its entry."""
    _source(tmp_path, monkeypatch)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), str(tmp_path / f"out{i}"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert (tmp_path / "count").read_text() == "x"
    assert all(json.loads((tmp_path / f"out{i}").read_text()) == {"w": 7} for i in range(3))
