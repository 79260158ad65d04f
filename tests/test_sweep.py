"""The bad-input sweep (tests/sweep_cases.py): every command given malformed params and inputs fails with a
non-zero exit, no traceback, one `error:` line naming the problem, and every file that was in the project
before it (the corpus, params, tokens.zarr, the store, the students) is still there, byte for byte.

The cases run in-process (typer's CliRunner); a few run again as real `python -m distill_pipe` processes to
show that the in-process result is what a user sees. The base projects are built once per session.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_tiny_llama, make_tokenizer, write_project
from sweep_cases import CASES, STUDENT_INIT, TRAIN, Case, edit_params

BY_NAME = {c.name: c for c in CASES}


def _in(root: Path, fn) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        fn()
    finally:
        os.chdir(cwd)


def build_bases(parent: Path, teacher: Path) -> dict[str, Path]:
    """The three base projects of sweep_cases.py: corpus, store (prepare + teacher-logits), trained (+ train)."""
    from distill_pipe.config import load_config
    from distill_pipe.data import run_prepare
    from distill_pipe.teacher import run_teacher_logits
    from distill_pipe.train import run_train

    corpus = parent / "corpus"
    corpus.mkdir(parents=True)
    write_project(corpus, teacher, doc_chars=1500, seq_len=16, teacher_logits={"shard_size": 8})
    edit_params(corpus, lambda p: (p["train"].update(TRAIN), p["data"].update(source="corpus"),  # in each copy
                                   p.update(students={"kd": {"init": STUDENT_INIT}})))
    store = parent / "store"
    shutil.copytree(corpus, store)
    _in(store, lambda: (run_prepare(load_config()), run_teacher_logits(load_config())))
    trained = parent / "trained"
    shutil.copytree(store, trained, symlinks=True)
    _in(trained, lambda: run_train(load_config(), "kd"))
    return {"corpus": corpus, "store": store, "trained": trained}


@pytest.fixture(scope="session")
def sweep_env(tmp_path_factory, tiny_teacher) -> dict:
    """The base projects and the other models the cases point at."""
    root = tmp_path_factory.mktemp("sweep")
    other = root / "other_teacher"  # the same tokenizer, other weights
    from transformers import AutoTokenizer

    make_tiny_llama(other, AutoTokenizer.from_pretrained(tiny_teacher), seed=5)
    other_tok = root / "other_tok_teacher"
    make_tiny_llama(other_tok, make_tokenizer(other_tok, vocab_size=280), seed=6)
    bases = build_bases(root / "bases", tiny_teacher)
    return {"bases": bases, "teacher": tiny_teacher, "other_teacher": other, "other_tok_teacher": other_tok}


def snapshot(root: Path) -> dict[str, str]:
    """Every file's sha256 and every link's target under root."""
    out = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def prepared_case(case: Case, env: dict, dest: Path) -> dict[str, str]:
    """Copy the case's base project to dest, break it (cwd = dest), return the snapshot before the command."""
    shutil.copytree(env["bases"][case.base], dest, symlinks=True)
    os.chdir(dest)
    if case.setup is not None:
        case.setup(dest, env)
    return snapshot(dest)


def error_line(out: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, f"expected one error: line, got:\n{out}"
    return lines[0]


def check_refused(case: Case, code: int, out: str, before: dict, after: dict) -> str:
    assert code != 0, f"{case.name}: exit 0 on bad input:\n{out}"
    assert "Traceback" not in out, f"{case.name}: a traceback:\n{out}"
    line = error_line(out)
    missing = [w for w in case.expect if w not in line]
    assert not missing, f"{case.name}: the error does not name {missing}:\n{line}"
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"{case.name}: files changed or lost: {changed[:5]}\n{line}"
    return line


def run_in_process(args: list[str]) -> tuple[int, str, BaseException | None]:
    from typer.testing import CliRunner

    from distill_pipe.cli import app

    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output, result.exception


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_in_one_line(case, sweep_env, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILL_PIPE_DEBUG", raising=False)
    before = prepared_case(case, sweep_env, tmp_path / "p")
    with caplog.at_level(logging.INFO):
        code, out, exc = run_in_process(case.args)
    assert isinstance(exc, SystemExit), f"{case.name}: {exc!r} escaped the CLI:\n{out}"
    logged = [r for r in caplog.records if r.exc_info]
    assert not logged, f"{case.name}: a traceback was logged: {logged[0].getMessage()}"
    check_refused(case, code, out, before, snapshot(tmp_path / "p"))


def test_the_sweep_has_at_least_60_distinct_cases():
    assert len(BY_NAME) == len(CASES) >= 60
    assert len({(tuple(c.args), c.what) for c in CASES}) == len(CASES)
    assert {c.args[0] for c in CASES} == {"prepare", "teacher-logits", "train", "evaluate", "inspect"}


SUBPROCESS_CASES = ["corpus-binary", "store-other-teacher", "train-store-chunk-truncated"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_a_real_process_prints_what_the_in_process_run_prints(name, sweep_env, tmp_path, monkeypatch):
    """The same case as a user runs it: exit 1, no traceback on stderr, the same error line."""
    monkeypatch.chdir(tmp_path)
    case = BY_NAME[name]
    before = prepared_case(case, sweep_env, tmp_path / "a")
    code, out, _ = run_in_process(case.args)
    in_process = check_refused(case, code, out, before, snapshot(tmp_path / "a"))
    before = prepared_case(case, sweep_env, tmp_path / "b")
    env = {k: v for k, v in os.environ.items() if k != "DISTILL_PIPE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "distill_pipe", *case.args], cwd=tmp_path / "b", env=env,
                          capture_output=True, text=True, timeout=300)
    line = check_refused(case, proc.returncode, proc.stdout + proc.stderr, before, snapshot(tmp_path / "b"))
    assert proc.returncode == 1
    assert line.replace(str(tmp_path / "b"), "") == in_process.replace(str(tmp_path / "a"), "")


def test_the_users_list_of_cases_is_the_case_table():
    """docs/troubleshooting-cases.md is generated from CASES: a case added, changed or removed without
    rerunning `python benchmarks/sweep_table.py` fails here."""
    from sweep_cases import PAGE, troubleshooting_page

    page = (REPO / PAGE).read_text(encoding="utf-8")
    assert page == troubleshooting_page(), f"{PAGE} is out of date: run python benchmarks/sweep_table.py"
    assert f"{len(CASES)} cases of bad input" in page
    assert troubleshooting_page(CASES[:-1]) != page  # one case fewer is seen
    rows = [l for l in page.splitlines() if l.startswith("| ") and not l.startswith("| What")]
    assert len(rows) == len(CASES)
    for doc in ("README.md", "docs/troubleshooting.md"):  # the count where users are sent to the list
        assert f"{len(CASES)} " in (REPO / doc).read_text(encoding="utf-8"), f"{doc}: not {len(CASES)} cases"


def test_the_repair_the_input_ids_error_names_repairs_it(sweep_env, tmp_path, monkeypatch):
    """The fix named by the error for a cut input_ids chunk (train-store-input-ids-truncated) is a real one:
    after `teacher-logits --repair` every row reads again, equal to tokens.zarr's."""
    import numpy as np
    import zarr

    from distill_pipe.store import StoreCorruptError, open_store
    from sweep_cases import LOGITS, TOKENS, truncate_chunk

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISTILL_PIPE_DEBUG", raising=False)
    prepared_case(Case("one-chunk", [], "", (), setup=truncate_chunk(f"{LOGITS}/train/input_ids")), sweep_env,
                  tmp_path / "p")
    with pytest.raises(StoreCorruptError, match="train/input_ids.*--repair"):
        open_store(LOGITS).token_rows("train")[:]
    code, out, _ = run_in_process(["teacher-logits", "--repair"])
    assert code == 0, out
    want = zarr.open_group(str(TOKENS), mode="r")["train/input_ids"][:]
    np.testing.assert_array_equal(open_store(LOGITS).token_rows("train")[:], want)
