"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny Llama models built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]

TINY_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Distillation trains a small student to match a large teacher's distribution.",
    "def f(x):\n    return x * 2  # doubled\n",
    "Zarr stores chunked, compressed, N-dimensional arrays. Ünïcödé ✓ works too.",
]


def run_cli(*args: str) -> tuple[int, str]:
    """Run a distill-pipe command in-process; (exit code, stdout+stderr)."""
    from typer.testing import CliRunner

    from distill_pipe.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def assert_one_line_error(code: int, out: str, fragment: str) -> None:
    """A user error: non-zero exit, no traceback, exactly one `error:` line, naming `fragment`."""
    assert code != 0, out
    assert "Traceback" not in out, out
    lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], out


def make_tokenizer(folder: Path, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from pydoc_data.topics import topics

    tk.train_from_iterator(TINY_TEXT + list(topics.values())[:5], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.save_pretrained(folder)
    return tok


def make_tiny_llama(folder: Path, tok, *, layers: int = 2, hidden: int = 32, max_pos: int = 128, seed: int = 0,
                    vocab_size: int | None = None, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_pos, tie_word_embeddings=tied,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-layer Llama (d=32) with a 300-token byte-level BPE tokenizer, saved as an HF folder."""
    folder = tmp_path_factory.mktemp("tiny_teacher")
    tok = make_tokenizer(folder)
    make_tiny_llama(folder, tok)
    return folder


@pytest.fixture(scope="session")
def tiny_tied_teacher(tmp_path_factory) -> Path:
    """tiny_teacher's shapes with tied input and output embeddings (Llama-3.2-1B, Qwen2.5-0.5B, Gemma, SmolLM2):
    its safetensors hold model.embed_tokens.weight and no lm_head.weight."""
    folder = tmp_path_factory.mktemp("tiny_tied_teacher")
    tok = make_tokenizer(folder)
    make_tiny_llama(folder, tok, seed=1, tied=True)
    return folder


def write_project(root: Path, teacher: Path, *, doc_chars: int, seq_len: int, teacher_logits: dict | None = None) -> Path:
    """params.yaml in `root` pointing at `teacher` and a 12-document .txt corpus (pydoc topics, cut to doc_chars)."""
    import yaml
    from pydoc_data.topics import topics

    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(list(topics.values())[10:22]):
        (corpus / f"doc{i:02d}.txt").write_text(text[:doc_chars])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(corpus), seq_len=seq_len, max_train_tokens=None, max_validation_tokens=None,
                          validation_fraction=0.25)
    params["teacher"]["model"] = str(teacher)
    params["teacher_logits"].update(teacher_logits or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def build_store_project(root: Path, teacher: Path, teacher_logits: dict) -> Path:
    """A project (write_project: 1,500-char documents, seq_len 16, shards of 8) with prepare and the teacher
    stage already run in it, in-process."""
    from distill_pipe.config import load_config
    from distill_pipe.data import run_prepare
    from distill_pipe.teacher import run_teacher_logits

    write_project(root, teacher, doc_chars=1500, seq_len=16, teacher_logits={"shard_size": 8, **teacher_logits})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config()
        run_prepare(cfg)
        run_teacher_logits(cfg)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def project(tmp_path, tiny_teacher, monkeypatch) -> Path:
    """A working directory with a params.yaml pointing at the tiny teacher and a small .txt corpus."""
    write_project(tmp_path, tiny_teacher, doc_chars=3000, seq_len=32)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def zygote():
    """tests/faultkit.py's Zygote: real processes (1 or more ranks) started in a fraction of a second."""
    from faultkit import Zygote

    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def kill_project(tmp_path_factory, tiny_teacher, zygote) -> Path:
    """A project with tokens.zarr (made by a zygote child); stores and students are made by each test."""
    root = write_project(tmp_path_factory.mktemp("kills"), tiny_teacher, doc_chars=700, seq_len=16,
                         teacher_logits={"codec": "factored", "shard_size": 4, "batch_size": 4})
    codes, out = zygote.run(root, "prepare")
    assert codes == [0], out
    return root
