"""Shared benchmark helpers: timing, environment record, atomic JSON, tables.

Row convention (every ``bench/bench_*.py`` ``run(device)`` returns a list of such dicts):

    bench     short name of the benchmark ("hook", "fista", ...)
    case      what was run, with its shape ("sd15_attn2 B4 H8 N4096 T77 hd40")
    dtype     input dtype ("fp16") when it applies
    provider  implementation ("eager", "triton", "native", ...)
    ms        median wall time of one call in milliseconds (None when not timed)
    ratio     eager_ms / ms measured in the same run (> 1: faster than eager); 1.0 for the eager row
    check     how the provider was verified against the reference before timing ("max|err| 3e-4 <= 1e-3")
    note      anything a reader needs ("fused kernel needs CUDA")

Extra keys are allowed (kept in the JSON; the README table shows the columns above).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
TABLE_COLUMNS = ("bench", "table", "case", "dtype", "provider", "ms", "ratio", "check", "note")


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_time_s: float = 0.0,
    max_time_s: float = 10.0,
    min_runs: int = 5,
) -> dict:
    """Median wall time of ``fn()`` in ms over at least ``repeats`` (>= ``min_runs``, default 5) timed calls
    after ``warmup``. (CPU variants of slow cases pass ``min_runs=3`` to fit ``make bench`` in minutes.)

    On CUDA every call is bracketed by ``torch.cuda.synchronize`` so that the time covers the kernel(s),
    not the launch. Keeps timing past ``repeats`` until ``min_time_s`` has been spent, and stops early
    (still >= 5 runs) once ``max_time_s`` is exceeded.
    """
    min_runs = max(1, int(min_runs))
    repeats = max(min_runs, int(repeats))
    for _ in range(max(0, warmup)):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while True:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        spent = time.perf_counter() - start
        if len(times) >= repeats and spent >= min_time_s:
            break
        if len(times) >= min_runs and spent >= max_time_s:
            break
    return {
        "ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
    }


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu @.*|\bprocessor\b", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def environment(device: str | torch.device) -> dict:
    """What the numbers depend on: device, versions, commit, date."""
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    dev = torch.device(device)
    env = {
        "device": dev.type,
        "device_name": device_name(dev),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON through a temp file in the same folder and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        a = abs(value)
        if a >= 100:
            return f"{value:.0f}"
        if a >= 1:
            return f"{value:.2f}"
        if a >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value).replace("\n", " ")


def table(rows: Sequence[dict], columns: Iterable[str] | None = None, markdown: bool = False) -> str:
    """A plain (or markdown) table of ``rows``; columns default to the convention's, where present."""
    rows = list(rows)
    if columns is None:
        present = {k for r in rows for k, v in r.items() if v is not None}
        columns = [c for c in TABLE_COLUMNS if c in present]
        if "ms" not in present:  # rows in their own format (e.g. native_ms, speedup): show their scalar keys
            extra = []
            for r in rows:
                for k, v in r.items():
                    if k not in columns and k not in extra and k != "table" and isinstance(v, (int, float, str, bool)):
                        extra.append(k)
            columns += extra
    columns = list(columns)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    if markdown:
        cells = [[x.replace("|", "\\|") for x in row] for row in cells]
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def main(run, doc: str | None) -> None:
    """Command line of a single benchmark: ``python bench/bench_X.py [--device cpu|cuda]``, table only."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(table(run(args.device)))
