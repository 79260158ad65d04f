"""Writing a logit store: `create_store` (all metadata, once, before any worker) and `ShardWriter`.

A writer owns whole shards: zarr rewrites a whole shard object on every write, so two writers touching
one shard silently lose rows (DESIGN.md). Shard k's `done[k] = 1` is written after its data; resume
trusts only that flag.
"""

from __future__ import annotations

import errno
import queue
import threading
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from distill_pipe import __version__
from distill_pipe.store.codecs import Codec, make_codec
from distill_pipe.store.codecs.base import zstd_crc
from distill_pipe.store.format import (DONE_ARRAY, FORMAT_NAME, HEAD_GROUP, INPUT_IDS_ARRAY, MASKED_FORMAT_VERSION,
                                       TARGET_MASK_ARRAY, StoreError, head_attrs, inner_chunk_len, num_shards_for,
                                       payload_keep, shard_key)
from distill_pipe.store.reader import LogitStore, open_group, open_store

RESERVED_ATTRS = ("format", "format_version", "codec", "shard_size", "seq_len", "vocab_size", "hidden_size",
                  "splits", "versions", "created")


def _versions() -> dict:
    out = {"distill-pipe": __version__}
    for pkg in ("torch", "transformers", "zarr", "numcodecs"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _np(x) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16


def create_store(path_or_url, *, attrs: dict, splits: dict[str, np.ndarray], codec: Codec | str,
                 shard_size: int, vocab_size: int, hidden_size: int | None = None, head: dict | None = None,
                 overwrite: bool = False, storage_options: dict | None = None,
                 target_masks: dict[str, np.ndarray] | None = None) -> LogitStore:
    """Create the whole store layout (attributes last) and return it opened for writing (mode r+).

    attrs: lineage (teacher, tokenizer, data, ...) recorded as group attributes.
    splits: split name -> input_ids (N, L) integer array, copied into the store.
    head (factored only): {"weight": (V, d), "bias": (V,) | None, "final_logit_softcapping": float | None,
    "logit_scale": float | None}.
    target_masks: split name -> (N, L) target mask (conversations): copied as `<split>/target_mask`; the
    payload is then written only where the next token is a target (zeros elsewhere) and the store is v2.
    """
    codec = make_codec(codec) if isinstance(codec, str) else codec
    if not splits:
        raise ValueError("create_store: no splits given")
    if shard_size < 1:
        raise ValueError(f"create_store: shard_size must be >= 1, got {shard_size}")
    clash = sorted(set(attrs) & set(RESERVED_ATTRS))
    if clash:
        raise ValueError(f"create_store: attrs may not set the reserved keys {clash}")
    # an array-like with shape and dtype (e.g. tokens.zarr's zarr array) is copied a block at a time, never whole
    ids = {name: a if hasattr(a, "shape") and hasattr(a, "dtype") and not isinstance(a, torch.Tensor) else _np(a)
           for name, a in splits.items()}
    seq_lens = {a.shape[1] if a.ndim == 2 else None for a in ids.values()}
    if len(seq_lens) != 1 or None in seq_lens or any(a.dtype.kind not in "iu" for a in ids.values()):
        raise ValueError("create_store: every split's input_ids must be a 2-D integer (N, L) array with one L")
    seq_len = seq_lens.pop()
    masks = {name: a if hasattr(a, "shape") and not isinstance(a, torch.Tensor) else _np(a)
             for name, a in (target_masks or {}).items()}  # zarr arrays are copied a block at a time, below
    if masks and (set(masks) != set(ids) or any(tuple(masks[n].shape) != tuple(ids[n].shape) for n in ids)):
        raise ValueError("create_store: target_masks must hold one (N, L) mask per split, shaped like its input_ids")
    if codec.name == "factored":
        if head is None or hidden_size is None:
            raise ValueError("create_store: the factored codec needs head={'weight': ...} and hidden_size")
        weight = head["weight"]  # any dtype, torch or numpy: written as float32 a block of rows at a time
        if tuple(weight.shape) != (vocab_size, hidden_size):
            raise StoreError(f"create_store: head weight has shape {tuple(weight.shape)} but vocab_size, hidden_size "
                             f"= ({vocab_size}, {hidden_size})")
        bias = None if head.get("bias") is None else _np(head["bias"]).astype(np.float32)
        if bias is not None and bias.shape != (vocab_size,):
            raise StoreError(f"create_store: head bias has shape {bias.shape}, expected ({vocab_size},)")
    elif head is not None:
        raise ValueError(f"create_store: codec {codec.name} stores no head; pass head=None")
    specs = codec.payload_specs(vocab_size, hidden_size)

    try:
        root = open_group(path_or_url, "w" if overwrite else "w-", storage_options)
    except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
        try:
            open_store(path_or_url, storage_options=storage_options)
        except StoreError:
            raise StoreError(f"{path_or_url} is not empty: choose another path or pass overwrite=True") from None
        raise StoreError(f"{path_or_url} already holds a store: open it with mode='r+' to resume, or "
                         "pass overwrite=True") from None

    if codec.name == "factored":
        g = root.create_group(HEAD_GROUP, attributes=head_attrs(head))
        write_head_weight(g, weight)
        if bias is not None:
            write_head_array(g, "bias", bias)
        transforms = codec.transforms(hidden_size)
        if transforms is not None:
            write_head_array(g, "encode_transform", transforms[0].numpy())
            write_head_array(g, "transform", transforms[1].numpy())

    split_attrs = {}
    for name, input_ids in ids.items():
        n = input_ids.shape[0]
        k = num_shards_for(n, shard_size)
        split_attrs[name] = {"num_sequences": n, "num_shards": k}
        g = root.create_group(name)
        z = g.create_array(INPUT_IDS_ARRAY, shape=(n, seq_len), dtype=np.int32, chunks=(max(1, min(n, shard_size)), seq_len),
                           compressors=zstd_crc())
        step = max(1, min(n, shard_size)) * max(1, (4 << 20) // (4 * seq_len * max(1, min(n, shard_size))))
        for start in range(0, n, step):
            z[start:start + step] = np.asarray(input_ids[start:start + step]).astype(np.int32)
        if masks:
            zm = g.create_array(TARGET_MASK_ARRAY, shape=(n, seq_len), dtype=np.uint8,
                                chunks=(max(1, min(n, shard_size)), seq_len), compressors=zstd_crc())
            for start in range(0, n, step):
                zm[start:start + step] = (np.asarray(masks[name][start:start + step]) != 0).astype(np.uint8)
        for pname, spec in specs.items():
            row_bytes = int(np.prod(spec.trailing, dtype=np.int64)) * spec.dtype.itemsize
            inner = (1, inner_chunk_len(seq_len, row_bytes), *spec.trailing)
            g.create_array(pname, shape=(n, seq_len, *spec.trailing), dtype=spec.dtype, chunks=inner,
                           shards=(shard_size, seq_len, *spec.trailing), filters=list(spec.filters),
                           compressors=list(spec.compressors), fill_value=0,
                           dimension_names=("sequence", "position", *[f"x{i}" for i in range(len(spec.trailing))]))
        # One object per flag and no sharding: concurrent writers of different shards never collide.
        g.create_array(DONE_ARRAY, shape=(k,), dtype=np.uint8, chunks=(1,), fill_value=0, compressors=None)

    # The lowest version that describes the store: one without a mask stays readable by v1 readers.
    info = {**attrs, "format": FORMAT_NAME, "format_version": MASKED_FORMAT_VERSION if masks else 1,
            "codec": {"name": codec.name, "params": codec.params}, "shard_size": shard_size,
            "seq_len": seq_len, "vocab_size": vocab_size, "hidden_size": hidden_size, "splits": split_attrs,
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    root.attrs.update(info)  # last: only now does the path open as a store
    store = LogitStore(root, str(path_or_url), "r+")
    return store


# The head's arrays and input_ids carry a crc32c like the payload: without one, damaged zstd bytes of float32
# rows (stored nearly raw) read back as other numbers, and a store would train on a wrong head without a word.
def write_head_weight(g: zarr.Group, weight) -> None:
    """head/weight (V, d) float32 from `weight` (any dtype, torch or numpy), ~64 MB of rows per write: a teacher's
    head in bf16 is never copied whole to float32."""
    vocab_size, hidden_size = weight.shape
    rows = max(1, min(vocab_size, 2**20 // (4 * hidden_size)))
    w = g.create_array("weight", shape=(vocab_size, hidden_size), dtype=np.float32, chunks=(rows, hidden_size),
                       compressors=zstd_crc(), overwrite=True)
    block = rows * max(1, (64 << 20) // (4 * hidden_size * rows))
    for start in range(0, vocab_size, block):
        w[start:start + block] = _np(weight[start:start + block]).astype(np.float32)


def write_head_array(g: zarr.Group, name: str, data: np.ndarray) -> None:
    """A small head array (bias, transforms), replacing any old one."""
    g.create_array(name, data=np.asarray(data, dtype=np.float32), compressors=zstd_crc(), overwrite=True)


def rewrite_head(store: LogitStore, head: dict, parts) -> None:
    """Rewrite `parts` of a factored store's head (`LogitStore.head_problems`' names) from `head` (create_store's
    head dict, the teacher's), leaving the other parts as they are: "zarr.json" (the attributes; written without
    touching the arrays beside it), "weight", "bias", "transform" (a rotation's, made again from its seed: the same
    bits with the same LAPACK, else a rotation that differs at float32 rounding; klt-int8's cannot be made again:
    the caller refuses)."""
    if store.mode == "r":
        raise ValueError(f"{store.location} is open read-only; open it with mode='r+' to write")
    root = store._root
    if "zarr.json" in parts:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.group import GroupMetadata

        for key, buf in GroupMetadata(attributes=head_attrs(head)).to_buffer_dict(default_buffer_prototype()).items():
            sync((root.store_path / HEAD_GROUP / key).set(buf))
    g = root[HEAD_GROUP]
    if "weight" in parts:
        write_head_weight(g, head["weight"])
    if "bias" in parts:
        if head.get("bias") is None:
            sync((root.store_path / HEAD_GROUP / "bias").delete_dir())
        else:
            write_head_array(g, "bias", _np(head["bias"]))
    if "transform" in parts:
        if store.codec.params.get("hidden_dtype") == "klt-int8":
            raise StoreError(f"{store.location}: klt-int8's transforms cannot be rebuilt")
        enc, dec = make_codec(store.codec.name, **store.codec.params).transforms(store.hidden_size)
        write_head_array(g, "encode_transform", enc.numpy())
        write_head_array(g, "transform", dec.numpy())
    store.forget_head()


def write_shard(store: LogitStore, split: str, k: int, payload: dict) -> None:
    """Write shard k's payload (name -> (n_k, L, ...) for the whole shard), then mark it done.

    The shard's old objects are deleted first (`clear_shard`): zarr reads a shard object before rewriting it
    (to keep inner chunks not written), so a damaged one left by a kill or a full disk would fail the write
    that replaces it.

    In a store with a target mask, the payload's rows at positions that predict no target are overwritten
    in place (the caller's arrays/tensors included) with each array's `masked_fill` (zeros by default)."""
    if store.mode == "r":
        raise ValueError(f"{store.location} is open read-only; open it with mode='r+' to write")
    start, stop = store.shard_range(split, k)
    specs = store.codec.payload_specs(store.vocab_size, store.hidden_size)
    if set(payload) != set(specs):
        raise ValueError(f"shard {k}: payload has arrays {sorted(payload)}, codec {store.codec.name} "
                         f"writes {sorted(specs)}")
    arrays = {}
    for name, spec in specs.items():
        a = _np(payload[name])
        want = (stop - start, store.seq_len, *spec.trailing)
        if a.shape != want or a.dtype != spec.dtype:
            raise ValueError(f"{split} shard {k}: {name} is {a.shape} {a.dtype}, expected {want} {spec.dtype}")
        arrays[name] = a
    clear_shard(store, split, k)
    mask = store.target_mask(split)
    if mask is not None:
        # Positions that predict no target hold a constant (zeros, or the codec's masked_fill): zstd stores
        # a run of it in a few bytes, whatever the codec, so the store pays only for the positions trained
        # on (docs/chat.md).
        keep_nL = payload_keep(mask[start:stop])
        for name, a in arrays.items():
            a = arrays[name] = a if a.flags.writeable else a.copy()
            a[~keep_nL] = specs[name].masked_fill  # in place: a copy of a dense shard would double its memory
    for name, a in arrays.items():
        store.array(split, name)[start:stop] = a
    store.array(split, DONE_ARRAY)[k] = 1


def clear_shard(store: LogitStore, split: str, k: int) -> None:
    """Mark shard k unwritten (flag first, so a kill leaves it 'to compute') and delete its payload objects,
    so the next write starts from nothing (a partial last shard would otherwise be read, corrupt, and merged)."""
    store.array(split, DONE_ARRAY)[k] = 0
    for name in store.payload_names:
        arr = store.array(split, name)
        sync(arr.store_path.store.delete(shard_key(arr.path, k, arr.ndim)))
    store.forget_shard(split, k)


def rewrite_input_ids(store: LogitStore, split: str, k: int, rows: np.ndarray) -> None:
    """Replace shard k's input_ids rows (their own chunk), deleting the chunk first: it may be unreadable."""
    arr = store.input_ids(split)
    sync(arr.store_path.store.delete(shard_key(arr.path, k, arr.ndim)))
    start, stop = store.shard_range(split, k)
    arr[start:stop] = rows.astype(np.int32)


def write_error(store: LogitStore, split: str, e: BaseException) -> StoreError:
    """The one-line error for a failed shard write, naming the fix; the shards finished before it are kept."""
    what = f"writing {split} shards of {store.location} failed ({type(e).__name__}: {e})"
    if isinstance(e, PermissionError) or getattr(e, "errno", None) == errno.EROFS:
        fix = "make it writable (or set paths.logits to a writable location)"
    elif isinstance(e, OSError):  # a full disk, a file too large, a lost mount
        fix = "free space (or fix the storage)"
    else:
        fix = "check the storage"
    return StoreError(f"{what}; {fix} and rerun `distill-pipe teacher-logits`: the finished shards are kept")


class ShardWriter:
    """Writes whole shards from a background thread so encoding/IO overlap the teacher's compute.

    `submit` blocks once `max_queue` shards wait (bounding memory); a writer error is re-raised by the
    next `submit` or by `close`. zarr compresses a shard's inner chunks in its own thread pool
    (`zarr.config` threading.max_workers; blosc's threads are off under zarr).
    """

    def __init__(self, store: LogitStore, split: str, max_queue: int = 2):
        if store.mode == "r":
            raise ValueError(f"{store.location} is open read-only; open it with mode='r+' to write")
        store.num_shards(split)  # validates the split name now, not in the thread
        self.store = store
        self.split = split
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._closed = False
        self.shards_written = 0
        self._thread = threading.Thread(target=self._run, name=f"ShardWriter-{split}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after an error, drain so submit() never blocks forever
                try:
                    write_shard(self.store, self.split, *item)
                    self.shards_written += 1
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = e

    def _raise_error(self) -> None:
        if self._error is not None:
            raise write_error(self.store, self.split, self._error) from self._error

    def submit(self, shard_index: int, payload: dict) -> None:
        """Queue shard `shard_index`'s payload (name -> CPU tensor/array for the whole shard)."""
        if self._closed:
            raise RuntimeError("ShardWriter.submit after close()")
        self._raise_error()
        self.store.shard_range(self.split, shard_index)  # bad index: fail here, in the caller
        self._queue.put((int(shard_index), payload))

    def close(self) -> None:
        """Wait for queued shards and re-raise any writer error."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        self._raise_error()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the body's error wins; still stop the thread
            try:
                self.close()
            except StoreError:
                pass
