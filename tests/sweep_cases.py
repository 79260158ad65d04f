"""The bad-input sweep's case table: every distill-pipe command given malformed params and inputs.

Each `Case` names the command line, the base project it starts from (a copy, made fresh per case), a setup
that breaks something in that copy, and the words its one `error:` line must contain (the offending key, file
or flag, and the fix). tests/test_sweep.py runs them; benchmarks/sweep_table.py prints them as a table
(docs/troubleshooting-cases.md).

Base projects (tests/test_sweep.py builds each once per session, `sweep_bases`):
- `corpus`: params.yaml (the tiny teacher, a 12-file .txt corpus, seq_len 16, student `kd`) and nothing run;
- `store`: `corpus` after prepare and teacher-logits (factored, shards of 8);
- `trained`: `store` after `train --student kd` (finished: 2 steps).
`env` holds the other models the cases point at: `teacher` (the project's), `other_teacher` (same tokenizer,
other weights), `other_tok_teacher` (another tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

TOKENS = Path("stages/prepare/tokens.zarr")
LOGITS = Path("stages/teacher_logits/logits.zarr")
MANIFEST = Path("stages/teacher_logits/manifest.json")
STUDENT = Path("stages/train/kd")
STUDENT_INIT = {"config": {"num_hidden_layers": 1}}
TRAIN = dict(batch_size=2, max_steps=2, eval_steps=2, save_steps=2, warmup_steps=1, max_eval_sequences=4,
             calibration_tokens=64, keep_last=1)


@dataclass
class Case:
    name: str
    args: list[str]
    """The command line after `distill-pipe`."""
    what: str
    """What is wrong, in words (the table's second column)."""
    expect: tuple[str, ...]
    """Fragments the one `error:` line must contain."""
    base: str = "store"
    setup: Callable[[Path, dict], None] | None = None
    """Breaks the copy of the base project (cwd is that copy); gets `env`."""


# ---------------------------------------------------------------- setup helpers


def edit_params(root: Path, fn: Callable[[dict], None]) -> None:
    p = root / "params.yaml"
    params = yaml.safe_load(p.read_text())
    fn(params)
    p.write_text(yaml.safe_dump(params))


def put(section: str, **values):
    """A setup that sets params.yaml keys of `section`."""

    def setup(root: Path, env: dict) -> None:
        edit_params(root, lambda p: p.setdefault(section, {}).update(values))

    return setup


def student(init=None, **train):
    """A setup that replaces student kd's entry with `init` and train overrides."""

    def setup(root: Path, env: dict) -> None:
        edit_params(root, lambda p: p["students"].update(kd={"init": init or STUDENT_INIT, **train}))

    return setup


def write(rel: str, data: bytes | str, **params):
    """A setup that writes a file (and sets data.* params, e.g. source)."""

    def setup(root: Path, env: dict) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        if params:
            edit_params(root, lambda p: p["data"].update(params))

    return setup


def raw_params(text: str | bytes):
    def setup(root: Path, env: dict) -> None:
        (root / "params.yaml").write_bytes(text.encode() if isinstance(text, str) else text)

    return setup


def remove(*rels: str):
    def setup(root: Path, env: dict) -> None:
        for rel in rels:
            p = root / rel
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    return setup


def chunk_files(folder: Path) -> list[Path]:
    """The data files (chunks/shards) of a Zarr array folder, largest first."""
    files = [p for p in (folder / "c").rglob("*") if p.is_file()] if (folder / "c").exists() else []
    return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


def truncate_chunk(array_rel: str, every: bool = False):
    """Cut the largest data file of an array (every one: a run that reads a few rows meets one) to half."""

    def setup(root: Path, env: dict) -> None:
        files = chunk_files(root / array_rel)
        for f in files if every else files[:1]:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return setup


def json_edit(rel: str, fn: Callable[[dict], None]):
    def setup(root: Path, env: dict) -> None:
        p = root / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))

    return setup


def attrs_edit(rel: str, fn: Callable[[dict], None]):
    """Edit the attributes of a Zarr v3 group or array (its zarr.json)."""
    return json_edit(f"{rel}/zarr.json", lambda d: fn(d.setdefault("attributes", {})))


def teacher(which: str, **more):
    def setup(root: Path, env: dict) -> None:
        edit_params(root, lambda p: (p["teacher"].update(model=str(env[which])), p["data"].update(more)))

    return setup


def chain(*setups):
    def setup(root: Path, env: dict) -> None:
        for s in setups:
            s(root, env)

    return setup


def fake_model_folder(config: str | None):
    """A folder `fake_model` with (or without) a config.json; teacher.model points at it."""

    def setup(root: Path, env: dict) -> None:
        (root / "fake_model").mkdir()
        if config is not None:
            (root / "fake_model" / "config.json").write_text(config)
        edit_params(root, lambda p: p["teacher"].update(model="fake_model"))

    return setup


def copy_of_teacher_with(fn: Callable[[Path], None]):
    """teacher.model -> a copy of the project's teacher, changed by fn(folder)."""

    def setup(root: Path, env: dict) -> None:
        dst = root / "teacher_copy"
        shutil.copytree(env["teacher"], dst)
        fn(dst)
        edit_params(root, lambda p: p["teacher"].update(model="teacher_copy"))

    return setup


def truncate_file(rel_in_folder: str):
    def fn(folder: Path) -> None:
        f = folder / rel_in_folder
        f.write_bytes(f.read_bytes()[:100])

    return fn


def other_data_tokens(root: Path, env: dict) -> None:
    """tokens.zarr re-prepared from another split seed: the store (and students) were made from other data."""
    from distill_pipe.config import load_config
    from distill_pipe.data import run_prepare

    edit_params(root, lambda p: p["data"].update(seed=7))
    run_prepare(load_config())


def student_of_other_data(root: Path, env: dict) -> None:
    """metrics.json of the trained student records another data fingerprint."""
    metrics = (root / STUDENT / "metrics.json").resolve()
    d = json.loads(metrics.read_text())
    d["data"]["data"] = {**(d["data"].get("data") or {}), "fingerprint": "0" * 16}
    metrics.unlink()
    metrics.write_text(json.dumps(d))


def checkpoint_of_other_run(root: Path, env: dict) -> None:
    """student kd's checkpoints come from a run with another learning rate (a folder copied from elsewhere)."""
    edit_params(root, lambda p: p["students"]["kd"].update(learning_rate=0.123))


def dangling_corpus_file(root: Path, env: dict) -> None:
    (root / "corpus" / "zz_gone.txt").symlink_to(root / "nowhere.txt")


def tokens_version(root: Path, env: dict) -> None:
    attrs_edit(str(TOKENS), lambda a: a.update(format_version=99))(root, env)


def store_attr(key: str, value):
    return attrs_edit(str(LOGITS), lambda a: a.update({key: value}))


# ---------------------------------------------------------------- the table

CHAT_JSONL = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CASES: list[Case] = [
    # ---- params files and --set
    Case("params-missing", ["prepare", "--params", "nope.yaml"], "--params names a file that does not exist",
         ("nope.yaml", "does not exist")),
    Case("params-folder", ["prepare", "--params", "corpus"], "--params names a folder", ("corpus",), base="corpus"),
    Case("params-bad-yaml", ["prepare"], "params.yaml is not valid YAML", ("params.yaml", "not valid YAML"),
         setup=raw_params("data: [unclosed\n")),
    Case("params-not-mapping", ["prepare"], "params.yaml is a YAML list", ("params.yaml", "mapping"),
         setup=raw_params("- data\n- train\n")),
    Case("params-non-utf8", ["prepare"], "params.yaml is not UTF-8 text", ("params.yaml", "UTF-8"),
         setup=raw_params(b"data:\n  source: \xff\xfe corpus\n")),
    Case("params-binary", ["evaluate"], "params.yaml holds binary bytes", ("params.yaml",),
         setup=raw_params(bytes(range(256)) * 4)),
    Case("params-section-scalar", ["prepare"], "a params section is a number", ("data", "mapping"),
         setup=raw_params("data: 5\n")),
    Case("params-unknown-section", ["prepare"], "params.yaml has a section the config lacks", ("datta",),
         setup=raw_params("datta: {}\n")),
    Case("params-unknown-key", ["prepare"], "params.yaml has a key its section lacks", ("data.seqlen",),
         setup=put("data", seqlen=16)),
    Case("set-no-equals", ["prepare", "--set", "data.seq_len"], "--set without =value",
         ("data.seq_len", "section.key=value")),
    Case("set-no-section", ["prepare", "--set", "seq_len=16"], "--set key without a section",
         ("seq_len", "section.key")),
    Case("set-unknown-section", ["prepare", "--set", "dta.seq_len=16"], "--set names an unknown section",
         ("dta",)),
    Case("set-unknown-key", ["teacher-logits", "--set", "teacher_logits.shardsize=8"], "--set names an unknown key",
         ("teacher_logits.shardsize",)),
    Case("set-bad-yaml", ["prepare", "--set", "data.source=[oops"], "--set value is not valid YAML",
         ("data.source", "YAML")),
    Case("set-not-a-mapping", ["prepare", "--set", "data.seq_len.x=1"], "--set goes below a scalar key",
         ("data.seq_len",)),
    Case("type-int-as-str", ["prepare", "--set", "data.seq_len=abc"], "a number key given text",
         ("data.seq_len", "int")),
    Case("type-int-as-float", ["prepare", "--set", "data.seq_len=16.5"], "an integer key given a fraction",
         ("data.seq_len", "int")),
    Case("type-bool-as-int", ["train", "--student", "kd", "--set", "train.batch_size=true"],
         "an integer key given a boolean", ("train.batch_size",)),
    Case("type-str-as-list", ["prepare", "--set", "data.source=[a, b]"], "a path key given a list",
         ("data.source", "str")),
    Case("type-float-as-str", ["train", "--student", "kd", "--set", "train.learning_rate=fast"],
         "a float key given text", ("train.learning_rate",)),
    Case("type-codec-params-list", ["teacher-logits", "--set", "teacher_logits.codec_params=[1]"],
         "codec_params given a list", ("teacher_logits.codec_params", "dict")),
    Case("range-seq-len", ["prepare", "--set", "data.seq_len=1"], "data.seq_len below 2", ("data.seq_len", ">= 2")),
    Case("range-validation-fraction", ["prepare", "--set", "data.validation_fraction=1.5"],
         "validation_fraction outside (0, 1)", ("data.validation_fraction",)),
    Case("range-block-chars", ["prepare", "--set", "data.text_block_chars=3"], "text_block_chars too small",
         ("data.text_block_chars",)),
    Case("range-max-train-tokens", ["prepare", "--set", "data.max_train_tokens=4"], "a token cap below seq_len",
         ("data.max_train_tokens",)),
    Case("range-num-proc", ["prepare", "--set", "data.num_proc=0"], "no tokenizer process", ("data.num_proc",)),
    Case("range-format", ["prepare", "--set", "data.format=markdown"], "an unknown data.format", ("data.format",)),
    Case("range-targets", ["prepare", "--set", "data.targets=user"], "an unknown data.targets", ("data.targets",)),
    Case("range-teacher-dtype", ["teacher-logits", "--set", "teacher.dtype=float16"], "an unsupported teacher.dtype",
         ("teacher.dtype",)),
    Case("range-codec", ["teacher-logits", "--set", "teacher_logits.codec=gzip"], "an unknown codec",
         ("teacher_logits.codec",)),
    Case("range-shard-size", ["teacher-logits", "--set", "teacher_logits.shard_size=0"], "shards of 0 sequences",
         ("teacher_logits.shard_size",)),
    Case("codec-param-unknown", ["teacher-logits", "--overwrite", "--set", "teacher_logits.codec=dense-u8",
                                 "--set", "teacher_logits.codec_params={stepp: 0.1}"],
         "a codec parameter the codec lacks", ("stepp",)),
    Case("codec-param-range", ["teacher-logits", "--overwrite", "--set", "teacher_logits.codec=dense-u8",
                               "--set", "teacher_logits.codec_params={step: -1}"],
         "a negative dense-u8 step", ("step",)),
    Case("codec-param-type", ["teacher-logits", "--overwrite", "--set", "teacher_logits.codec=topk",
                              "--set", "teacher_logits.codec_params={k: many}"],
         "a topk k given text", ("teacher_logits.codec_params", "many")),
    Case("range-temperature", ["train", "--student", "kd", "--set", "train.temperature=0"], "temperature 0",
         ("train.temperature",)),
    Case("range-alpha", ["train", "--student", "kd", "--set", "students.kd.alpha=2"], "alpha above 1",
         ("students.kd.alpha",)),
    Case("range-divergence", ["train", "--student", "kd", "--set", "train.divergence=kl"], "an unknown divergence",
         ("train.divergence",)),
    Case("range-max-steps", ["train", "--student", "kd", "--set", "train.max_steps=0"], "0 optimizer steps",
         ("train.max_steps",)),
    Case("range-eval-batch", ["evaluate", "--set", "evaluate.batch_size=0"], "evaluate.batch_size 0",
         ("evaluate.batch_size",)),
    Case("paths-manifest-url", ["teacher-logits", "--set", "paths.manifest=s3://bucket/m.json"],
         "the manifest on object storage", ("paths.manifest",)),
    Case("paths-empty", ["prepare", "--set", "paths.tokens="], "an empty output path", ("paths.tokens",)),
    Case("students-not-mapping", ["train", "--student", "kd"], "students is a list", ("students",),
         setup=lambda root, env: edit_params(root, lambda p: p.update(students=["kd"]))),
    Case("student-no-init", ["train", "--student", "kd"], "a student without init", ("students.kd", "init"),
         setup=lambda root, env: edit_params(root, lambda p: p["students"].update(kd={"alpha": 0.5}))),
    Case("student-init-kind", ["train", "--student", "kd"], "an unknown init kind", ("students.kd.init",),
         setup=student({"scratch": {}})),
    Case("student-unknown-key", ["train", "--student", "kd", "--set", "students.kd.alhpa=0.3"],
         "a student override the train section lacks", ("students.kd.alhpa",)),
    Case("student-bad-type", ["train", "--student", "kd", "--set", "students.kd.temperature=hot"],
         "a student override of the wrong type", ("students.kd.temperature",)),
    Case("student-unknown", ["train", "--student", "nobody"], "--student names no params entry", ("nobody", "kd")),
    # ---- prepare: the corpus
    Case("corpus-missing", ["prepare", "--set", "data.source=missing.txt"], "data.source does not exist",
         ("missing.txt", "data.source"), base="corpus"),
    Case("corpus-empty-folder", ["prepare", "--set", "data.source=empty"], "data.source is an empty folder",
         ("empty", "data.source"), base="corpus", setup=lambda root, env: (root / "empty").mkdir()),
    Case("corpus-glob-nothing", ["prepare", "--set", "data.source=corpus/*.md"], "a glob that matches nothing",
         ("corpus/*.md",), base="corpus"),
    Case("corpus-unsupported", ["prepare", "--set", "data.source=book.pdf"], "a .pdf corpus file", ("book.pdf",),
         base="corpus", setup=write("book.pdf", b"%PDF-1.4 ...")),
    Case("corpus-empty-file", ["prepare"], "a 0-byte .txt corpus", ("empty.txt",), base="corpus",
         setup=write("empty.txt", b"", source="empty.txt")),
    Case("corpus-whitespace", ["prepare"], "a corpus of blank lines only", ("blank.txt",), base="corpus",
         setup=write("blank.txt", "\n \n\t\n" * 50, source="blank.txt")),
    Case("corpus-binary", ["prepare"], "a binary file named .txt", ("blob.txt", "UTF-8"), base="corpus",
         setup=write("blob.txt", bytes(range(256)) * 64, source="blob.txt")),
    Case("corpus-latin1", ["prepare"], "a Latin-1 .txt file in the corpus folder", ("latin1.txt", "UTF-8"),
         base="corpus", setup=write("corpus/latin1.txt", "caf\xe9 cr\xe8me ".encode("latin-1") * 200)),
    Case("corpus-dangling-link", ["prepare"], "a corpus file that cannot be read (a dangling link)",
         ("zz_gone.txt",), base="corpus", setup=dangling_corpus_file),
    Case("jsonl-bad-line", ["prepare"], "a .jsonl with a broken line", ("docs.jsonl:2", "JSON"), base="corpus",
         setup=write("docs.jsonl", '{"text": "a fine line of text"}\n{"text": "cut\n', source="docs.jsonl")),
    Case("jsonl-no-field", ["prepare"], "a .jsonl without the text field", ("docs.jsonl", "data.text_field"),
         base="corpus", setup=write("docs.jsonl", '{"body": "some text"}\n', source="docs.jsonl")),
    Case("jsonl-not-objects", ["prepare"], "a .jsonl of numbers, not records", ("docs.jsonl",), base="corpus",
         setup=write("docs.jsonl", "1\n2\n3\n", source="docs.jsonl")),
    Case("jsonl-text-not-str", ["prepare"], "a .jsonl whose text field holds a number", ("docs.jsonl", "text"),
         base="corpus", setup=write("docs.jsonl", '{"text": 12}\n{"text": 13}\n', source="docs.jsonl")),
    Case("jsonl-non-utf8", ["prepare"], "a .jsonl in Latin-1", ("docs.jsonl", "UTF-8"), base="corpus",
         setup=write("docs.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), source="docs.jsonl")),
    Case("json-invalid", ["prepare"], "a .json that is not JSON", ("docs.json", "JSON"), base="corpus",
         setup=write("docs.json", "[{\"text\": ", source="docs.json")),
    Case("csv-no-column", ["prepare"], "a .csv without the text column", ("docs.csv", "data.text_field"),
         base="corpus", setup=write("docs.csv", "title,body\na,some text\n", source="docs.csv")),
    Case("parquet-garbage", ["prepare"], "a .parquet file of random bytes", ("docs.parquet",), base="corpus",
         setup=write("docs.parquet", os.urandom(4096), source="docs.parquet")),
    Case("builtin-unknown", ["prepare", "--set", "data.source=builtin:wiki"], "an unknown builtin corpus",
         ("builtin:wiki",), base="corpus"),
    Case("seq-len-too-long", ["prepare", "--set", "data.seq_len=4096"], "seq_len above the teacher's positions",
         ("data.seq_len",), base="corpus"),
    Case("split-no-train", ["prepare", "--set", "data.validation_fraction=0.999"],
         "a validation fraction that leaves no training document", ("data.validation_fraction",), base="corpus"),
    Case("tokens-path-is-file", ["prepare", "--set", "paths.tokens=notes.txt"],
         "paths.tokens names an existing file that is not a tokens store", ("notes.txt",), base="corpus",
         setup=write("notes.txt", "my notes, not a store\n")),
    # ---- prepare: the teacher (its tokenizer)
    Case("teacher-missing", ["prepare", "--set", "teacher.model=./no_such_model"], "teacher.model does not exist",
         ("no_such_model",), base="corpus"),
    Case("teacher-no-config", ["prepare"], "teacher.model is a folder without config.json", ("fake_model",
         "config.json"), base="corpus", setup=fake_model_folder(None)),
    Case("teacher-bad-config", ["teacher-logits"], "the teacher's config.json is not JSON", ("fake_model",),
         setup=fake_model_folder("{ not json")),
    Case("teacher-gguf-missing", ["prepare", "--set", "teacher.model=model.gguf"], "a .gguf file that is not there",
         ("model.gguf",), base="corpus"),
    Case("teacher-gguf-garbage", ["prepare", "--set", "teacher.model=model.gguf"], "a .gguf file of random bytes",
         ("model.gguf",), base="corpus", setup=write("model.gguf", os.urandom(2048))),
    Case("teacher-builtin-unknown", ["prepare", "--set", "teacher.model=builtin:gpt5"], "an unknown builtin teacher",
         ("builtin:gpt5",), base="corpus"),
    Case("teacher-tokenizer-broken", ["prepare"], "the teacher's tokenizer.json is cut short",
         ("teacher_copy",), base="corpus", setup=copy_of_teacher_with(truncate_file("tokenizer.json"))),
    Case("teacher-weights-broken", ["teacher-logits", "--overwrite"], "the teacher's model.safetensors is cut short",
         ("teacher_copy",), setup=copy_of_teacher_with(truncate_file("model.safetensors"))),
    # ---- prepare: conversations
    Case("chat-on-plain-text", ["prepare", "--set", "data.format=chat"], "format chat on a folder of .txt files",
         ("data.format",), base="corpus"),
    Case("chat-no-template", ["prepare"], "format chat, a tokenizer without a chat template and none set",
         ("data.chat_template",), base="corpus",
         setup=write("chat.jsonl", CHAT_JSONL + "\n", source="chat.jsonl", format="chat")),
    Case("chat-template-syntax", ["prepare"], "a chat template that is not valid Jinja", ("chat template",),
         base="corpus", setup=write("chat.jsonl", CHAT_JSONL + "\n", source="chat.jsonl", format="chat",
                                    chat_template="{% for m in messages %}{{ m['content'] }")),
    Case("chat-template-raises", ["prepare"], "a chat template that raises on the conversation", ("chat template",),
         base="corpus", setup=write("chat.jsonl", CHAT_JSONL + "\n", source="chat.jsonl", format="chat",
                                    chat_template="{{ raise_exception('no system turn') }}")),
    Case("chat-template-last-only", ["prepare"], "a chat template that renders only the last message",
         ("chat template",), base="corpus",
         setup=write("chat.jsonl", CHAT_JSONL + "\n", source="chat.jsonl", format="chat",
                     chat_template="{{ messages[-1]['content'] }}")),
    Case("chat-messages-not-list", ["prepare"], "a chat record whose messages is a string", ("chat.jsonl",),
         base="corpus", setup=write("chat.jsonl", '{"messages": "hello"}\n', source="chat.jsonl", format="chat",
                                    chat_template=TEMPLATE)),
    Case("chat-message-no-role", ["prepare"], "a chat message without a role", ("chat.jsonl",), base="corpus",
         setup=write("chat.jsonl", '{"messages": [{"content": "hi"}]}\n', source="chat.jsonl", format="chat",
                     chat_template=TEMPLATE)),
    Case("prompt-completion-no-field", ["prepare"], "a prompt_completion record without its completion",
         ("completion",), base="corpus",
         setup=write("pc.jsonl", '{"prompt": "hi"}\n', source="pc.jsonl", format="prompt_completion",
                     chat_template=TEMPLATE)),
    # ---- teacher-logits: tokens.zarr and the store
    Case("tokens-missing", ["teacher-logits"], "tokens.zarr was deleted", ("tokens.zarr", "prepare"),
         setup=remove(str(TOKENS))),
    Case("tokens-metadata-removed", ["teacher-logits", "--overwrite"], "tokens.zarr's group metadata removed",
         ("tokens.zarr", "prepare"), setup=remove(f"{TOKENS}/zarr.json")),
    Case("tokens-array-removed", ["teacher-logits", "--overwrite"], "tokens.zarr lost its train input_ids",
         ("tokens.zarr", "prepare"), setup=remove(f"{TOKENS}/train/input_ids")),
    Case("tokens-chunk-truncated", ["teacher-logits", "--overwrite"], "a chunk of tokens.zarr cut short",
         ("tokens.zarr", "prepare"), setup=truncate_chunk(f"{TOKENS}/train/input_ids")),
    Case("tokens-version", ["teacher-logits"], "tokens.zarr from a newer distill-pipe", ("tokens.zarr", "version"),
         setup=tokens_version),
    Case("tokens-other-tokenizer", ["teacher-logits"], "tokens.zarr made with another tokenizer than the teacher's",
         ("tokens.zarr",), setup=teacher("other_tok_teacher")),
    Case("store-other-teacher", ["teacher-logits"], "the store was made by another teacher",
         ("logits.zarr", "teacher", "--overwrite"), setup=teacher("other_teacher")),
    Case("store-other-codec", ["teacher-logits", "--set", "teacher_logits.codec=dense-u8"],
         "the store was made with another codec", ("logits.zarr", "codec", "--overwrite")),
    Case("store-other-data", ["teacher-logits"], "the store was made from other data (another split seed)",
         ("logits.zarr", "--overwrite"), setup=other_data_tokens),
    Case("store-path-is-file", ["teacher-logits", "--set", "paths.logits=notes.txt"],
         "paths.logits names an existing file", ("notes.txt", "--overwrite"), setup=write("notes.txt", "notes\n")),
    Case("store-metadata-removed", ["teacher-logits"], "the store's root zarr.json removed",
         ("logits.zarr", "--overwrite"), setup=remove(f"{LOGITS}/zarr.json")),
    Case("store-version", ["teacher-logits"], "a store of a newer format version", ("logits.zarr",),
         setup=store_attr("format_version", 99)),
    Case("flags-overwrite-repair", ["teacher-logits", "--overwrite", "--repair"],
         "--overwrite with --repair (replace or repair?)", ("--overwrite", "--repair")),
    Case("flags-overwrite-replace", ["teacher-logits", "--overwrite", "--replace-changed"],
         "--overwrite with --replace-changed", ("--overwrite", "--replace-changed")),
    # ---- train
    Case("train-no-store", ["train", "--student", "kd"], "the store was deleted", ("logits.zarr", "teacher-logits"),
         setup=remove(str(LOGITS))),
    Case("train-no-tokens-ce", ["train", "--student", "kd", "--set", "students.kd.alpha=1"],
         "CE-only training without tokens.zarr", ("tokens.zarr", "prepare"), setup=remove(str(TOKENS))),
    Case("train-store-metadata", ["train", "--student", "kd"], "the metadata of the store's train payload removed",
         ("logits.zarr", "hidden"), setup=remove(f"{LOGITS}/train/hidden/zarr.json")),
    Case("train-store-chunk-truncated", ["train", "--student", "kd"], "the store's train shards cut short",
         ("logits.zarr", "--repair"), setup=truncate_chunk(f"{LOGITS}/train/hidden", every=True)),
    Case("train-store-input-ids-truncated", ["train", "--student", "kd"], "the store's train input_ids shards cut "
         "short", ("logits.zarr", "train/input_ids", "--repair"),
         setup=truncate_chunk(f"{LOGITS}/train/input_ids", every=True)),
    Case("train-ce-tokens-truncated", ["train", "--student", "kd", "--set", "students.kd.alpha=1"],
         "CE-only training on tokens.zarr whose train input_ids chunks are cut short",
         ("tokens.zarr", "train/input_ids", "prepare"), setup=truncate_chunk(f"{TOKENS}/train/input_ids", every=True)),
    Case("train-manifest-other-store", ["train", "--student", "kd"], "the manifest records another store than "
         "the one in place", ("manifest.json", "teacher-logits"),
         setup=json_edit(str(MANIFEST), lambda d: d.update(seq_len=999))),
    Case("train-other-data", ["train", "--student", "kd", "--set", "students.kd.alpha=1"],
         "CE-only training on tokens.zarr that is not the store's data", ("tokens.zarr", "logits.zarr"),
         setup=other_data_tokens),
    Case("train-earlier-run", ["train", "--student", "kd"], "a student folder of an earlier run, no --resume",
         ("--resume",), base="trained"),
    Case("train-resume-other-run", ["train", "--student", "kd", "--resume"],
         "--resume on a checkpoint of another run (other learning rate)", ("--auto-resume",), base="trained",
         setup=checkpoint_of_other_run),
    Case("train-resume-and-auto", ["train", "--student", "kd", "--resume", "--auto-resume"],
         "--resume with --auto-resume", ("--resume", "--auto-resume"), base="trained"),
    Case("train-latest-dangling", ["train", "--student", "kd", "--resume"], "the latest checkpoint pointer names "
         "a deleted checkpoint", ("step-000009",), base="trained",
         setup=lambda root, env: (root / STUDENT / "checkpoints" / "latest").write_text("step-000009\n")),
    Case("student-too-many-layers", ["train", "--student", "kd"], "a layer-dropped student as deep as the teacher",
         ("num_layers",), setup=student({"from_teacher": {"num_layers": 5}})),
    Case("student-layer-out-of-range", ["train", "--student", "kd"], "a teacher layer index that does not exist",
         ("layers",), setup=student({"from_teacher": {"layers": [0, 7]}})),
    Case("student-layer-repeated", ["train", "--student", "kd"], "a teacher layer kept twice", ("layers",),
         setup=student({"from_teacher": {"layers": [1, 1]}})),
    Case("student-config-unknown-key", ["train", "--student", "kd"], "a student config key the model lacks",
         ("num_hidden_layerz",), setup=student({"config": {"num_hidden_layerz": 1}})),
    Case("student-config-vocab", ["train", "--student", "kd"], "a student with another vocabulary size",
         ("vocab_size",), setup=student({"config": {"vocab_size": 512}})),
    Case("student-config-invalid", ["train", "--student", "kd"], "a student whose heads do not divide its width",
         ("students.kd",), setup=student({"config": {"hidden_size": 30}})),
    Case("student-pretrained-missing", ["train", "--student", "kd"], "a pretrained student that does not exist",
         ("no_such_student",), setup=student({"pretrained": "./no_such_student"})),
    Case("student-other-tokenizer", ["train", "--student", "kd"], "a pretrained student with another tokenizer",
         ("tokenizer",), setup=lambda root, env: student({"pretrained": str(env["other_tok_teacher"])})(root, env)),
    # ---- evaluate
    Case("evaluate-untrained", ["evaluate"], "evaluate before any student was trained", ("kd", "train")),
    Case("evaluate-no-store", ["evaluate"], "evaluate without the store", ("logits.zarr",), base="trained",
         setup=remove(str(LOGITS))),
    Case("evaluate-metrics-broken", ["evaluate"], "a student's metrics.json is not JSON", ("metrics.json",),
         base="trained", setup=lambda root, env: ((root / STUDENT / "metrics.json").resolve().write_text("{"))),
    Case("evaluate-other-data", ["evaluate"], "a student trained on other data than the store's", ("kd",),
         base="trained", setup=student_of_other_data),
    Case("evaluate-model-broken", ["evaluate"], "a student's model.safetensors cut short", ("kd",), base="trained",
         setup=lambda root, env: truncate_file("model.safetensors")((root / STUDENT / "model").resolve())),
    Case("evaluate-model-config-missing", ["evaluate"], "a student's model folder without config.json", ("kd",),
         base="trained", setup=lambda root, env: (root / STUDENT / "model" / "config.json").resolve().unlink()),
    # ---- inspect
    Case("inspect-missing", ["inspect", "no_store.zarr"], "a path that does not exist", ("no_store.zarr",)),
    Case("inspect-file", ["inspect", "params.yaml"], "a file, not a store", ("params.yaml",)),
    Case("inspect-tokens", ["inspect", str(TOKENS)], "tokens.zarr, not a logit store", ("tokens.zarr",)),
    Case("inspect-no-metadata", ["inspect", str(LOGITS)], "a store without its root zarr.json", ("logits.zarr",),
         setup=remove(f"{LOGITS}/zarr.json")),
    Case("inspect-version", ["inspect", str(LOGITS)], "a store of a newer format version", ("logits.zarr",),
         setup=store_attr("format_version", 99)),
    Case("inspect-bad-attrs", ["inspect", str(LOGITS)], "a store whose codec attribute is damaged",
         ("logits.zarr", "codec", "--overwrite"), setup=store_attr("codec", "nonsense")),
    Case("inspect-unknown-codec", ["inspect", str(LOGITS)], "a store of a codec this version lacks",
         ("logits.zarr", "codec"), setup=store_attr("codec", {"name": "zip9", "params": {}})),
    Case("train-store-no-seq-len", ["train", "--student", "kd"], "a store whose seq_len attribute was removed",
         ("logits.zarr", "seq_len"), setup=attrs_edit(str(LOGITS), lambda a: a.pop("seq_len"))),
    Case("evaluate-store-truncated", ["evaluate"], "the store's validation shards cut short", ("logits.zarr",),
         base="trained", setup=truncate_chunk(f"{LOGITS}/validation/hidden", every=True)),
]


# ---------------------------------------------------------------- the users' list (docs/troubleshooting-cases.md)

COMMANDS = ("prepare", "teacher-logits", "train", "evaluate", "inspect")
BASE_WORDS = {"corpus": "nothing run yet", "store": "after prepare and teacher-logits",
              "trained": "with a trained student"}
PAGE = Path("docs/troubleshooting-cases.md")


def _code(text: str) -> str:
    """Inline code as HTML: the commands here hold wrong keys on purpose, which the docs' key check would
    report in backticks, and `|` would end a table cell."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "&#124;")
    return f"<code>{text}</code>"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def troubleshooting_page(cases: list[Case] = CASES) -> str:
    """The list of every case for users, per command: what is wrong, the command and what its error names."""
    by_command = {c: [case for case in cases if case.args[0] == c] for c in COMMANDS}
    assert sum(map(len, by_command.values())) == len(cases), "a case of a command missing from COMMANDS"
    counts = ", ".join(f"{len(v)} {k}" for k, v in by_command.items())
    lines = [
        "# Bad input, case by case",
        "",
        "<!-- Generated from tests/sweep_cases.py by `python benchmarks/sweep_table.py`; do not edit by hand. -->",
        f"{len(cases)} cases of bad input ({counts}), each run by the test suite: the command exits",
        "with code 1, prints one line starting with `error:` that holds the words in the last column (the offending",
        "key, file or flag, and the fix), shows no traceback, and leaves every file that was there before unchanged.",
        "The commands give wrong keys and values on purpose. See [troubleshooting.md](troubleshooting.md) for the",
        "common problems and their fixes.",
    ]
    for command, group in by_command.items():
        lines += ["", f"## distill-pipe {command} ({len(group)} cases)", "",
                  "| What is wrong | Project | Command | The error line names |", "|---|---|---|---|"]
        lines += [f"| {_cell(c.what)} | {BASE_WORDS[c.base]} | {_code('distill-pipe ' + ' '.join(c.args))} | "
                  f"{', '.join(_code(e) for e in c.expect)} |" for c in group]
    return "\n".join(lines) + "\n"
