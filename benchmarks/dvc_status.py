"""`dvc status` time with a tiny logit store and with the same store padded to a large size.

    python benchmarks/dvc_status.py [--pad-gb 100] [--pad-files 10000] [--repeats 5] [--old-pad-gb 2]

Builds a copy of this repository's DVC project in a temporary folder with the tests' tiny configuration and
tiny teacher (a 2-layer Llama, d=32, a 300-token BPE tokenizer; tests/conftest.py, tests/test_dvc.py: needs
the `test` extra), runs `dvc repro` once, then
times `dvc status` (median of --repeats runs, each a fresh `dvc` process) three ways:

1. with the store as written (a few hundred kB);
2. with the store padded to --pad-gb GB in --pad-files extra shard-sized files inside it
   (logits.zarr/train/padding/...). The files are sparse: their apparent size is --pad-gb but they use no
   disk. That does not flatter the figure: anything that hashes or reads them (as DVC hashes an output or
   dependency) reads --pad-gb of zeros through md5, minutes per 100 GB; a stat per file is what remains;
3. for comparison, the former dvc.yaml (the store itself an uncached output of the teacher stage and a
   dependency of every student and of evaluate), after a `dvc commit` of the tiny store: `dvc status`
   with the store padded by --old-pad-gb (the first status after the store grew, when DVC hashes it, then
   a repeat, when its state database has the hashes). Skip it with --old-pad-gb 0.

(1) and (2) alternate, --repeats times each, and their medians are compared. The target: (2) takes as
long as (1), within the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STORE = "stages/teacher_logits/logits.zarr"
# this checkout's code, in this process and in every dvc / distill-pipe process it starts
os.environ.update(HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO))


def sh(*args, cwd) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(args)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def tiny_project(root: Path) -> Path:
    """A git + DVC copy of this repository with the tests' tiny params and tiny teacher, `dvc repro`-ed."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_tiny_llama, make_tokenizer
    from test_dvc import tiny_repo

    teacher = root / "teacher"
    teacher.mkdir()
    make_tiny_llama(teacher, make_tokenizer(teacher))
    (root / "repo").mkdir()
    repo = tiny_repo(root / "repo", teacher)
    print("dvc repro of the tiny project ...", flush=True)
    sh("dvc", "repro", cwd=repo)
    return repo


def time_status(repo: Path, repeats: int) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sh("dvc", "status", cwd=repo)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out.strip().splitlines()[-1] if out.strip() else ""


def pad(store: Path, gb: float, files: int, tag: str) -> int:
    """Sparse files of total apparent size `gb` GB in store/train/padding-<tag>; returns the bytes added."""
    folder = store / "train" / f"padding-{tag}"
    folder.mkdir(parents=True)
    each = int(gb * 1e9) // files
    for i in range(files):
        with open(folder / f"{i:06d}", "wb") as f:
            f.truncate(each)
    return each * files


def size(path: Path) -> tuple[int, int]:
    """(apparent bytes, bytes on disk) of a folder."""
    apparent = disk = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            disk += st.st_blocks * 512
    return apparent, disk


def old_layout(repo: Path) -> None:
    """The former dvc.yaml: the store an uncached, persisted output of the teacher stage and a dependency of
    every student and of evaluate (as committed before the manifest)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    st = spec["stages"]
    st["teacher_logits"]["outs"] = [{"${paths.logits}": {"persist": True, "cache": False}}]
    for stage in (st["train"]["do"], st["evaluate"]):
        stage["deps"] = ["${paths.logits}" if d == "${paths.manifest}" else d for d in stage["deps"]]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sh("dvc", "commit", "--force", cwd=repo)  # record the store's hash as the old layout's dvc.lock did


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pad-gb", type=float, default=100.0, help="apparent size added to the store (sparse files)")
    ap.add_argument("--pad-files", type=int, default=10000, help="number of padding files")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old-pad-gb", type=float, default=2.0,
                    help="padding for the former layout's comparison (0: skip it); DVC reads all of it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dvc_status_") as tmp:
        repo = tiny_project(Path(tmp))
        store = repo / STORE
        tiny, _ = size(store)
        # The padding is made once beside the store and renamed in and out (instant), so that the tiny and
        # the padded measurements alternate and a shared machine's drifting load hits both alike.
        stash = Path(tmp) / "padding"
        stash.mkdir()
        pad(stash, args.pad_gb, args.pad_files, "big")
        inside = store / "train" / "padding-big"
        small, big, line = [], [], ""
        for _ in range(args.repeats):
            small.append(time_status(repo, 1)[0])
            (stash / "train" / "padding-big").rename(inside)
            t, line = time_status(repo, 1)
            big.append(t)
            inside.rename(stash / "train" / "padding-big")
        (stash / "train" / "padding-big").rename(inside)  # once more, to report its size
        apparent, disk = size(store)
        files = sum(1 for p in store.rglob("*") if p.is_file())
        inside.rename(stash / "train" / "padding-big")
        t_small, t_big = statistics.median(small), statistics.median(big)
        print(f"store {tiny / 1e6:.2f} MB: dvc status {t_small:.2f} s (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in small)})")
        print(f"store {apparent / 1e9:.1f} GB apparent, {disk / 1e6:.1f} MB on disk, {files} files: dvc status "
              f"{t_big:.2f} s (median of {args.repeats}: {', '.join(f'{t:.2f}' for t in big)}; {line!r})")
        print(f"ratio padded / tiny: {t_big / t_small:.2f}")

        if args.old_pad_gb > 0:
            old_layout(repo)
            t_old_small, _ = time_status(repo, args.repeats)
            pad(store, args.old_pad_gb, max(1, min(args.pad_files, int(args.old_pad_gb * 100))), "old")
            apparent, _ = size(store)
            t0 = time.perf_counter()
            sh("dvc", "status", cwd=repo)
            t_first = time.perf_counter() - t0
            t_again, _ = time_status(repo, args.repeats)
            print(f"former layout (store as output and dependency): tiny store {t_old_small:.2f} s; padded to "
                  f"{apparent / 1e9:.1f} GB: first status {t_first:.2f} s (hashes it), repeats {t_again:.2f} s")


if __name__ == "__main__":
    main()
