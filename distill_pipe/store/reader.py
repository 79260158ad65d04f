"""Reading a logit store: `open_store`, `LogitStore`, `TeacherBatch`.

Shapes: N sequences in a split, L seq_len, B batch, P = B*L flattened positions, V vocab, d hidden size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from distill_pipe import __version__
from distill_pipe.store.codecs import Codec, Head, make_codec
from distill_pipe.store.format import (DONE_ARRAY, FORMAT_NAME, FORMAT_VERSION, HEAD_GROUP, INPUT_IDS_ARRAY,
                                       MASKED_FORMAT_VERSION, REPAIR_HINT, TARGET_MASK_ARRAY, TRANSFORM_LOST_HINT,
                                       HeadCorruptError, NotAStoreError, StoreCorruptError, StoreError,
                                       StoreIncompleteError, StoreVersionError, head_attrs, incomplete_message,
                                       payload_keep, shard_key)
from distill_pipe.store.shards import RowRequest, ShardIndexCache, ShardLayout, read_rows


def is_url(path_or_url) -> bool:
    return "://" in str(path_or_url)


@dataclass
class TeacherBatch:
    """Compact teacher payload for B sequences; logits are formed chunk by chunk on the batch's device."""

    codec: Codec
    payload: dict[str, torch.Tensor]  # name -> (P, ...) compact rows, P = B*L
    head: Head | None
    batch_size: int
    seq_len: int

    @property
    def num_positions(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def device(self) -> torch.device:
        return next(iter(self.payload.values())).device

    def to(self, device, non_blocking: bool = False, head: Head | None = None) -> TeacherBatch:
        """The payload on `device`; head: the head already there (LogitStore.head_on), else it is copied too."""
        payload = {k: v.to(device, non_blocking=non_blocking) for k, v in self.payload.items()}
        if head is None and self.head is not None:
            head = self.head.to(device)
        return TeacherBatch(self.codec, payload, head, self.batch_size, self.seq_len)

    def logits(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """(end-start, V) float32 teacher logits (up to a constant per row) of flattened positions [start, end)."""
        end = self.num_positions if end is None else end
        if not 0 <= start <= end <= self.num_positions:
            raise ValueError(f"positions [{start}, {end}) are outside this batch's [0, {self.num_positions})")
        return self.codec.decode({k: v[start:end] for k, v in self.payload.items()}, self.head)

    def sparse_targets(self, start: int, end: int, temperature: float):
        """losses.SparseTargets of flattened positions [start, end) at `temperature` (sparse codecs only)."""
        if not 0 <= start <= end <= self.num_positions:
            raise ValueError(f"positions [{start}, {end}) are outside this batch's [0, {self.num_positions})")
        return self.codec.sparse_targets({k: v[start:end] for k, v in self.payload.items()}, temperature)


class LogitStore:
    """An opened logit store. Use `open_store` / `create_store` rather than the constructor."""

    def __init__(self, root: zarr.Group, location: str, mode: str, load_head: bool = True, check_head: bool = True):
        self._root = root
        self.location = location
        self.mode = mode
        info = dict(root.attrs)
        if info.get("format") != FORMAT_NAME:
            raise NotAStoreError(f"{location} is not a distill-pipe logit store (no format '{FORMAT_NAME}' "
                                 "in its attributes; an interrupted creation looks the same): recreate it")
        version = info.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreVersionError(f"{location} has store format version {version}, this distill-pipe "
                                    f"{__version__} reads up to {FORMAT_VERSION}: upgrade distill-pipe")
        _check_attributes(location, info)
        self.info = info
        try:
            self.codec: Codec = make_codec(info["codec"]["name"], **info["codec"]["params"])
        except ValueError as e:
            raise StoreCorruptError(f"{location}: its codec attribute is damaged ({e}); {ATTRS_HINT}") from None
        self._arrays: dict[str, zarr.Array] = {}
        self._present: set[tuple[str, int]] = set()  # (array path, shard) found on storage
        self._head: Head | None = None
        self._device_heads: dict[str, Head] = {}
        self._layouts: dict[str, dict[str, ShardLayout] | None] = {}  # split -> fast-path layouts (None: zarr's)
        self._shard_index = ShardIndexCache()
        self._known_done: dict[str, set[int]] = {}  # shards seen complete (they never become incomplete)
        self._specs = self.codec.payload_specs(self.vocab_size, self.hidden_size)
        self._check_shapes()
        if check_head:
            self._check_head_shape()
        if load_head:
            self.head  # noqa: B018 - load the head (and a factored codec's transforms) now
        elif check_head:  # a writer needs the codec's transforms only: the (V, d) head loads when first used
            self._transform()

    # ---- metadata -------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(self.info["splits"])

    @property
    def seq_len(self) -> int:
        return self.info["seq_len"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def hidden_size(self) -> int | None:
        return self.info.get("hidden_size")

    @property
    def shard_size(self) -> int:
        return self.info["shard_size"]

    @property
    def payload_names(self) -> list[str]:
        return list(self._specs)

    def _split_info(self, split: str) -> dict:
        if split not in self.info["splits"]:
            raise ValueError(f"split {split!r} is not in the store {self.location} (it has {self.splits})")
        return self.info["splits"][split]

    def num_sequences(self, split: str) -> int:
        return self._split_info(split)["num_sequences"]

    def num_shards(self, split: str) -> int:
        return self._split_info(split)["num_shards"]

    def shard_range(self, split: str, k: int) -> tuple[int, int]:
        """Sequence indices [start, stop) of shard k."""
        if not 0 <= k < self.num_shards(split):
            raise ValueError(f"{split} has shards 0..{self.num_shards(split) - 1}, not {k}")
        return k * self.shard_size, min((k + 1) * self.shard_size, self.num_sequences(split))

    def array(self, split: str, name: str) -> zarr.Array:
        """A split's zarr array (input_ids, done or a payload array); writable when opened with mode r+."""
        path = f"{split}/{name}"
        if path not in self._arrays:
            self._split_info(split)
            try:
                arr = self._root[path]
            except KeyError:
                raise StoreCorruptError(f"{self.location}: array {path} is missing") from None
            if self.mode != "r":
                # Each writer owns whole shards, so skipping the empty-chunk check is safe and ~2x faster.
                arr = arr.with_config({"write_empty_chunks": True})
            self._arrays[path] = arr
        return self._arrays[path]

    def input_ids(self, split: str) -> zarr.Array:
        """(N, L) int32 zarr array; slicing gives numpy."""
        return self.array(split, INPUT_IDS_ARRAY)

    def token_rows(self, split: str, mask: bool = False) -> CheckedRows | None:
        """The split's input_ids (or, with mask, its target mask: None for plain text) for reading rows in
        training and evaluation: a chunk that fails to read is a StoreCorruptError naming the repair."""
        arr = self.target_mask(split) if mask else self.input_ids(split)
        return None if arr is None else CheckedRows(arr, self.location)

    def target_mask(self, split: str) -> zarr.Array | None:
        """(N, L) uint8 zarr array, 1 where token t is a training target; None when every token is one
        (a store of plain text). The payload is only meaningful where the next token is a target."""
        self._split_info(split)
        if self.info["format_version"] < MASKED_FORMAT_VERSION:
            return None
        key = f"{split}/{TARGET_MASK_ARRAY}"
        if key not in self._arrays:
            if TARGET_MASK_ARRAY not in self._root[split]:
                return None
            self._arrays[key] = self._root[key]
        return self._arrays[key]

    def _check_shapes(self) -> None:
        for split in self.splits:
            n = self.num_sequences(split)
            mask = self.target_mask(split)
            if mask is not None and tuple(mask.shape) != (n, self.seq_len):
                raise StoreError(f"{self.location}: {split}/{TARGET_MASK_ARRAY} has shape {tuple(mask.shape)}, "
                                 f"expected {(n, self.seq_len)}")
            for name, spec in self._specs.items():
                want = (n, self.seq_len, *spec.trailing)
                got = tuple(self.array(split, name).shape)
                if got != want:
                    raise StoreError(f"{self.location}: payload {split}/{name} has shape {got} but the store's "
                                     f"attributes and codec {self.codec} say {want}")

    def _check_head_shape(self) -> None:
        if self.codec.name != "factored":
            return
        w = self._head_read("weight", lambda: self._root[f"{HEAD_GROUP}/weight"])
        want = (self.vocab_size, self.hidden_size)
        if tuple(w.shape) != want:
            raise StoreError(f"{self.location}: head/weight has shape {tuple(w.shape)} (V, d) but the payload "
                             f"hidden states need (V, d) = {want} (vocab_size {self.vocab_size}, hidden "
                             f"size {self.hidden_size}): payload and head come from different teachers")

    # ---- head -----------------------------------------------------------------------------------
    @property
    def head(self) -> Head | None:
        """The factored codec's output head (CPU, float32), loaded once; None for dense codecs."""
        if self.codec.name != "factored":
            return None
        if self._head is None:
            attrs = self._head_attrs()
            has_bias = attrs["bias"] if "bias" in attrs else "bias" in self._head_keys()  # older stores: none said
            self._head = Head(self._head_array("weight"), self._head_array("bias") if has_bias else None,
                              attrs.get("final_logit_softcapping"), attrs.get("logit_scale"), self._transform())
        return self._head

    def _head_read(self, part: str, read):
        """read() of one part of the head; missing or unreadable (a checksum, damaged JSON) raises HeadCorruptError
        naming the fix: the repair rebuilds the head from the teacher, except klt-int8's fitted transforms."""
        try:
            return read()
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to fetch, parse or decompress that part
            why = "is missing" if isinstance(e, KeyError) else f"is unreadable ({type(e).__name__}: {e})"
            fix = (TRANSFORM_LOST_HINT if part.endswith("transform") and self.codec.params.get("hidden_dtype") ==
                   "klt-int8" else REPAIR_HINT)
            raise HeadCorruptError(f"{self.location}: the teacher's head ({HEAD_GROUP}/{part}) {why}; {fix}", part,
                                   why) from e

    def _head_group(self) -> zarr.Group:
        return self._head_read("zarr.json", lambda: self._root[HEAD_GROUP])

    def _head_attrs(self) -> dict:
        return self._head_read("zarr.json", lambda: dict(self._head_group().attrs))

    def _head_keys(self) -> set[str]:
        return self._head_read("zarr.json", lambda: set(self._head_group().array_keys()))

    def _head_array(self, name: str) -> torch.Tensor:
        return self._head_read(name, lambda: torch.from_numpy(
            np.asarray(self._root[f"{HEAD_GROUP}/{name}"][...], dtype=np.float32)))

    def _transform(self) -> torch.Tensor | None:
        """A factored codec's fitted (d, d) transform, if it uses one; the opened store's codec gets it too,
        so it can encode more shards (resume) exactly as the first ones."""
        if self.codec.name != "factored" or not getattr(self.codec, "uses_transform", False):
            return None
        transform = self._head_array("transform")
        self.codec.enc_DD, self.codec.dec_DD = self._head_array("encode_transform"), transform
        return transform

    def head_problems(self, expected: dict) -> dict[str, str]:
        """What of the stored head is unreadable or differs from `expected` (create_store's head dict: the teacher's
        head, in any dtype), part -> why: "zarr.json" (the attributes), "weight", "bias", "transform" (both
        transforms, read and checked for shape and finite values: nothing else says what they must be). The
        stored weight is compared a block of rows at a time, never held whole."""
        problems: dict[str, str] = {}

        def check(part: str, compare) -> None:
            try:
                why = compare()
            except HeadCorruptError as e:
                why = e.why
            if why:
                problems[part] = why

        def attrs_differ() -> str | None:
            got, want = self._head_attrs(), head_attrs(expected)
            if "bias" not in got:  # a store from before that attribute: its arrays say
                del want["bias"]
            return None if got == want else f"holds the attributes {got}, the teacher's are {want}"

        check("zarr.json", attrs_differ)
        check("weight", lambda: self._head_rows_differ("weight", expected["weight"]))
        check("bias", lambda: self._head_rows_differ("bias", expected.get("bias")))
        if getattr(self.codec, "uses_transform", False):
            check("transform", self._transform_problem)
        return problems

    def _head_rows_differ(self, name: str, want) -> str | None:
        arr = self._head_read(name, lambda: self._root.get(f"{HEAD_GROUP}/{name}"))  # None: absent
        if want is None or arr is None:
            return None if want is None and arr is None else ("is missing" if arr is None else
                                                             "is there, and the teacher's head has none")
        if tuple(arr.shape) != tuple(want.shape):
            return f"has shape {tuple(arr.shape)}, the teacher's {tuple(want.shape)}"
        step = max(1, (64 << 20) // (4 * int(np.prod(arr.shape[1:], dtype=np.int64))))
        for a in range(0, arr.shape[0], step):
            got = self._head_read(name, lambda: np.asarray(arr[a:a + step]))
            rows = want[a:a + step]
            rows = (rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else
                    np.asarray(rows, dtype=np.float32))
            if not np.array_equal(got, rows):
                return f"differs from the teacher's (rows {a}-{min(a + step, arr.shape[0]) - 1})"
        return None

    def _transform_problem(self) -> str | None:
        got = self._transform()
        d = self.hidden_size
        if tuple(got.shape) != (d, d) or tuple(self.codec.enc_DD.shape) != (d, d):
            return f"has shape {tuple(got.shape)}, expected {(d, d)}"
        if not (torch.isfinite(got).all() and torch.isfinite(self.codec.enc_DD).all()):
            return "holds NaN/inf"
        return None

    def forget_head(self) -> None:
        """Drop the head read so far (after `writer.rewrite_head`): it is read afresh when next used, the codec's
        transforms now."""
        self._head = None
        self._device_heads.clear()
        self._transform()

    def head_on(self, device) -> Head | None:
        """The head on `device` with any transform folded in, made once per device (a training run moves it
        once, not per micro-batch); None for dense codecs."""
        if self.head is None:
            return None
        key = str(torch.device(device))
        if key not in self._device_heads:
            h = self.head
            w = h.effective_weight().to(device)
            self._device_heads[key] = Head(w, None if h.bias_V is None else h.bias_V.to(device),
                                           h.final_logit_softcapping, h.logit_scale)
        return self._device_heads[key]

    # ---- completion -----------------------------------------------------------------------------
    def completed_shards(self, split: str) -> set[int]:
        """Shards whose completion flag is set (read fresh from storage)."""
        done = set(np.flatnonzero(self.array(split, DONE_ARRAY)[:]).tolist())
        self._known_done[split] = done
        return set(done)

    def check_complete(self, split: str, shards=None) -> None:
        """Raise StoreIncompleteError naming the missing shards (of `shards`, default all)."""
        wanted = set(range(self.num_shards(split))) if shards is None else set(int(k) for k in shards)
        if wanted <= self._known_done.get(split, set()):
            return  # flags only ever go 0 -> 1: no need to re-read them for every batch
        missing = wanted - self.completed_shards(split)
        if missing:
            raise StoreIncompleteError(f"{self.location}: " + incomplete_message(split, missing,
                                                                                 self.num_shards(split)))

    def forget_shard(self, split: str, k: int) -> None:
        """Drop what this object cached about shard k (after its flag was cleared and objects deleted)."""
        self._known_done.get(split, set()).discard(k)
        self._present = {(path, j) for path, j in self._present if not (j == k and path.startswith(f"{split}/"))}
        for name, spec in self._specs.items():  # the fast path's cached shard index too
            self._shard_index.forget(shard_key(f"{split}/{name}", k, 2 + len(spec.trailing)))

    # ---- payload --------------------------------------------------------------------------------
    def _fast_layouts(self, split: str) -> dict[str, ShardLayout] | None:
        """The payload arrays' shard layouts when every one is what the fast path reads, else None."""
        if split not in self._layouts:
            layouts = {name: ShardLayout.parse(self.array(split, name)) for name in self._specs}
            ok = all(lay is not None and lay.shard_rows == self.shard_size for lay in layouts.values())
            self._layouts[split] = layouts if ok else None
        return self._layouts[split]

    def _corrupt(self, split: str, k: int, key: str, e: BaseException) -> StoreCorruptError:
        return StoreCorruptError(f"{self.location}: {split} shard {k} is corrupt ({key}: {type(e).__name__}: {e}); "
                                 f"{REPAIR_HINT}")

    def _read_rows_into(self, split: str, rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Fast path: global rows `rows` (distinct) of every payload array into out[name][i] (L, ...)."""
        layouts = self._fast_layouts(split)
        store = self._root.store_path.store if hasattr(self._root, "store_path") else self._root.store
        requests = [RowRequest(store, lay, int(g) // self.shard_size, int(g) % self.shard_size, out[name][i])
                    for i, g in enumerate(rows) for name, lay in layouts.items()]
        errors = read_rows(requests, self._shard_index)
        failed = sorted(((r.k, r.layout.key(r.k), e) for r, e in zip(requests, errors) if e is not None),
                        key=lambda t: t[0])
        for _, key, _ in failed:
            self._shard_index.forget(key)  # a repaired shard is read afresh
        if failed:
            k, key, e = failed[0]
            raise self._corrupt(split, k, key, e) from e

    def _read_shard_rows(self, split: str, k: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Payload rows (sorted global sequence indices, all inside shard k) -> name -> (n, L, ...)."""
        if self._fast_layouts(split) is not None:
            out = {name: np.empty((len(rows), self.seq_len, *spec.trailing), spec.dtype)
                   for name, spec in self._specs.items()}
            self._read_rows_into(split, np.asarray(rows), out)
            return out
        return self._read_shard_rows_zarr(split, k, rows)

    def _read_shard_rows_zarr(self, split: str, k: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        """_read_shard_rows through zarr's indexing (any array layout; what the fast path replaced)."""
        out = {}
        for name in self._specs:
            arr = self.array(split, name)
            key = shard_key(arr.path, k, arr.ndim)
            try:
                if (arr.path, k) not in self._present:
                    # A missing shard object would silently read back as fill values.
                    if not sync(arr.store_path.store.exists(key)):
                        raise FileNotFoundError("object not found")
                    self._present.add((arr.path, k))
                start, stop = int(rows[0]), int(rows[-1]) + 1
                if stop - start == len(rows):
                    out[name] = arr[start:stop]
                else:
                    out[name] = arr.oindex[rows]
            except Exception as e:  # any failure to fetch or decompress one shard object
                raise self._corrupt(split, k, key, e) from e
        return out

    def teacher_batch(self, split: str, indices: Sequence[int], pin_memory: bool = False,
                      fast: bool = True) -> TeacherBatch:
        """Compact CPU payload for sequences `indices` (any order, repeats allowed).

        pin_memory: in page-locked memory (for a non_blocking copy to the GPU; needs CUDA).
        fast=False reads through zarr's indexing instead of the fast path (store/shards.py), as a reference.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_sequences(split)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"sequence indices must be non-empty and in [0, {n}) for split {split}")
        shard_of = idx // self.shard_size
        self.check_complete(split, set(shard_of.tolist()))
        if fast and self._fast_layouts(split) is not None:
            return self._teacher_batch_fast(split, idx, pin_memory)
        uniq, inverse = np.unique(idx, return_inverse=True)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self._specs}
        uniq_shard = uniq // self.shard_size
        for k in np.unique(uniq_shard):
            for name, rows in self._read_shard_rows(split, int(k), uniq[uniq_shard == k]).items():
                parts[name].append(rows)
        payload = {}
        for name, spec in self._specs.items():
            rows_ULX = np.concatenate(parts[name])[inverse]  # (B, L, ...)
            payload[name] = torch.from_numpy(rows_ULX.reshape(idx.size * self.seq_len, *spec.trailing))
            if pin_memory:
                payload[name] = payload[name].pin_memory()
        return TeacherBatch(self.codec, payload, self.head, idx.size, self.seq_len)

    def _teacher_batch_fast(self, split: str, idx: np.ndarray, pin_memory: bool) -> TeacherBatch:
        # Each distinct sequence is decompressed once, straight into the row of its first occurrence.
        uniq, first = np.unique(idx, return_index=True)
        out, payload = {}, {}
        for name, spec in self._specs.items():
            t = torch.empty((idx.size, self.seq_len, *spec.trailing), dtype=_torch_dtype(spec.dtype),
                            pin_memory=pin_memory)
            out[name] = t.numpy()
            payload[name] = t.view(idx.size * self.seq_len, *spec.trailing)
        self._read_rows_into(split, uniq, {name: _RowsAt(a, first) for name, a in out.items()})
        if uniq.size < idx.size:  # repeats: copy from the first occurrence
            src = first[np.searchsorted(uniq, idx)]
            for a in out.values():
                for i in np.flatnonzero(src != np.arange(idx.size)):
                    a[i] = a[src[i]]
        return TeacherBatch(self.codec, payload, self.head, idx.size, self.seq_len)

    def logprobs(self, split: str, i: int) -> torch.Tensor:
        """(L, V) float32 log_softmax at T=1 of sequence i."""
        return torch.log_softmax(self.teacher_batch(split, [i]).logits(), -1)

    def verify(self, split: str | None = None, shards: Sequence[tuple[str, int]] | None = None,
               sample_positions: int = 8) -> list[tuple[str, int, str]]:
        """Read and decompress every shard (crc32c checksums), sanity-check its payload and input_ids, and
        decode `sample_positions` positions of it to logits (for factored: the matmul with the head).

        shards: only these (split, shard) pairs (default: all of `split`, or of every split).
        Returns (split, shard, problem) for each failing or unfinished shard; the others still read.
        """
        if shards is None:
            shards = [(s, k) for s in (self.splits if split is None else [split]) for k in range(self.num_shards(s))]
        done = {s: self.completed_shards(s) for s in {s for s, _ in shards}}
        failures = []
        for s, k in shards:
            if k not in done[s]:
                failures.append((s, k, "not written (incomplete)"))
                continue
            start, stop = self.shard_range(s, k)
            try:
                rows = self._read_shard_rows(s, k, np.arange(start, stop))
                ids = np.asarray(self.input_ids(s)[start:stop])
            except StoreCorruptError as e:
                failures.append((s, k, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - input_ids unreadable
                failures.append((s, k, f"input_ids rows {start}-{stop - 1} unreadable ({type(e).__name__}: {e})"))
                continue
            mask = self.target_mask(s)
            if mask is not None:  # the left-out positions are not payload: check the kept ones
                keep = payload_keep(mask[start:stop])
                rows = {name: a[keep][None] for name, a in rows.items()}
            problem = self.codec.check_payload(rows) or self._check_decoded(rows, sample_positions, seed=k)
            if problem is None and (ids.min() < 0 or ids.max() >= self.vocab_size):
                problem = f"input_ids hold ids outside the vocabulary [0, {self.vocab_size})"
            if problem:
                failures.append((s, k, problem))
        return failures

    def _check_decoded(self, rows: dict[str, np.ndarray], n: int, seed: int) -> str | None:
        """Decode n random positions of a shard's payload rows to logits: each needs a finite max, no NaN."""
        if n <= 0:
            return None
        flat = {name: a.reshape(-1, *a.shape[2:]) for name, a in rows.items()}
        total = next(iter(flat.values())).shape[0]
        pick = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
        logits_PV = self.codec.decode({name: torch.from_numpy(np.ascontiguousarray(a[pick]))
                                       for name, a in flat.items()}, self.head)
        if torch.isnan(logits_PV).any() or not torch.isfinite(logits_PV.max(-1).values).all():
            return f"decoded logits of {len(pick)} sampled positions hold NaN or no finite value"
        return None

    def __repr__(self) -> str:
        return f"LogitStore({self.location!r}, codec={self.codec}, splits={self.splits})"


ATTRS_HINT = "recreate the store with `distill-pipe teacher-logits --overwrite`"


def _check_attributes(location: str, info: dict) -> None:
    """The group attributes every read relies on, each of the right kind (a hand-edited or damaged zarr.json
    would otherwise fail later with a TypeError or KeyError)."""
    kinds = {"codec": dict, "splits": dict, "seq_len": int, "vocab_size": int, "shard_size": int}
    for key, kind in kinds.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise StoreCorruptError(f"{location}: its attribute {key!r} is missing or damaged (got "
                                    f"{str(info.get(key))[:40]!r}); {ATTRS_HINT}")
    codec = info["codec"]
    if not isinstance(codec.get("name"), str) or not isinstance(codec.get("params", {}), dict):
        raise StoreCorruptError(f"{location}: its attribute 'codec' is damaged (got {str(codec)[:60]!r}); "
                                f"{ATTRS_HINT}")


def open_group(path_or_url, mode: str, storage_options: dict | None = None) -> zarr.Group:
    if is_url(path_or_url):
        return zarr.open_group(str(path_or_url), mode=mode, storage_options=storage_options)
    return zarr.open_group(zarr.storage.LocalStore(str(path_or_url), read_only=(mode == "r")), mode=mode)


def open_store(path_or_url, mode: str = "r", storage_options: dict | None = None,
               load_head: bool = True, check_head: bool = True) -> LogitStore:
    """Open a store at a local path or fsspec URL (memory://, s3:// with s3fs); mode 'r' or 'r+'.
    load_head=False defers reading a factored store's (V, d) head until it is used (a writer never does).
    check_head=False (with load_head=False) opens a store whose head is damaged, leaving the head group unread
    until used: what `teacher-logits --repair` rewrites it through."""
    if mode not in ("r", "r+"):
        raise ValueError(f"open_store: mode must be 'r' or 'r+', got {mode!r}")
    try:
        root = open_group(path_or_url, mode, storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
            zarr.errors.ContainsArrayError) as e:
        raise NotAStoreError(f"{path_or_url} is not a distill-pipe logit store ({type(e).__name__}): "
                             "check the path, or create it with `distill-pipe teacher-logits`") from None
    return LogitStore(root, str(path_or_url), mode, load_head=load_head, check_head=check_head)


class CheckedRows:
    """A read-only (N, L) token array of a store (a zarr array: `a[...]`, `a.oindex[...]`, shape, dtype) whose
    failed reads name the store, the array and the fix: zarr alone says only "Stored and computed checksum do
    not match" for a truncated or damaged chunk. error, hint: what is raised and the fix it names (tokens.zarr's
    arrays, read by CE-only training, name `distill-pipe prepare`)."""

    def __init__(self, array: zarr.Array, location: str, error: type[Exception] = StoreCorruptError,
                 hint: str = REPAIR_HINT):
        self.array, self.location, self.error, self.hint = array, location, error, hint
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key) -> np.ndarray:
        return self._read(lambda: self.array[key])

    @property
    def oindex(self) -> _OIndex:
        return _OIndex(self)

    def _read(self, fn) -> np.ndarray:
        try:
            return fn()
        except (OSError, IndexError):  # the storage (a lost mount) or the caller's index: already one line
            raise
        except Exception as e:  # noqa: BLE001 - any failure to decompress or decode a chunk
            raise self.error(f"{self.location}: array {self.array.path} is unreadable ({type(e).__name__}: "
                             f"{e}); {self.hint}") from e


class _OIndex:
    def __init__(self, rows: CheckedRows):
        self.rows = rows

    def __getitem__(self, key) -> np.ndarray:
        return self.rows._read(lambda: self.rows.array.oindex[key])


class _RowsAt:
    """rows[i] -> array[at[i]]: a view of the output row that distinct sequence i decodes into."""

    def __init__(self, array: np.ndarray, at: np.ndarray):
        self.array, self.at = array, at

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[self.at[i]]


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
