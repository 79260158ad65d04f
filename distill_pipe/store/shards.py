"""The fast read path: whole sequences of sharded payload arrays, straight from their shard objects.

zarr's own indexing re-reads a shard's index for every selection, gathers scattered rows through
orthogonal indexing (10-20x slower than a contiguous slice, benchmarks/read_path.py) and copies each
chunk through intermediate buffers. Here a shard's index is read once per opened store (shards marked
done never change), the inner chunks of all requested rows of all payload arrays are fetched together
(adjacent chunks of a row in one ranged get; concurrent gets, which is what object storage needs) and
each chunk is checksummed and decompressed in a thread pool straight into its place in the output (which
may be pinned memory). Both steps release the GIL, so reading in the background leaves the training
thread free: numcodecs while it decompresses, and the checksum is computed by `crc32c` rather than
`google_crc32c`, which holds the GIL throughout (a thread launching small torch ops ran 6x to 2,400x
slower beside it in benchmarks/read_path.py's contention probe; 1.1-1.2x beside crc32c).

Only the layout that `create_store` writes is read here (zarr v3 sharding along axis 0, index at the end
with crc32c, inner chunks (1, c, *trailing) of blosc/zstd/crc32c bytes, optionally transposed); any other
array metadata makes `ShardLayout.parse` return None and the caller falls back to zarr's indexing.
Shapes: S sequences per shard, L positions, c positions per inner chunk, X the trailing payload dims.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import crc32c
import numcodecs
import numpy as np
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from distill_pipe.store.format import shard_key

EMPTY = 2**64 - 1  # an index entry of a chunk never written (it reads as the fill value)
_ZSTD, _BLOSC = numcodecs.Zstd(), numcodecs.Blosc()  # decoding keeps no state: one of each serves every thread


def _crc(data: np.ndarray) -> bytes:
    """crc32c of a contiguous uint8 array as zarr stores it (4 bytes little-endian); the GIL is released throughout."""
    return crc32c.crc32c(memoryview(data), gil_release_mode=1).to_bytes(4, "little")


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_threads() -> int:
    """Threads that decompress: DISTILL_PIPE_READ_THREADS, else the CPUs this process may use shared among the
    ranks on this host (torchrun's LOCAL_WORLD_SIZE), so eight ranks on a node do not run eight pools of
    every core each."""
    env = os.environ.get("DISTILL_PIPE_READ_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="store-decode")
        return _pool


@dataclass(frozen=True)
class ShardLayout:
    """How one payload array's shard objects are laid out (parsed from its zarr metadata)."""

    path: str
    ndim: int
    shard_rows: int  # S
    seq_len: int  # L
    chunk_len: int  # c
    trailing: tuple[int, ...]
    dtype: np.dtype
    fill_value: object
    transpose: tuple[int, ...] | None  # the TransposeCodec order (encoded = chunk.transpose(order)), if any
    bytes_codecs: tuple  # bytes -> bytes codecs, in encoding order

    @classmethod
    def parse(cls, arr) -> ShardLayout | None:
        meta = arr.metadata
        codecs = getattr(meta, "codecs", ())
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sh = codecs[0]
        inner = tuple(sh.chunk_shape)
        shard = tuple(meta.chunk_grid.chunk_shape)
        if (getattr(sh.index_location, "value", sh.index_location) != "end" or len(inner) < 2 or inner[0] != 1
                or tuple(inner[2:]) != tuple(shard[2:]) or shard[1] % inner[1]
                or [type(c) for c in sh.index_codecs] != [BytesCodec, Crc32cCodec]):
            return None
        transpose, bb, seen_bytes = None, [], False
        for c in sh.codecs:
            if isinstance(c, TransposeCodec) and not seen_bytes and transpose is None:
                transpose = tuple(int(i) for i in c.order)
            elif isinstance(c, BytesCodec) and not seen_bytes:
                endian = getattr(c.endian, "value", c.endian)
                if endian not in (None, "little"):
                    return None
                seen_bytes = True
            elif isinstance(c, (BloscCodec, ZstdCodec, Crc32cCodec)) and seen_bytes:
                bb.append(c)
            else:
                return None
        dtype = np.dtype(arr.dtype)
        if dtype.itemsize > 1 and dtype.byteorder == ">":
            return None
        return cls(arr.path, arr.ndim, shard[0], shard[1], inner[1], tuple(inner[2:]), dtype, meta.fill_value,
                   transpose, tuple(bb))

    @property
    def chunks_per_row(self) -> int:
        return self.seq_len // self.chunk_len

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows * self.chunks_per_row

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_len * int(np.prod(self.trailing, dtype=np.int64)) * self.dtype.itemsize

    def key(self, k: int) -> str:
        return shard_key(self.path, k, self.ndim)

    def decode_into(self, data: np.ndarray, dest: np.ndarray) -> None:
        """One inner chunk's stored bytes (uint8) -> dest (c, *X), checksums verified (ValueError on a mismatch)."""
        out = dest.reshape(-1).view(np.uint8)
        codecs = list(self.bytes_codecs)
        while codecs:
            c = codecs.pop()
            last = not codecs and self.transpose is None  # the final step may write straight into dest
            if isinstance(c, Crc32cCodec):
                body = data[:-4]
                if len(data) < 4 or _crc(body) != data[-4:].tobytes():
                    raise ValueError("checksum mismatch")
                data = body
                continue
            decoder = _ZSTD if isinstance(c, ZstdCodec) else _BLOSC
            if last:
                decoder.decode(data, out=out)
                return
            data = np.frombuffer(decoder.decode(data), np.uint8)
        if len(data) != self.chunk_bytes:
            raise ValueError(f"chunk holds {len(data)} bytes, expected {self.chunk_bytes}")
        if self.transpose is None:
            out[:] = data
            return
        shape = (1, self.chunk_len, *self.trailing)
        encoded = data.view(self.dtype).reshape([shape[i] for i in self.transpose])
        dest.reshape(shape)[...] = encoded.transpose(np.argsort(self.transpose))


class ShardIndexCache:
    """Shard indexes (offset, nbytes per inner chunk) read once per opened store: finished shards never change."""

    def __init__(self):
        self._index: dict[str, np.ndarray] = {}

    async def get(self, store, layout: ShardLayout, k: int) -> np.ndarray:
        key = layout.key(k)
        if key not in self._index:
            n = layout.chunks_per_shard
            size = n * 16 + 4
            buf = await store.get(key, default_buffer_prototype(), byte_range=SuffixByteRequest(size))
            if buf is None:
                raise FileNotFoundError("object not found")
            raw = buf.as_numpy_array().view(np.uint8)
            if raw.size != size or _crc(raw[:-4]) != raw[-4:].tobytes():
                raise ValueError("shard index checksum mismatch (truncated or overwritten)")
            self._index[key] = raw[:-4].view("<u8").reshape(n, 2).copy()
        return self._index[key]

    def forget(self, key: str) -> None:
        self._index.pop(key, None)


@dataclass
class RowRequest:
    """Read row `row` (0..S-1) of shard k of an array into dest (L, *X)."""

    store: object
    layout: ShardLayout
    k: int
    row: int
    dest: np.ndarray


async def _read_row(req: RowRequest, cache: ShardIndexCache, pool: ThreadPoolExecutor) -> None:
    lay = req.layout
    index = await cache.get(req.store, lay, req.k)
    first = req.row * lay.chunks_per_row
    entries = index[first:first + lay.chunks_per_row]
    dest_CX = req.dest.reshape(lay.chunks_per_row, lay.chunk_len, *lay.trailing)
    loop = asyncio.get_running_loop()
    jobs = []
    # Runs of chunks stored back to back are fetched with one ranged get.
    j = 0
    while j < len(entries):
        off, nb = int(entries[j, 0]), int(entries[j, 1])
        if off == EMPTY:
            dest_CX[j] = lay.fill_value
            j += 1
            continue
        end, stop = off + nb, j + 1
        while stop < len(entries) and int(entries[stop, 0]) == end:
            end += int(entries[stop, 1])
            stop += 1
        jobs.append(_fetch_and_decode(req, off, end, range(j, stop), entries, dest_CX, loop, pool))
        j = stop
    await asyncio.gather(*jobs)


async def _fetch_and_decode(req, start, end, chunks, entries, dest_CX, loop, pool) -> None:
    buf = await req.store.get(req.layout.key(req.k), default_buffer_prototype(), byte_range=RangeByteRequest(start, end))
    if buf is None:
        raise FileNotFoundError("object not found")
    data = buf.as_numpy_array().view(np.uint8)
    if len(data) != end - start:
        raise ValueError(f"read {len(data)} bytes of a {end - start}-byte range (truncated shard)")
    decodes = []
    for j in chunks:
        a = int(entries[j, 0]) - start
        decodes.append(loop.run_in_executor(pool, req.layout.decode_into, data[a:a + int(entries[j, 1])], dest_CX[j]))
    await asyncio.gather(*decodes)


def read_rows(requests: list[RowRequest], cache: ShardIndexCache) -> list[BaseException | None]:
    """Run every request concurrently; returns per request None or the exception it raised."""
    pool = decode_pool()

    async def run():
        return await asyncio.gather(*[_read_row(r, cache, pool) for r in requests], return_exceptions=True)

    return list(sync(run()))
