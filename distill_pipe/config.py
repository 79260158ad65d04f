"""Typed configuration: one dataclass per params.yaml section, validated once.

params.yaml sections mirror the dataclasses one to one. Every field is documented where it is
declared. User errors raise ``ConfigError`` (a ValueError) with one line naming the key.
"""

from __future__ import annotations

import copy
import re
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PARAMS = "params.yaml"

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
"""The values of train.divergence (defined in distill_pipe/divergences.py, which computes them)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` as a string (a float needs a dot there); learning rates are written so."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d[\d_]*)?(\.\d*)?[eE][-+]?\d+$"),
                              list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A params.yaml / --set problem; the message names the key and what is allowed."""


@dataclass
class PathsConfig:
    tokens: str = "stages/prepare/tokens.zarr"
    """Output of `prepare`: packed token sequences (Zarr v3 group)."""
    logits: str = "stages/teacher_logits/logits.zarr"
    """Output of `teacher-logits`: the teacher-logit store (local path or fsspec URL)."""
    manifest: str = "stages/teacher_logits/manifest.json"
    """Local JSON file `teacher-logits` writes once the store is complete: what DVC tracks in place of the
    store (its location, lineage and completion), so `dvc status` never reads the store."""
    train: str = "stages/train"
    """Parent folder of the per-student outputs (`<train>/<student>/`)."""
    dvclive: str = "stages/dvclive"
    """Parent folder of each student's live training metrics (`<dvclive>/<student>/`, written by dvclive): the
    train stage's metrics and plots in dvc.yaml, apart from <train> (DVC outputs may not overlap)."""
    evaluate: str = "stages/evaluate"
    """Output folder of `evaluate`."""

    def validate(self, p: str) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name):
                raise ConfigError(f"{p}.{f.name} must be a non-empty path")
        if "://" in self.manifest:
            raise ConfigError(f"{p}.manifest must be a local path (DVC tracks it in place of the store), got "
                              f"{self.manifest}; put the store itself on object storage with {p}.logits")


DATA_FORMATS = ("text", "chat", "prompt_completion")
CHAT_TARGETS = ("assistant", "all")


@dataclass
class DataConfig:
    source: str = "builtin:pydoc"
    """Corpus: `builtin:pydoc` (CPython's pydoc topics), `builtin:pydoc-chat` (conversations written from them,
    with format chat), a .txt/.jsonl/.json/.parquet/.csv file, a folder
    or glob of those, or a Hugging Face dataset name."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json/.parquet/.csv records and HF datasets."""
    dataset_split: str = "train"
    """Split to read when `source` is a Hugging Face dataset name."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    validation_fraction: float = 0.1
    """Fraction of documents held out for validation, in (0, 1), decided per document by a seeded hash of its
    identity (file path relative to the source, record index or text block): of a .txt file's blocks, every
    1/fraction-th one (from a seeded offset), so one text file is held out in that proportion."""
    text_block_chars: int = 2048
    """A .txt file is cut into documents at blank lines: blocks of whole passages of at least this many
    characters (a smaller file is one document). Blocks that stay consecutive in a split are joined without
    an EOS. Larger blocks give validation longer passages; smaller ones a finer split of a small corpus."""
    max_train_tokens: int | None = None
    """Cap on training tokens (whole sequences); null for all."""
    max_validation_tokens: int | None = None
    """Cap on validation tokens (whole sequences); null for all."""
    seed: int = 0
    """Seed of the per-document hash that decides the split."""
    num_proc: int = 1
    """Tokenizer processes. 1: in the main process (a fast tokenizer still uses every core for a batch);
    more helps where the main process, not the tokenizer, is the bottleneck (many cores)."""
    format: str = "text"
    """Records are `text` (one document each), `chat` (a list of {role, content} messages each) or
    `prompt_completion` (a prompt and a completion each: strings, or lists of messages). Conversations are
    rendered with the teacher's chat template and only their target tokens are trained on (`targets`)."""
    messages_field: str = "messages"
    """Field holding the message list of a record (format chat)."""
    prompt_field: str = "prompt"
    """Field holding the prompt (format prompt_completion): a string (one user message) or messages."""
    completion_field: str = "completion"
    """Field holding the completion (format prompt_completion): a string (one assistant message) or messages."""
    chat_template: str | None = None
    """Jinja chat template used instead of the teacher tokenizer's (needed when it has none); null: its own."""
    targets: str = "assistant"
    """Tokens of a conversation the student learns: `assistant` (each assistant turn through its
    end-of-turn marker) or `all` (every token)."""

    def validate(self, p: str) -> None:
        _check(self.format in DATA_FORMATS,
               f"{p}.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        _check(self.targets in CHAT_TARGETS,
               f"{p}.targets must be one of {', '.join(CHAT_TARGETS)}, got {self.targets!r}")
        _check(self.num_proc >= 1, f"{p}.num_proc must be >= 1, got {self.num_proc}")
        _check(self.seq_len >= 2, f"{p}.seq_len must be >= 2, got {self.seq_len}")
        _check(0 < self.validation_fraction < 1,
               f"{p}.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        _check(self.text_block_chars >= 64, f"{p}.text_block_chars must be >= 64, got {self.text_block_chars}")
        for key in ("max_train_tokens", "max_validation_tokens"):
            v = getattr(self, key)
            _check(v is None or v >= self.seq_len,
                   f"{p}.{key} must be null or >= data.seq_len ({self.seq_len}), got {v}")
        _check(bool(self.source), f"{p}.source must be set (e.g. builtin:pydoc or a path)")


@dataclass
class TeacherConfig:
    model: str = "builtin:smollm2-135m"
    """Teacher (and tokenizer) spec: HF hub id, local HF folder, path to a .gguf file, or builtin:smollm2-135m."""
    dtype: str = "float32"
    """Compute dtype of the teacher forward: float32 or bfloat16."""

    def validate(self, p: str) -> None:
        _check(self.dtype in ("float32", "bfloat16"), f"{p}.dtype must be float32 or bfloat16, got {self.dtype!r}")
        _check(bool(self.model), f"{p}.model must be set")


@dataclass
class TeacherLogitsConfig:
    batch_size: int = 4
    """Sequences per teacher forward."""
    codec: str = "factored"
    """Store codec: factored | dense-bf16 | dense-u8 | sampled | topk | headtail."""
    codec_params: dict = field(default_factory=dict)
    """Codec parameters (e.g. dense-u8: {step: 0.0625, gamma: 0, tail_mass: 0.001}: a linear grid of 1/16 nat)."""
    shard_size: int = 16
    """Sequences per store shard: the unit of writing, of resume and of distribution over ranks."""

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size must be >= 1, got {self.batch_size}")
        _check(self.shard_size >= 1, f"{p}.shard_size must be >= 1, got {self.shard_size}")
        codecs = ("factored", "dense-bf16", "dense-u8", "sampled", "topk", "headtail")
        _check(self.codec in codecs, f"{p}.codec must be one of {', '.join(codecs)}; got {self.codec!r}")


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Sequences per micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to 10% of the peak at the last step."""
    num_epochs: float = 1.0
    """Passes over the training split (used when max_steps is null)."""
    max_steps: int | None = None
    """Optimizer steps; overrides num_epochs when set."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; null disables clipping."""
    alpha: float = 0.5
    """Weight of the CE term: loss = alpha*CE + (1-alpha)*T^2*KL. alpha=1 is plain LM training (no store)."""
    temperature: float = 2.0
    """Distillation temperature T (> 0)."""
    divergence: str = "forward_kl"
    """What the KD term measures between the teacher p_T = softmax(t/T) and the student q_T = softmax(z/T), summed
    over positions and scaled by T^2 like the KL: forward_kl KL(p_T||q_T) (covers the teacher's modes),
    reverse_kl KL(q_T||p_T) (seeks them), jsd the generalized Jensen-Shannon divergence with train.beta, tvd the
    total variation 0.5*sum|p_T - q_T|. A sampled or headtail store allows forward_kl only (an unbiased estimate
    of the teacher keeps only that one unbiased); a dense-u8 store with a dropped tail refuses reverse_kl (infinite on
    the tail's zero-probability tokens). The figures logged as `kl` / `eval_kl` hold the chosen divergence."""
    beta: float = 0.5
    """The generalized JSD's weight in [0, 1] (read by divergence jsd only): m = beta*p_T + (1-beta)*q_T and
    JSD = beta*KL(p_T||m) + (1-beta)*KL(q_T||m). beta 0 is forward_kl and 1 is reverse_kl exactly (as in TRL and
    Liger); in between the JSD is about beta*(1-beta) times the KL near the teacher (0.25x at 0.5), and tends to
    beta*KL(p_T||q_T) as beta goes to 0, so weigh it with alpha accordingly."""
    eval_steps: int = 10
    """Evaluate on the validation split every this many optimizer steps (and at the end)."""
    save_steps: int = 10
    """Checkpoint every this many optimizer steps."""
    keep_last: int = 2
    """Checkpoints kept."""
    early_stop_patience: int | None = None
    """Stop after this many evaluations without improvement; null disables early stopping."""
    early_stop_min_delta: float = 0.0
    """Improvement of the eval loss that counts."""
    seed: int = 0
    """Seed of the data order and the student initialisation."""
    dtype: str = "float32"
    """Student parameter dtype under FSDP mixed precision: float32 or bfloat16 compute."""
    loss_chunk_size: int | None = None
    """Positions per chunk of the fp32 loss computation; null = auto (losses.default_chunk_size: a (chunk,
    vocab) fp32 block within 24 MiB on CPU, 128 positions for a 49k vocabulary; within 256 MiB on GPU)."""
    calibration_tokens: int = 1024
    """Training tokens used to rank layers when a student is a layer-dropped teacher."""
    max_eval_sequences: int | None = None
    """Cap on validation sequences per evaluation; null for all."""
    prefetch: int = 2
    """Micro-batches whose teacher payload (and token rows) are read and decompressed in background threads
    ahead of the one computing; 0 reads synchronously in the training thread. Changes no result."""

    def validate(self, p: str) -> None:
        for key in ("batch_size", "gradient_accumulation_steps", "eval_steps", "save_steps", "keep_last",
                    "calibration_tokens"):
            _check(getattr(self, key) >= 1, f"{p}.{key} must be >= 1, got {getattr(self, key)}")
        _check(self.loss_chunk_size is None or self.loss_chunk_size >= 1,
               f"{p}.loss_chunk_size must be null (auto) or >= 1, got {self.loss_chunk_size}")
        _check(0.0 <= self.alpha <= 1.0, f"{p}.alpha must be in [0, 1], got {self.alpha}")
        _check(self.temperature > 0, f"{p}.temperature must be > 0, got {self.temperature}")
        _check(self.divergence in DIVERGENCES,
               f"{p}.divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        _check(0.0 <= self.beta <= 1.0, f"{p}.beta must be in [0, 1], got {self.beta}")
        _check(self.learning_rate > 0, f"{p}.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.num_epochs > 0, f"{p}.num_epochs must be > 0, got {self.num_epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps must be null or >= 1, got {self.max_steps}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"{p}.max_grad_norm must be null or > 0, got {self.max_grad_norm}")
        _check(self.early_stop_patience is None or self.early_stop_patience >= 1,
               f"{p}.early_stop_patience must be null or >= 1, got {self.early_stop_patience}")
        _check(self.early_stop_min_delta >= 0, f"{p}.early_stop_min_delta must be >= 0, got {self.early_stop_min_delta}")
        _check(self.dtype in ("float32", "bfloat16"), f"{p}.dtype must be float32 or bfloat16, got {self.dtype!r}")
        _check(self.max_eval_sequences is None or self.max_eval_sequences >= 1,
               f"{p}.max_eval_sequences must be null or >= 1, got {self.max_eval_sequences}")
        _check(self.prefetch >= 0, f"{p}.prefetch must be >= 0 (0 = no read-ahead), got {self.prefetch}")


INIT_KINDS = ("from_teacher", "pretrained", "config")


@dataclass
class StudentConfig:
    """One entry of `students`: an init plus overrides of any `train` key."""

    name: str
    init: dict
    """{from_teacher: {num_layers: N}} | {from_teacher: {layers: [i, ...]}} | {pretrained: spec} | {config: {...}}."""
    train: TrainConfig

    def validate(self, p: str) -> None:
        _check(isinstance(self.init, dict) and len(self.init) == 1 and next(iter(self.init)) in INIT_KINDS,
               f"{p}.init must be a mapping with exactly one of {', '.join(INIT_KINDS)}; got {self.init!r}")
        kind, spec = next(iter(self.init.items()))
        if kind == "from_teacher":
            ok = isinstance(spec, dict) and len(spec) == 1 and (
                (isinstance(spec.get("num_layers"), int) and spec["num_layers"] >= 1)
                or (isinstance(spec.get("layers"), list) and spec["layers"]
                    and all(isinstance(i, int) and i >= 0 for i in spec["layers"])))
            _check(ok, f"{p}.init.from_teacher must be {{num_layers: N >= 1}} or {{layers: [indices]}}; got {spec!r}")
        elif kind == "pretrained":
            _check(isinstance(spec, str) and spec, f"{p}.init.pretrained must be a model spec string; got {spec!r}")
        else:
            _check(isinstance(spec, dict), f"{p}.init.config must be a mapping of model config keys; got {spec!r}")
        self.train.validate(p)


@dataclass
class EvaluateConfig:
    batch_size: int = 4
    """Sequences per forward during evaluation."""
    max_sequences: int | None = None
    """Cap on validation sequences evaluated; null for all."""

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_sequences is None or self.max_sequences >= 1,
               f"{p}.max_sequences must be null or >= 1, got {self.max_sequences}")


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teacher_logits: TeacherLogitsConfig = field(default_factory=TeacherLogitsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    students: dict[str, StudentConfig] = field(default_factory=dict)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: str = "<defaults>"
    """Where the params came from (for logs and provenance)."""
    raw: dict = field(default_factory=dict, repr=False)
    """The merged params mapping, as written into outputs for provenance."""

    def student(self, name: str) -> StudentConfig:
        if name not in self.students:
            known = ", ".join(sorted(self.students)) or "none defined"
            raise ConfigError(f"unknown student {name!r}: params `students` has {known}")
        return self.students[name]


_SECTIONS = {k: v for k, v in typing.get_type_hints(Config).items() if k not in ("students", "source", "raw")}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp is list or origin is list:
        return isinstance(value, list)
    raise AssertionError(f"unsupported config type {tp}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _build(cls: type, data: Any, prefix: str):
    """Make dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {prefix}.{key}; {prefix} has: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{prefix}.{key} must be {_type_name(hints[key])}, got {value!r}")
        kwargs[key] = float(value) if hints[key] in (float, float | None) and value is not None else value
    return cls(**kwargs)


def _set_key(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set key {dotted!r} must be section.key (e.g. data.seq_len=128)")
    if parts[0] not in _SECTIONS and parts[0] != "students":
        raise ConfigError(f"--set {dotted}: unknown section {parts[0]!r}; sections: "
                          f"{', '.join([*_SECTIONS, 'students'])}")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `section.key=value` strings; values are YAML scalars or lists."""
    out = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        try:
            value = _yaml(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({e.problem})") from None
        out.append((key.strip(), value))
    return out


def load_config(params: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load params.yaml (or `params`), apply `--set` overrides, build and validate the typed config."""
    path = Path(params or DEFAULT_PARAMS)
    raw: dict = {}
    if path.exists():
        try:
            raw = _yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); --params takes a YAML file saved as "
                              "UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a YAML mapping of sections")
    elif params is not None:
        raise ConfigError(f"params file {path} does not exist; pass an existing file to --params")
    for key, value in parse_overrides(list(overrides)):
        _set_key(raw, key, value)
    return config_from_dict(raw, source=str(path) if path.exists() else "<defaults>")


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    raw = copy.deepcopy(raw)
    for key in raw:
        if key not in _SECTIONS and key != "students":
            raise ConfigError(f"unknown section {key!r}; sections: {', '.join([*_SECTIONS, 'students'])}")
    sections = {name: _build(cls, raw.get(name), name) for name, cls in _SECTIONS.items()}
    students = {}
    raw_students = raw.get("students") or {}
    if not isinstance(raw_students, dict):
        raise ConfigError("students must be a mapping of student name -> {init: ..., <train overrides>}")
    for name, entry in raw_students.items():
        p = f"students.{name}"
        if not isinstance(entry, dict) or "init" not in entry:
            raise ConfigError(f"{p} must be a mapping with an `init` key (e.g. init: {{from_teacher: {{num_layers: 6}}}})")
        overrides = {k: v for k, v in entry.items() if k != "init"}
        merged = {**(raw.get("train") or {}), **overrides}
        try:
            train = _build(TrainConfig, merged, "train")
        except ConfigError as e:  # name the student entry when the bad key came from it
            bad = str(e)
            for k in overrides:
                bad = bad.replace(f"train.{k}", f"{p}.{k}")
            raise ConfigError(bad.replace("unknown key train.", f"unknown key {p}.")) from None
        students[str(name)] = StudentConfig(name=str(name), init=entry["init"], train=train)
    cfg = Config(**sections, students=students, source=source, raw=raw)
    for name in _SECTIONS:
        getattr(cfg, name).validate(name)
    for name, s in cfg.students.items():
        s.validate(f"students.{name}")
    return cfg
