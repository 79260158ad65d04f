"""The `evaluate` stage: teacher, each student's best model and its initialisation, on the validation split.

For every model: perplexity (exp of the mean next-token CE), mean KL(teacher || model) at T=1 and top-1
agreement with the teacher, over the same target positions. The teacher's figures come from the store,
never from reloading it. Writes `<paths.evaluate>/metrics.json`, `report.md`, `curves.csv` and `chart.png`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill_pipe import models
from distill_pipe.config import Config
from distill_pipe.losses import IGNORE_INDEX, default_chunk_size, shift_for_next_token
from distill_pipe.prefetch import MicroBatchPlan, MicroBatchStream, host_tokens
from distill_pipe.store.manifest import open_manifested_store
from distill_pipe.student_head import head_spec, run_head

log = logging.getLogger(__name__)
SPLIT = "validation"


class EvaluateError(ValueError):
    """Missing inputs of the evaluate stage; the message says which stage to run."""


@torch.no_grad()
def score(model, store, indices, batch_size: int, vocab_size: int, chunk: int | None = None, desc: str = "",
          device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> dict:
    """Sums over the validation targets, normalised once at the end. model=None scores the teacher itself.

    vocab_size: the logits compared (the tokenizer's size when a model pads its vocabulary, as in training).
    A student's logits are formed chunk by chunk from its last hidden states and its head (student_head.py), in
    fp32: no (N, V) tensor of the student exists.
    A store that drops tokens (dense-u8's tail) gives some targets zero teacher probability: model=None then
    sums CE over the other targets only and counts them in zero_prob_targets (run_evaluate marks that
    perplexity as not comparable).
    device: where the model is and the logits are formed; autocast_dtype: the model's forward under autocast
    (bf16 for a student trained in bf16). The next batches' token rows and teacher payloads are read and
    decompressed in the background (prefetch.py) while this one is scored; sums stay on the device (float64)
    until the end, so nothing waits for the device per batch.
    """
    mask = store.token_rows(SPLIT, mask=True)

    def make_targets(ids_BL, split, idx):
        targets_BL = shift_for_next_token(ids_BL)
        if mask is not None:  # conversations: only the predictions of target tokens count
            targets_BL[:, :-1].masked_fill_(torch.as_tensor(np.asarray(mask[idx])[:, 1:] == 0), IGNORE_INDEX)
        return targets_BL

    device = torch.device(device)
    pin = device.type == "cuda"
    chunk = chunk or default_chunk_size(vocab_size, device)
    head = store.head_on(device)
    spec = None if model is None else head_spec(model, vocab_size)
    ids = store.token_rows(SPLIT)
    # kl, -ce over finite targets, top-1 agreements, finite targets, zero-probability targets
    acc = torch.zeros(5, dtype=torch.float64, device=device)
    n = 0
    plans = [MicroBatchPlan(SPLIT, tuple(indices[s:s + batch_size])) for s in range(0, len(indices), batch_size)]
    stream = MicroBatchStream(
        iter([[p] for p in plans]),
        lambda p: host_tokens(p, np.asarray(ids[list(p.indices)]), make_targets, pin),
        lambda p: store.teacher_batch(SPLIT, list(p.indices), **({"pin_memory": True} if pin else {})), depth=2)
    try:
        for _ in tqdm(plans, desc=f"evaluate {desc}", unit="batch", dynamic_ncols=True):
            (pending,) = stream.next_step()
            host = pending.tokens()
            teacher = pending.teacher().to(device, non_blocking=pin, head=head)
            ids_BL = host.input_ids_BL.to(device, non_blocking=pin)
            targets_N = host.targets_BL.reshape(-1)  # on the CPU: which positions count needs no device sync
            hidden_Nd = None
            if model is not None:  # the last hidden states; each chunk's logits are formed from them below
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    hidden_Nd, W_Vd, b_V = run_head(model, ids_BL, lambda h, w, b: (h.flatten(0, 1), *spec.prepare(w, b)))
            for a in range(0, len(targets_N), chunk):
                b = min(a + chunk, len(targets_N))
                keep = targets_N[a:b] != IGNORE_INDEX
                if not keep.any():
                    continue
                keep_dev = keep.to(device, non_blocking=pin)
                t = targets_N[a:b][keep].to(device, non_blocking=pin)
                t_logp = torch.log_softmax(teacher.logits(a, b)[keep_dev][:, :vocab_size], -1)
                s_logp = t_logp if hidden_Nd is None else torch.log_softmax(
                    spec.logits(hidden_Nd[a:b][keep_dev], W_Vd, b_V), -1)
                p = t_logp.exp()
                tgt = s_logp.gather(1, t[:, None]).squeeze(1)
                finite = torch.isfinite(tgt)
                acc += torch.stack([torch.where(p > 0, p * (t_logp - s_logp), 0.0).sum().double(),
                                    tgt[finite].sum().double(),
                                    (s_logp.argmax(-1) == t_logp.argmax(-1)).sum().double(),
                                    finite.sum().double(), (~finite).sum().double()])
                n += len(t)
    finally:
        stream.close()
    kl, neg_ce, agree, n_ce, zero = acc.tolist()
    ce, n_ce, zero = -neg_ce, int(n_ce), int(zero)
    return {"perplexity": math.exp(ce / n_ce), "ce": ce / n_ce, "kl_to_teacher": kl / n,
            "top1_agreement": agree / n, "tokens": n, "zero_prob_targets": zero}


def run_evaluate(cfg: Config) -> Path:
    out = Path(cfg.paths.evaluate)
    store = open_manifested_store(cfg.paths.logits, cfg.paths.manifest, [SPLIT])
    n_seq = store.num_sequences(SPLIT)
    indices = list(range(min(n_seq, cfg.evaluate.max_sequences or n_seq)))
    bs = cfg.evaluate.batch_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    log.info("evaluating on %d validation sequences of %s on %s", len(indices), cfg.paths.logits, device)

    def bf16(scfg):  # a student is scored the way it trained: bf16 autocast when train.dtype is bfloat16
        return torch.bfloat16 if scfg.train.dtype == "bfloat16" else None

    vocab = store.vocab_size
    results: dict[str, dict] = {"teacher": {"model": cfg.teacher.model,
                                            **score(None, store, indices, bs, vocab, desc="teacher", device=device)}}
    _mark_teacher_perplexity(results["teacher"], store)
    inits: dict[str, dict] = {}
    for name, scfg in cfg.students.items():
        folder = Path(cfg.paths.train) / name
        if not (folder / "model" / "config.json").is_file():
            raise EvaluateError(f"student {name} has no trained model in {folder / 'model'}; run "
                                f"`distill-pipe train --student {name}` (or `dvc repro`)")
        check_student_lineage(name, folder, store)
        try:
            model = models.load_causal_lm(str(folder / "model"), dtype=torch.float32, device=device).eval()
        except Exception as e:  # noqa: BLE001 - a truncated safetensors raises SafetensorError, not an OSError
            text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
            raise EvaluateError(f"student {name}'s model in {folder / 'model'} cannot be loaded ({type(e).__name__}: "
                                f"{text}): it is damaged; train it again (delete {folder}, then "
                                f"`distill-pipe train --student {name}`)") from e
        v = _compared_vocab(model.config.vocab_size, store)
        results[name] = {"alpha": scfg.train.alpha, "temperature": scfg.train.temperature,
                         **score(model, store, indices, bs, v, desc=name, device=device, autocast_dtype=bf16(scfg))}
        del model
        # what build_student depends on: the init, the seed (config inits), the calibration slice (num_layers)
        key = json.dumps([scfg.init, scfg.train.seed, scfg.train.calibration_tokens], sort_keys=True)
        if key not in inits:  # students that share an init are scored against it once
            init_model = _init_model(cfg, scfg, store).to(device)
            v = _compared_vocab(init_model.config.vocab_size, store)
            inits[key] = {"init": scfg.init, **score(init_model, store, indices, bs, v, desc=f"{name} init",
                                                     device=device, autocast_dtype=bf16(scfg))}
            del init_model
        results[name]["init"] = inits[key]

    _mark_teacher_at_t1(results, store)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_flat_metrics(results), indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(results, len(indices), store.seq_len))
    write_curves(out / "curves.csv", cfg)
    write_chart(out / "chart.png", results, cfg)
    log.info("wrote %s, %s, %s and %s", out / "metrics.json", out / "report.md", out / "curves.csv",
             out / "chart.png")
    return out


def check_student_lineage(name: str, folder: Path, store) -> None:
    """The student must have trained on the data this store holds (else its validation split may be the
    student's training data): a KD student on this store (same teacher, data, codec), a CE-only student on
    the tokens the store was made from. Compares the identities train wrote into metrics.json."""
    try:
        trained_on = json.loads((folder / "metrics.json").read_text())["data"]
    except (OSError, ValueError, KeyError):
        raise EvaluateError(f"student {name} has no readable {folder / 'metrics.json'}; rerun "
                            f"`distill-pipe train --student {name}` (or `dvc repro`)") from None
    from distill_pipe.train import store_shape

    info = store.info
    if "tokens" in trained_on:  # CE only: trained on tokens.zarr
        theirs, ours = {"data": trained_on["tokens"]}, {"data": info["data"]["fingerprint"]}
    else:
        theirs, ours = ({"teacher": (d.get("teacher") or {}).get("fingerprint"),
                         "data": (d.get("data") or {}).get("fingerprint"),
                         "codec": json.dumps(d.get("codec"), sort_keys=True)} for d in (trained_on, info))
    # a student of a release that recorded no shape (its fingerprint ignored seq_len) is never taken as current
    theirs["shape"], ours["shape"] = trained_on.get("shape"), store_shape(store)
    differ = [k for k in ours if theirs[k] != ours[k]]
    if "data" in differ and "shape" in differ:  # the data's fingerprint covers its shape: "data" says it all
        differ.remove("shape")
    if differ == ["shape"] and theirs["shape"] is None:
        raise EvaluateError(f"student {name} was trained by an earlier distill-pipe, which did not record the shape "
                            f"of its data, so it cannot be shown to have trained on what {store.location} holds; "
                            f"retrain it with `distill-pipe train --student {name}` (or `dvc repro`)")
    if differ:
        raise EvaluateError(f"student {name} was trained on another {'/'.join(differ)} than {store.location} "
                            f"holds, so its validation split is not held out; retrain it with `distill-pipe train "
                            f"--student {name}` (or `dvc repro`)")


def _mark_teacher_perplexity(teacher: dict, store) -> None:
    """A store that drops tokens (dense-u8's tail, top-k, samples) cannot give the teacher's perplexity: its
    dropped targets have no probability, and the kept ones are renormalised. The figure over the kept
    targets stays, as perplexity_kept_targets; perplexity and ce become None with the reason in the note."""
    if not store.codec.drops_tokens:
        return
    teacher["perplexity_kept_targets"] = teacher["perplexity"]
    teacher["perplexity"] = teacher["ce"] = None
    teacher["perplexity_note"] = (
        f"not comparable: the {store.codec.name} store drops the teacher's unlikely tokens "
        f"({teacher['zero_prob_targets']:,} of {teacher['tokens']:,} targets had zero probability in it); "
        f"{teacher['perplexity_kept_targets']:.2f} over the other targets. A codec that keeps the full "
        "distribution (factored, dense-bf16) gives the teacher's perplexity")
    log.warning("teacher perplexity %s", teacher["perplexity_note"])


def _teacher_t1_problem(codec) -> str | None:
    """Why the store's decoded logits are not the teacher at T=1, or None. A codec may refuse T=1
    (check_temperature); a sparse codec's decode gives its target at its own temperature Ts."""
    if codec.sparse and codec.temperature != 1.0:
        return (f"the {codec.name} store decodes to its target at temperature {codec.temperature:g}; make the "
                "store with temperature 1 for these figures")
    return codec.check_temperature(1.0)


def _mark_teacher_at_t1(results: dict, store) -> None:
    """KL to the teacher and top-1 agreement compare with the teacher at T=1: from a store that cannot give
    T=1 (e.g. tokens sampled at another temperature) they become None, with the reason as teacher_note."""
    problem = _teacher_t1_problem(store.codec)
    if problem is None:
        return
    note = f"not comparable: evaluate compares with the teacher at T=1, and {problem}"
    log.warning("KL to the teacher and top-1 agreement %s", note)
    for r in results.values():
        r["kl_to_teacher"] = r["top1_agreement"] = None
        r["teacher_note"] = note


def _compared_vocab(model_vocab: int, store) -> int:
    """As in training: all logits when student and store agree, else the tokenizer's vocabulary."""
    return store.vocab_size if model_vocab == store.vocab_size else int(store.info["tokenizer"]["vocab_size"])


def _init_model(cfg: Config, scfg, store):
    """The student as initialised, rebuilt exactly as the train stage built it (a layer selection comes
    from the cache that stage filled)."""
    from distill_pipe.students import build_student
    from distill_pipe.train import calibration_ids

    calib = calibration_ids(store.input_ids("train"), scfg.train.calibration_tokens)
    with tempfile.TemporaryDirectory() as scratch:  # never write into the train stage's outputs
        model, _, _ = build_student(cfg, scfg, Path(scratch), calib)
    return model.eval()


def _flat_metrics(results: dict) -> dict:
    """metrics.json for `dvc metrics show`: one flat mapping of numbers per model."""
    out = {}
    for name, r in results.items():
        out[name] = {k: r[k] for k in ("perplexity", "kl_to_teacher", "top1_agreement", "tokens", "zero_prob_targets")}
        if "perplexity_kept_targets" in r:
            out[name]["perplexity_kept_targets"] = r["perplexity_kept_targets"]
        if "init" in r:
            out[name]["init_perplexity"] = r["init"]["perplexity"]
    return out


def report_markdown(results: dict, sequences: int, seq_len: int) -> str:
    teacher_ppl = results["teacher"]["perplexity"]  # None when the store drops tokens
    lines = [f"# Evaluation on the validation split: {sequences} sequences x {seq_len} tokens, "
             f"{results['teacher']['tokens']:,} next-token targets", "",
             "| model | alpha | T | perplexity | KL to teacher (nats/token) | top-1 agreement | init perplexity |",
             "|---|---|---|---|---|---|---|",
             f"| teacher | | | {'n/a (below)' if teacher_ppl is None else f'{teacher_ppl:.2f}'} | 0 | 1 | |"]
    for name, r in results.items():
        if name == "teacher":
            continue
        temperature = r["temperature"] if r["alpha"] < 1 else "–"  # T plays no part in plain CE
        kl, agree = (("n/a", "n/a") if r["kl_to_teacher"] is None else  # see teacher_note
                     (f"{r['kl_to_teacher']:.4f}", f"{r['top1_agreement']:.3f}"))
        lines.append(f"| {name} | {r['alpha']} | {temperature} | {r['perplexity']:.2f} | {kl} "
                     f"| {agree} | {r['init']['perplexity']:.2f} |")
    ce = [r for n, r in results.items() if n != "teacher" and r["alpha"] == 1.0]
    kd = [(n, r) for n, r in results.items() if n != "teacher" and r["alpha"] < 1.0]
    if ce and kd:
        base = ce[0]["perplexity"]
        known = teacher_ppl is not None
        lines += ["", f"Against the CE-only baseline (perplexity {base:.2f}"
                  f"{f', teacher {teacher_ppl:.2f}' if known else ''}):", ""]
        for n, r in kd:
            change = r["perplexity"] / base - 1
            line = f"- {n}: perplexity {change:+.1%} vs CE-only ({'better' if change < 0 else 'worse'})"
            if known:
                closed = (base - r["perplexity"]) / (base - teacher_ppl) if base != teacher_ppl else float("nan")
                line += f"; {closed:.0%} of CE-only's gap to the teacher closed"
            lines.append(line)
    if teacher_ppl is None:
        lines += ["", f"Teacher perplexity {results['teacher']['perplexity_note']}."]
    if "teacher_note" in results["teacher"]:
        lines += ["", f"KL to the teacher and top-1 agreement {results['teacher']['teacher_note']}."]
    return "\n".join(lines) + "\n"


def _eval_history(cfg: Config, name: str) -> list[dict]:
    from distill_pipe.metrics import read_history
    from distill_pipe.train import metrics_dir

    return read_history(metrics_dir(cfg, name), "eval")


def _read_eval_history(cfg: Config, name: str) -> tuple[list[int], list[float], int | None]:
    """(steps, validation CE, index of the exported model's step: metrics.json's best_step)."""
    rows = _eval_history(cfg, name)
    steps = [int(r["step"]) for r in rows]
    try:
        best_step = json.loads((Path(cfg.paths.train) / name / "metrics.json").read_text())["best_step"]
    except (OSError, ValueError, KeyError):
        best_step = None
    # CE, not the optimised loss: alpha and T differ between students, CE is comparable across them.
    return steps, [float(r["eval_ce"]) for r in rows], steps.index(best_step) if best_step in steps else None


def write_curves(path: Path, cfg: Config) -> None:
    """Every student's validation curve in one long table (student, step, eval_ce, eval_ppl): the file
    dvc.yaml plots with the `by_student` template, so the overlay names no student."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "step", "eval_ce", "eval_ppl"])
        for name in cfg.students:
            for r in _eval_history(cfg, name):
                w.writerow([name, r["step"], r["eval_ce"], r["eval_ppl"]])


def write_chart(path: Path, results: dict, cfg: Config) -> None:
    """Eval-loss curves of every student and a perplexity comparison; a PNG needs no internet to open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in cfg.students:
        steps, losses, best = _read_eval_history(cfg, name)
        if steps:
            (line,) = ax1.plot(steps, losses, marker="o", ms=3, label=name)
            if best is not None:
                ax1.plot(steps[best], losses[best], marker="*", ms=12, color=line.get_color(), ls="none")
    if results["teacher"]["ce"] is not None:  # None: the store drops tokens (not comparable)
        ax1.axhline(results["teacher"]["ce"], color="#555", ls="--", lw=1, label="teacher")
    ax1.set(xlabel="optimizer step", ylabel="validation CE (nats/token)",
            title="students: validation CE (★ = best, the exported model)")
    ax1.legend()
    names = list(results)
    ppl = [np.nan if results[n]["perplexity"] is None else results[n]["perplexity"] for n in names]
    init = [results[n]["init"]["perplexity"] if "init" in results[n] else np.nan for n in names]
    x = np.arange(len(names))
    ax2.bar(x - 0.2, init, 0.4, label="at init", color="#bbb")
    ax2.bar(x + 0.2, ppl, 0.4, label="trained", color="#3a7")
    for xi, v, v0 in zip(x, ppl, init):
        if np.isfinite(v):  # nan: the teacher's perplexity from a store that drops tokens (not comparable)
            ax2.text(xi + 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        if np.isfinite(v0):
            ax2.text(xi - 0.2, v0, f"{v0:.1f}", ha="center", va="bottom", fontsize=8)
    top, bottom = np.nanmax(init + ppl), np.nanmin(init + ppl)
    if top / bottom > 20:  # e.g. a randomly initialised student near the vocabulary size: log scale
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax2.set_yscale("log")
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.set_ylim(bottom / 1.5, top * 2)
    else:
        ax2.set_ylim(0, top * 1.15)
    ax2.set_xticks(x, names)
    ax2.set(ylabel="validation perplexity", title="perplexity: teacher vs students")
    ax2.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
