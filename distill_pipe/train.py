"""Stage two: train one student from the teacher-logit store (or from tokens.zarr when alpha == 1).

    distill-pipe train --student kd20 [--resume]
    torchrun --nproc_per_node=2 -m distill_pipe train --student kd20     # FSDP2 (bf16 if train.dtype)

Writes `<paths.train>/<student>/`: `model/` (the best model by eval loss: save_pretrained + tokenizer; a
symlink into checkpoints/exports, see `Exporter`), `metrics.json` (describes the step `model/` holds),
`history/train.csv` and `history/eval.csv` (DVC plots), `checkpoints/` (resume), and whatever the student
initialisation records (e.g. the layers kept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from distill_pipe import distributed as dd
from distill_pipe import models
from distill_pipe.config import Config, StudentConfig
from distill_pipe.trainer import (CheckpointError, DistillTrainer, Trainer, check_store_temperature,
                                  checkpoint_step)

log = logging.getLogger(__name__)

# Train keys that do not change what a run computes: they may differ when resuming.
# loss_chunk_size only regroups the loss sums (float rounding), and lowering it is the fix for an OOM;
# prefetch only changes when a micro-batch is read
UNFINGERPRINTED_KEYS = ("save_steps", "keep_last", "loss_chunk_size", "prefetch")


class TrainError(ValueError):
    """Inputs of the train stage that do not fit together; the message names the fix."""


def run_train(cfg: Config, student: str, resume: bool = False, auto_resume: bool = False) -> Path:
    """resume: continue this student's checkpoint (refused when it was made with another config).
    auto_resume: continue it when its config matches, else set it aside (kept, never used) and start from
    step 0: what `dvc repro` runs, so a crashed student resumes and a changed one starts cleanly."""
    scfg = cfg.student(student)
    tc = scfg.train
    info = dd.init_distributed()
    out = Path(cfg.paths.train) / student
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.exists() and not (resume or auto_resume):
        raise CheckpointError(f"{ckpt_dir} holds a checkpoint of an earlier run; pass --resume to continue it, "
                              f"or delete {out} to start over")
    source = _open_data(cfg, tc)
    check_store_temperature(source.get("store"), tc)  # before anything in `out` is touched
    data = source["data"]
    if data["validation"].shape[0] == 0:
        raise TrainError(f"the validation split of {source['path']} is empty: evaluation and early stopping "
                         "need it; raise data.validation_fraction and rerun `distill-pipe prepare`")
    fingerprint = {
        "student": student,
        "train": {k: v for k, v in dataclasses.asdict(tc).items() if k not in UNFINGERPRINTED_KEYS},
        "init": scfg.init,
        "data": source["identity"],
        "world_size": info.world_size,
    }
    if info.is_main:
        log.info("training student %s on %s (%s): %d train / %d validation sequences of %d tokens -> %s",
                 student, source["path"], source["kind"], data["train"].shape[0], data["validation"].shape[0],
                 data["train"].shape[1], out)
        out.mkdir(parents=True, exist_ok=True)
        if auto_resume and latest.exists():
            _set_aside_if_changed(ckpt_dir, fingerprint)
        if not latest.exists():  # a fresh run: outputs of an earlier, checkpoint-less run are stale
            for stale in ("history", "model", "metrics.json", "checkpoints/exports"):
                _remove(out / stale)
    dd.barrier()

    model, tok, init_info = _build(cfg, scfg, out, data["train"], info)
    vocab = _check_vocab(model, tok, source, student)
    model.to(info.device)
    if info.distributed:
        model = dd.fsdp_wrap(model, param_dtype=torch.bfloat16 if tc.dtype == "bfloat16" else None)

    exporter = Exporter(model, tok, out, info, static_metrics(scfg, init_info, source, vocab))
    trainer = DistillTrainer(model, tc, data, store=source.get("store"), vocab_size=vocab, out_dir=out,
                             info=info, fingerprint=fingerprint, on_best=exporter,
                             on_checkpoint=exporter.after_checkpoint, target_masks=source["target_masks"])
    trainer.clean_stale_temp()
    if (resume or auto_resume) and latest.exists():
        trainer.load_checkpoint(trainer.latest_checkpoint())
        exporter.restore(trainer)
    elif (resume or auto_resume) and info.is_main:
        log.info("no checkpoint in %s: starting from step 0", ckpt_dir)
    result = trainer.train()
    if info.is_main:
        exporter.write_metrics(trainer)
        log.info("wrote %s (best eval loss %.4f at step %d)", out, result["best_eval_loss"], result["best_step"])
    dd.barrier()
    return out


def _set_aside_if_changed(ckpt_dir: Path, fingerprint: dict) -> None:
    """Checkpoints made with another config are renamed to checkpoints-<their config hash>, never deleted
    (days of training) and never used; the run then starts from step 0."""
    from distill_pipe.trainer import checkpoint_fingerprint, fingerprint_diff

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


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ---------------------------------------------------------------- inputs


def _open_data(cfg: Config, tc) -> dict:
    """The sequences to train on and what identifies them: the store (alpha < 1) or tokens.zarr (alpha == 1).
    The identity holds the data's shape beside its fingerprint: a checkpoint or student of a release whose
    fingerprint ignored the shape (one token stream cut at another seq_len) lacks it, so it never passes."""
    splits = ("train", "validation")
    if tc.alpha < 1:
        from distill_pipe.store.manifest import open_manifested_store

        # a missing split or shard raises a one-line StoreError naming the rerun that finishes it
        store = open_manifested_store(cfg.paths.logits, cfg.paths.manifest, splits)
        masks = {s: store.target_mask(s) for s in splits}
        data = {s: store.input_ids(s) for s in splits}
        return {"kind": "teacher-logit store", "path": str(cfg.paths.logits), "store": store,
                "data": data, "tokenizer": store.info["tokenizer"],
                "target_masks": {s: m for s, m in masks.items() if m is not None},
                "teacher_vocab": int(store.vocab_size),
                "identity": {**{k: store.info.get(k) for k in ("teacher", "tokenizer", "data", "codec")},
                             "shape": data_shape(data)}}
    from distill_pipe.data import open_tokens

    tokens = open_tokens(cfg.paths.tokens)
    attrs = dict(tokens.attrs)
    data = {s: tokens[s]["input_ids"] for s in splits}
    check_tokens_match_store(cfg, attrs["fingerprint"])
    return {"kind": "tokens, CE only (alpha = 1)", "path": str(cfg.paths.tokens),
            "data": data, "tokenizer": attrs["tokenizer"],
            "target_masks": {s: tokens[s]["target_mask"] for s in splits if "target_mask" in tokens[s]},
            "teacher_vocab": None, "identity": {"tokens": attrs["fingerprint"], "shape": data_shape(data)}}


def check_tokens_match_store(cfg: Config, fingerprint: str) -> None:
    """CE-only training reads tokens.zarr, but `evaluate` scores on the store's validation split: if tokens.zarr
    is not the data the store was made from, those splits overlap this student's training data and its score
    is inflated. No store yet: nothing to check here (evaluate checks each student's lineage)."""
    from distill_pipe.store import NotAStoreError, open_store

    try:
        store = open_store(cfg.paths.logits)
    except NotAStoreError:
        return
    made_from = (store.info.get("data") or {}).get("fingerprint")
    if made_from != fingerprint:
        raise TrainError(f"{cfg.paths.tokens} ({fingerprint}) is not the data {cfg.paths.logits} was made from "
                         f"({made_from}), so evaluation would score on sequences this student trains on; rerun "
                         "`distill-pipe teacher-logits --replace-changed` (or `dvc repro`) for the new tokens, or "
                         "rerun `distill-pipe prepare` with the data params the store was made from")


def data_shape(arrays: dict) -> dict:
    """{"seq_len": L, "train": N, "validation": N} of (N, L) arrays per split: part of a run's data identity."""
    return {"seq_len": int(arrays["train"].shape[1]), **{s: int(a.shape[0]) for s, a in arrays.items()}}


def store_shape(store) -> dict:
    """`data_shape` of a logit store's token rows."""
    return data_shape({s: store.input_ids(s) for s in ("train", "validation")})


def calibration_ids(train_ids, num_tokens: int) -> np.ndarray:
    """The first `num_tokens` tokens of the training split as whole rows (rows, L) int64: num_tokens // L
    rows (at least one, all when the split is shorter), or (1, num_tokens) when num_tokens < L."""
    L = train_ids.shape[1]
    if num_tokens < L:
        return np.asarray(train_ids[:1, :num_tokens], dtype=np.int64)
    return np.asarray(train_ids[: num_tokens // L], dtype=np.int64)


def _build(cfg: Config, scfg: StudentConfig, out: Path, train_ids, info):
    """The initial student. Under torchrun rank 0 builds it (layer selection runs once) and the others load
    rank 0's copy, so every rank starts from the same weights."""
    from distill_pipe.students import build_student

    torch.manual_seed(scfg.train.seed)
    calib = calibration_ids(train_ids, scfg.train.calibration_tokens)
    if not info.distributed:
        model, tok, init_info = build_student(cfg, scfg, out, calib)
        return model, tok or models.load_tokenizer(cfg.teacher.model), init_info
    shared = out / ".init"
    error = None
    if info.is_main:
        try:
            model, tok, init_info = build_student(cfg, scfg, out, calib)
            tok = tok or models.load_tokenizer(cfg.teacher.model)
            shutil.rmtree(shared, ignore_errors=True)
            model.save_pretrained(shared)
            tok.save_pretrained(shared)
            (shared / "init_info.json").write_text(json.dumps(init_info, default=str))
        except (ValueError, OSError) as e:
            error = str(e)
    error = dd.broadcast_object(error)
    if error is not None:
        raise TrainError(error)
    if not info.is_main:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(shared, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(shared)
        init_info = json.loads((shared / "init_info.json").read_text())
    dd.barrier()
    if info.is_main:
        shutil.rmtree(shared, ignore_errors=True)
    return model, tok, init_info


def _check_vocab(model, tok, source: dict, student: str) -> int:
    """The number of logits compared: the student's (== the teacher's), or the tokenizer's when either model
    pads its vocabulary beyond it (trl#2215). Another tokenizer is an error."""
    want = source["tokenizer"]
    fp = models.tokenizer_fingerprint(tok)
    if fp != want["fingerprint"]:
        raise TrainError(f"student {student}'s tokenizer differs from the one {source['path']} was made with "
                         f"({want.get('spec')}); a student must use the teacher's tokenizer")
    n_tok = len(tok)
    v_student = int(model.get_output_embeddings().weight.shape[0])
    v_teacher = source["teacher_vocab"] or v_student
    for who, v in (("student", v_student), ("teacher", v_teacher)):
        if v < n_tok:
            raise TrainError(f"the {who}'s vocabulary ({v}) is smaller than its tokenizer ({n_tok} tokens); "
                             "use a model made for this tokenizer")
    vocab = v_student if v_student == v_teacher else n_tok
    if vocab != v_student or vocab != v_teacher:
        log.info("vocabularies differ (student %d, teacher %d): comparing the tokenizer's %d logits",
                 v_student, v_teacher, vocab)
    return vocab


# ---------------------------------------------------------------- outputs


class Exporter:
    """The best model by eval loss, published so that a kill at any instant leaves a complete one.

    Each export is a complete folder `checkpoints/exports/step-N/` (save_pretrained + tokenizer +
    metrics.json), written under a temporary name and renamed. `model` is a symlink to the current one,
    replaced atomically (rename of a new link over the old); `metrics.json` is a symlink to
    `model/metrics.json`. So `model/` is always a complete folder, old or new, and metrics.json always
    describes the step `model/` holds: the one flip publishes both. `from_pretrained("<student>/model")`
    follows the link. Exports live beside the checkpoints that refer to them (a resume re-points `model` at
    the checkpoint's best export) and are deleted with them.
    """

    def __init__(self, model, tok, out: Path, info, static: dict):
        self.model, self.tok, self.out, self.info, self.static = model, tok, out, info, static
        self.exports = out / "checkpoints" / "exports"

    def __call__(self, trainer: Trainer) -> None:  # on_best
        name = f"step-{trainer.step:06d}"
        dest = self.exports / name
        files = {"distill_pipe.json": {"step": trainer.step, **(trainer.last_eval or {})},
                 "metrics.json": self.metrics(trainer)}
        if export_model(self.model, self.tok, dest, self.info, files=files):
            self._publish(name)

    def _publish(self, name: str) -> None:
        _symlink_atomic(self.out / "model", f"checkpoints/exports/{name}")
        _symlink_atomic(self.out / "metrics.json", "model/metrics.json")

    def metrics(self, trainer: Trainer) -> dict:
        s, best, final = trainer.summary(), trainer.best_eval or {}, trainer.last_eval or {}
        return {
            "best_eval_loss": best.get("eval_loss"), "best_eval_ppl": best.get("eval_ppl"),
            "best_step": best.get("step"),
            "final_eval_loss": final.get("eval_loss"), "final_eval_ppl": final.get("eval_ppl"),
            "steps": s["steps"], "total_steps": s["total_steps"], "tokens": s["tokens"],
            "tokens_per_s": s["tokens_per_s"], "train_seconds": s["train_seconds"],
            "data_wait_seconds": s["data_wait_seconds"],
            "early_stopped": s["early_stopped"], "world_size": trainer.info.world_size,
            "global_batch": trainer.global_batch, **self.static}

    def write_metrics(self, trainer: Trainer) -> None:
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
            _remove(self.out / "metrics.json")
            _write_atomic(self.out / "metrics.json", text)

    def after_checkpoint(self, trainer: Trainer) -> None:
        """Refresh metrics, then delete exports that neither `model` nor a kept checkpoint refers to."""
        if not self.info.is_main:
            return
        self.write_metrics(trainer)
        keep = {os.path.basename(os.readlink(self.out / "model"))} if (self.out / "model").is_symlink() else set()
        for ck in trainer.checkpoints():
            best = json.loads((ck / "meta.json").read_text()).get("best_step") if (ck / "meta.json").exists() else None
            if best is not None:
                keep.add(f"step-{best:06d}")
        for p in self.exports.iterdir() if self.exports.is_dir() else []:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def restore(self, trainer: Trainer) -> None:
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
            _remove(self.out / "model")
            _remove(self.out / "metrics.json")


def static_metrics(scfg: StudentConfig, init_info: dict, source: dict, vocab: int) -> dict:
    """The parts of metrics.json that do not change during a run."""
    return {"vocab_compared": vocab, "data": {"kind": source["kind"], "path": source["path"], **source["identity"]},
            "student": {"name": scfg.name, "init": scfg.init, "init_info": init_info,
                        "train": dataclasses.asdict(scfg.train)}}


def export_model(model, tok, dest: Path, info, files: dict | None = None) -> bool:
    """save_pretrained + tokenizer (+ `files`: name -> JSON) into `dest`, written beside it and renamed into
    place. Collective under FSDP (gathers weights); True on the rank that wrote."""
    from distill_pipe.trainer import fsdp_modules

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
