"""The store's manifest: a small local JSON file that stands for a complete store in DVC's lineage.

DVC hashes every file of an output and of a dependency; for a store of terabytes that is hours on every
`dvc status`, and a store on object storage cannot be a DVC output at all. So the teacher stage's DVC
output is this manifest instead of the store, and the students depend on it. Its content is what the
store *means* (where it lies, the lineage it was made from, its format and shape) and that it is complete,
and nothing else (no creation time, no package versions): it changes exactly when a student's input would,
so a store deleted and recomputed from the same inputs does not retrain the students.

It is written (atomically) only once every shard of every split is flagged done, so its presence says "this
store was complete". The store can still be deleted or damaged afterwards without DVC noticing; readers
(`open_manifested_store`) then fail with a one-line error that names the rerun that finishes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distill_pipe.store.format import FORMAT_NAME, HeadCorruptError, NotAStoreError, StoreError
from distill_pipe.store.reader import LogitStore, open_store

MANIFEST_FORMAT = "distill-pipe-logits-manifest"
# What DVC reruns when the store behind a manifest is gone or unfinished.
RERUN_HINT = "rerun `distill-pipe teacher-logits` (under DVC: `dvc repro --force --single-item teacher_logits`)"


class ManifestMismatchError(StoreError):
    """The store was made from other inputs than its manifest says."""


def _identity(store: LogitStore) -> dict:
    """What the store means: where it lies, what it was made from, its format and shape."""
    info = store.info
    data = info.get("data") or {}
    return {
        "format": MANIFEST_FORMAT,
        "store": _location(store.location),
        "store_format": {"name": FORMAT_NAME, "version": info["format_version"]},
        "teacher": info.get("teacher"),
        "tokenizer": info.get("tokenizer"),
        # the data's fingerprint, not where tokens.zarr lies (moving it does not change the store)
        "data": {"fingerprint": data.get("fingerprint")},
        "codec": info["codec"],
        "seq_len": info["seq_len"],
        "shard_size": info["shard_size"],
        "vocab_size": info["vocab_size"],
        "hidden_size": info.get("hidden_size"),
    }


def _location(location) -> str:
    return str(location).rstrip("/")


def manifest_of(store: LogitStore) -> dict:
    """The manifest of a complete store (raises StoreIncompleteError naming the missing shards otherwise)."""
    for split in store.splits:
        store.check_complete(split)
    return {**_identity(store),
            "splits": {s: {"num_sequences": store.num_sequences(s), "num_shards": store.num_shards(s),
                           "shards_done": len(store.completed_shards(s))} for s in store.splits},
            "complete": True}


def write_manifest(path, store: LogitStore) -> dict:
    """Write `store`'s manifest to the local file `path` atomically (a reader sees the old file or the new
    one, never a torn one) and return it."""
    manifest = manifest_of(store)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def read_manifest(path) -> dict | None:
    """The manifest at `path`, or None when there is none (or it is not a manifest)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _same(a, b) -> bool:
    """Equal after a JSON round trip (tuples become lists)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def open_manifested_store(location: str, manifest_path, splits=None) -> LogitStore:
    """Open the store at `location` for reading and check that `splits` (default all) are complete.

    When the manifest at `manifest_path` describes this location (as under `dvc repro`), the error for a
    store that is missing or incomplete names the rerun that fixes it (DVC's record says complete, so DVC
    will not rerun the teacher by itself), and one made from other inputs than the manifest says raises
    ManifestMismatchError.
    Without such a manifest (stages run by hand, other locations) the store's own completion flags decide.
    """
    manifest = read_manifest(manifest_path)
    if manifest is not None and manifest.get("store") != _location(location):
        manifest = None
    try:
        store = open_store(location)
        for split in store.splits if splits is None else splits:
            if split not in store.splits:
                raise StoreError(f"store {location} has no {split} split; rerun `distill-pipe teacher-logits`")
            store.check_complete(split)
    except StoreError as e:
        if manifest is None or isinstance(e, HeadCorruptError):  # a damaged head: its message names the repair
            raise
        problem = f"{location} is missing" if isinstance(e, NotAStoreError) else str(e).split(";")[0]
        # the same error class (callers tell incomplete from missing), with the rerun DVC will not do itself
        raise type(e)(f"{problem}, though {manifest_path} says it is complete (deleted or damaged since): "
                      f"{RERUN_HINT}") from None
    if manifest is not None:
        differ = [k for k, v in _identity(store).items() if not _same(v, manifest.get(k))]
        if differ:
            raise ManifestMismatchError(f"{location} differs from {manifest_path} in {', '.join(differ)} (it was "
                                        f"rewritten outside `dvc repro`): {RERUN_HINT}")
    return store
