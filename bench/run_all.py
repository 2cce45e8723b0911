"""Run every ``bench/bench_*.py`` that has ``run(device)``, save the rows, print tables, update the README.

    python bench/run_all.py --device cpu              # every benchmark, CPU
    python bench/run_all.py --device cuda --only hook # one benchmark (name with or without "bench_")

Results go to ``bench/results/<device-name-slug>.json`` (merged: benchmarks not run this time keep their
previous rows) with the environment record, and the table between ``<!-- results:start -->`` and
``<!-- results:end -->`` in ``bench/README.md`` is regenerated from every file in ``bench/results/``.
A benchmark that raises is reported and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

import torch  # noqa: E402

import common  # noqa: E402

README = BENCH_DIR / "README.md"
# benchmarks left out of a default run (still run with --only NAME), per device, with the reason
SKIP_BY_DEFAULT = {
    "cpu": {"pure_stages": "SD1.5 at 256 px takes 5-15 min on 2 CPU cores; bench_end_to_end covers the stages",
            "compile": "torch.compile of the SD1.5 UNet takes minutes on 2 CPU cores (measured: slower than eager)",
            "compile_e2e": "torch.compile of the SD1.5 UNet takes minutes on 2 CPU cores (measured: slower than eager)"},
    "cuda": {"pure_stages": "bench_end_to_end covers the same runs with verification and the collection floor",
             "compile_e2e": "PURE end to end compiled (SDXL + SD1.5, 50 concepts): several minutes; "
                            "bash bench/gpu/session.sh issue16 runs it"},
}
START, END = "<!-- results:start -->", "<!-- results:end -->"


def discover() -> dict[str, Path]:
    return {p.stem[len("bench_"):]: p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def normalize(name: str, result) -> list[dict]:
    """Rows from what ``run`` returned: a list of dicts, one dict (a row), a dict with "rows", or a dict
    of lists of rows (one per table; the key becomes the row's "table")."""
    if result is None:
        return []
    if isinstance(result, dict):
        if isinstance(result.get("rows"), list):
            result = result["rows"]
        elif result and all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in result.values()):
            result = [{"table": key, **row} for key, rows in result.items() for row in rows]
        else:
            result = [result]
    rows = []
    for row in result:
        if not isinstance(row, dict):
            raise TypeError(f"bench_{name}.run returned a row that is not a dict: {row!r}")
        row = dict(row)
        row.setdefault("bench", name)
        rows.append(row)
    return rows


def results_path(device: str) -> Path:
    return common.RESULTS_DIR / f"{common.slug(common.device_name(device))}.json"


def render_results() -> str:
    """Markdown for the README section: one table per device results file."""
    parts = []
    for path in sorted(common.RESULTS_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            parts.append(f"### {path.name}\n\nunreadable: {e}\n")
            continue
        if not isinstance(data, dict) or "benches" not in data:
            continue  # reports with their own markdown (quality, probe, storage, memory) are not run_all output
        env = data.get("env", {})
        parts.append(f"### {data.get('device_name', path.stem)}\n")
        parts.append(
            f"`{path.relative_to(common.REPO)}` — torch {env.get('torch')}, triton {env.get('triton')}, "
            f"python {env.get('python')}, {env.get('cpu_threads')} CPU threads, "
            f"commit {str(env.get('git_commit'))[:10]}{' (dirty)' if env.get('git_dirty') else ''}, "
            f"{env.get('date')}\n"
        )
        for name, entry in sorted(data.get("benches", {}).items()):
            tables: dict = {}
            for row in entry.get("rows", []):
                tables.setdefault(row.get("table"), []).append(row)
            for table_name, rows in tables.items():
                title = name if table_name in (None, name) else f"{name} / {table_name}"
                secs = f" ({entry['seconds']} s)" if entry.get("seconds") is not None else ""
                parts.append(f"#### {title}{secs}\n")
                parts.append(common.table([{k: v for k, v in r.items() if k not in ("bench", "table")} for r in rows],
                                          markdown=True) + "\n")
            if entry.get("error"):
                parts.append(f"- `{name}` failed: {entry['error'].strip().splitlines()[-1]}\n")
    if not parts:
        return "_No results yet: run `make bench` (CPU) or `make bench-gpu` (CUDA)._\n"
    return "\n".join(parts)


def update_readme() -> bool:
    if not README.exists():
        return False
    text = README.read_text()
    if START not in text or END not in text or text.index(START) > text.index(END):
        common.log(f"{README}: markers {START} / {END} missing; table not updated")
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render_results()}{END}{tail}"
    if new != text:
        tmp = README.with_name(README.name + ".tmp")
        tmp.write_text(new)
        tmp.replace(README)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks in bench/")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", action="append", default=[],
                        help="benchmark name (hook, fista, ...); repeat or comma-separate for several")
    parser.add_argument("--no-readme", action="store_true", help="do not regenerate bench/README.md")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2

    found = discover()
    wanted = [w.strip().removeprefix("bench_") for item in args.only for w in item.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in found]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; found {sorted(found)}", file=sys.stderr)
        return 2
    selected = {k: v for k, v in found.items() if not wanted or k in wanted}
    if not wanted:
        for name, why in SKIP_BY_DEFAULT.get(args.device, {}).items():
            if selected.pop(name, None) is not None:
                common.log(f"== bench_{name}: skipped by default on {args.device} ({why}); run it with --only {name}")

    env = common.environment(args.device)
    out_path = results_path(args.device)
    data = {"device_name": env["device_name"], "device": args.device, "env": env, "benches": {}}
    if out_path.exists():
        try:
            old = json.loads(out_path.read_text())
            data["benches"] = old.get("benches", {})
        except (OSError, ValueError):
            common.log(f"{out_path}: unreadable, starting afresh")

    failed = []
    for name, path in selected.items():
        common.log(f"== bench_{name} ({args.device})")
        t0 = time.perf_counter()
        entry = {"env": env, "rows": [], "error": None}
        try:
            module = load(name, path)
            if not callable(getattr(module, "run", None)):
                common.log(f"   bench_{name}.py has no run(device); skipped")
                continue
            entry["rows"] = normalize(name, module.run(args.device))
        except Exception:
            entry["error"] = traceback.format_exc()
            failed.append(name)
            common.log(entry["error"])
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        data["benches"][name] = entry
        if entry["rows"]:
            print(f"\n## {name} ({entry['seconds']} s)\n")
            print(common.table(entry["rows"]))

    common.write_json(out_path, data)
    print(f"\nwrote {out_path.relative_to(common.REPO)}")
    if not args.no_readme and update_readme():
        print(f"updated {README.relative_to(common.REPO)}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
