"""Student initialisation: greedy layer selection against a naive greedy, layer copies, save/load/generate,
config and pretrained inits, the selection cache, and bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_llama, make_tokenizer
from distill_pipe import models, students
from distill_pipe.config import config_from_dict

TEACHER_LAYERS = 6


@pytest.fixture(scope="module")
def teacher6(tmp_path_factory):
    """A 6-layer Llama (d=32) whose layers matter: weights scaled up so dropping one changes perplexity a lot."""
    folder = tmp_path_factory.mktemp("teacher6")
    tok = make_tokenizer(folder)
    model = make_tiny_llama(folder, tok, layers=TEACHER_LAYERS, hidden=32, seed=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.model.layers.named_parameters():
            if p.ndim == 2:  # random layers of different strength, so there are no near-ties to flip
                p.copy_(torch.randn(p.shape, generator=gen) * torch.rand(1, generator=gen) * 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib(teacher6) -> np.ndarray:
    """(4, 24) int32 sequences of tokenised text, like a slice of the training split."""
    from transformers import AutoTokenizer
    from pydoc_data.topics import topics

    tok = AutoTokenizer.from_pretrained(teacher6)
    ids = tok("\n".join(list(topics.values())[30:34]))["input_ids"][:96]
    return np.asarray(ids, dtype=np.int32).reshape(4, 24)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_PIPE_CACHE", str(tmp_path / "cache"))


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_cfg(teacher, init, **train):
    return config_from_dict({"teacher": {"model": str(teacher)}, "students": {"s": {"init": init, **train}}})


def perplexity(model, ids) -> float:
    """Naive reference: full forward, mean next-token CE."""
    ids_NL = torch.as_tensor(ids, dtype=torch.long)
    with torch.no_grad():
        logits_NLV = model(input_ids=ids_NL, use_cache=False).logits
    return math.exp(F.cross_entropy(logits_NLV[:, :-1].reshape(-1, logits_NLV.shape[-1]),
                                    ids_NL[:, 1:].reshape(-1)).item())


def naive_keep(model, keep):
    """Naive layer drop: deep copy, slice the layer list (no layer_idx fix needed without a cache)."""
    m = copy.deepcopy(model)
    m.model.layers = nn.ModuleList(m.model.layers[i] for i in keep)
    m.config.num_hidden_layers = len(keep)
    return m


def naive_greedy(model, ids, num_layers):
    current = list(range(len(model.model.layers)))
    order, ppls, gaps = [], [], []
    while len(current) > num_layers:
        scores = [perplexity(naive_keep(model, [j for j in current if j != c]), ids) for c in current]
        best = int(np.argmin(scores))
        gaps.append(sorted(scores)[1] / sorted(scores)[0] - 1)
        order.append(current.pop(best))
        ppls.append(scores[best])
    return current, order, ppls, min(gaps)


def test_select_layers_matches_naive_greedy(teacher6, calib):
    model = load(teacher6)
    before = [p.clone() for p in model.parameters()]
    sel = students.select_layers(model, calib, 2)
    kept, order, ppls, gap = naive_greedy(model, calib, 2)
    assert gap > 1e-4, "test model has a near-tie: pick other weights"
    assert sel["kept"] == kept and sel["drop_order"] == order
    assert sel["perplexity_after_drop"] == pytest.approx(ppls, rel=1e-4)
    assert sel["perplexity_before"] == pytest.approx(perplexity(model, calib), rel=1e-5)
    assert sel["rounds"][0]["candidates"][str(order[0])] == pytest.approx(ppls[0], rel=1e-4)
    assert len(sel["rounds"][0]["candidates"]) == TEACHER_LAYERS
    # the model is left as it was
    assert len(model.model.layers) == TEACHER_LAYERS
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sel["perplexity_before"] == pytest.approx(perplexity(model, calib), rel=1e-5)


def test_select_layers_with_grouped_sequences(teacher6, calib, monkeypatch):
    """Sequences scored in several groups (a small logits budget) give the same selection."""
    model = load(teacher6)
    whole = students.select_layers(model, calib, 3)
    monkeypatch.setattr(students, "LOGITS_BYTES", 24 * 300 * 4 * 1)  # one sequence per group
    grouped = students.select_layers(model, calib, 3)
    assert grouped["kept"] == whole["kept"]
    assert grouped["perplexity_after_drop"] == pytest.approx(whole["perplexity_after_drop"], rel=1e-5)


def test_build_from_num_layers_records_selection(teacher6, calib, tmp_path):
    cfg = make_cfg(teacher6, {"from_teacher": {"num_layers": 3}})
    model, tok, info = students.build_student(cfg, cfg.student("s"), tmp_path / "out", calib)
    sel = json.loads((tmp_path / "out" / "layer_selection.json").read_text())
    assert json.loads((tmp_path / "out" / "init.json").read_text()) == json.loads(json.dumps(info))
    assert info["layers"] == sel["kept"] and len(sel["kept"]) == 3 and sel["kept"] == sorted(sel["kept"])
    assert sorted(sel["kept"] + sel["drop_order"]) == list(range(TEACHER_LAYERS))
    assert info["selection_cache_hit"] is False and model.config.num_hidden_layers == 3
    assert len(tok) == 300
    # recorded perplexities match a direct recomputation on the built student and on each intermediate model
    teacher = load(teacher6)
    assert perplexity(model, calib) == pytest.approx(sel["perplexity_after_drop"][-1], rel=1e-4)
    assert info["perplexity_student"] == sel["perplexity_after_drop"][-1]
    assert perplexity(teacher, calib) == pytest.approx(sel["perplexity_before"], rel=1e-5)
    for i, ppl in enumerate(sel["perplexity_after_drop"]):
        keep = [j for j in range(TEACHER_LAYERS) if j not in sel["drop_order"][:i + 1]]
        assert perplexity(naive_keep(teacher, keep), calib) == pytest.approx(ppl, rel=1e-4)


def test_explicit_layers_copy_teacher_weights(teacher6, tmp_path):
    cfg = make_cfg(teacher6, {"from_teacher": {"layers": [5, 0, 2]}})
    model, tok, info = students.build_student(cfg, cfg.student("s"), tmp_path, None)
    teacher = load(teacher6)
    assert info["layers"] == [0, 2, 5] and not (tmp_path / "layer_selection.json").exists()
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert teacher.config.num_hidden_layers == TEACHER_LAYERS
    for new, old in enumerate([0, 2, 5]):
        s_new, s_old = model.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert s_new.keys() == s_old.keys() and all(torch.equal(s_new[k], s_old[k]) for k in s_new)
        assert model.model.layers[new].self_attn.layer_idx == new
        assert model.model.layers[new].self_attn.q_proj.weight.data_ptr() != \
            teacher.model.layers[old].self_attn.q_proj.weight.data_ptr()  # a copy, not shared
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), teacher.get_parameter(name))


def test_keep_layers_subsets_per_layer_config_lists(teacher6):
    teacher = load(teacher6)
    teacher.config.layer_types = [f"t{i}" for i in range(TEACHER_LAYERS)]
    student = students.keep_layers(teacher, [1, 4])
    assert student.config.layer_types == ["t1", "t4"]
    assert teacher.config.layer_types == [f"t{i}" for i in range(TEACHER_LAYERS)]


def test_student_saves_loads_and_generates(teacher6, tmp_path):
    cfg = make_cfg(teacher6, {"from_teacher": {"layers": [0, 3, 5]}})
    model, tok, _ = students.build_student(cfg, cfg.student("s"), tmp_path / "out", None)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    loaded = load(tmp_path / "model")
    assert loaded.config.num_hidden_layers == 3
    prompt = torch.as_tensor([tok("def f(x):")["input_ids"]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=None)
    with_cache = loaded.generate(prompt, use_cache=True, **kw)  # KV cache is indexed by layer_idx
    assert with_cache.shape[1] == prompt.shape[1] + 8
    assert torch.equal(with_cache, loaded.generate(prompt, use_cache=False, **kw))
    assert torch.equal(with_cache, model.generate(prompt, use_cache=True, **kw))


def test_config_init(teacher6, tmp_path):
    init = {"config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 24}}
    cfg = make_cfg(teacher6, init, seed=3)
    model, tok, info = students.build_student(cfg, cfg.student("s"), tmp_path / "a", None)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (1, 16, 24, 300)
    assert c.head_dim == 4 and model.model.layers[0].self_attn.q_proj.weight.shape == (16, 16)
    assert len(tok) == 300 and info["seed"] == 3 and info["num_hidden_layers"] == 1
    same, _, _ = students.build_student(cfg, cfg.student("s"), tmp_path / "b", None)
    other_cfg = make_cfg(teacher6, init, seed=4)
    other, _, _ = students.build_student(other_cfg, other_cfg.student("s"), tmp_path / "c", None)
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.get_parameter(w), same.get_parameter(w))
    assert not torch.equal(model.get_parameter(w), other.get_parameter(w))
    assert math.isfinite(perplexity(model, [[1, 2, 3, 4]]))


def test_pretrained_init(teacher6, tmp_path):
    folder = tmp_path / "pre"
    folder.mkdir()
    tok0 = make_tokenizer(folder, vocab_size=280)
    ref = make_tiny_llama(folder, tok0, layers=1, hidden=16, seed=7)
    cfg = make_cfg(teacher6, {"pretrained": str(folder)})
    model, tok, info = students.build_student(cfg, cfg.student("s"), tmp_path / "out", None)
    assert len(tok) == 280 and info["fingerprint"].startswith("sha256:")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values()))


def test_selection_cache_hit_skips_recomputation(teacher6, calib, tmp_path, monkeypatch):
    cfg = make_cfg(teacher6, {"from_teacher": {"num_layers": 4}})
    _, _, first = students.build_student(cfg, cfg.student("s"), tmp_path / "kd", calib)
    assert first["selection_cache_hit"] is False

    def fail(*a, **k):
        raise AssertionError("select_layers ran despite a cached selection")

    monkeypatch.setattr(students, "select_layers", fail)
    model, _, second = students.build_student(cfg, cfg.student("s"), tmp_path / "ce", calib)
    assert second["selection_cache_hit"] is True and second["layers"] == first["layers"]
    assert (tmp_path / "kd" / "layer_selection.json").read_text() == (tmp_path / "ce" / "layer_selection.json").read_text()
    assert model.config.num_hidden_layers == 4
    with pytest.raises(AssertionError, match="despite"):  # other calibration data is another key
        students.build_student(cfg, cfg.student("s"), tmp_path / "x", calib[:2])


def test_damaged_cache_entry_is_recomputed(teacher6, calib, tmp_path):
    teacher = load(teacher6)
    sel, hit = students.cached_select_layers(teacher, calib, 4, "fp")
    (entry,) = (models.cache_dir() / "layer-selection").iterdir()
    entry.write_text("{not json")
    again, hit2 = students.cached_select_layers(teacher, calib, 4, "fp")
    assert (hit, hit2) == (False, False) and again == sel
    assert students.cached_select_layers(teacher, calib, 4, "fp") == (sel, True)


@pytest.mark.parametrize("init, calibration, message", [
    ({"layers": [0, 6]}, None, r"students\.s\.init\.from_teacher\.layers must be indices in \[0, 5\]"),
    ({"layers": [1, 2, 1]}, None, r"students\.s\.init\.from_teacher\.layers must not repeat a layer; \[1\]"),
    ({"num_layers": 6}, "calib", r"students\.s\.init\.from_teacher\.num_layers must be in \[1, 5\]"),
    ({"num_layers": 9}, "calib", r"num_layers must be in \[1, 5\] \(fewer than the teacher's 6 layers\)"),
    ({"num_layers": 3}, None, r"students\.s\.init\.from_teacher\.num_layers ranks layers on calibration data"),
])
def test_bad_from_teacher_init(teacher6, calib, tmp_path, init, calibration, message):
    cfg = make_cfg(teacher6, {"from_teacher": init})
    with pytest.raises(ValueError, match=message) as e:
        students.build_student(cfg, cfg.student("s"), tmp_path, calib if calibration else None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    ({"num_layerz": 2}, r"students\.s\.init\.config: unknown LlamaConfig key\(s\) num_layerz; known: "),
    ({"vocab_size": 500}, r"students\.s\.init\.config\.vocab_size must stay the teacher's 300"),
    ({"num_attention_heads": 3}, r"students\.s\.init\.config does not make a valid model"),
])
def test_bad_config_init(teacher6, tmp_path, overrides, message):
    cfg = make_cfg(teacher6, {"config": overrides})
    with pytest.raises(ValueError, match=message) as e:
        students.build_student(cfg, cfg.student("s"), tmp_path, None)
    assert "\n" not in str(e.value)


def test_select_layers_bad_input(teacher6, calib):
    model = load(teacher6)
    with pytest.raises(ValueError, match=r"calibration_ids must be \(N, L\)"):
        students.select_layers(model, calib[0], 2)
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 5\]"):
        students.select_layers(model, calib, 0)
