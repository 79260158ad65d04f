"""The `prepare` stage: corpus -> documents -> tokens -> packed (N, L) int32 sequences in tokens.zarr.

It streams: sources yield one document at a time (files one by one; a .txt file in blocks of whole
passages, read a few MiB at a time; .jsonl line by line; .parquet/.csv in record batches; a hub dataset as
an iterable), documents are tokenized in batches, and each split's packed rows are appended to tokens.zarr
a chunk at a time. Memory is bounded by a few batches and a chunk, not by the corpus or its largest file.
Each document goes to train or validation by a seeded hash of its identity (`document_split`), so the
split needs no view of the whole corpus; reading stops once both token caps are filled.

Documents: a record (.jsonl/.json/.parquet/.csv line or row, dataset row) is one; a .txt file is cut at
blank lines into blocks of at least `data.text_block_chars` characters (`text_blocks`), each a document
named by the file and its block index, so one big file splits, caps and streams as many small ones do.

Each split is one token stream in corpus order: per document, [BOS] if the tokenizer adds one itself,
the document's tokens, EOS; a block that follows the file's previous block in the same split continues it
(no EOS, no BOS between them: the text as the file has it). The stream is cut into sequences of
`data.seq_len` tokens and the incomplete last sequence is dropped.

Conversations (`data.format` chat or prompt_completion) are rendered with the teacher's chat template,
tokenized piece by piece and packed whole, several per row, with a target mask (distill_pipe/chat.py);
each split then also holds `target_mask` (N, L) uint8 and the store's format_version is 2.

tokens.zarr layout (Zarr v3): group attrs {format, tokenizer, vocab_size, eos_token_id, bos_token_id, seq_len,
corpus, split, splits: {name: {documents, stream_tokens, num_sequences, tokens}}, fingerprint}; sub-groups
`train/` and `validation/`, each holding `input_ids` (N, L) int32 [and, for conversations, `target_mask`
(N, L) uint8: 1 where token t is a training target; attrs then add `chat` and format_version 2].

Legend: L = data.seq_len.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from distill_pipe.config import Config, DataConfig
from distill_pipe import chat, models

log = logging.getLogger(__name__)

TOKENS_FORMAT = "distill-pipe-tokens"
TOKENS_FORMAT_VERSION = 2
"""1: input_ids only; 2: conversations add target_mask (a store without one is still written as 1)."""
SPLITS = ("train", "validation")
FILE_KINDS = (".txt", ".jsonl", ".json", ".parquet", ".csv")
RECORD_BATCH = 1024  # rows per .parquet/.csv/dataset batch
READ_BYTES = 1 << 22  # a .txt file is read 4 MiB at a time
BLOCK_LIMIT = 4  # a text block is cut at most this many times data.text_block_chars from its start
TOKENIZE_BATCH_CHARS = 1 << 20  # characters of text per tokenizer call
CHUNK_BYTES = 1 << 20  # tokens.zarr chunks of ~1 MiB


class DataError(ValueError):
    """Bad corpus or tokens input; the message names the problem and the fix."""


@dataclass
class Document:
    name: str
    """Identity with `index`: path relative to the source (+ `#record`), stable when the corpus moves;
    decides the split."""
    text: str
    pieces: list[tuple[str, bool]] | None = None
    """A conversation: its rendered text as consecutive (text, is_target) pieces, tokenized one by one."""
    index: int = 0
    """Block of a .txt file (`text_blocks`): 0, 1, ... in file order; 0 for every other document."""


# ---------------------------------------------------------------- corpus sources
#
# A source yields (name, record): a .txt file's text (str), or one record (dict) of a .jsonl/.json/.parquet/
# .csv file or a dataset. A RecordReader turns each record into the Document that is tokenized (or None to
# skip it): the one place a new corpus format (e.g. chat records) plugs in.


@dataclass
class RecordReader:
    """Plain text records: the text is `text_field` of a dict record, or the record itself (a .txt file)."""

    text_field: str
    columns: list[str] | None = field(default=None)
    """Columns to read from .parquet/.csv/datasets (None: all); the columns `to_document` needs."""

    def __post_init__(self):
        if self.columns is None:
            self.columns = [self.text_field]

    @property
    def field_key(self) -> str:
        """The params key naming the columns read (for errors)."""
        return "data.text_field"

    def to_document(self, name: str, record: Any, where: str) -> Document | None:
        """`where` names the record in errors (file and line or record number)."""
        if isinstance(record, str):
            return Document(name, record)
        if not isinstance(record, dict) or self.text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where} has no field {self.text_field!r} (has: {keys}); set data.text_field")
        text = record[self.text_field]
        if text is not None and not isinstance(text, str):  # str(12) or str([...]) would train on its repr
            raise DataError(f"{where}: field {self.text_field!r} holds a {type(text).__name__} "
                            f"({str(text)[:40]!r}), not text; set data.text_field to the field with the text")
        return Document(name, text) if text else None


@dataclass
class ChatRecordReader(RecordReader):
    """Conversation records (data.format chat / prompt_completion), rendered with the chat template."""

    fmt: str = "chat"
    tok: Any = None
    template: str = ""
    targets: str = "assistant"
    fields: dict = field(default_factory=dict)
    """messages_field, prompt_field, completion_field."""

    @property
    def field_key(self) -> str:
        return " / ".join(f"data.{k}" for k in self.fields)

    def to_document(self, name: str, record: Any, where: str) -> Document | None:
        if isinstance(record, str):
            raise DataError(f"{where} is a plain text file, not conversation records; data.format={self.fmt} "
                            "reads .jsonl/.json/.parquet records or a dataset (or set data.format=text)")
        msgs = chat.conversation(record, self.fmt, where=where, **self.fields)
        pieces = chat.segments(msgs, self.tok, self.template, self.targets, where)
        return Document(name, "".join(text for text, _ in pieces), pieces)


def record_reader(cfg: DataConfig, tok=None, teacher: str = "") -> RecordReader:
    """The reader of `data.format`; conversations need the teacher's tokenizer (its chat template)."""
    if cfg.format == "text":
        return RecordReader(cfg.text_field)
    fields = ({"messages_field": cfg.messages_field} if cfg.format == "chat"
              else {"prompt_field": cfg.prompt_field, "completion_field": cfg.completion_field})
    return ChatRecordReader(text_field=cfg.text_field, columns=list(fields.values()), fmt=cfg.format, tok=tok,
                            template=chat.resolve_template(tok, cfg.chat_template, teacher), targets=cfg.targets,
                            fields=fields)


def iter_documents(cfg: DataConfig, reader: RecordReader | None = None) -> Iterator[Document]:
    """The corpus's documents, lazily, in a fixed order (files sorted by path, records in file order).
    The source itself (builtin name, path, glob) is checked at once, before the first document is read."""
    reader = reader or record_reader(cfg)
    src = cfg.source
    if src == "builtin:pydoc":
        from pydoc_data.topics import topics

        return (reader.to_document(f"pydoc:{k}", v, f"builtin:pydoc topic {k}") for k, v in sorted(topics.items()))
    if src in ("builtin:pydoc", "builtin:pydoc-chat") and (src == "builtin:pydoc-chat") != (cfg.format == "chat"):
        raise DataError(f"{src} holds {'conversations' if src.endswith('chat') else 'plain text'}: use it with "
                        f"data.format={'chat' if src.endswith('chat') else 'text'}, or the other builtin corpus")
    if src == "builtin:pydoc-chat":
        return (reader.to_document(f"pydoc-chat:{r['topic']}", r, f"builtin:pydoc-chat {r['topic']}")
                for r in chat.pydoc_conversations())
    if src.startswith("builtin:"):
        raise DataError(f"unknown builtin corpus {src!r}; known: builtin:pydoc, builtin:pydoc-chat")
    files, root = _corpus_files(src)
    if files is None:
        return _iter_hf_dataset(cfg, reader)
    return (doc for path in files for doc in _iter_file(path, _relative_name(path, root), reader,
                                                         cfg.text_block_chars))


def load_documents(cfg: DataConfig) -> list[Document]:
    """Every document in memory: for small corpora and tests; `prepare` streams instead."""
    return list(iter_documents(cfg))


def _corpus_files(src: str) -> tuple[list[Path] | None, Path | None]:
    """(files, root that document names are relative to), or (None, None) for a hub dataset name."""
    path = Path(src).expanduser()
    if path.is_dir():
        candidates = [p for p in path.rglob("*") if p.suffix.lower() in FILE_KINDS]
        _refuse_broken_links(candidates)
        files = sorted(p for p in candidates if p.is_file())
        if not files:
            raise DataError(f"folder {src} holds no {'/'.join(FILE_KINDS)} files; point data.source at a corpus")
        return files, path
    if any(c in src for c in "*?["):
        pattern = os.path.expanduser(src)
        candidates = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).suffix.lower() in FILE_KINDS]
        _refuse_broken_links(candidates)
        files = sorted(p for p in candidates if p.is_file())
        if not files:
            raise DataError(f"glob {src} matches no {'/'.join(FILE_KINDS)} files; check data.source")
        static = pattern[: min(pattern.index(c) for c in "*?[" if c in pattern)]
        return files, Path(static if static.endswith("/") else os.path.dirname(static) or ".")
    if path.suffix.lower() in FILE_KINDS or path.exists() or "/" not in src or src.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"corpus {src} does not exist; set data.source to an existing file, folder or glob")
        if path.suffix.lower() not in FILE_KINDS:
            raise DataError(f"corpus {src}: unsupported file type; use one of {', '.join(FILE_KINDS)}")
        return [path], path.parent
    return None, None


def _refuse_broken_links(paths: list[Path]) -> None:
    """A corpus file that is a link to nothing would otherwise be left out without a word."""
    for p in paths:
        if p.is_symlink() and not p.exists():
            raise DataError(f"corpus file {p} is a broken link (to {os.readlink(p)}); fix the link or remove it")


def _relative_name(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    """Strict UTF-8: a corpus file in another encoding (or a binary file in a corpus folder) would otherwise
    be tokenized as replacement characters, silently training on garbage. `offset`: of `data` in its file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not valid UTF-8 (byte {offset + e.start}: {data[e.start:e.start + 4]!r}); "
                        "convert it (e.g. `iconv -f latin1 -t utf-8`) or remove it from the corpus") from None


# A blank-line run: a newline, then one or more lines holding only whitespace.
_BLANK_RUN = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_SPACE = re.compile(r"\s")


def text_blocks(path: Path, block_chars: int) -> Iterator[str]:
    """A .txt file as consecutive blocks of whole passages, read READ_BYTES at a time (never whole).

    A block ends after the first blank-line run that ends at least `block_chars` characters from its start;
    when there is none within BLOCK_LIMIT * block_chars (a passage that long, text without blank lines), after
    the first line end, else the first whitespace, past `block_chars`, else at that limit. The rest of the
    file is the last block once it fits in the limit with no further blank-line run past `block_chars`.
    Each cut depends only on the text from the block's start to the limit, so the blocks (and with them
    the documents' identities) do not depend on how the file is read. Joined, the blocks are the file."""
    limit = BLOCK_LIMIT * block_chars
    buf, pos, eof, read, tail = "", 0, False, 0, b""  # tail: bytes of a character cut by a read
    with open(path, "rb") as f:
        while True:
            while not eof and len(buf) - pos < limit:
                raw = f.read(READ_BYTES)
                eof = not raw
                data = tail + raw
                cut = len(data) - (0 if eof else _cut_character(data))  # decoded with the next read
                data, tail = data[:cut], data[cut:]
                buf = buf[pos:] + _decode(data, str(path), read)
                pos, read = 0, read + len(data)
            if pos >= len(buf):
                return
            end = _block_end(buf, pos, block_chars, limit, eof)
            yield buf[pos:end]
            pos = end


def _cut_character(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that they do not complete."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 != 0x80:  # not a continuation byte: the last character starts here
            need = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return k if k < need else 0
    return 0  # four continuation bytes: invalid, left for the decoder to report


def _block_end(buf: str, pos: int, block_chars: int, limit: int, eof: bool) -> int:
    """Where the block starting at `pos` ends (see `text_blocks`); buf holds `limit` characters past `pos`,
    or the rest of the file when `eof`."""
    stop = min(len(buf), pos + limit)
    for m in _BLANK_RUN.finditer(buf, pos, stop):
        if m.end() - pos >= block_chars:
            return m.end()
    if eof and stop == len(buf):
        return stop
    line = buf.find("\n", pos + block_chars - 1, stop)
    if line >= 0:
        return line + 1
    space = _SPACE.search(buf, pos + block_chars - 1, stop)
    return space.end() if space else stop


def _iter_file(path: Path, name: str, reader: RecordReader, block_chars: int) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":  # one document per block of whole passages: a split and caps for one big file too
        for k, block in enumerate(text_blocks(path, block_chars)):
            if (doc := reader.to_document(name, block, str(path))) is not None:
                doc.index = k
                yield doc
        return
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for i, raw in enumerate(f):
                line = _decode(raw, f"{path}:{i + 1}")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1} is not valid JSON ({e.msg}); fix or remove that line") from None
                # record index = line index, so an edit elsewhere in the file does not move other records
                if (doc := reader.to_document(f"{name}#{i}", rec, f"{path} record {i}")) is not None:
                    yield doc
        return
    if suffix == ".json":  # one JSON value: read whole (use .jsonl for large corpora)
        try:
            data = json.loads(_decode(path.read_bytes(), str(path)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        for i, rec in enumerate(data if isinstance(data, list) else [data]):
            if (doc := reader.to_document(f"{name}#{i}", rec, f"{path} record {i}")) is not None:
                yield doc
        return
    for i, rec in enumerate(_iter_table(path, reader.columns, reader.field_key)):
        if (doc := reader.to_document(f"{name}#{i}", rec, f"{path} record {i}")) is not None:
            yield doc


def _iter_table(path: Path, columns: list[str], key: str = "data.text_field") -> Iterator[dict]:
    """Rows of a .parquet or .csv file as dicts of `columns`, RECORD_BATCH rows at a time."""
    import pyarrow as pa

    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path} is not a readable Parquet file ({e}); fix or remove it") from None
        _check_columns(path, columns, pf.schema_arrow.names, key)
        batches = pf.iter_batches(batch_size=RECORD_BATCH, columns=columns)
    else:
        import pyarrow.csv as pacsv

        try:
            stream = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22))
        except pa.ArrowInvalid as e:
            raise DataError(f"{path} is not a readable CSV file ({e}); fix or remove it") from None
        _check_columns(path, columns, stream.schema.names, key)
        batches = stream
    try:
        i = 0
        for batch in batches:
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for j in range(batch.num_rows):
                # pyarrow reads a CSV column holding invalid UTF-8 as binary: decode it strictly
                yield {c: _decode(v[j], f"{path} record {i}") if isinstance(v[j], bytes) else v[j]
                       for c, v in cols.items()}
                i += 1
    except pa.ArrowInvalid as e:  # e.g. "CSV conversion error to string: invalid UTF8 data"
        raise DataError(f"{path} cannot be read ({e}); fix it (UTF-8 text, consistent columns) or remove "
                        "it from the corpus") from None


def _check_columns(path, columns: list[str], names: list[str], key: str = "data.text_field") -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (columns: {', '.join(names)}); set {key}")


def _iter_hf_dataset(cfg: DataConfig, reader: RecordReader) -> Iterator[Document]:
    """A Hugging Face dataset: streamed from the hub when it is reachable, else from the local cache
    (memory-mapped Arrow, read in batches)."""
    import datasets

    try:
        if models._hub_reachable():
            ds = datasets.load_dataset(cfg.source, split=cfg.dataset_split, streaming=True)
        else:
            datasets.config.HF_HUB_OFFLINE = True
            ds = datasets.load_dataset(cfg.source, split=cfg.dataset_split)
    except DataError:
        raise
    except Exception:
        raise DataError(f"dataset {cfg.source!r} is not a local path, not in the datasets cache, and the "
                        "Hugging Face hub is unreachable (offline?): give a local file or folder") from None
    names = ds.column_names
    if names is not None:
        _check_columns(f"dataset {cfg.source}", reader.columns, names, reader.field_key)
    i = 0
    for batch in ds.iter(batch_size=RECORD_BATCH):
        cols = {c: batch[c] for c in reader.columns}
        for j in range(len(next(iter(cols.values())))):
            doc = reader.to_document(f"{cfg.source}#{i}", {c: v[j] for c, v in cols.items()},
                                     f"dataset {cfg.source} record {i}")
            i += 1
            if doc is not None:
                yield doc


# ---------------------------------------------------------------- split, tokenize, pack


def document_split(name: str, fraction: float, seed: int, index: int = 0) -> str:
    """'validation' or 'train' for document `index` of `name`, decided without seeing the rest of the corpus.

    u, the seeded hash of `name` as a number in [0, 1), is an offset: document `index` goes to validation
    when frac(u + index * fraction) < fraction. For index 0 (a file, a record) that is u < fraction, a coin
    with that weight; the blocks 0..n-1 of one text file get floor or ceil of n * fraction validation
    blocks, evenly spaced, so a single text file is split in proportion rather than by chance."""
    h = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    return "validation" if (u + index * fraction) % 1.0 < fraction else "train"


def split_documents(docs: list[Document], fraction: float, seed: int) -> dict[str, list[Document]]:
    """Documents grouped by `document_split`, each split in corpus order (the order `prepare` packs them)."""
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[document_split(d.name, fraction, seed, d.index)].append(d)
    return out


def adds_bos(tok) -> int | None:
    """The BOS id if the tokenizer puts one before a text when asked for its special tokens (Llama 2/3,
    Mistral, Gemma do; GPT-2-style tokenizers and SmolLM2 do not), else None."""
    if tok.bos_token_id is None:
        return None
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return int(tok.bos_token_id) if ids and ids[0] == tok.bos_token_id else None


class _Encoder:
    """Texts -> one int32 array per text (no special tokens). Picklable for worker processes: a fast
    tokenizer is sent as its Rust `tokenizers.Tokenizer`, whose batch call runs on every core."""

    def __init__(self, tok):
        backend = getattr(tok, "_tokenizer", None)
        self.rust = backend if backend is not None and hasattr(backend, "encode_batch") else None
        self.tok = None if self.rust is not None else tok

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.rust is not None:
            # encode_batch_fast skips character offsets (~20% less CPU here); the ids are the same
            encode = getattr(self.rust, "encode_batch_fast", self.rust.encode_batch)
            return [np.asarray(e.ids, dtype=np.int32) for e in encode(texts, add_special_tokens=False)]
        return [np.asarray(ids, dtype=np.int32) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]


_worker_encoder: _Encoder | None = None


def _worker_init(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return _worker_encoder(texts)


def tokenize_batches(batches: Iterator[tuple[Any, list[str]]], encoder: _Encoder, num_proc: int
                     ) -> Iterator[tuple[Any, list[np.ndarray]]]:
    """(key, texts) -> (key, token arrays), in order, at most 2 * num_proc batches in flight: reading the
    next batch overlaps tokenizing this one, and memory stays bounded however long the corpus."""
    if num_proc > 1:
        pool = cf.ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                                      initializer=_worker_init, initargs=(encoder,))
        fn = _worker_encode
    else:  # one thread: the Rust tokenizer releases the GIL while the main thread reads and packs
        pool, fn = cf.ThreadPoolExecutor(1), encoder
    pending: deque = deque()
    try:
        for key, texts in batches:
            pending.append((key, pool.submit(fn, texts)))
            if len(pending) >= 2 * num_proc:
                k, fut = pending.popleft()
                yield k, fut.result()
        while pending:
            k, fut = pending.popleft()
            yield k, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class SplitWriter:
    """Packs one split's token stream into (N, L) rows and appends them to `input_ids` a chunk at a time.

    Also counts what went in and hashes the rows (the tokens fingerprint) as they are written."""

    def __init__(self, group: zarr.Group, seq_len: int, max_tokens: int | None, eos_id: int | None = None):
        self.L = seq_len
        self.eos = np.asarray([] if eos_id is None else [eos_id], dtype=np.int32)
        self.open = False  # a document is in the stream whose EOS is not yet
        self.max_rows = None if max_tokens is None else max_tokens // seq_len
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * seq_len))
        self.array = group.create_array("input_ids", shape=(0, seq_len), dtype="int32",
                                        chunks=(self.chunk_rows, seq_len))
        self.parts: list[np.ndarray] = []  # tokens not yet written (< one chunk of rows + one document)
        self.buffered = 0  # tokens in parts
        self.written = 0  # rows in the array
        self.rows = 0  # rows written or buffered whole
        self.documents = 0
        self.stream_tokens = 0
        self.digest = hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.max_rows is not None and self.rows >= self.max_rows

    def add(self, docs: list[tuple[np.ndarray, bool]]) -> None:
        """Append documents, (tokens, continues) each, then write any whole chunks. Documents are joined by
        EOS, and the last one ends with it; a document that `continues` the one before it (the next block of
        a text file, both in this split) follows it directly, as in the file."""
        for ids, continues in docs:
            if self.full:
                return
            if self.open and not continues:
                ids = np.concatenate([self.eos, ids])
            self.open = True
            self.parts.append(ids)
            self.buffered += len(ids)
            self.documents += 1
            self.stream_tokens += len(ids)
            self.rows = self.written + self.buffered // self.L
        if self.buffered >= self.chunk_rows * self.L:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int32)
        n = len(stream) // self.L
        if not final:
            n -= n % self.chunk_rows  # whole chunks only: appending never rewrites a chunk
        if self.max_rows is not None:
            n = min(n, self.max_rows - self.written)
        if n > 0:
            rows = stream[: n * self.L].reshape(n, self.L)
            self.digest.update(rows.tobytes())
            self.array.append(rows, axis=0)
            self.written += n
        rest = stream[n * self.L:]
        self.parts, self.buffered = ([rest] if len(rest) and not final else []), (len(rest) if not final else 0)

    def close(self) -> dict:
        if self.open:
            self.parts.append(self.eos)
            self.stream_tokens += len(self.eos)
        self._flush(final=True)
        n = self.written
        return {"documents": self.documents, "stream_tokens": self.stream_tokens, "num_sequences": n,
                "tokens": n * self.L}


class ChatSplitWriter:
    """Packs one split's conversations whole (chat.Packer: several per row, padding, target mask) and appends
    the rows to `input_ids` and `target_mask` a chunk at a time; the same interface as SplitWriter."""

    def __init__(self, group: zarr.Group, seq_len: int, max_tokens: int | None, pad_id: int):
        self.L = seq_len
        self.packer = chat.Packer(seq_len, pad_id, None if max_tokens is None else max_tokens // seq_len)
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * seq_len))
        self.array = group.create_array("input_ids", shape=(0, seq_len), dtype="int32",
                                        chunks=(self.chunk_rows, seq_len))
        self.mask_array = group.create_array("target_mask", shape=(0, seq_len), dtype="uint8",
                                             chunks=(self.chunk_rows, seq_len))
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []  # closed rows not yet written
        self.written = 0
        self.documents = 0
        self.stream_tokens = 0
        self.digest, self.mask_digest = hashlib.sha256(), hashlib.sha256()

    @property
    def full(self) -> bool:
        return self.packer.full

    def add(self, convs: list[chat.Tokenized]) -> None:
        for conv in convs:
            if self.full:
                return
            self.documents += 1
            self.stream_tokens += len(conv.input_ids)
            self.rows.extend(self.packer.add(conv))
        if len(self.rows) >= self.chunk_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n = len(self.rows) if final else len(self.rows) - len(self.rows) % self.chunk_rows  # whole chunks
        if n:
            ids = np.stack([r[0] for r in self.rows[:n]])
            mask = np.stack([r[1] for r in self.rows[:n]])
            self.digest.update(ids.tobytes())
            self.mask_digest.update(mask.tobytes())
            self.array.append(ids, axis=0)
            self.mask_array.append(mask, axis=0)
            self.written += n
            self.rows = self.rows[n:]

    def close(self) -> dict:
        self.rows.extend(self.packer.finish())
        self._flush(final=True)
        n = self.written
        return {"documents": self.documents, "stream_tokens": self.stream_tokens, "num_sequences": n,
                "tokens": n * self.L, **{k: v for k, v in self.packer.stats.as_dict().items() if k != "rows"}}


# ---------------------------------------------------------------- the stage


def run_prepare(cfg: Config) -> Path:
    d = cfg.data
    out = Path(cfg.paths.tokens)
    src = models.resolve(cfg.teacher.model)  # fail on a bad spec before reading any corpus
    model_cfg = models.load_config(src)
    limit = models.max_positions(model_cfg)
    if limit is not None and d.seq_len > limit:
        raise DataError(f"data.seq_len={d.seq_len} exceeds the teacher's max positions ({limit}); lower data.seq_len")
    tok = models.load_tokenizer(src)
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer of {cfg.teacher.model} has no EOS token to join documents with")
    bos = adds_bos(tok)
    reader = record_reader(d, tok, cfg.teacher.model)  # conversations: no chat template fails here, at once
    docs = iter_documents(d, reader)  # the first file is opened only when the stream starts, below
    conversations = d.format != "text"
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        caps = {"train": d.max_train_tokens, "validation": d.max_validation_tokens}
        writers = {s: ChatSplitWriter(root.create_group(s), d.seq_len, caps[s], pad_id) if conversations
                   else SplitWriter(root.create_group(s), d.seq_len, caps[s], tok.eos_token_id) for s in SPLITS}
        corpus = _stream(docs, writers, tok, bos, d)
        stats = {s: w.close() for s, w in writers.items()}
        _check_splits(d, corpus, stats, tok)
        attrs = {
            "format": TOKENS_FORMAT,
            "format_version": TOKENS_FORMAT_VERSION if conversations else 1,
            "tokenizer": {"spec": cfg.teacher.model, "fingerprint": models.tokenizer_fingerprint(tok),
                          "vocab_size": len(tok)},
            "vocab_size": len(tok),
            "eos_token_id": int(tok.eos_token_id),
            "bos_token_id": bos,
            "seq_len": d.seq_len,
            "corpus": {"source": d.source, "documents": corpus["documents"], "read_all": corpus["read_all"],
                       "fingerprint": "sha256:" + corpus["hash"].hexdigest()[:32]},
            "split": {"method": "hash", "validation_fraction": d.validation_fraction, "seed": d.seed,
                      "max_train_tokens": d.max_train_tokens, "max_validation_tokens": d.max_validation_tokens},
            "splits": stats,
        }
        if conversations:
            template = reader.template
            attrs["chat"] = {"format": d.format, "targets": d.targets, **reader.fields,
                             "template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
                             "template_given": bool(d.chat_template)}
        attrs["fingerprint"] = _combine_fingerprint(attrs, {s: w.digest for s, w in writers.items()},
                                                    {s: w.mask_digest for s, w in writers.items()}
                                                    if conversations else None,
                                                    {s: (w.written, d.seq_len) for s, w in writers.items()})
        root.attrs.update(attrs)  # attrs last: a group without them is not a tokens store
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split in SPLITS:
        s = stats[split]
        log.info("%s: %s -> %s x %d = %d tokens", split, _count(s["documents"], "document"),
                 _count(s["num_sequences"], "sequence"), d.seq_len, s["tokens"])
        if conversations:
            log.info("%s: %d conversations packed: %d tokens, %d of them targets (%.1f%%), and %d padding; "
                     "%d cut to data.seq_len (%d target tokens lost), %d without a target skipped", split,
                     s["conversations"], s["real_tokens"], s["target_tokens"],
                     100 * s["target_tokens"] / max(s["real_tokens"], 1), s["padding_tokens"], s["truncated"],
                     s["dropped_target_tokens"], s["skipped_no_target"])
    log.info("wrote %s", out)
    return out


def _stream(docs: Iterator[Document], writers: dict[str, SplitWriter], tok, bos: int | None, d: DataConfig) -> dict:
    """Read, split, tokenize and pack until the corpus ends or every split is full; what was read."""
    corpus = {"documents": 0, "bytes": 0, "hash": hashlib.sha256(), "read_all": True, "cut_files": 0,
              "records": []}
    head = np.asarray([] if bos is None else [bos], dtype=np.int32)
    last: dict[str, tuple[str, int]] = {}  # per split, the (name, index) of its last document

    def batches() -> Iterator[tuple[list, list[str]]]:
        # key: per document, (split, None, continues, record) for text, (split, is_target per piece, False,
        # record) for a conversation; record: its index in corpus["records"] (None when not kept)
        keys, texts, chars = [], [], 0
        for doc in docs:
            if all(w.full for w in writers.values()):
                corpus["read_all"] = False
                break
            if not doc.text.strip():
                continue
            raw = doc.text.encode("utf-8")
            corpus["documents"] += 1
            corpus["bytes"] += len(raw)
            corpus["cut_files"] += doc.index == 1
            corpus["hash"].update(raw + b"\0")
            split = document_split(doc.name, d.validation_fraction, d.seed, doc.index)
            record = _keep_record(corpus, doc)
            if writers[split].full:
                continue  # that split's cap is reached: no need to tokenize it
            continues = doc.index > 0 and last.get(split) == (doc.name, doc.index - 1)
            last[split] = (doc.name, doc.index)
            if doc.pieces is None:
                keys.append((split, None, continues, record))
                texts.append(doc.text)
            else:  # tokenized piece by piece: a target starts on a token boundary (distill_pipe/chat.py)
                keys.append((split, [is_target for _, is_target in doc.pieces], False, record))
                texts.extend(text for text, _ in doc.pieces)
            chars += len(doc.text)
            if chars >= TOKENIZE_BATCH_CHARS:
                yield keys, texts
                keys, texts, chars = [], [], 0
        if texts:
            yield keys, texts

    t0 = time.perf_counter()
    n_tokens = 0
    # `with`: the bar ends its line even when a bad document raises, so the error is a line of its own
    with tqdm(desc="prepare", unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        for keys, ids_list in tokenize_batches(batches(), _Encoder(tok), d.num_proc):
            by_split: dict[str, list] = {s: [] for s in SPLITS}
            k = 0
            for split, flags, continues, record in keys:
                if flags is None:
                    ids = ids_list[k]
                    by_split[split].append((ids if continues else np.concatenate([head, ids]), continues))
                    weight = len(ids)
                    k += 1
                else:
                    conv = chat.join_pieces(ids_list[k:k + len(flags)], flags)
                    by_split[split].append(conv)
                    weight = int(conv.target_mask.any())
                    k += len(flags)
                if record is not None and corpus["records"] is not None:
                    corpus["records"][record][2] = weight
            for split, items in by_split.items():
                if items:
                    writers[split].add(items)
            n = sum(len(x) for x in ids_list)
            n_tokens += n
            bar.update(n)
    dt = time.perf_counter() - t0
    cut = (f"; {_count(corpus['cut_files'], '.txt file')} cut at blank lines into documents of >= "
           f"{d.text_block_chars} characters (data.text_block_chars)" if corpus["cut_files"] else "")
    log.info("read %s (%s) from %s%s%s; tokenized %d tokens in %.1f s (%.0f tokens/s)",
             _count(corpus["documents"], "document"), _size(corpus["bytes"]), d.source,
             "" if corpus["read_all"] else " (stopped: both token caps reached)", cut, n_tokens, dt,
             n_tokens / max(dt, 1e-9))
    return corpus


SUGGEST_DOCS = 10_000
"""Documents whose (name, index, weight) prepare keeps, to name a fix that works when a split is empty."""
SUGGEST_BYTES = 1 << 20  # a text corpus up to this size is re-read with smaller blocks to find such a fix


def _keep_record(corpus: dict, doc: Document) -> int | None:
    records = corpus["records"]
    if records is None:
        return None
    if len(records) >= SUGGEST_DOCS:  # a corpus that large does not leave a split empty by its size
        corpus["records"] = None
        return None
    records.append([doc.name, doc.index, 0])  # weight: filled in once tokenized (0 if never tokenized)
    return len(records) - 1


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


def _check_splits(d: DataConfig, corpus: dict, stats: dict, tok) -> None:
    if corpus["documents"] == 0:
        raise DataError(f"corpus {d.source} has no non-empty documents; point data.source at some text")
    if stats["train"]["documents"] == 0:
        raise DataError(f"data.validation_fraction={d.validation_fraction} leaves no training document out of "
                        f"{corpus['documents']}; {_fixes(d, corpus, stats, tok)}")
    for split in SPLITS:
        s = stats[split]
        if s["num_sequences"] == 0 and s.get("skipped_no_target"):
            raise DataError(f"none of the {s['documents']} conversations of the {split} split has a target token "
                            "(an assistant turn); check the records' roles, or set data.targets=all")
        if s["num_sequences"] == 0:
            raise DataError(f"the {split} split has {s['stream_tokens']} tokens ({_count(s['documents'], 'document')}"
                            f"), fewer than one sequence of data.seq_len={d.seq_len}; {_fixes(d, corpus, stats, tok)}")


def _fixes(d: DataConfig, corpus: dict, stats: dict, tok) -> str:
    """Params that give each split at least one sequence, each checked on what was read (the documents'
    identities and token counts): a shorter seq_len, another seed or validation_fraction, and for a small
    corpus of text files smaller blocks; else the corpus is too small to split."""
    text = d.format == "text"
    need = d.seq_len - 1 if text else 1  # text: tokens (an EOS comes on top); conversations: with a target

    def works(records, fraction: float, seed: int) -> bool:
        weight = {s: 0 for s in SPLITS}
        for name, index, w in records:
            weight[document_split(name, fraction, seed, index)] += w
        return all(w >= need for w in weight.values())

    fixes = []
    shortest = min(s["stream_tokens"] for s in stats.values())
    if text and shortest >= 2:  # the split stays; rows of the shorter split's length fill it
        fixes.append(f"data.seq_len={shortest} (or lower)")
    records = corpus["records"]
    if records is not None:
        seed = next((s for s in range(d.seed + 1, d.seed + 101) if works(records, d.validation_fraction, s)), None)
        if seed is not None:
            fixes.append(f"data.seed={seed}")
        grid = sorted((f for f in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5) if f != d.validation_fraction),
                      key=lambda f: abs(f - d.validation_fraction))
        fraction = next((f for f in grid if works(records, f, d.seed)), None)
        if fraction is not None:
            fixes.append(f"data.validation_fraction={fraction}")
    if text and records is not None and corpus["bytes"] <= SUGGEST_BYTES:
        for chars in (c for c in (1024, 512, 256, 128) if c < d.text_block_chars):
            docs = [doc for doc in iter_documents(replace(d, text_block_chars=chars)) if doc.text.strip()]
            if not any(doc.index for doc in docs):
                break  # no .txt file long enough to cut
            ids = tok([doc.text for doc in docs], add_special_tokens=False)["input_ids"]
            if works([(doc.name, doc.index, len(x)) for doc, x in zip(docs, ids)], d.validation_fraction, d.seed):
                fixes.append(f"data.text_block_chars={chars}")
                break
    if fixes:
        return f"any of these gives both splits a sequence: {', '.join(fixes)}; or add text to the corpus"
    return (f"the corpus ({_count(corpus['documents'], 'document')}) is too small to give both splits a sequence "
            "of data.seq_len: add text to it")


FINGERPRINT = "distill-pipe-tokens-fingerprint-v2"
"""What `_combine_fingerprint` hashes first. v1 (until this one) hashed the rows' bytes without their shape,
so one token stream cut at another seq_len kept its fingerprint; every v2 fingerprint differs from every
v1 one, so a store, checkpoint or student made from v1 data is never taken for this data."""


def _combine_fingerprint(attrs: dict, digests: dict, mask_digests: dict | None, shapes: dict) -> str:
    """The data's identity: what the student sees, i.e. the tokenizer and per split the shape (N, L) and the
    bytes of its rows [and of its target mask]. Any change of the data params that changes those (seq_len,
    split, caps, format, targets, chat template, corpus, text blocks) changes it; one that does not, does not."""
    h = hashlib.sha256(FINGERPRINT.encode() + b"\0" + attrs["tokenizer"]["fingerprint"].encode())
    for split in SPLITS:
        n, length = shapes[split]
        h.update(f"\0{split}\0{int(n)}x{int(length)}\0".encode() + digests[split].digest())
        if mask_digests is not None:  # conversations: which tokens are targets is part of the data
            h.update(b"target_mask" + mask_digests[split].digest())
    return "sha256:" + h.hexdigest()[:32]


def tokens_fingerprint(arrays: dict, attrs: dict, masks: dict | None = None) -> str:
    """The data fingerprint `prepare` records, recomputed from (N, L) arrays (numpy or zarr, read in blocks):
    `arrays` the input_ids per split, `masks` the target masks of conversations."""
    def digest(arr, dtype):
        h = hashlib.sha256()
        step = max(1, CHUNK_BYTES // (4 * max(1, arr.shape[1])))
        for start in range(0, arr.shape[0], step):
            h.update(np.ascontiguousarray(arr[start:start + step], dtype=dtype).tobytes())
        return h

    return _combine_fingerprint(attrs, {s: digest(arrays[s], np.int32) for s in SPLITS},
                                None if masks is None else {s: digest(masks[s], np.uint8) for s in SPLITS},
                                {s: arrays[s].shape for s in SPLITS})


def write_tokens(out: Path, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    """Write whole arrays as a tokens store, through a temporary sibling swapped in (never half-written)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for split, arr in arrays.items():
            w = SplitWriter(root.create_group(split), arr.shape[1], None)
            w.array.append(np.asarray(arr, dtype=np.int32), axis=0)
        root.attrs.update(attrs)  # attrs last: a group without them is not a tokens store
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """prepare replaces paths.tokens whole: only when it is a tokens store (or what is left of one), an empty
    folder or nothing, never a file or a folder of something else that paths.tokens names by mistake."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and (not any(out.iterdir()) or any((out / n).exists() for n in ("zarr.json", *SPLITS))):
        return
    raise DataError(f"paths.tokens={out} exists and is not a tokens store made by `distill-pipe prepare`; "
                    "set paths.tokens to a new location, or move it away")


def _clear_leftovers(out: Path) -> None:
    """What a killed prepare left beside `out`: its half-written `.tmp-<pid>` (removed) and, if it died
    between the two renames of `_swap_in`, the previous output as `.old-<pid>` (put back where `out` is
    missing, removed otherwise). Only leftovers of processes no longer running on this host are touched:
    another prepare may be writing its own."""
    for p in sorted(out.parent.glob(out.name + ".*-*")):
        kind, _, pid = p.name[len(out.name) + 1:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _running(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(p, out)
            log.warning("restored %s from %s, left by a prepare killed while swapping its output in", out, p.name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, left by a killed prepare", p)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _swap_in(tmp: Path, out: Path) -> None:
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
    if root.attrs.get("format") != TOKENS_FORMAT or any(s not in root or "input_ids" not in root[s] for s in SPLITS):
        raise DataError(f"{path} is not a complete tokens store made by `distill-pipe prepare`; rerun prepare")
    version = root.attrs.get("format_version", 1)
    if not isinstance(version, int) or version > TOKENS_FORMAT_VERSION:
        raise DataError(f"{path} has tokens format version {version}, this distill-pipe reads up to "
                        f"{TOKENS_FORMAT_VERSION}: upgrade distill-pipe, or rerun `distill-pipe prepare`")
    return root
