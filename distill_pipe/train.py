"""Stage two: train one student from the teacher-logit store (or from tokens.zarr when alpha == 1).

    distill-pipe train --student kd20 [--resume]
    torchrun --nproc_per_node=2 -m distill_pipe train --student kd20     # FSDP2 (bf16 if train.dtype)

Writes `<paths.train>/<student>/`: `model/` (the best model by eval loss: save_pretrained + tokenizer; a
symlink into checkpoints/exports, see `Exporter`), `metrics.json` (describes the step `model/` holds),
`checkpoints/` (resume; once the run is finished, only what a rerun needs to see that: checkpoint.py),
and whatever the student initialisation records (e.g. the layers kept); and
`<paths.dvclive>/<student>/`: its step and eval metrics, live (dvclive, see metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from distill_pipe import distributed as dd
from distill_pipe import models
from distill_pipe.checkpoint import CheckpointError, Exporter, check_loadable, remove, set_aside_if_changed
from distill_pipe.config import Config, StudentConfig
from distill_pipe.metrics import run_metrics, static_metrics
from distill_pipe.trainer import DistillTrainer, check_store_divergence, check_store_temperature

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
    if resume and auto_resume:
        raise TrainError("--resume continues the checkpoint or fails, --auto-resume sets a changed one aside and "
                         "starts again: pass one of them")
    scfg = cfg.student(student)
    tc = scfg.train
    info = dd.init_distributed()
    out = Path(cfg.paths.train) / student
    live = metrics_dir(cfg, student)
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.exists() and not (resume or auto_resume):
        raise CheckpointError(f"{ckpt_dir} holds a checkpoint of an earlier run; pass --resume to continue it, "
                              f"or delete {out} to start over")
    if (resume or auto_resume) and latest.exists():  # an unsafe checkpoint is refused before anything changes
        check_loadable(ckpt_dir / latest.read_text().strip())
    source = _open_data(cfg, tc)
    check_store_temperature(source.get("store"), tc)  # before anything in `out` is touched
    check_store_divergence(source.get("store"), tc)
    data = source["data"]
    if data["validation"].shape[0] == 0:
        raise TrainError(f"the validation split of {source['path']} is empty: evaluation and early stopping "
                         "need it; raise data.validation_fraction and rerun `distill-pipe prepare`")
    fingerprint = {
        "student": student,
        "train": _train_identity(tc),
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
            set_aside_if_changed(ckpt_dir, fingerprint)
        if not latest.exists():  # a fresh run: outputs of an earlier, checkpoint-less run are stale
            for stale in (live, out / "model", out / "metrics.json", out / "checkpoints" / "exports"):
                remove(stale)
    dd.barrier()

    model, tok, init_info = _build(cfg, scfg, out, data["train"], info)
    vocab = _check_vocab(model, tok, source, student)
    model.to(info.device)
    if info.distributed:
        model = dd.fsdp_wrap(model, param_dtype=torch.bfloat16 if tc.dtype == "bfloat16" else None)

    static = static_metrics(scfg, init_info, source, vocab)
    exporter = Exporter(model, tok, out, info, lambda trainer: run_metrics(trainer, static))
    trainer = DistillTrainer(model, tc, data, store=source.get("store"), vocab_size=vocab, out_dir=out,
                             metrics_dir=live, info=info, fingerprint=fingerprint, on_best=exporter,
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
    if trainer.finished:  # the model is exported: keep what lineage and a later --auto-resume need, no more
        trainer.checkpointer.finish()
        if info.is_main:
            exporter.prune(trainer)
    if info.is_main:
        log.info("wrote %s (best eval loss %.4f at step %d)", out, result["best_eval_loss"], result["best_step"])
    dd.barrier()
    return out


def _train_identity(tc) -> dict:
    """The train keys that change what the run computes. beta counts only for jsd, and a forward-KL run (the
    default divergence, the only one before these keys came) is identified as before: its checkpoints resume."""
    out = {k: v for k, v in dataclasses.asdict(tc).items() if k not in UNFINGERPRINTED_KEYS}
    if tc.divergence != "jsd":
        del out["beta"]
    if tc.divergence == "forward_kl":
        del out["divergence"]
    return out


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
        masks = {s: store.token_rows(s, mask=True) for s in splits}
        data = {s: store.token_rows(s) for s in splits}
        return {"kind": "teacher-logit store", "path": str(cfg.paths.logits), "store": store,
                "data": data, "tokenizer": store.info["tokenizer"],
                "target_masks": {s: m for s, m in masks.items() if m is not None},
                "teacher_vocab": int(store.vocab_size),
                "identity": {**{k: store.info.get(k) for k in ("teacher", "tokenizer", "data", "codec")},
                             "shape": data_shape(data)}}
    from distill_pipe.data import DataError, open_tokens
    from distill_pipe.store.reader import CheckedRows

    tokens = open_tokens(cfg.paths.tokens)
    attrs = dict(tokens.attrs)

    def rows(split: str, name: str) -> CheckedRows:  # a cut chunk: one line naming tokens.zarr and prepare
        return CheckedRows(tokens[split][name], str(cfg.paths.tokens), DataError, "rerun `distill-pipe prepare`")

    data = {s: rows(s, "input_ids") for s in splits}
    check_tokens_match_store(cfg, attrs["fingerprint"])
    return {"kind": "tokens, CE only (alpha = 1)", "path": str(cfg.paths.tokens),
            "data": data, "tokenizer": attrs["tokenizer"],
            "target_masks": {s: rows(s, "target_mask") for s in splits if "target_mask" in tokens[s]},
            "teacher_vocab": None, "identity": {"tokens": attrs["fingerprint"], "shape": data_shape(data)}}


def metrics_dir(cfg: Config, student: str) -> Path:
    """Where a student's live metrics go (metrics.py): <paths.dvclive>/<student>."""
    return Path(cfg.paths.dvclive) / student


def check_tokens_match_store(cfg: Config, fingerprint: str) -> None:
    """CE-only training reads tokens.zarr, but `evaluate` scores on the store's validation split: if tokens.zarr
    is not the data the store was made from, those splits overlap this student's training data and its score
    is inflated. No store yet: nothing to check here (evaluate checks each student's lineage)."""
    from distill_pipe.store import NotAStoreError, open_store

    try:
        store = open_store(cfg.paths.logits)
    except NotAStoreError:
        return
    check_store_made_from(store, cfg.paths.tokens, fingerprint)


def check_store_made_from(store, tokens_location, fingerprint: str) -> None:
    """TrainError unless `store` was made from the tokens.zarr at `tokens_location` (fingerprint: its
    attrs["fingerprint"]); the public API's lineage check too."""
    made_from = (store.info.get("data") or {}).get("fingerprint")
    if made_from != fingerprint:
        raise TrainError(f"{tokens_location} ({fingerprint}) is not the data {store.location} was made from "
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
