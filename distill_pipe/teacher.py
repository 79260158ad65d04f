"""Stage one: run the teacher over tokens.zarr and write its logits to the store.

    distill-pipe teacher-logits                                   # one process
    torchrun --nproc_per_node=8 -m distill_pipe teacher-logits    # FSDP2, one rank per GPU

The unit of work, of writing and of resume is a shard (`teacher_logits.shard_size` whole sequences).
Ranks take disjoint shards, round robin over the shards still missing a completion record, and step in
lockstep (FSDP all-gathers parameters in every forward): a rank that runs out of work runs throwaway
forwards until every rank is done. Killed at any point, a rerun computes only the missing shards.
`--repair` first verifies every finished shard and recomputes only those that fail (corrupt, truncated,
deleted or wrong values), then verifies the whole store; a shard never flagged done is recomputed whole by any
rerun, never read. A resumed factored store's head must equal the teacher's: `--repair` rewrites what does not
(weight, bias, attributes, a rotation's transforms), and refuses a klt-int8 store that lost its fitted transforms.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill_pipe import distributed, models
from distill_pipe.config import Config
from distill_pipe.data import DataError, open_tokens
from distill_pipe.store.manifest import write_manifest
from distill_pipe.store.reader import is_url
from distill_pipe.store import Head, ShardWriter, StoreError, create_store, head_from_model, make_codec, open_store
from distill_pipe.store.format import (HEAD_GROUP, REPAIR_HINT, TRANSFORM_LOST_HINT, HeadCorruptError,
                                       StoreCorruptError)
from distill_pipe.store.writer import clear_shard, rewrite_head, rewrite_input_ids

log = logging.getLogger(__name__)

# Keys of the store attributes that must match for an existing store to be resumed.
IDENTITY_KEYS = ("teacher", "tokenizer", "data", "codec", "shard_size", "seq_len")


class TeacherError(ValueError):
    """A teacher/tokens/store mismatch; the message names the problem and the fix."""


def run_teacher_logits(cfg: Config, overwrite: bool = False, replace_changed: bool = False,
                       repair: bool = False) -> str:
    """overwrite: replace any existing store. replace_changed: replace it only if it was made from other
    inputs (what `dvc repro` wants after a param change), resume it otherwise. repair: verify every finished
    shard first and recompute those that fail (see `_repair`), then verify the whole store again."""
    if overwrite and (replace_changed or repair):
        raise TeacherError(f"--overwrite replaces the store, --{'repair' if repair else 'replace-changed'} keeps "
                           "what it can of it: pass one of them")
    dist = distributed.init_distributed()
    if dist.device.type == "cpu":  # on a GPU the gathers live in device memory; host copies stay cheap
        _return_freed_memory()
    tokens = open_tokens(cfg.paths.tokens)
    t_attrs = dict(tokens.attrs)
    seq_len = int(t_attrs["seq_len"])
    src = models.resolve(cfg.teacher.model)
    hf_config = models.load_config(src)
    _check_tokens(cfg, src, hf_config, tokens, t_attrs)
    codec = make_codec(cfg.teacher_logits.codec, **cfg.teacher_logits.codec_params)
    _warn_temperatures(cfg, codec)

    dtype = models.DTYPES[cfg.teacher.dtype]
    model = _load_model(src, dtype, dist)
    # Two training sequences probe the head (and calibrate a codec that fits a transform, e.g. klt-int8).
    # Under torchrun every rank runs the probe's forward; rank 0 alone holds the head and checks it.
    error = head = h_probe = None
    try:
        head, h_probe = _linear_head(model, tokens["train"]["input_ids"][:2], codec, dtype, dist)
    except TeacherError as e:
        if not dist.distributed:
            raise
        error = str(e)
    attrs = {
        "teacher": {"spec": cfg.teacher.model, "fingerprint": models.model_fingerprint(src),
                    "dtype": cfg.teacher.dtype, "class": distributed.unwrapped_class(model).__name__},
        "tokenizer": t_attrs["tokenizer"],
        "data": {"fingerprint": t_attrs["fingerprint"], "tokens": str(cfg.paths.tokens),
                 "corpus": t_attrs.get("corpus")},
    }
    out = cfg.paths.logits.rstrip("/")
    # Rank 0 alone creates or checks the store; the others open it after the barrier.
    if dist.is_main and error is None:
        try:
            resumed = _create_or_check(out, attrs, tokens, codec, cfg, model, head, h_probe, overwrite, replace_changed)
            if resumed and head is not None:
                _check_head(out, head, repair)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or they wait forever
            if not dist.distributed:
                raise
            error = str(e)
    head = h_probe = None  # written: rank 0 need not hold a (V, d) head while the teacher runs
    error = distributed.broadcast_object(error)  # every rank fails together, with rank 0's message
    if error is not None:
        raise TeacherError(error)
    store = open_store(out, mode="r+", load_head=False)
    codec = store.codec  # carries what the store recorded (e.g. a fitted transform), also when resuming

    if repair:
        _repair(store, tokens, dist)
    jobs = [(split, k) for split in store.splits for k in range(store.num_shards(split))
            if k not in store.completed_shards(split)]
    mine = jobs[dist.rank :: dist.world_size]
    total = sum(store.num_shards(s) for s in store.splits)
    log.info("teacher %s (%s) -> %s: codec %s, %d of %d shards to compute (%d on this rank)",
             cfg.teacher.model, cfg.teacher.dtype, out, codec.name, len(jobs), total, len(mine))
    _compute(model, store, codec, mine, cfg.teacher_logits.batch_size, dist, seq_len)
    distributed.barrier()
    if dist.is_main:
        missing = {s: store.num_shards(s) - len(store.completed_shards(s)) for s in store.splits}
        assert not any(missing.values()), f"shards still missing after the run: {missing}"
        log.info("wrote %s (%s)", out, ", ".join(f"{s}: {store.num_sequences(s)} sequences" for s in store.splits))
    if repair:
        failures = _verify_share(store, dist)
        if failures:
            raise StoreCorruptError(f"{out}: {len(failures)} shard(s) still fail after the repair, e.g. "
                                    f"{failures[0][0]} shard {failures[0][1]}: {failures[0][2]}")
        if dist.is_main:
            log.info("repair: every shard of %s verified (checksums, values, decoded samples)", out)
    if dist.is_main:
        # Last, and only for a complete (and, with --repair, verified) store: DVC tracks this file in its place.
        write_manifest(cfg.paths.manifest, store)
        log.info("wrote %s (the store's manifest)", cfg.paths.manifest)
    return out


def _return_freed_memory() -> None:
    """glibc: blocks of 1 MiB and more get mappings of their own, unmapped when freed. By default glibc raises
    that threshold to the largest block freed so far (up to 32 MiB), after which FSDP's per-layer all-gather
    buffers (host memory when the teacher runs on the CPU) are carved from the heap and stay there,
    fragmented: +0.4-0.7 GiB per rank in benchmarks/scale.py. Not on a GPU, where a fresh mapping for every
    batch's payload copy would cost page faults. A MALLOC_MMAP_THRESHOLD_ the user set wins."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (fixing it also stops the raising)
    except (OSError, AttributeError):  # not glibc (musl): nothing to tune
        pass


def _verify_share(store, dist) -> list[tuple[str, int, str]]:
    """store.verify() of every shard, split round robin over the ranks; every rank gets all failures."""
    pairs = [(s, k) for s in store.splits for k in range(store.num_shards(s))]
    mine = store.verify(shards=pairs[dist.rank :: dist.world_size])
    return [f for part in distributed.all_gather_object(mine) for f in part] if dist.distributed else mine


def _repair(store, tokens, dist) -> None:
    """Verify this rank's share of the finished shards (checksums, payload values, input_ids against
    tokens.zarr, a decoded sample); for each that fails, delete its payload objects and clear its completion
    flag, so the run below recomputes exactly those. Shards not flagged done are recomputed by that run whatever
    their objects hold (write_shard deletes them before writing): only their input_ids, which the run reads, are
    checked here. Each rank touches only its own shards' objects."""
    pairs = [(s, k) for s in store.splits for k in range(store.num_shards(s))]
    mine = pairs[dist.rank :: dist.world_size]
    done = {s: store.completed_shards(s) for s in store.splits}
    failures = {(s, k): why for s, k, why in store.verify(shards=[(s, k) for s, k in mine if k in done[s]])}
    for s, k in mine:
        start, stop = store.shard_range(s, k)
        want = np.asarray(tokens[s]["input_ids"][start:stop])
        try:
            same = np.array_equal(np.asarray(store.input_ids(s)[start:stop]), want)
        except Exception:  # noqa: BLE001 - unreadable: rewritten below
            same = False
        if not same:
            rewrite_input_ids(store, s, k, want)
            if k in done[s]:
                failures.setdefault((s, k), "input_ids differ from tokens.zarr")
            else:
                log.warning("repair: %s shard %d (not finished) had input_ids that differ from tokens.zarr: "
                            "rewritten", s, k)
    for (s, k), why in sorted(failures.items()):
        log.warning("repair: %s shard %d fails (%s): recomputing it", s, k, why)
        clear_shard(store, s, k)
    n = int(distributed.all_reduce(len(failures), op="sum")) if dist.distributed else len(failures)
    distributed.barrier()
    if dist.is_main:
        log.info("repair: %d of %d finished shards failed verification", n, sum(len(d) for d in done.values()))


def _stored_ids(store, split: str, start: int, stop: int) -> np.ndarray:
    """input_ids rows [start, stop) of the store; unreadable ones are a one-line error naming the repair."""
    try:
        return np.asarray(store.input_ids(split)[start:stop])
    except OSError:  # the storage, not the data (a lost mount): already one line
        raise
    except Exception as e:  # noqa: BLE001 - any failure to decompress or decode the chunk
        raise StoreCorruptError(f"{store.location}: {split} input_ids rows {start}-{stop - 1} are unreadable "
                                f"({type(e).__name__}: {e}); {REPAIR_HINT}") from e


def _check_tokens(cfg: Config, src, hf_config, tokens, t_attrs) -> None:
    """Everything that can be checked before loading weights or computing anything."""
    seq_len = int(t_attrs["seq_len"])
    limit = models.max_positions(hf_config)
    if limit is not None and seq_len > limit:
        raise TeacherError(f"tokens.zarr seq_len={seq_len} exceeds the teacher's max positions ({limit}); "
                           "rerun `distill-pipe prepare` with a smaller data.seq_len")
    vocab = int(hf_config.vocab_size)
    for split in ("train", "validation"):
        ids = tokens[split]["input_ids"]
        if ids.shape[0] == 0:
            raise DataError(f"{cfg.paths.tokens} has an empty {split} split; rerun `distill-pipe prepare`")
        try:
            top, bottom = _id_range(ids)
        except Exception as e:  # noqa: BLE001 - zarr raises RuntimeError / ValueError for a cut chunk
            raise DataError(f"{cfg.paths.tokens}: {split}/input_ids cannot be read ({type(e).__name__}: {e}): it is "
                            "damaged; rerun `distill-pipe prepare`") from None
        if top >= vocab or bottom < 0:
            raise TeacherError(f"{cfg.paths.tokens} holds token id {top} outside the teacher's vocabulary "
                               f"(size {vocab}): it was made with another tokenizer "
                               f"({t_attrs['tokenizer']['spec']}); rerun `distill-pipe prepare`")
    tok = models.load_tokenizer(src)
    fp = models.tokenizer_fingerprint(tok)
    if fp != t_attrs["tokenizer"]["fingerprint"]:
        raise TeacherError(f"{cfg.paths.tokens} was tokenized with {t_attrs['tokenizer']['spec']}, whose tokenizer "
                           f"differs from {cfg.teacher.model}'s; rerun `distill-pipe prepare`")


def _warn_temperatures(cfg: Config, codec) -> None:
    """Say now, not after the teacher's compute, which students the train stage will refuse from this store."""
    for name, scfg in cfg.students.items():
        problem = codec.check_temperature(scfg.train.temperature) if scfg.train.alpha < 1 else None
        if problem:
            log.warning("student %s cannot train from this store: %s", name, problem)


def _id_range(ids) -> tuple[int, int]:
    """(max, min) token id of an (N, L) zarr array, read a few MiB at a time: never the whole split."""
    step = max(1, (4 << 20) // (4 * ids.shape[1]))
    top, bottom = -1, 0
    for start in range(0, ids.shape[0], step):
        block = ids[start:start + step]
        top, bottom = max(top, int(block.max())), min(bottom, int(block.min()))
    return top, bottom


def _load_model(src, dtype: torch.dtype, dist):
    """The teacher, ready to run: whole on the device in one process; under torchrun FSDP2-sharded, built on
    the meta device with each rank reading only its own rows of the safetensors (in `dtype`), so the whole
    model never exists on one host. The embedding and the output head are held whole on every rank
    (`fsdp_wrap(inference=True)`: cheaper than gathering them for every forward). A checkpoint that cannot be
    read by rows (GGUF, .bin) is loaded whole on each rank, in `dtype`, and then sharded.

    A failure on any rank fails every rank together with one TeacherError (one line from the CLI, not a traceback
    per rank), after the ranks that loaded have reached the same point: none is left waiting in a collective."""
    failure, model = None, None
    try:
        if not dist.distributed:
            model = models.load_causal_lm(src, dtype=dtype, device=dist.device)
        else:
            # The parameters are already in `dtype`: no mixed-precision cast; fp32 output on the root only.
            wrap = lambda m: distributed.fsdp_wrap(m, param_dtype=None, inference=True)  # noqa: E731
            model = models.load_causal_lm_sharded(src, dtype, dist.device, wrap)
            if model is None:
                log.info("%s cannot be read shard by shard: every rank loads it whole, then shards it", src.spec)
                model = wrap(models.load_causal_lm(src, dtype=dtype, device="cpu"))
    except Exception as e:  # noqa: BLE001 - any failure to read the teacher is the user's to act on
        failure = e
    error = None if failure is None else _load_error(src, failure)
    if dist.distributed and error is not None:
        error = f"rank {dist.rank}: {error}"
    errors = [e for e in distributed.all_gather_object(error) if e]  # [error] in one process
    if errors:
        raise TeacherError(errors[0]) from failure  # DISTILL_PIPE_DEBUG=1 shows this rank's traceback
    return model


def _load_error(src, e: Exception) -> str:
    """One line for a teacher that failed to load: our own errors name their fix; anything else (a KeyError, a
    safetensors header error) means the files are not what their config says."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
    if isinstance(e, (ValueError, OSError)):
        return text
    return (f"cannot load the teacher {src.spec} ({type(e).__name__}: {text}): its files are damaged, incomplete "
            "or not what its config.json describes; download or save it again (DISTILL_PIPE_DEBUG=1 shows the "
            "traceback)")


def _reshard(model) -> None:
    """Free what FSDP gathered for the root unit: with no backward to follow, FSDP2 keeps the root's
    parameters whole after a forward, for the rest of the stage."""
    if hasattr(model, "reshard"):
        model.reshard()


def _gathered_head(model, dtype: torch.dtype, dist) -> dict | None:
    """The output head on rank 0 (None elsewhere), in the compute dtype, so the head is the one the teacher
    applies, the same with any number of ranks. The teacher holds it whole on every rank; were it sharded,
    every rank would take part in gathering it, and the others drop it at once."""
    lm_head = model.get_output_embeddings()
    tensors = {}
    for key in ("weight", "bias"):
        t = getattr(lm_head, key, None)
        if isinstance(t, torch.Tensor):
            t = t.detach()
            tensors[key] = (t.full_tensor() if hasattr(t, "full_tensor") else t).to(dtype)
    if not dist.is_main:
        return None
    return head_from_model(model, tensors, float32=False)  # kept in `dtype`: no whole float32 copy


def _linear_head(model, probe_ids, codec, dtype: torch.dtype, dist) -> tuple[dict | None, torch.Tensor | None]:
    """For the factored codec: the output head and the probe's final hidden states (P, d), after checking
    logits == post(h @ W.T + b) on the probe sequences. Under torchrun every rank runs the forward; rank 0
    gets the head and does the check, the others get (None, None)."""
    if codec.input_kind != "hidden":
        return None, None
    head = _gathered_head(model, dtype, dist)
    ids = torch.as_tensor(np.asarray(probe_ids), dtype=torch.long, device=dist.device)
    with torch.inference_mode(), _capture_hidden(model) as cap:
        logits = model(ids).logits.float().flatten(0, 1).cpu()
        _reshard(model)
        h = cap["h"].float().flatten(0, 1).cpu()
    if head is None:
        return None, None
    err, W, b = 0.0, head["weight"], head["bias"]
    with torch.inference_mode():  # in blocks of vocabulary rows: the head is never held whole in float32
        for v in range(0, W.shape[0], 8192):
            part = Head(W[v:v + 8192].float(), None if b is None else b[v:v + 8192],
                        head["final_logit_softcapping"], head["logit_scale"]).logits(h)
            err = max(err, (part - logits[:, v:v + 8192]).abs().max().item())
    # the model rounds its logits to `dtype` (bf16: 2^-8 relative); anything non-linear errs far more
    tol = max(1e-3, 4 * torch.finfo(dtype).eps)
    if not err <= tol * max(1.0, logits.abs().max().item()):
        raise TeacherError(f"{type(model).__name__}'s logits are not a linear head over the final hidden state "
                           f"(max error {err:.3g}); use teacher_logits.codec=dense-bf16 or dense-u8")
    return head, h


class _capture_hidden:
    """Context manager: records the decoder's final (normalised) hidden state of each forward in ["h"]."""

    def __init__(self, model):
        self.decoder = model.get_decoder()

    def __enter__(self):
        self.box: dict = {}

        def hook(module, args, output):
            self.box["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

        self.handle = self.decoder.register_forward_hook(hook)
        return self.box

    def __exit__(self, *exc):
        self.handle.remove()


def _create_or_check(out, attrs, tokens, codec, cfg, model, head, h_probe, overwrite, replace_changed) -> bool:
    """Create the store, or check that the existing one was made from these inputs; True when it resumes one."""
    expected = {**attrs, "codec": {"name": codec.name, "params": codec.params},
                "shard_size": cfg.teacher_logits.shard_size, "seq_len": int(tokens.attrs["seq_len"])}
    existing = None
    if not overwrite:
        try:
            existing = open_store(out, load_head=False, check_head=False)  # the head: _check_head
        except StoreError as e:
            if _exists(out):
                raise TeacherError(f"{out} exists but is not a usable logit store ({e}); pass --overwrite "
                                   "to replace it") from None
    if existing is not None:
        info = existing.info
        differ = [k for k in IDENTITY_KEYS
                  if _identity(_key_view(k, info.get(k))) != _identity(_key_view(k, expected[k]))]
        if differ and replace_changed:
            log.info("%s was made from another %s: replacing it (--replace-changed)", out, ", ".join(differ))
            existing = None
        elif differ:
            raise TeacherError(f"{out} was made from another {', '.join(differ)}; pass --overwrite to replace "
                               "it, or set paths.logits to a new location")
        else:
            log.info("resuming %s", out)
            return True
    c = model.config
    if h_probe is not None:
        codec.calibrate(h_probe, head)  # a no-op for codecs without a fitted transform
    # A local store is created beside its final path and renamed into place, so a kill during creation
    # leaves nothing that a plain rerun would have to --overwrite. (On object storage there is no rename:
    # an interrupted creation there needs --overwrite.)
    local = not is_url(out)
    target = f"{out}.creating" if local else out
    if local:
        shutil.rmtree(target, ignore_errors=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    splits = ("train", "validation")
    # Conversations: the store keeps payload only where the next token is a target (store/format.py v2).
    masks = {s: tokens[s]["target_mask"] for s in splits if "target_mask" in tokens[s]}
    create_store(target, attrs=attrs, splits={s: tokens[s]["input_ids"] for s in splits},
                 codec=codec, shard_size=cfg.teacher_logits.shard_size, vocab_size=int(c.vocab_size),
                 hidden_size=int(c.hidden_size), head=head, overwrite=True, target_masks=masks or None)
    if local:
        if Path(out).exists():  # only with --overwrite or --replace-changed
            shutil.rmtree(out)
        os.replace(target, out)
    log.info("created %s", out)
    return False


def _check_head(out: str, head: dict, repair: bool) -> None:
    """A resumed factored store's head must be the teacher's (`head`): weight, bias and attributes as the teacher
    gives them, transforms readable. What is not is a one-line error naming the repair, and with `repair` is
    rewritten from the teacher, bit for bit what the store was created with; except klt-int8's transforms, fitted
    when the store was created: its payload is coded in their basis, so a store that lost them is refused."""
    store = open_store(out, mode="r+" if repair else "r", load_head=False, check_head=False)
    problems = store.head_problems(head)
    if not problems:
        return
    if "transform" in problems and store.codec.params.get("hidden_dtype") == "klt-int8":
        raise TeacherError(f"{out}: the klt-int8 transform ({HEAD_GROUP}/transform) {problems['transform']}; "
                           f"{TRANSFORM_LOST_HINT}")
    part, why = next(iter(problems.items()))
    if not repair:
        raise HeadCorruptError(f"{out}: the teacher's head ({HEAD_GROUP}/{part}) {why}; {REPAIR_HINT}", part, why)
    for part, why in problems.items():
        log.warning("repair: %s/%s %s: rewriting it from the teacher", HEAD_GROUP, part, why)
    rewrite_head(store, head, problems)
    left = store.head_problems(head)
    assert not left, f"the head still fails after its repair: {left}"
    log.info("repair: the head of %s rewritten (%s) and verified", out, ", ".join(problems))


def _key_view(key: str, value):
    """What must match for a resume: for the data, its fingerprint, not where tokens.zarr lies."""
    return {"fingerprint": value.get("fingerprint")} if key == "data" and isinstance(value, dict) else value


def _identity(value):
    """Attributes as they compare after a JSON round trip (tuples become lists, ints stay ints)."""
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _exists(out: str) -> bool:
    if is_url(out):
        import fsspec

        fs, path = fsspec.core.url_to_fs(out)
        return fs.exists(path)
    return Path(out).exists()


def _step(model, store, codec, writers, parts, batches, step, cap, dist, bar, seq_len) -> None:
    real = step < len(batches)
    split, k, start, stop = batches[step] if real else batches[-1] if batches else ("train", 0, 0, 1)
    failed = None
    try:
        ids = torch.as_tensor(_stored_ids(store, split, start, stop), dtype=torch.long, device=dist.device)
    except Exception as e:  # noqa: BLE001 - raised after the forward below
        if not dist.distributed:
            raise
        # The other ranks are about to enter this step's FSDP all-gathers: run the forward anyway (on
        # placeholder ids) so they are not left waiting, then fail; the step's error flag stops every rank.
        failed, ids = e, torch.zeros((stop - start, seq_len), dtype=torch.long, device=dist.device)
    # logits_to_keep=1: the factored codec needs only the hidden state, not the (B, L, V) logits.
    out = model(ids, logits_to_keep=1 if codec.input_kind == "hidden" else 0)
    _reshard(model)
    if failed is not None:
        raise failed
    if not real:
        return  # a throwaway forward that keeps this rank in FSDP lockstep
    x = cap["h"] if codec.input_kind == "hidden" else out.logits
    rows = [f"{split}/{i}" for i in range(start, stop)]  # seeds a random codec's draws per sequence
    payload = {name: t.cpu() for name, t in codec.encode(x, rows=rows).items()}
    del out, x
    parts.setdefault((split, k), []).append(payload)
    if stop == store.shard_range(split, k)[1]:
        chunks = parts.pop((split, k))
        writers[split].submit(k, {n: torch.cat([c[n] for c in chunks]) for n in chunks[0]})
    bar.update((stop - start) * seq_len)


def _compute(model, store, codec, jobs, batch_size: int, dist, seq_len: int) -> None:
    batches = [(split, k, start, min(start + batch_size, stop))
               for split, k in jobs
               for (lo, stop) in [store.shard_range(split, k)]
               for start in range(lo, stop, batch_size)]
    steps = int(distributed.all_reduce(len(batches), op="max")) if dist.distributed else len(batches)
    writers = {split: ShardWriter(store, split) for split in store.splits}
    parts: dict[tuple[str, int], list[dict]] = {}
    bar = tqdm(total=sum(b[3] - b[2] for b in batches) * seq_len, unit="tok", unit_scale=True,
               desc="teacher logits", disable=not dist.is_main, dynamic_ncols=True)
    t0 = time.perf_counter()
    error: BaseException | None = None
    with torch.inference_mode(), _capture_hidden(model) as cap:
        for step in range(steps):
            if error is None:
                try:
                    _step(model, store, codec, writers, parts, batches, step, cap, dist, bar, seq_len)
                except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks know
                    error = e
            # One flag per step: a rank that failed stops every rank, instead of leaving them blocked in
            # FSDP all-gathers until the process-group timeout.
            if dist.distributed and distributed.all_reduce(int(error is not None), op="max"):
                error = error or TeacherError(
                    "another rank failed (its error is above); rerun the same command to resume: the shards "
                    "finished so far are kept")
                break
    bar.close()
    for w in writers.values():  # finished shards are flushed even when something failed
        try:
            w.close()
        except Exception as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error
    n_tok = sum(b[3] - b[2] for b in batches) * seq_len
    if n_tok:
        log.info("computed %d tokens in %.1f s (%.0f tokens/s on this rank)", n_tok, time.perf_counter() - t0,
                 n_tok / (time.perf_counter() - t0))
