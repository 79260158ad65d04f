"""Scale: prepare's memory and speed from 10^7 to 10^8 tokens and on one 1 GB text file, and the teacher
stage's host memory under torchrun with a ~0.92B-parameter teacher. Corpora and teacher are built on the spot.

    python benchmarks/scale.py                          # every part (~10^8-token corpus + 1 GB text: ~2.5 GB of /tmp)
    python benchmarks/scale.py --part prepare --sizes 1e7
    python benchmarks/scale.py --part text [--text-gb 1]
    python benchmarks/scale.py --part teacher [--layers 14]

prepare: the corpus is CPython's own standard library (.py files, not site-packages) as JSONL, one record per
file, repeated until it holds about N tokens (each copy's records are new documents to the split). Each
`prepare` runs in a fresh process that reports its own peak RSS (getrusage) and the stage's wall time;
tokens/s = tokens tokenized / that time. The version before streaming (`--baseline-rev`, run from a `git
archive` of that revision in a temporary folder) runs on the 10^7 corpus in the same benchmark run, so the
speed ratio is measured under the same load. Targets: peak RSS flat within 10% from 10^7 to 10^8 and under
1 GB; >= 1M tokens/s; not slower than before.

text: one .txt file of `--text-gb` GB (10^9 bytes) of prose, CPython's pydoc topics one after another, blank
lines between passages, repeated until the size is reached; `prepare` with the SmolLM2 tokenizer and no caps,
in a fresh process as above. A text file is cut into blocks of whole passages (documents) and read 4 MiB at a
time, so its peak RSS must stay near the JSONL figures: target under 1 GB, and both splits filled.

teacher: a random Llama (hidden 2048, 14 layers, MLP 5632, SmolLM2's 49,152-token tokenizer: 0.92B
parameters) saved as bf16 safetensors, 8 + 2 sequences of 64 tokens from the same corpus, `teacher.dtype:
bfloat16`, codec factored. The stage runs once in one process and once under `torchrun --nproc_per_node=2`;
each rank reports its own peak RSS, and their sum is compared with 1.25 x the bf16 size + 1 GiB per rank.
The two stores must hold the same values.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30
BASELINE_REV = "23fa4e6^"  # the last revision whose prepare held the whole corpus in memory


def build_corpus(path: Path, tokens: float, chars_per_token: float = 3.46) -> Path:
    """CPython's stdlib sources as JSONL, repeated until ~`tokens` tokens (3.46 chars/token: SmolLM2 on them)."""
    if path.exists():
        return path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [f.read_bytes().decode("utf-8", "replace") for f in sorted(stdlib.rglob("*.py"))
             if "site-packages" not in f.parts and f.is_file()]
    want, done = tokens * chars_per_token, 0
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as out:
        while done < want:
            for t in texts:
                out.write(json.dumps({"text": t}) + "\n")
                done += len(t)
                if done >= want:
                    break
    os.replace(tmp, path)
    return path


def run_measured(code: str, pythonpath: Path, cwd: Path, env_extra: dict | None = None) -> dict:
    """Run `code` in a fresh Python process; it prints one JSON line, to which its peak RSS is added."""
    wrapper = (f"import json, resource, sys\n{code}\n"
               "r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "out['peak_rss_bytes'] = r * 1024\n"
               "u = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]\n"
               "out['cpu_seconds'] = sum(x.ru_utime + x.ru_stime for x in u)\n"
               "print('RESULT ' + json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[7:])


PREPARE = """
import time
from distill_pipe.config import load_config
from distill_pipe.data import run_prepare
import zarr
cfg = load_config(overrides={overrides!r})
t = time.perf_counter()
run_prepare(cfg)
dt = time.perf_counter() - t
a = zarr.open_group(cfg.paths.tokens, mode="r").attrs["splits"]
out = {{"seconds": dt, "stream_tokens": sum(s["stream_tokens"] for s in a.values()),
        "tokens": sum(s["tokens"] for s in a.values()),
        "splits": {{k: {{"documents": s["documents"], "tokens": s["tokens"]}} for k, s in a.items()}}}}
"""


def build_text(path: Path, n_bytes: int) -> Path:
    """One .txt file of ~n_bytes of prose: the pydoc topics, passages apart by blank lines, repeated."""
    if path.exists() and path.stat().st_size >= n_bytes:
        return path
    from pydoc_data.topics import topics

    piece = "\n\n".join(t.strip() for _, t in sorted(topics.items())).encode() + b"\n\n"
    tmp, done = path.with_suffix(".part"), 0
    with open(tmp, "wb") as out:
        while done < n_bytes:
            out.write(piece)
            done += len(piece)
    os.replace(tmp, path)
    return path


def prepare_once(code_dir: Path, work: Path, corpus: Path, name: str) -> dict:
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text((code_dir / "params.yaml").read_text())
    overrides = [f"data.source={corpus}", "data.max_train_tokens=null", "data.max_validation_tokens=null",
                 "teacher.model=builtin:smollm2-135m", f"paths.tokens={run_dir / 'tokens.zarr'}"]
    r = run_measured(PREPARE.format(overrides=overrides), code_dir, run_dir)
    r["tokens_per_s"] = r["stream_tokens"] / r["seconds"]
    print(f"  {name:<28} {r['stream_tokens'] / 1e6:8.1f}M tokens  {r['seconds']:7.1f} s  "
          f"{r['tokens_per_s'] / 1e6:5.2f}M tokens/s  peak RSS {r['peak_rss_bytes'] / 1e9:5.2f} GB  "
          f"({r['stream_tokens'] / r['cpu_seconds'] / 1e6:.2f}M tokens per CPU-second, whole process)", flush=True)
    return r


def part_prepare(args, work: Path) -> None:
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"prepare (load average {os.getloadavg()[0]:.1f} at start)")
    results = {}
    for size in sizes:
        corpus = build_corpus(work / f"stdlib-{size:.0e}.jsonl", size)
        results[size] = prepare_once(REPO, work, corpus, f"streaming {size:.0e}")
    if args.baseline_rev:
        base = work / "baseline"
        if not base.exists():
            base.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline_rev], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        corpus = build_corpus(work / f"stdlib-{sizes[0]:.0e}.jsonl", sizes[0])
        old = prepare_once(base, work, corpus, f"before ({args.baseline_rev}) {sizes[0]:.0e}")
        new = results[sizes[0]]
        print(f"  speed streaming / before at {sizes[0]:.0e}: {new['tokens_per_s'] / old['tokens_per_s']:.2f}x; "
              f"peak RSS {new['peak_rss_bytes'] / 1e9:.2f} vs {old['peak_rss_bytes'] / 1e9:.2f} GB")
    if len(sizes) > 1:
        lo, hi = results[sizes[0]], results[sizes[-1]]
        print(f"  peak RSS {sizes[-1]:.0e} / {sizes[0]:.0e}: {hi['peak_rss_bytes'] / lo['peak_rss_bytes']:.3f} "
              "(target within 1.10, under 1 GB)")
    print(f"  (load average {os.getloadavg()[0]:.1f} at end, {len(os.sched_getaffinity(0))} usable CPUs)", flush=True)


def part_text(args, work: Path) -> None:
    size = int(args.text_gb * 1e9)
    t = time.perf_counter()
    corpus = build_text(work / f"prose-{args.text_gb:g}GB.txt", size)
    print(f"text (one file of {corpus.stat().st_size / 1e9:.2f} GB, built in {time.perf_counter() - t:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} at start)", flush=True)
    r = prepare_once(REPO, work, corpus, f"one .txt file, {args.text_gb:g} GB")
    s = r["splits"]
    print(f"  documents (text blocks): {s['train']['documents']:,} train, {s['validation']['documents']:,} validation; "
          f"tokens {s['train']['tokens'] / 1e6:.1f}M / {s['validation']['tokens'] / 1e6:.1f}M; peak RSS "
          f"{r['peak_rss_bytes'] / 1e9:.2f} GB (target under 1 GB, as the JSONL corpora above)")
    print(f"  (load average {os.getloadavg()[0]:.1f} at end, {len(os.sched_getaffinity(0))} usable CPUs)", flush=True)


# ---------------------------------------------------------------- teacher


def build_teacher(folder: Path, layers: int, hidden: int, seed: int = 0) -> int:
    """A random Llama saved as bf16 safetensors, built without ever holding an fp32 copy; returns its size."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from distill_pipe import models

    tok = models.load_tokenizer("builtin:smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      pad_token_id=tok.eos_token_id)
    if not (folder / "config.json").exists():
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.fill_(1.0)  # norms
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, framework="pt") as st:
            n += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    return n


RANK = """
import atexit, json, os, resource, sys
from pathlib import Path
out_dir = Path(sys.argv.pop(1))
def report():  # this process's own peak RSS, written when it exits
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_bytes": r}))
atexit.register(report)
sys.argv[0] = "distill-pipe"
from distill_pipe.cli import main
main()
"""


def teacher_run(work: Path, run_dir: Path, ranks: int, stage_args: list[str]) -> tuple[float, list[int]]:
    rss_dir = run_dir / f"rss-{ranks}"
    rss_dir.mkdir(parents=True, exist_ok=True)
    script = work / "rank.py"
    script.write_text(RANK)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread in both runs: a GEMM's summation order depends on its thread count
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={ranks}"]
    t = time.perf_counter()
    proc = subprocess.run([*launch, str(script), str(rss_dir), "teacher-logits", *stage_args], cwd=run_dir,
                          env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"teacher stage with {ranks} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    peaks = [json.loads((rss_dir / f"rank{r}.json").read_text())["peak_rss_bytes"] for r in range(ranks)]
    return dt, peaks


def part_teacher(args, work: Path) -> None:
    import numpy as np
    import zarr

    t0 = time.perf_counter()
    teacher = work / f"llama-{args.layers}x{args.hidden}"
    n = build_teacher(teacher, args.layers, args.hidden)
    bf16 = 2 * n
    print(f"teacher: random Llama, {n / 1e9:.3f}B parameters, {bf16 / GiB:.2f} GiB in bf16 "
          f"(built in {time.perf_counter() - t0:.0f} s); load average {os.getloadavg()[0]:.1f}", flush=True)
    run_dir = work / "teacher_run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "params.yaml").write_text((REPO / "params.yaml").read_text())
    corpus = build_corpus(work / "stdlib-1e+07.jsonl", 1e7)
    common = ["--set", f"teacher.model={teacher}", "--set", "teacher.dtype=bfloat16"]
    prep = ["--set", f"data.source={corpus}", "--set", "data.seq_len=64", "--set", "data.max_train_tokens=512",
            "--set", "data.max_validation_tokens=128"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "distill_pipe", "prepare", *common, *prep], cwd=run_dir, env=env,
                   check=True, capture_output=True)
    stage = [*common, "--set", "teacher_logits.shard_size=2", "--set", "teacher_logits.batch_size=2",
             "--set", "teacher_logits.codec=factored"]
    budget = 1.25 * bf16 + 2 * GiB
    t1, one = teacher_run(work, run_dir, 1, [*stage, "--set", "paths.logits=one.zarr", "--overwrite"])
    print(f"  1 process:  {t1:6.0f} s, peak RSS {one[0] / GiB:.2f} GiB", flush=True)
    t2, two = teacher_run(work, run_dir, 2, [*stage, "--set", "paths.logits=two.zarr", "--overwrite"])
    print(f"  2 ranks:    {t2:6.0f} s, peak RSS {' + '.join(f'{p / GiB:.2f}' for p in two)} = "
          f"{sum(two) / GiB:.2f} GiB summed (target <= 1.25 x {bf16 / GiB:.2f} + 2 x 1 = {budget / GiB:.2f} GiB)")
    a, b = zarr.open_group(str(run_dir / "one.zarr"), mode="r"), zarr.open_group(str(run_dir / "two.zarr"), mode="r")
    worst, equal = 0.0, True
    for split in ("train", "validation"):
        for name, arr in a[split].arrays():
            x, y = arr[...], b[split][name][...]
            equal &= bool(np.array_equal(x, y))
            if x.dtype.kind == "f":
                worst = max(worst, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max(initial=0)))
    equal &= bool(np.array_equal(a["head"]["weight"][...], b["head"]["weight"][...]))
    print(f"  stores: {'bit-equal' if equal else f'max abs difference {worst:.3g}'} (1 process vs 2 ranks)")
    print(f"  teacher part took {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["prepare", "text", "teacher", "both"], default="both",
                    help="both: every part")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "distill-pipe-scale"),
                    help="corpus, teacher and outputs (kept between runs: the corpus and teacher are reused)")
    ap.add_argument("--sizes", default="1e7,1e8", help="corpus sizes in tokens, comma-separated")
    ap.add_argument("--text-gb", type=float, default=1.0, help="size of the single text file, in GB (10^9 bytes)")
    ap.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision to compare prepare's speed with; '' for none")
    ap.add_argument("--layers", type=int, default=14, help="teacher layers (14 x 2048: 0.92B parameters)")
    ap.add_argument("--hidden", type=int, default=2048, help="teacher hidden size (MLP: 11/4 of it)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.part in ("prepare", "both"):
        part_prepare(args, work)
    if args.part in ("text", "both"):
        part_text(args, work)
    if args.part in ("teacher", "both"):
        part_teacher(args, work)


if __name__ == "__main__":
    main()
