"""Stage two: train one student from the teacher-logit store (or from tokens.zarr when alpha == 1).

    distill-pipe train --student kd20 [--resume]
    torchrun --nproc_per_node=2 -m distill_pipe train --student kd20     # FSDP2 (bf16 if train.dtype)

Writes `<paths.train>/<student>/`: `model/` (the best model by eval loss: save_pretrained + tokenizer),
`metrics.json`, `history/train.csv` and `history/eval.csv` (DVC plots), `checkpoints/` (resume), and
whatever the student initialisation records (e.g. the layers kept).
"""

from __future__ import annotations

import dataclasses
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
from distill_pipe.trainer import CheckpointError, DistillTrainer, Trainer

log = logging.getLogger(__name__)

# Train keys that do not change what a run computes: they may differ when resuming.
# loss_chunk_size only regroups the loss sums (float rounding), and lowering it is the fix for an OOM
UNFINGERPRINTED_KEYS = ("save_steps", "keep_last", "loss_chunk_size")


class TrainError(ValueError):
    """Inputs of the train stage that do not fit together; the message names the fix."""


def run_train(cfg: Config, student: str, resume: bool = False) -> Path:
    scfg = cfg.student(student)
    tc = scfg.train
    info = dd.init_distributed()
    out = Path(cfg.paths.train) / student
    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest"
    if latest.exists() and not resume:
        raise CheckpointError(f"{ckpt_dir} holds a checkpoint of an earlier run; pass --resume to continue it, "
                              f"or delete {out} to start over")
    source = _open_data(cfg, tc)
    data = source["data"]
    if data["validation"].shape[0] == 0:
        raise TrainError(f"the validation split of {source['path']} is empty: evaluation and early stopping "
                         "need it; raise data.validation_fraction and rerun `distill-pipe prepare`")
    if info.is_main:
        log.info("training student %s on %s (%s): %d train / %d validation sequences of %d tokens -> %s",
                 student, source["path"], source["kind"], data["train"].shape[0], data["validation"].shape[0],
                 data["train"].shape[1], out)
        out.mkdir(parents=True, exist_ok=True)
        if not latest.exists():  # a fresh run: outputs of an earlier, checkpoint-less run are stale
            for stale in ("history", "model", "metrics.json"):
                p = out / stale
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    dd.barrier()

    model, tok, init_info = _build(cfg, scfg, out, data["train"], info)
    vocab = _check_vocab(model, tok, source, student)
    model.to(info.device)
    if info.distributed:
        model = dd.fsdp_wrap(model, param_dtype=torch.bfloat16 if tc.dtype == "bfloat16" else None)

    fingerprint = {
        "student": student,
        "train": {k: v for k, v in dataclasses.asdict(tc).items() if k not in UNFINGERPRINTED_KEYS},
        "init": scfg.init,
        "data": source["identity"],
        "world_size": info.world_size,
    }
    exporter = _Exporter(model, tok, out / "model", info)
    trainer = DistillTrainer(model, tc, data, store=source.get("store"), vocab_size=vocab, out_dir=out,
                             info=info, fingerprint=fingerprint, on_best=exporter)
    trainer.clean_stale_temp()
    if resume and latest.exists():
        trainer.load_checkpoint(trainer.latest_checkpoint())
    elif resume and info.is_main:
        log.info("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
    result = trainer.train()
    if info.is_main:
        _write_metrics(out / "metrics.json", trainer, result, scfg, init_info, source, vocab)
        log.info("wrote %s (best eval loss %.4f at step %d)", out, result["best_eval_loss"], result["best_step"])
    dd.barrier()
    return out


# ---------------------------------------------------------------- inputs


def _open_data(cfg: Config, tc) -> dict:
    """The sequences to train on and what identifies them: the store (alpha < 1) or tokens.zarr (alpha == 1)."""
    splits = ("train", "validation")
    if tc.alpha < 1:
        from distill_pipe.store import open_store

        store = open_store(cfg.paths.logits)
        for split in splits:
            if split not in store.splits:
                raise TrainError(f"store {cfg.paths.logits} has no {split} split; rerun `distill-pipe teacher-logits`")
            store.check_complete(split)  # StoreIncompleteError naming the missing shards
        return {"kind": "teacher-logit store", "path": str(cfg.paths.logits), "store": store,
                "data": {s: store.input_ids(s) for s in splits}, "tokenizer": store.info["tokenizer"],
                "teacher_vocab": int(store.vocab_size),
                "identity": {k: store.info.get(k) for k in ("teacher", "tokenizer", "data", "codec")}}
    from distill_pipe.data import open_tokens

    tokens = open_tokens(cfg.paths.tokens)
    attrs = dict(tokens.attrs)
    return {"kind": "tokens, CE only (alpha = 1)", "path": str(cfg.paths.tokens),
            "data": {s: tokens[s]["input_ids"] for s in splits}, "tokenizer": attrs["tokenizer"],
            "teacher_vocab": None, "identity": {"tokens": attrs["fingerprint"]}}


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


class _Exporter:
    """on_best: write the current weights as a Hugging Face folder (with the tokenizer), atomically."""

    def __init__(self, model, tok, dest: Path, info):
        self.model, self.tok, self.dest, self.info = model, tok, dest, info

    def __call__(self, trainer: Trainer) -> None:
        export_model(self.model, self.tok, self.dest, self.info, note={"step": trainer.step, **(trainer.last_eval or {})})


def export_model(model, tok, dest: Path, info, note: dict | None = None) -> None:
    """save_pretrained + tokenizer into `dest`, swapped in whole. Collective under FSDP (gathers weights)."""
    from distill_pipe.trainer import fsdp_modules

    if fsdp_modules(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not info.is_main:
            return
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.load_state_dict(state)
    elif not info.is_main:
        return
    else:
        plain = model
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    was_training = plain.training
    models.save_pretrained_quietly(plain, tmp)
    plain.train(was_training)
    tok.save_pretrained(tmp)
    if note is not None:
        (tmp / "distill_pipe.json").write_text(json.dumps(note, indent=2, default=str))
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _write_metrics(path: Path, trainer: DistillTrainer, result: dict, scfg: StudentConfig, init_info: dict,
                   source: dict, vocab: int) -> None:
    best, final = trainer.best_eval or {}, result["final_eval"] or {}
    metrics = {
        "best_eval_loss": best.get("eval_loss"), "best_eval_ppl": best.get("eval_ppl"), "best_step": best.get("step"),
        "final_eval_loss": final.get("eval_loss"), "final_eval_ppl": final.get("eval_ppl"),
        "steps": result["steps"], "total_steps": result["total_steps"], "tokens": result["tokens"],
        "tokens_per_s": result["tokens_per_s"], "train_seconds": result["train_seconds"],
        "early_stopped": result["early_stopped"], "world_size": trainer.info.world_size,
        "global_batch": trainer.global_batch, "vocab_compared": vocab,
        "data": {"kind": source["kind"], "path": source["path"], **source["identity"]},
        "student": {"name": scfg.name, "init": scfg.init, "init_info": init_info,
                    "train": dataclasses.asdict(scfg.train)},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    os.replace(tmp, path)
