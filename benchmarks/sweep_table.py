"""Write docs/troubleshooting-cases.md, the users' list of the bad-input sweep (tests/sweep_cases.py).

    python benchmarks/sweep_table.py          # regenerate the page
    python benchmarks/sweep_table.py --check  # exit 1 when the page is out of date with the cases

tests/test_sweep.py fails when the page and the cases differ, so rerun this after changing a case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from sweep_cases import CASES, PAGE, troubleshooting_page  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is out of date")
    args = ap.parse_args()
    path, text = REPO / PAGE, troubleshooting_page()
    if args.check:
        same = path.exists() and path.read_text(encoding="utf-8") == text
        print(f"{PAGE}: {'up to date' if same else 'out of date: run python benchmarks/sweep_table.py'}")
        return 0 if same else 1
    path.write_text(text, encoding="utf-8")
    print(f"{PAGE}: {len(CASES)} cases written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
