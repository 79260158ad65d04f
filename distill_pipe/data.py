"""The `prepare` stage: corpus -> documents -> tokens -> packed (N, L) int32 sequences in tokens.zarr.

Documents are split (seeded shuffle, whole documents) into train and validation, each split's documents
are joined with the tokenizer's EOS and the stream is packed into sequences of `data.seq_len` tokens;
the incomplete last sequence is dropped.

tokens.zarr layout (Zarr v3): group attrs {format, tokenizer, vocab_size, eos_token_id, seq_len, corpus,
splits: {name: {documents, tokens, num_sequences}}, fingerprint}; sub-groups `train/` and
`validation/`, each holding `input_ids` (N, L) int32.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from tqdm.auto import tqdm

from distill_pipe.config import Config, DataConfig
from distill_pipe import models

log = logging.getLogger(__name__)

TOKENS_FORMAT = "distill-pipe-tokens"
SPLITS = ("train", "validation")
FILE_KINDS = (".txt", ".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Bad corpus or tokens input; the message names the problem and the fix."""


@dataclass
class Document:
    name: str
    text: str


# ---------------------------------------------------------------- corpus sources


def load_documents(cfg: DataConfig) -> list[Document]:
    src = cfg.source
    if src == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [Document(f"pydoc:{k}", v) for k, v in sorted(topics.items())]
    if src.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {src!r}; known: builtin:pydoc")
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_KINDS)
        if not files:
            raise DataError(f"folder {src} holds no {'/'.join(FILE_KINDS)} files; point data.source at a corpus")
    elif any(c in src for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True)
                       if Path(p).is_file() and Path(p).suffix.lower() in FILE_KINDS)
        if not files:
            raise DataError(f"glob {src} matches no {'/'.join(FILE_KINDS)} files; check data.source")
    elif path.suffix.lower() in FILE_KINDS or path.exists() or "/" not in src or src.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"corpus {src} does not exist; set data.source to an existing file, folder or glob")
        if path.suffix.lower() not in FILE_KINDS:
            raise DataError(f"corpus {src}: unsupported file type; use one of {', '.join(FILE_KINDS)}")
        files = [path]
    else:
        return _load_hf_dataset(cfg)
    docs = [d for f in files for d in _read_file(f, cfg.text_field)]
    return docs


def _read_file(path: Path, field: str) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Document(str(path), path.read_text(encoding="utf-8", errors="replace"))]
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        records = data if isinstance(data, list) else [data]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); "
                            "set data.text_field")
        return [Document(f"{path}#{i}", t) for i, t in enumerate(table.column(field).to_pylist()) if t]
    else:  # .csv
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path)
        if field not in table.column_names:
            raise DataError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); "
                            "set data.text_field")
        return [Document(f"{path}#{i}", str(t)) for i, t in enumerate(table.column(field).to_pylist()) if t]
    docs = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or field not in rec:
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{path} record {i} has no field {field!r} (has: {keys}); set data.text_field")
        if rec[field]:
            docs.append(Document(f"{path}#{i}", str(rec[field])))
    return docs


def _load_hf_dataset(cfg: DataConfig) -> list[Document]:
    import datasets

    if not models._hub_reachable():
        try:
            datasets.config.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(cfg.source, split=cfg.dataset_split)
        except Exception:
            raise DataError(f"dataset {cfg.source!r} is not a local path, not in the datasets cache, and the "
                            "Hugging Face hub is unreachable (offline?): give a local file or folder") from None
    else:
        ds = datasets.load_dataset(cfg.source, split=cfg.dataset_split)
    if cfg.text_field not in ds.column_names:
        raise DataError(f"dataset {cfg.source} has no column {cfg.text_field!r} "
                        f"(columns: {', '.join(ds.column_names)}); set data.text_field")
    return [Document(f"{cfg.source}#{i}", t) for i, t in enumerate(ds[cfg.text_field]) if t]


# ---------------------------------------------------------------- split, tokenize, pack


def split_documents(docs: list[Document], fraction: float, seed: int) -> dict[str, list[Document]]:
    """Seeded shuffle of whole documents; the first round(fraction*n) (at least 1) go to validation."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(docs)))
    if n_val >= len(docs):
        raise DataError(f"data.validation_fraction={fraction} leaves no training document out of {len(docs)}; "
                        "lower it or add documents")
    # Shuffled order is kept, so a max_*_tokens cap samples across the corpus rather than its first files.
    return {"train": [docs[i] for i in order[n_val:]], "validation": [docs[i] for i in order[:n_val]]}


def pack(docs_ids: list[list[int]], eos_id: int, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Join documents with EOS after each and cut the stream into (N, seq_len) int32 rows."""
    stream = np.fromiter((t for ids in docs_ids for t in (*ids, eos_id)), dtype=np.int64)
    n = len(stream) // seq_len
    if max_tokens is not None:
        n = min(n, max_tokens // seq_len)
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int32)


def tokenize(docs: list[Document], tok, desc: str) -> list[list[int]]:
    out = []
    bar = tqdm(docs, desc=f"tokenize {desc}", unit="doc", dynamic_ncols=True)
    n_tokens = 0
    for d in bar:
        ids = tok(d.text, add_special_tokens=False)["input_ids"]
        out.append(ids)
        n_tokens += len(ids)
        bar.set_postfix(tokens=n_tokens, refresh=False)
    return out


# ---------------------------------------------------------------- the stage


def run_prepare(cfg: Config) -> Path:
    d = cfg.data
    out = Path(cfg.paths.tokens)
    src = models.resolve(cfg.teacher.model)  # fail on a bad spec before reading any corpus
    docs = load_documents(d)
    docs = [doc for doc in docs if doc.text.strip()]
    if not docs:
        raise DataError(f"corpus {d.source} has no non-empty documents; point data.source at some text")
    log.info("loaded %d documents (%.1f MB) from %s", len(docs), sum(len(x.text) for x in docs) / 1e6, d.source)

    model_cfg = models.load_config(src)
    limit = models.max_positions(model_cfg)
    if limit is not None and d.seq_len > limit:
        raise DataError(f"data.seq_len={d.seq_len} exceeds the teacher's max positions ({limit}); lower data.seq_len")
    tok = models.load_tokenizer(src)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer of {cfg.teacher.model} has no EOS token to join documents with")

    split_docs = split_documents(docs, d.validation_fraction, d.seed)
    caps = {"train": d.max_train_tokens, "validation": d.max_validation_tokens}
    arrays, stats = {}, {}
    for split in SPLITS:
        ids = tokenize(split_docs[split], tok, split)
        arrays[split] = pack(ids, tok.eos_token_id, d.seq_len, caps[split])
        n_tokens = sum(len(x) + 1 for x in ids)
        if len(arrays[split]) == 0:
            raise DataError(f"the {split} split has {n_tokens} tokens, fewer than one sequence of data.seq_len="
                            f"{d.seq_len}; lower data.seq_len or change data.validation_fraction")
        stats[split] = {"documents": len(split_docs[split]), "stream_tokens": n_tokens,
                        "num_sequences": int(arrays[split].shape[0]), "tokens": int(arrays[split].size)}

    corpus_hash = hashlib.sha256()
    for doc in docs:
        corpus_hash.update(doc.text.encode("utf-8", "replace") + b"\0")
    attrs = {
        "format": TOKENS_FORMAT,
        "format_version": 1,
        "tokenizer": {"spec": cfg.teacher.model, "fingerprint": models.tokenizer_fingerprint(tok),
                      "vocab_size": len(tok)},
        "vocab_size": len(tok),
        "eos_token_id": int(tok.eos_token_id),
        "seq_len": d.seq_len,
        "corpus": {"source": d.source, "documents": len(docs), "fingerprint": "sha256:" + corpus_hash.hexdigest()[:32]},
        "split": {"validation_fraction": d.validation_fraction, "seed": d.seed,
                  "max_train_tokens": d.max_train_tokens, "max_validation_tokens": d.max_validation_tokens},
        "splits": stats,
    }
    attrs["fingerprint"] = tokens_fingerprint(arrays, attrs)
    write_tokens(out, arrays, attrs)
    for split in SPLITS:
        s = stats[split]
        log.info("%s: %d documents -> %d sequences x %d = %d tokens", split, s["documents"], s["num_sequences"],
                 d.seq_len, s["tokens"])
    log.info("wrote %s", out)
    return out


def tokens_fingerprint(arrays: dict[str, np.ndarray], attrs: dict) -> str:
    h = hashlib.sha256(attrs["tokenizer"]["fingerprint"].encode())
    for split in SPLITS:
        h.update(split.encode() + np.ascontiguousarray(arrays[split]).tobytes())
    return "sha256:" + h.hexdigest()[:32]


def write_tokens(out: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write to a temporary sibling and swap it in, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for split, arr in arrays.items():
        g = root.create_group(split)
        rows = max(1, min(len(arr), (1 << 20) // (4 * arr.shape[1])))  # ~1 MiB chunks
        z = g.create_array("input_ids", shape=arr.shape, dtype="int32", chunks=(rows, arr.shape[1]))
        z[...] = arr
    root.attrs.update(attrs)  # attrs last: a group without them is not a tokens store
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def open_tokens(path: str | Path) -> zarr.Group:
    """Open tokens.zarr written by `prepare`, or raise DataError saying how to make it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; run `distill-pipe prepare` first")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception:
        raise DataError(f"{path} is not a Zarr group; rerun `distill-pipe prepare`") from None
    if root.attrs.get("format") != TOKENS_FORMAT or any(s not in root for s in SPLITS):
        raise DataError(f"{path} is not a complete tokens store made by `distill-pipe prepare`; rerun prepare")
    return root
