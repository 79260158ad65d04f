"""Store format v2: names, constants, errors and the on-disk layout rules shared by writer and reader.

Layout (a Zarr v3 group; readable with `zarr` alone, see docs/store-format.md):

    <root>/zarr.json           group attributes (`info`): format, format_version, codec, shapes, lineage
    <root>/head/               factored codec only: weight (V, d) float32, [bias (V,)],
                               [encode_transform, transform (d, d)] for rotated/klt hidden dtypes; attributes
                               final_logit_softcapping, logit_scale, bias (whether head/bias exists);
                               each array checksummed (crc32c), as input_ids and target_mask
    <root>/<split>/input_ids   (N, L) int32
    <root>/<split>/<payload>   (N, L, ...) the codec's arrays, one zarr shard = `shard_size` whole sequences
    <root>/<split>/done        (num_shards,) uint8, one object per flag; 1 = shard k written completely
    <root>/<split>/target_mask (N, L) uint8, v2, only in stores of conversations (prepare's data.format chat
                               or prompt_completion): 1 where token t is a training target. The payload
                               at position t is kept only where target_mask[t + 1] is 1 (the position
                               predicting a target); elsewhere it holds a constant
                               (zeros; dense-u8: 255) that compresses to almost nothing and must not be read.

Versions: 1, the first; 2 adds `target_mask` and the payload left out (constant) where it is 0. A store is written with the lowest
version that describes it, so a store without a mask still says 1 and older readers read it; one with a
mask says 2, and a reader that knows only v1 refuses it ("store format version 2, ... reads up to 1:
upgrade distill-pipe") rather than train on the zeros.

The group attributes are written last at creation, so a half-created store has no `format` and is
refused as "not a store".
"""

FORMAT_NAME = "distill-pipe-logits"
FORMAT_VERSION = 2
MASKED_FORMAT_VERSION = 2
"""The first version with `target_mask` (and payload zeroed where the next token is not a target)."""
HEAD_GROUP = "head"
DONE_ARRAY = "done"
INPUT_IDS_ARRAY = "input_ids"
TARGET_MASK_ARRAY = "target_mask"
# Inner chunks of payload arrays hold at most this many bytes (uncompressed).
INNER_CHUNK_BYTES = 2 * 2**20
RESUME_HINT = "rerun `distill-pipe teacher-logits` to finish them"
# The one command that verifies every shard and recomputes only the broken ones (teacher.py).
REPAIR_HINT = "repair the store with `distill-pipe teacher-logits --repair`"


class StoreError(ValueError):
    """Any problem with a logit store that the user can act on."""


class NotAStoreError(StoreError):
    """The path holds no (completely created) distill-pipe logit store."""


class StoreVersionError(StoreError):
    """The store was written by a newer distill-pipe."""


class StoreIncompleteError(StoreError):
    """Some shards of a split have not been written yet."""


class StoreCorruptError(StoreError):
    """A shard's data cannot be read back."""


class HeadCorruptError(StoreCorruptError):
    """A factored store's head (weight, bias, attributes, transforms) is missing, unreadable or not the teacher's.
    part: which ("weight", "bias", "zarr.json" (attributes), "transform", ...); why: what is wrong with it."""

    def __init__(self, message: str, part: str | None = None, why: str | None = None):
        super().__init__(message)
        self.part, self.why = part, why


# klt-int8's transforms were fitted on the teacher's hidden states when the store was created; its payload is coded
# in their basis, and a refit need not give the same bits, so a store that lost them cannot be repaired.
TRANSFORM_LOST_HINT = ("the stored hidden states are coded in that fitted basis, which cannot be fitted again: "
                       "recompute the store with `distill-pipe teacher-logits --overwrite`")


def head_attrs(head: dict) -> dict:
    """The head group's attributes for a head dict (create_store's `head`). `bias` says whether head/bias exists, so
    a deleted bias is an error, not a head without one."""
    return {"final_logit_softcapping": head.get("final_logit_softcapping"), "logit_scale": head.get("logit_scale"),
            "bias": head.get("bias") is not None}


def format_ranges(indices) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    idx = sorted(set(int(i) for i in indices))
    parts: list[str] = []
    start = prev = None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ", ".join(parts)


def incomplete_message(split: str, missing, num_shards: int) -> str:
    word = "shard" if len(set(missing)) == 1 else "shards"
    return f"{split} {word} {format_ranges(missing)} of {num_shards} missing; {RESUME_HINT}"


def num_shards_for(num_sequences: int, shard_size: int) -> int:
    return -(-num_sequences // shard_size)


def shard_key(array_path: str, shard_index: int, ndim: int) -> str:
    """Store key of shard `shard_index` of a payload array (sharded along axis 0 only)."""
    return "/".join([array_path, "c", str(shard_index)] + ["0"] * (ndim - 1))


def inner_chunk_len(seq_len: int, row_bytes: int) -> int:
    """Positions per inner chunk: the largest divisor of seq_len whose chunk fits INNER_CHUNK_BYTES."""
    best = 1
    for n in range(1, seq_len + 1):
        if seq_len % n == 0 and n * row_bytes <= INNER_CHUNK_BYTES:
            best = n
    return best


def payload_keep(target_mask_NL):
    """(N, L) bool: positions whose payload a store keeps, those predicting a target (mask[:, t + 1] == 1)."""
    import numpy as np

    m = np.asarray(target_mask_NL)
    keep = np.zeros(m.shape, dtype=bool)
    keep[:, :-1] = m[:, 1:] != 0
    return keep
