"""Checkpoints of one training run, and the best model published beside them.

`Checkpointer` owns `<out>/checkpoints/`: folders `step-NNNNNN` (ordered by step NUMBER, never as strings),
each holding model and optimizer (torch.distributed.checkpoint, DCP: sharded under FSDP), every rank's RNG
state, the trainer's own state with the run's config fingerprint (`trainer.pt`, written last: its presence
marks a complete folder), `meta.json` (step, best step) and a copy of the folders the run asks to carry (its
metrics history up to that step, restored on resume). A save is written to a temporary folder and renamed,
and the `latest` pointer file is replaced atomically, so a kill during a save leaves the previous checkpoint
usable; temp folders of interrupted saves are removed on the next start.

Nothing in a checkpoint runs code when it is read: trainer.pt and the RNG files hold only tensors, numbers,
strings, lists and dicts (numpy's and Python's RNG states as tensors and lists) and load with
`torch.load(weights_only=True)`; DCP's own files are read through a reader and planner of `_safe_dcp`
(its pickled index unpickled against an allowlist of DCP's metadata classes, its non-tensor values with
weights_only). A file holding anything else (a checkpoint of distill-pipe 0.1, whose numpy RNG state was
pickled, or one made to run code) is refused with a one-line `CheckpointError` before anything is changed.

A finished run (its last step taken, or stopped early) keeps, once its best model is exported
(`Checkpointer.finish`, `Exporter.prune`): the exported model (`model/` -> checkpoints/exports/step-BEST, with
its metrics.json: the lineage identities evaluate checks), and of its latest checkpoint trainer.pt (step, evals,
early stopping, fingerprint), meta.json and the carried metrics history. That is what `train --auto-resume`
needs to see the run is finished and republish the same model without training (a resume restores the history
and evals; the model comes from the export), and what tells a changed config apart (the fingerprint: another
max_steps or num_epochs sets the small folder aside and trains from step 0, so nothing could continue from the
dropped state). It drops model, optimizer and RNG state of every checkpoint and the older checkpoints: a
finished run never continues, and the AdamW state alone is twice the model (1.6 GB per student in the demo).
Unfinished runs keep everything for resume.

`Exporter` publishes the best model by eval loss as `<out>/model` (a symlink into checkpoints/exports) with
`<out>/metrics.json`, so that a kill at any instant leaves a complete one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from distill_pipe import distributed as dd
from distill_pipe import models
from distill_pipe.distributed import DistInfo, fsdp_modules

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says what to do."""


class Checkpointer:
    """checkpoints/ of one run.

    fingerprint: what made the run; a checkpoint made with another is refused by `load`. carry: {name: folder}
    copied into every checkpoint (rank 0) and put back by `load`, so they always match the checkpoint's step.
    """

    def __init__(self, ckpt_dir: Path, info: DistInfo, fingerprint: dict, carry: dict[str, Path] | None = None):
        self.dir, self.info, self.fingerprint = Path(ckpt_dir), info, fingerprint
        self.carry = carry or {}

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first, ordered by step NUMBER (step-1000000 after step-999999)."""
        if not self.dir.is_dir():
            return []
        found = [(checkpoint_step(p.name), p) for p in self.dir.iterdir() if p.is_dir()]
        return [p for step, p in sorted((s, p) for s, p in found if s is not None)]

    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        if not (path / "trainer.pt").exists():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; delete "
                                  f"{self.dir} to start over")
        return path

    def save(self, step: int, model, optimizer, state: dict, *, best_step: int | None, keep_last: int) -> Path:
        """Write step-NNNNNN atomically (collective under FSDP), point `latest` at it, keep the last keep_last.
        state: the trainer's own state (numbers, strings, lists, dicts), returned by `load`."""
        import torch.distributed.checkpoint as dcp

        name = f"{CHECKPOINT_PREFIX}{step:06d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dd.barrier()
        with _single_process_dcp_quiet():
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp))
        torch.save(_rng_state(), tmp / f"rng-rank{self.info.rank}.pt")
        dd.barrier()
        if self.info.is_main:
            for folder_name, folder in self.carry.items():
                if folder.is_dir():
                    shutil.copytree(folder, tmp / folder_name)
            (tmp / "meta.json").write_text(json.dumps({"step": step, "best_step": best_step}))
            torch.save({**state, "fingerprint": self.fingerprint}, tmp / "trainer.pt")  # last: marks it complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.dir / "latest", name)
            for old in self.checkpoints()[:-keep_last]:
                if old != final:  # never the one `latest` names
                    shutil.rmtree(old, ignore_errors=True)
        dd.barrier()
        return final

    def load(self, path: Path, model, optimizer, is_finished: Callable[[dict], bool] = lambda state: False) -> dict:
        """Restore model, optimizer and RNG from `path`, put the carried folders back; returns the trainer's
        state. Refuses a checkpoint from another config. is_finished(state): True for a run with nothing left
        to train, whose checkpoint may hold no model state (`finish` dropped it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = _safe_load(path / "trainer.pt")
        diff = fingerprint_diff(state.get("fingerprint", {}), self.fingerprint)
        if diff:
            what = ("; it trained on another store or tokens.zarr" if any(k.startswith("data.") for k in diff)
                    else "")
            raise CheckpointError(f"checkpoint {path} was made with a different config ({', '.join(diff)} "
                                  f"differ{what}); restore the old params and data to resume, or pass "
                                  "--auto-resume instead of --resume to keep it aside and start from step 0")
        if (path / ".metadata").exists():
            sds = _state_dicts(model, optimizer)
            with _single_process_dcp_quiet():
                reader, planner = _safe_dcp()
                dcp.load(sds, storage_reader=reader(str(path)), planner=planner(path))
            set_state_dict(model, optimizer, model_state_dict=sds["model"], optim_state_dict=sds["optimizer"])
            rng_file = path / f"rng-rank{self.info.rank}.pt"
            if rng_file.exists():
                _set_rng_state(_safe_load(rng_file))
        elif not is_finished(state):
            raise CheckpointError(f"checkpoint {path} holds no model state though its run is unfinished; delete "
                                  f"{self.dir} to start over")
        if self.info.is_main:
            for name, folder in self.carry.items():  # as it was at the checkpoint
                shutil.rmtree(folder, ignore_errors=True)
                if (path / name).is_dir():
                    shutil.copytree(path / name, folder)
        dd.barrier()
        return state

    def finish(self) -> None:
        """A finished run: drop what only continuing it needs. Older checkpoints go; the latest keeps trainer.pt
        (step, evals, fingerprint: what `--auto-resume` needs to see the run is finished), meta.json and the
        carried folders, and loses model, optimizer and RNG state. DCP's index goes first: from then on the
        folder claims no model state, so a kill at any point of this leaves a checkpoint that loads."""
        latest = self.latest()
        if self.info.is_main and latest is not None:
            for old in self.checkpoints():
                if old != latest:
                    shutil.rmtree(old, ignore_errors=True)
            for pattern in (".metadata", "*.distcp", "rng-rank*.pt"):
                for f in sorted(latest.glob(pattern)):
                    f.unlink()
        dd.barrier()

    def clean_stale_temp(self) -> None:
        """Remove temp folders of saves that were interrupted (they were never pointed at)."""
        if self.info.is_main and self.dir.exists():
            for p in self.dir.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        dd.barrier()


def _state_dicts(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


@contextlib.contextmanager
def _single_process_dcp_quiet():
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def checkpoint_step(name: str) -> int | None:
    """'step-000012' -> 12; None for anything else (temp folders, `latest`, exports)."""
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def checkpoint_fingerprint(path: Path) -> dict:
    """The config fingerprint a checkpoint was made with."""
    return _safe_load(path / "trainer.pt").get("fingerprint", {})


def fingerprint_diff(theirs: dict, ours: dict) -> list[str]:
    """Flattened keys whose values differ between two run fingerprints."""
    theirs, ours = _flatten(theirs), _flatten(ours)
    return sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "<unset>") != ours.get(k, "<unset>"))


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"alpha": 1}} -> {"train.alpha": 1}, so a mismatch names the exact key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_aside_if_changed(ckpt_dir: Path, fingerprint: dict) -> None:
    """Checkpoints made with another config are renamed to checkpoints-<their config hash>, never deleted
    (days of training) and never used; the run then starts from step 0."""
    pointer = ckpt_dir / "latest"
    path = ckpt_dir / pointer.read_text().strip()
    theirs = checkpoint_fingerprint(path) if (path / "trainer.pt").exists() else {}
    diff = fingerprint_diff(theirs, fingerprint)
    if not diff:
        return
    digest = hashlib.sha256(json.dumps(theirs, sort_keys=True, default=str).encode()).hexdigest()[:10]
    aside = ckpt_dir.with_name(f"{ckpt_dir.name}-{digest}")
    if aside.exists():  # the same config was set aside before: keep the newer checkpoints
        shutil.rmtree(aside)
    os.replace(ckpt_dir, aside)
    log.warning("%s holds checkpoints of another config (%s differ): kept in %s, unused; starting from step 0 "
                "(delete it to free the space)", ckpt_dir, ", ".join(diff[:6]), aside)


def _rng_state() -> dict:
    """Every RNG's state as tensors, numbers and lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": {"version": version, "words": list(words), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- reading without running code


def check_loadable(path: Path) -> None:
    """Read every small file of checkpoint `path` the way `Checkpointer.load` will (trainer.pt, the RNG files,
    DCP's index), so an unsafe or foreign checkpoint is refused before anything on disk is touched. A folder
    without trainer.pt is left to the caller (incomplete: refused by --resume, set aside by --auto-resume)."""
    if not (path / "trainer.pt").exists():
        return
    _safe_load(path / "trainer.pt")
    for rng_file in sorted(path.glob("rng-rank*.pt")):
        _safe_load(rng_file)
    if (path / ".metadata").exists():
        _read_dcp_metadata(path / ".metadata")


def _refuse(file: Path) -> CheckpointError:
    return CheckpointError(f"{file} holds Python objects that loading would run as code (a checkpoint of an "
                           "earlier distill-pipe, which pickled its numpy RNG state, or a file distill-pipe did not "
                           f"write), so it is refused; delete {file.parent.parent} to train from step 0")


def _safe_load(file, name: Path | None = None):
    """torch.load(weights_only=True): tensors, numbers, strings, lists, dicts; anything else is refused."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError:
        raise _refuse(name or file) from None


# What DCP's pickled index (.metadata) may name: its own metadata classes and the torch types they hold.
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """The "restricting globals" pattern of Python's pickle docs: only the allowlist, dtypes included."""

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def _read_dcp_metadata(file: Path):
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError:
        raise _refuse(file) from None


@functools.cache
def _safe_dcp() -> tuple[type, type]:
    """DCP's file reader and load planner, made safe (their defaults unpickle without restriction). Built on
    first use: torch.distributed.checkpoint takes seconds to import, and only training needs it."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _read_dcp_metadata(Path(self.path) / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def __init__(self, path: Path):
            super().__init__()
            self.path = path

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # checked with weights_only, then handed on as the default planner expects it
            obj = _safe_load(value, name=self.path / read_item.dest_index.fqn)
            buf = io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return SafeReader, SafeLoadPlanner


# ---------------------------------------------------------------- the published model


class Exporter:
    """The best model by eval loss, published so that a kill at any instant leaves a complete one.

    Each export is a complete folder `checkpoints/exports/step-N/` (save_pretrained + tokenizer +
    metrics.json), written under a temporary name and renamed. `model` is a symlink to the current one,
    replaced atomically (rename of a new link over the old); `metrics.json` is a symlink to
    `model/metrics.json`. So `model/` is always a complete folder, old or new, and metrics.json always
    describes the step `model/` holds: the one flip publishes both. `from_pretrained("<student>/model")`
    follows the link. Exports live beside the checkpoints that refer to them (a resume re-points `model` at
    the checkpoint's best export) and are deleted with them.

    metrics(trainer): the content of metrics.json for the trainer's current state.
    """

    def __init__(self, model, tok, out: Path, info, metrics):
        self.model, self.tok, self.out, self.info, self.metrics = model, tok, out, info, metrics
        self.exports = out / "checkpoints" / "exports"

    def __call__(self, trainer) -> None:  # on_best
        name = f"step-{trainer.step:06d}"
        dest = self.exports / name
        files = {"distill_pipe.json": {"step": trainer.step, **(trainer.last_eval or {})},
                 "metrics.json": self.metrics(trainer)}
        if export_model(self.model, self.tok, dest, self.info, files=files):
            self._publish(name)

    def _publish(self, name: str) -> None:
        _symlink_atomic(self.out / "model", f"checkpoints/exports/{name}")
        _symlink_atomic(self.out / "metrics.json", "model/metrics.json")

    def write_metrics(self, trainer) -> None:
        """Refresh the published metrics (steps, final eval): in the current export when there is one (its
        best step stays the model's), else as a plain file (no eval has improved yet)."""
        if not self.info.is_main:
            return
        text = json.dumps(self.metrics(trainer), indent=2, default=str)
        target = self.out / "model" / "metrics.json"
        if (self.out / "model").is_symlink() and target.exists():
            _write_atomic(target, text)
            _symlink_atomic(self.out / "metrics.json", "model/metrics.json")
        else:
            remove(self.out / "metrics.json")
            _write_atomic(self.out / "metrics.json", text)

    def after_checkpoint(self, trainer) -> None:
        """Refresh metrics, then delete exports that neither `model` nor a kept checkpoint refers to."""
        if not self.info.is_main:
            return
        self.write_metrics(trainer)
        self.prune(trainer)

    def prune(self, trainer) -> None:
        """Delete exports that neither `model` nor a kept checkpoint refers to (rank 0)."""
        keep = {os.path.basename(os.readlink(self.out / "model"))} if (self.out / "model").is_symlink() else set()
        for ck in trainer.checkpoints():
            best = json.loads((ck / "meta.json").read_text()).get("best_step") if (ck / "meta.json").exists() else None
            if best is not None:
                keep.add(f"step-{best:06d}")
        for p in self.exports.iterdir() if self.exports.is_dir() else []:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def restore(self, trainer) -> None:
        """After loading a checkpoint: publish the export of ITS best step (a later export, made after the
        checkpoint by the run that died, is removed and will be remade bit for bit)."""
        if not self.info.is_main:
            return
        for p in self.exports.iterdir() if self.exports.is_dir() else []:
            step = checkpoint_step(p.name)
            if step is None or step > trainer.step:
                shutil.rmtree(p, ignore_errors=True)
        best = trainer.best_eval["step"] if trainer.best_eval else None
        if best is not None and (self.exports / f"step-{best:06d}" / "config.json").exists():
            self._publish(f"step-{best:06d}")
        else:
            remove(self.out / "model")
            remove(self.out / "metrics.json")


def export_model(model, tok, dest: Path, info, files: dict | None = None) -> bool:
    """save_pretrained + tokenizer (+ `files`: name -> JSON) into `dest`, written beside it and renamed into
    place. Collective under FSDP (gathers weights); True on the rank that wrote."""
    if fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:
            return False
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(state)
    elif not info.is_main:
        return False
    else:
        plain = model
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    was_training = plain.training
    models.save_pretrained_quietly(plain, tmp)
    plain.train(was_training)
    tok.save_pretrained(tmp)
    for name, content in (files or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2, default=str))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return True


def remove(path: Path) -> None:
    """Delete a file, a symlink (not its target) or a folder; nothing when absent."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _symlink_atomic(link: Path, target: str) -> None:
    """Point `link` at `target` (relative) by renaming a new link over it: never absent, never half-made."""
    tmp = link.with_name(f".{link.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    if link.is_dir() and not link.is_symlink():  # a folder left by an earlier version of distill-pipe
        shutil.rmtree(link)
    os.replace(tmp, link)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
