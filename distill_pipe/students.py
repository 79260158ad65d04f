"""Student initialisation: a layer-dropped teacher, explicit teacher layers, a pretrained model or a fresh config.

`build_student` is the one entry the train stage calls. The default init, `{from_teacher: {num_layers: N}}`,
keeps the N teacher layers chosen by `select_layers`: greedily drop the layer whose removal raises the
perplexity on a calibration slice least, until N remain. Uniform spacing is catastrophic for some teachers
(SmolLM2-135M: every other layer gives perplexity 1.6M, greedy 20 layers ~100; see DESIGN.md).

Shapes: N calibration sequences, L tokens each, D hidden size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill_pipe import models
from distill_pipe.config import Config, StudentConfig
from distill_pipe.distributed import decoder_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SELECTION_VERSION = 1
"""Bump when select_layers changes its result or record: cached selections of other versions are ignored."""
LOGITS_BYTES = 1 << 28
"""fp32 logits held at once while scoring a candidate (sequences are grouped to stay under it)."""
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")
"""Config lists with one entry per decoder layer: subset together with the layers."""


# ---------------------------------------------------------------- entry


def build_student(cfg: Config, student: StudentConfig, out_dir: str | Path,
                  calibration_ids: np.ndarray | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Initialise `student` (fp32, CPU, eval mode) and return (model, tokenizer to save with it, info).

    `calibration_ids` (N, L) int sequences of the training split rank the teacher's layers for
    `{from_teacher: {num_layers: N}}` (unused by the other kinds). Writes out_dir/init.json (= info) and,
    for a ranked layer drop, out_dir/layer_selection.json.
    """
    out_dir = Path(out_dir)
    where = f"students.{student.name}.init"
    kind, spec = next(iter(student.init.items()))
    info: dict = {"student": student.name, "init": student.init, "kind": kind}
    if kind == "pretrained":
        model = models.load_causal_lm(spec, dtype=torch.float32)
        tok = models.load_tokenizer(spec)
        info.update(model=spec, fingerprint=models.model_fingerprint(spec))
    elif kind == "config":
        model = _from_config(cfg.teacher.model, spec, student.train.seed, f"{where}.config")
        tok = models.load_tokenizer(cfg.teacher.model)
        info.update(teacher=cfg.teacher.model, seed=student.train.seed)
    else:
        total = models.load_config(cfg.teacher.model).num_hidden_layers  # validate before the slow load
        if "layers" in spec:
            layers = check_layers(spec["layers"], total, f"{where}.from_teacher.layers")
        else:
            _check_num_layers(spec["num_layers"], total, f"{where}.from_teacher.num_layers")
            if calibration_ids is None:
                raise ValueError(f"{where}.from_teacher.num_layers ranks layers on calibration data: "
                                 "pass calibration_ids (training sequences)")
        teacher = models.load_causal_lm(cfg.teacher.model, dtype=torch.float32)
        info.update(teacher=cfg.teacher.model, teacher_fingerprint=models.model_fingerprint(cfg.teacher.model),
                    teacher_layers=total)
        if "num_layers" in spec:
            start = time.perf_counter()
            selection, hit = cached_select_layers(teacher, calibration_ids, spec["num_layers"],
                                                  info["teacher_fingerprint"])
            layers = selection["kept"]
            info.update(selection="layer_selection.json", selection_cache_hit=hit,
                        selection_seconds=round(time.perf_counter() - start, 2),
                        perplexity_teacher=selection["perplexity_before"],
                        perplexity_student=selection["perplexity_after_drop"][-1])
            _write_json(out_dir / "layer_selection.json", selection)
        model = keep_layers(teacher, layers)
        del teacher
        tok = models.load_tokenizer(cfg.teacher.model)
        info.update(layers=layers)
    model.eval()
    info.update(num_hidden_layers=model.config.num_hidden_layers,
                num_parameters=sum(p.numel() for p in model.parameters()))
    _write_json(out_dir / "init.json", info)
    log.info("student %s: %s init, %d layers, %.1fM parameters", student.name, kind,
             info["num_hidden_layers"], info["num_parameters"] / 1e6)
    return model, tok, info


# ---------------------------------------------------------------- layer selection


def select_layers(model: nn.Module, calibration_ids: np.ndarray | torch.Tensor, num_layers: int) -> dict:
    """Greedy layer dropping: repeatedly drop the layer whose removal raises perplexity least.

    Perplexity is exp of the mean next-token CE over the calibration sequences (N, L). Returns the record
    written to layer_selection.json: kept layers (teacher indices, in order), the drop order, the
    perplexity before any drop and after each, and every candidate's perplexity per round.

    Cost: dropping the layer at position k leaves layers before k unchanged, so each round computes the
    current model's per-layer inputs once and scores candidate k by running only the layers after it from
    the input of layer k. `model` is left unchanged.
    """
    ids_NL = torch.as_tensor(np.asarray(calibration_ids), dtype=torch.long, device=next(model.parameters()).device)
    if ids_NL.ndim != 2 or ids_NL.shape[1] < 2 or ids_NL.shape[0] < 1:
        raise ValueError(f"calibration_ids must be (N, L) token ids with N >= 1, L >= 2; got {tuple(ids_NL.shape)}")
    layers = list(decoder_layers(model))
    _check_num_layers(num_layers, len(layers), "num_layers")
    targets = ids_NL.shape[0] * (ids_NL.shape[1] - 1)
    ppl = lambda nll: math.exp(nll / targets)  # noqa: E731

    current = list(range(len(layers)))  # teacher indices of the current model's layers
    drops = []
    with torch.inference_mode(), _layers_swapped(model):
        # inputs_LNLD[k]: (N, L, D) hidden state entering the current model's k-th layer
        nll, inputs_LNLD = _run(model, ids_NL, None, layers, capture=True)
        before = ppl(nll)
        log.info("layer selection: %d -> %d layers on %d tokens; perplexity %.2f", len(layers), num_layers,
                 ids_NL.numel(), before)
        while len(current) > num_layers:
            scores = [_run(model, ids_NL, inputs_LNLD[k], [layers[j] for j in current[k + 1:]])[0]
                      for k in range(len(current))]
            k = min(range(len(scores)), key=scores.__getitem__)
            drops.append({"layer": current[k], "perplexity": ppl(scores[k]),
                          "candidates": {str(j): ppl(s) for j, s in zip(current, scores)}})
            del current[k]
            h_NLD = inputs_LNLD.pop(k)  # the dropped layer's input now enters its successor
            if k < len(current):  # refresh the inputs of the layers after the successor
                _, later = _run(model, ids_NL, h_NLD, [layers[j] for j in current[k:]], capture=True)
                inputs_LNLD[k:] = later
            log.info("dropped layer %d: perplexity %.2f (%d layers left)", drops[-1]["layer"],
                     drops[-1]["perplexity"], len(current))
    return {
        "version": SELECTION_VERSION,
        "teacher_layers": len(layers),
        "num_layers": num_layers,
        "kept": current,
        "drop_order": [d["layer"] for d in drops],
        "perplexity_before": before,
        "perplexity_after_drop": [d["perplexity"] for d in drops],
        "calibration": {"sequences": ids_NL.shape[0], "seq_len": ids_NL.shape[1], "targets": targets},
        "rounds": drops,
    }


def cached_select_layers(model: nn.Module, calibration_ids: np.ndarray, num_layers: int,
                         teacher_fingerprint: str) -> tuple[dict, bool]:
    """`select_layers` through a JSON cache keyed by (teacher fingerprint, calibration ids, num_layers).

    The cache only saves time (students sharing an init rank the layers once): the result is the same
    either way. Returns (selection, cache_hit).
    """
    ids = np.ascontiguousarray(np.asarray(calibration_ids, dtype=np.int64))
    ids_sha = hashlib.sha256(repr(ids.shape).encode() + ids.tobytes()).hexdigest()
    key = hashlib.sha256(json.dumps([SELECTION_VERSION, teacher_fingerprint, ids_sha, num_layers]).encode())
    path = models.cache_dir() / "layer-selection" / f"{key.hexdigest()[:32]}.json"
    if path.is_file():
        try:
            selection = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # a damaged cache entry is recomputed, never trusted
            selection = None
        if selection and selection.get("version") == SELECTION_VERSION and len(selection["kept"]) == num_layers:
            log.info("layer selection: cache hit %s", path)
            return selection, True
    selection = select_layers(model, ids, num_layers)
    selection["calibration"]["sha256"] = ids_sha
    selection["teacher_fingerprint"] = teacher_fingerprint
    _write_json(path, selection)
    return selection, False


class _Inject(nn.Module):
    """Stands in as the first decoder layer: returns the hidden state it is given, ignoring its input.

    Running [inject, layer_k+1, ...] through the model's own forward keeps everything the model does
    around its layers (masks, rotary embeddings, final norm, head, soft-capping) without re-implementing it.
    """

    attention_type = "full_attention"  # models that pick a mask per layer type look this up

    def __init__(self, h_NLD: torch.Tensor):
        super().__init__()
        self.h_NLD = h_NLD

    def forward(self, hidden_states, *args, **kwargs):
        assert hidden_states.shape == self.h_NLD.shape, "injected hidden state does not match the batch"
        return self.h_NLD


def _run(model: nn.Module, ids_NL: torch.Tensor, h_NLD: torch.Tensor | None, layers: list[nn.Module],
         capture: bool = False) -> tuple[float, list[torch.Tensor] | None]:
    """Summed next-token NLL of the model made of `layers`, starting from hidden state h (None: embeddings).

    With `capture`, also the (N, L, D) input of each of `layers`. Must run inside `_layers_swapped(model)`.
    """
    base, name = _layer_slot(model)
    n, seq = ids_NL.shape
    group = max(1, LOGITS_BYTES // (seq * model.config.vocab_size * 4))  # bounds the (g, L, V) logits
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = []
    if capture:
        for i, layer in enumerate(layers):
            def grab(module, args, kwargs, i=i):
                captured[i].append(args[0] if args else kwargs["hidden_states"])
            hooks.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    nll = 0.0
    try:
        for s in range(0, n, group):
            ids_gL = ids_NL[s:s + group]
            stack = layers if h_NLD is None else [_Inject(h_NLD[s:s + group]), *layers]
            setattr(base, name, nn.ModuleList(stack))
            logits_gLV = model(input_ids=ids_gL, use_cache=False).logits.float()
            # next-token targets; the last position has none (ignored), which spares a copy of the logits
            targets_gL = F.pad(ids_gL[:, 1:], (0, 1), value=-100)
            nll += F.cross_entropy(logits_gLV.flatten(0, 1), targets_gL.flatten(), ignore_index=-100,
                                   reduction="sum").item()
            del logits_gLV
    finally:
        for hook in hooks:
            hook.remove()
    return nll, ([torch.cat(c) for c in captured] if capture else None)


@contextlib.contextmanager
def _layers_swapped(model: nn.Module):
    """Let `_run` replace the model's layer list; restore it afterwards."""
    base, name = _layer_slot(model)
    original = getattr(base, name)
    try:
        yield
    finally:
        setattr(base, name, original)


def _layer_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(module holding the decoder layer list, attribute name), e.g. (model.model, "layers")."""
    layers = decoder_layers(model)  # raises a clear error for unknown architectures
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    return base, next(n for n, m in base.named_children() if m is layers)


# ---------------------------------------------------------------- building


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """A deep copy of `model` with only the decoder layers `layers` (teacher indices, in this order).

    Fixes what indexes layers: config.num_hidden_layers, each attention module's layer_idx (KV-cache slot)
    and per-layer config lists (layer_types, ...). Only the kept layers are copied.
    """
    base, name = _layer_slot(model)
    original = getattr(base, name)
    total = len(original)
    setattr(base, name, nn.ModuleList(original[i] for i in layers))
    try:
        student = copy.deepcopy(model)
    finally:
        setattr(base, name, original)
    for new_idx, layer in enumerate(decoder_layers(student)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = student.config
    config.num_hidden_layers = len(layers)
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, key, [value[i] for i in layers])
    return student


def check_layers(layers: list[int], total: int, where: str) -> list[int]:
    """Validate explicit teacher layer indices; return them sorted (layers keep the teacher's order)."""
    bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < total)]
    if bad or not layers:
        raise ValueError(f"{where} must be indices in [0, {total - 1}] (the teacher has {total} layers); got {layers}")
    if len(set(layers)) != len(layers):
        dup = sorted({i for i in layers if layers.count(i) > 1})
        raise ValueError(f"{where} must not repeat a layer; {dup} appear more than once")
    return sorted(layers)


def _check_num_layers(num_layers: int, total: int, where: str) -> None:
    if not (isinstance(num_layers, int) and 1 <= num_layers < total):
        raise ValueError(f"{where} must be in [1, {total - 1}] (fewer than the teacher's {total} layers); "
                         f"got {num_layers}; to copy every layer use layers: [0, ..., {total - 1}]")


def _from_config(teacher_spec: str, overrides: dict, seed: int, where: str) -> nn.Module:
    """A randomly initialised model of the teacher's architecture with `overrides` applied (vocab kept)."""
    from huggingface_hub.errors import StrictDataclassError  # what transformers config validators raise
    from transformers import AutoModelForCausalLM

    base = models.load_config(teacher_spec)
    known = base.to_dict()
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown {type(base).__name__} key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    if "vocab_size" in overrides and overrides["vocab_size"] != base.vocab_size:
        raise ValueError(f"{where}.vocab_size must stay the teacher's {base.vocab_size} (the student shares "
                         "its tokenizer); remove it")
    raw = {**known}
    if {"hidden_size", "num_attention_heads"} & set(overrides) and "head_dim" not in overrides:
        raw.pop("head_dim", None)  # derived from hidden_size / heads: recompute, do not keep the teacher's
    if "num_hidden_layers" in overrides:
        for key in PER_LAYER_CONFIG_KEYS:
            if key not in overrides:
                raw.pop(key, None)  # one entry per layer: let the config rebuild it for the new depth
    raw.update(overrides)
    torch.manual_seed(seed)
    try:
        config = type(base).from_dict(raw)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, TypeError, RuntimeError, AssertionError, StrictDataclassError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where} does not make a valid model: {first}") from None
    return model


def _write_json(path: Path, data: dict) -> None:
    """Atomic write: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
