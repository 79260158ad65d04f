"""Plain text files as users start from: one file of 35 KB, a folder of a few whole files, a file of many MB.
A .txt file is cut at blank lines into blocks (documents), so each of these has a train and a validation
split; the blocks do not depend on how the file is read; memory does not grow with the file."""

import json
import logging
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import zarr

from distill_pipe import data
from distill_pipe.config import DataConfig

from conftest import REPO, assert_one_line_error
from conftest import run_cli as run
from test_prepare_stream import existing_output  # noqa: F401 - fixture

TOKENS = "stages/prepare/tokens.zarr"


def prose(n_chars: int) -> str:
    """Real prose of about `n_chars`: CPython's LICENSE, then pydoc topics, passages apart by blank lines."""
    from pydoc_data.topics import topics

    licence = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    parts = [licence.read_text()] if licence.exists() else []
    parts += list(topics.values())
    text, k = "", 0
    while len(text) < n_chars:
        text += parts[k % len(parts)].strip() + "\n\n"
        k += 1
    return text[:n_chars]


def splits() -> dict:
    return zarr.open_group(TOKENS, mode="r").attrs["splits"]


def test_one_text_file_of_35kb_has_both_splits(project, caplog):
    corpus = project / "corpus.txt"
    corpus.write_text(prose(35_000))
    with caplog.at_level(logging.INFO, logger="distill_pipe.data"):
        code, out = run("prepare", "--set", f"data.source={corpus}", "--set", "data.seq_len=128",
                        "--set", "data.validation_fraction=0.1")
    assert code == 0, out
    s = splits()
    assert s["train"]["num_sequences"] > 0 and s["validation"]["num_sequences"] > 0
    docs = data.load_documents(DataConfig(source=str(corpus)))
    assert len(docs) >= 14 and {d.name for d in docs} == {"corpus.txt"}
    assert "".join(d.text for d in docs) == corpus.read_text()  # the blocks are the file, cut
    # one file in 10% validation blocks: in proportion, not by chance (floor or ceil of n * fraction)
    assert s["validation"]["documents"] in (len(docs) // 10, len(docs) // 10 + 1)
    # the log: counts and units right (not "read 1 documents (0.0 MB)")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("read "))
    assert line.startswith(f"read {len(docs)} documents (35.0 KB) from {corpus}; 1 .txt file cut at blank lines")


def test_a_folder_of_a_few_whole_files_has_both_splits(project):
    folder = project / "licences"
    folder.mkdir()
    text = prose(4 * 9_000)
    for i in range(4):
        (folder / f"licence{i}.txt").write_text(text[i * 9_000:(i + 1) * 9_000])
    code, out = run("prepare", "--set", f"data.source={folder}", "--set", "data.seq_len=128")
    assert code == 0, out
    s = splits()
    assert s["train"]["num_sequences"] > 0 and s["validation"]["num_sequences"] > 0
    assert zarr.open_group(TOKENS, mode="r").attrs["corpus"]["documents"] >= 12


def test_validation_blocks_of_one_file_are_in_proportion_and_files_split_as_before():
    # a file's blocks: floor or ceil of n * fraction in validation, evenly spaced, for any seed and fraction
    for seed in range(20):
        for fraction in (0.05, 0.1, 0.3):
            for n in (5, 37, 400):
                k = [data.document_split("big.txt", fraction, seed, i) for i in range(n)].count("validation")
                assert int(n * fraction) <= k <= int(n * fraction) + 1, (seed, fraction, n, k)
    # block 0 (a small file, a record) is split as before blocks existed: blake2b(seed, name) < fraction
    import hashlib

    for i in range(200):
        name = f"dir/doc{i}.txt"
        u = int.from_bytes(hashlib.blake2b(f"3\0{name}".encode(), digest_size=8).digest(), "big") / 2.0**64
        assert data.document_split(name, 0.2, 3) == ("validation" if u < 0.2 else "train")


SAMPLE = ("Première ligne, café crème ✓.\r\nSecond line of the same passage.\r\n\r\n"
          "A short one.\n\n\n   \nThen a long passage without blank lines:\n" + "word " * 300 + "\n"
          + "x" * 3000 + "\n\n" + "🙂 emoji passage " * 40 + "\n\nlast")


@pytest.mark.parametrize("read_bytes", [1, 3, 7, 1000, 1 << 22])
def test_blocks_do_not_depend_on_how_the_file_is_read(tmp_path, monkeypatch, read_bytes):
    path = tmp_path / "t.txt"
    path.write_bytes((SAMPLE * 3).encode("utf-8"))
    monkeypatch.setattr(data, "READ_BYTES", 1 << 22)
    want = list(data.text_blocks(path, 256))
    monkeypatch.setattr(data, "READ_BYTES", read_bytes)
    assert list(data.text_blocks(path, 256)) == want
    assert "".join(want) == SAMPLE * 3  # lossless, line ends as in the file
    assert len(want) > 6


def test_block_rule():
    def blocks(text, n=100):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        return list(data.text_blocks(Path(f.name), n))

    para = "A passage of forty characters, roughly.\n"
    # blank-line runs: a block ends after the first one at >= 100 characters (the run belongs to it)
    b = blocks((para * 2 + "\n \n") * 6)
    assert all(x.endswith("\n\n \n") for x in b) and all(len(x) >= 100 for x in b[:-1])
    assert len(b) == 3  # two passages of 80 + 3 are not yet 100: each block holds two
    # no blank line within 4 x 100: the first line end past 100, else the first whitespace, else 400
    b = blocks(para * 30)
    assert all(x.endswith("\n") and 100 <= len(x) <= 140 for x in b[:-1])
    b = blocks("word " * 200)
    assert all(x.endswith(" ") and 100 <= len(x) <= 104 for x in b[:-1])
    b = blocks("x" * 1000)
    assert [len(x) for x in b] == [400, 400, 200]
    # a file shorter than the block size is one block; the rest of a file fitting the limit is the last one
    assert blocks("short\n\ntext") == ["short\n\ntext"]
    assert blocks(para * 8) == [para * 8]  # 320 characters, no blank line: one block, not cut at a line


def test_bad_utf8_in_a_big_file_names_its_byte(existing_output, project, monkeypatch):
    marker, before = existing_output
    monkeypatch.setattr(data, "READ_BYTES", 1000)
    good = prose(5000).encode()
    (project / "corpus" / "zz.txt").write_bytes(good + "caf\xe9".encode("latin-1"))
    assert_one_line_error(*run("prepare"), f"zz.txt is not valid UTF-8 (byte {len(good) + 3}: b'\\xe9')")
    assert marker.read_bytes() == before


def test_a_big_file_is_read_in_pieces_and_stops_at_the_caps(project, monkeypatch):
    corpus = project / "big.txt"
    corpus.write_text(prose(400_000) + "\n\n" + "unreachable " * 10)
    reads = []
    real = data.text_blocks

    def counting(path, block_chars):
        for block in real(path, block_chars):
            reads.append(len(block))
            yield block

    monkeypatch.setattr(data, "text_blocks", counting)
    monkeypatch.setattr(data, "TOKENIZE_BATCH_CHARS", 4000)
    code, out = run("prepare", "--set", f"data.source={corpus}", "--set", "data.max_train_tokens=2048",
                    "--set", "data.max_validation_tokens=256")
    assert code == 0, out
    attrs = zarr.open_group(TOKENS, mode="r").attrs
    assert attrs["corpus"]["read_all"] is False and sum(reads) < 60_000  # of 400 KB
    assert attrs["splits"]["train"]["tokens"] == 2048 and attrs["splits"]["validation"]["tokens"] == 256


MEASURE = """
import json, os, resource, sys
os.chdir(sys.argv[1])
from distill_pipe.config import load_config
from distill_pipe.data import run_prepare
run_prepare(load_config(overrides=sys.argv[2:]))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def test_a_multi_mb_file_prepares_in_memory_that_does_not_grow_with_it(project):
    """Peak RSS of prepare on one 1 MB and one 5 MB text file, no caps, in fresh processes run side by side:
    the same within a margin far below the 4 MB between them (the release before read a file whole and
    tokenized it in one call: +4 MB of bytes, +4 MB of str and ~3M token ids as Python ints, > 100 MB)."""
    text = prose(1_000_000)
    procs = {}
    for mb in (1, 5):
        path = project / f"f{mb}.txt"
        path.write_text(text * mb)
        procs[mb] = subprocess.Popen([sys.executable, "-c", MEASURE, str(project), f"data.source={path}",
                                      "data.seq_len=128", f"paths.tokens=tok{mb}.zarr"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    peaks = {}
    for mb, proc in procs.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        peaks[mb] = json.loads(out.strip().splitlines()[-1])
        s = zarr.open_group(str(project / f"tok{mb}.zarr"), mode="r").attrs["splits"]
        assert s["validation"]["num_sequences"] > 0
    assert s["train"]["tokens"] > 2e6  # the 5 MB file was read through
    assert peaks[5] - peaks[1] < 16e6, peaks


def named_fixes(out: str) -> list[str]:
    line = next(l for l in out.splitlines() if l.startswith("error:"))
    return re.findall(r"(data\.\w+=[\d.]+)", line.split("any of these gives both splits a sequence:")[1])


def test_a_small_corpus_error_names_fixes_that_work(project):
    small = project / "small"
    small.mkdir()
    for i in range(4):  # ~25 tokens each
        (small / f"{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog")
    seed = next(s for s in range(100) if [data.document_split(f"{i}.txt", 0.25, s) for i in range(4)].count("validation") == 1)
    args = ["--set", f"data.source={small}", "--set", "data.seq_len=64", "--set", "data.validation_fraction=0.25"]
    code, out = run("prepare", *args, "--set", f"data.seed={seed}")
    assert_one_line_error(code, out, "the validation split has")
    fixes = named_fixes(out)
    assert {f.split("=")[0] for f in fixes} >= {"data.seq_len", "data.seed", "data.validation_fraction"}, out
    for fix in fixes:  # each one works on its own
        code, out = run("prepare", *args, "--set", f"data.seed={seed}", "--set", fix)
        assert code == 0, (fix, out)
        s = splits()
        assert s["train"]["num_sequences"] > 0 and s["validation"]["num_sequences"] > 0


def test_one_short_text_file_error_names_smaller_blocks(project):
    corpus = project / "short.txt"
    corpus.write_text(prose(3000))  # two blocks of 2,048+ characters: one is validation only by chance
    seed = next(s for s in range(100) if all(data.document_split("short.txt", 0.1, s, i) == "train" for i in range(2)))
    args = ["--set", f"data.source={corpus}", "--set", "data.seq_len=128", "--set", f"data.seed={seed}",
            "--set", "data.validation_fraction=0.1"]
    code, out = run("prepare", *args)
    assert_one_line_error(code, out, "the validation split has 0 tokens (0 documents)")
    fixes = named_fixes(out)
    assert any(f.startswith("data.text_block_chars=") for f in fixes), out
    for fix in fixes:
        code, out = run("prepare", *args, "--set", fix)
        assert code == 0, (fix, out)


def test_a_tiny_corpus_says_it_is_too_small(project):
    corpus = project / "tiny.txt"
    corpus.write_text("Just one sentence, far too little to split.")
    assert_one_line_error(*run("prepare", "--set", f"data.source={corpus}", "--set", "data.seq_len=8"),
                          "the corpus (1 document) is too small to give both splits a sequence of data.seq_len: add text")
