"""Rewrite the README's results block from ``bench/results/quality.json`` (numbers the JSON holds, nothing else).

    python bench/update_readme.py [--json bench/results/quality.json] [--readme README.md]

Without the JSON the block says that no run is committed. The block lies between ``report.README_BEGIN`` and ``report.README_END``; the rest of the README is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pure_fast.evaluate import report  # noqa: E402
from pure_fast.errors import UsageError  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=os.path.join(HERE, "results", "quality.json"))
    p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
    args = p.parse_args(argv)
    try:
        bench = None  # no results file: the block says so
        if os.path.exists(args.json):
            with open(args.json, encoding="utf-8") as f:
                bench = json.load(f)
        with open(args.readme, encoding="utf-8") as f:
            text = f.read()
        new = report.update_readme(text, bench)
    except (OSError, ValueError, UsageError) as exc:
        print(f"update_readme: {exc}", file=sys.stderr)
        return 2
    if new != text:
        report.write_text(args.readme, new)
    src = args.json if bench is not None else "nothing (no results file)"
    print(f"{args.readme}: results block {'rewritten' if new != text else 'already up to date'} from {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
