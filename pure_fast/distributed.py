"""One job across processes with ``torch.distributed`` (``torchrun``, ``accelerate launch``, or a process group
the caller initialised). Every other module reaches torch.distributed only through this one.

Launch: ``torchrun --nproc-per-node N -m pure_fast erase ...`` (multi-node: torchrun's rendezvous) or
``accelerate launch -m pure_fast ...``; both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, which :func:`cli_session` reads. ``--device cuda`` puts rank r on ``cuda:LOCAL_RANK`` with the
backend ``cpu:gloo,cuda:nccl`` (statistics move over NCCL, control messages over gloo); ``--device cpu`` uses
gloo only.

How work is split, and why the results equal one process's bit for bit:

- **Collection** (PURE, ActErase): the samples (prompt x seed, all groups) are cut into the batches of
  ``batch_size`` the single-process run makes, and each rank runs one contiguous block of those batches
  (:func:`split`). Every UNet call is then the same call a single process makes (a UNet's output for one
  sample can depend on what else is in its batch in the last bits: measured 1.4e-6 on the toy model, so
  sharding by sample would not be exact). :func:`merge_group_stats` reduces the per-layer statistics: a
  (group, layer) whose rows, over all ranks, stay within the layer width (the single-process collector's
  switch) is *gathered*: every rank receives every rank's row blocks in rank order, which is the
  single-process order, and replays them through the same ``GroupStats.add``, so the statistics (rows,
  float64 sums, and the rows-to-Gram switch itself) are the single-process ones, bit for bit. Past the
  width, the fp32 Gram matrices ``H^T H`` and float64 row sums are ``all_reduce``d (d x d per layer instead
  of the rows): the same numbers up to fp32 summation order (<= 1e-6 relative, tested), and the same bytes
  from run to run for a given world size and backend.
- **Generation** (``pure-fast generate``): the batches of ``--batch-size`` (prompt, seed) pairs, split the
  same way, images gathered in order: the same PNG files.
- **Evaluation** (``pure-fast eval``, ``bench-quality``): whole evaluation jobs (one method on one concept,
  which the single-process run also computes on their own) are dealt round-robin (:func:`map_jobs`); each
  job runs in :func:`local` mode (no collectives inside) and the results are gathered in job order: the
  same numbers.
- Text-space methods (UCE, CURE, SPACE) run no UNet: every rank computes the same edit (about a second);
  rank 0 writes it.

Failures: a stage that can fail on one rank alone (bad input, out of memory, an exception) is wrapped in
:func:`stage`; at its end every rank exchanges a status (one ``all_gather`` of a small code + message), so a
failure anywhere becomes one clear line on every rank (``process 1 of 2 failed: <its message>``) with the
failing rank's exit code, before anything is written. A peer that dies (killed, segfault) breaks the
collective: gloo/NCCL raise, and every survivor prints ``lost contact with another process``; the process
group's timeout (``PURE_FAST_DIST_TIMEOUT`` seconds, default 1800) bounds any wait. No collective runs between
a stage's exchange and the data collectives that follow it, so ranks can never wait in different ones.
Data crosses ranks only as tensors (objects as safetensors bytes: JSON + arrays, never pickle).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from .errors import PureFastError, UsageError, one_line

# commands that run across processes; any other command under a launcher with WORLD_SIZE > 1 is refused
COMMANDS = ("erase", "generate", "eval", "bench-quality")
MESSAGE_BYTES = 1024  # status message per rank (utf-8, truncated)
DEFAULT_TIMEOUT_S = 1800


class PeerFailed(PureFastError):
    """Another rank failed; carries its exit code and its one-line message."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class PeerLost(PureFastError):
    """A collective failed (a peer died, or the process group timed out)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM under a launcher (torchrun stops every process when one fails): unwinds like Ctrl-C, so temp
    outputs are removed, without a status exchange (the peers may be gone)."""


@dataclass
class _State:
    local_depth: int = 0  # > 0 inside local(): no sharding, no collectives
    failure_known: bool = False  # every rank already knows this run failed: no further exchange
    owns_group: bool = False  # cli_session initialised the process group (and destroys it)
    joined_group: bool = False  # this process was in a process group: end it with exit_process
    records: list = field(default_factory=list)  # how work was split, for the edit's stats
    counter: int = 0  # shared-progress keys (same sequence on every rank)


_state = _State()


# ---- who am I ------------------------------------------------------------------------------------------
def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate (1 when unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer (set by the launcher)") from None


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes of the current process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if _group_ready() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group_ready() else 0


def processes() -> int:
    """How many processes share the work now (1 inside ``local()`` or without a group): outputs record it."""
    return world_size() if active() else 1


def active() -> bool:
    """Shard work and reduce across ranks now? (a process group of >= 2 ranks, and not inside ``local()``)."""
    return _state.local_depth == 0 and _group_ready()


def is_writer() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints results."""
    return rank() == 0


def rank_prefix() -> str:
    """'[rank r/W] ' for messages under a launcher (also after the group is gone), '' otherwise."""
    if _group_ready():
        return f"[rank {rank()}/{world_size()}] "
    w = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')}/{w}] " if w not in ("", "1") else ""


@contextlib.contextmanager
def local():
    """Run the block on this rank alone: collection and generation neither shard nor communicate."""
    _state.local_depth += 1
    try:
        yield
    finally:
        _state.local_depth -= 1


# ---- process group lifetime (CLI) ----------------------------------------------------------------------
def timeout_s() -> float:
    raw = os.environ.get("PURE_FAST_DIST_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise UsageError(f"PURE_FAST_DIST_TIMEOUT={raw!r} must be a number of seconds > 0")
    return v


def device_for_rank(device: str | None) -> str | None:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under a launcher (an explicit ``cuda:i`` is kept)."""
    if device is None or not str(device).startswith("cuda") or env_world_size() <= 1:
        return device
    if str(device) != "cuda":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise UsageError(f"LOCAL_RANK {local_rank} has no CUDA device (found {torch.cuda.device_count()}); "
                         "start at most one process per GPU (--nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def init_from_env(device: str | None = None) -> bool:
    """Join the process group the launcher describes (env://); returns True when this call created it."""
    import torch.distributed as dist

    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed; run without torchrun")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start with torchrun or accelerate launch")
    backend = "cpu:gloo,cuda:nccl" if device is not None and str(device).startswith("cuda") else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except Exception as exc:  # noqa: BLE001 - rendezvous failures: one line
        raise PeerLost(f"could not join the process group ({type(exc).__name__}: {_first_line(exc)})") from None
    return True


@contextlib.contextmanager
def cli_session(command: str, args) -> Iterable[None]:
    """Around one CLI command: join the launcher's process group, run, agree on the outcome, leave.

    Non-zero ranks run quietly (one progress bar: rank 0's). At the end every rank exchanges its outcome, so
    a late failure on any rank (after the last stage) still reaches all of them.
    """
    if env_world_size() <= 1:
        yield
        return
    if command not in COMMANDS:
        raise UsageError(f"pure-fast {command} runs in one process; start it without torchrun "
                         f"(commands that run across processes: {', '.join(COMMANDS)})")
    if hasattr(args, "device"):
        args.device = device_for_rank(args.device)
    _state.owns_group = init_from_env(getattr(args, "device", None))
    _state.joined_group = True
    import signal

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    _state.failure_known = False
    if rank() != 0:
        os.environ["PURE_FAST_PROGRESS"] = "0"
    try:
        with stage("finish"):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if _state.owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            _state.owns_group = False


def exit_process(rc: int) -> None:
    """End a process that was in a process group: flush stdio, then ``os._exit(rc)``.

    Why not a normal interpreter exit: after ``destroy_process_group`` the gloo backend's C++ objects can stay
    referenced (torch 2.13 keeps hidden references on some ranks; its worker threads ``pt_gloo_runloop`` /
    ``gloo_tcp_loop`` are still running) and are then destroyed during interpreter finalization, where one of
    them sometimes hits ``std::terminate`` ("terminate called without an active exception", SIGABRT): a
    process that finished its work and wrote its files exits -6 and torchrun reports the job failed.
    Reproduced in about 1 run in 4 of ``generate`` on two ranks on a busy 2-core machine. Every output file is
    complete before this point (written through a temp file and an atomic rename), so skipping the
    finalizers loses nothing. A process that never joined a group exits normally.
    """
    if not _state.joined_group:
        raise SystemExit(rc)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(rc) & 0xFF)


# ---- agreeing on failures ------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return s.splitlines()[0] if s else type(exc).__name__


def _control_device() -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if "gloo" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _data_device(t: torch.Tensor) -> torch.device:
    """Where a data tensor can travel: its own device when the backend serves it, else the control device."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if t.device.type == "cuda" and "nccl" in backend:
        return t.device
    if t.device.type == "cpu" and "gloo" in backend:
        return t.device
    return _control_device()


def _collective(what: str, fn: Callable, *a, **kw):
    """Run a torch.distributed collective; a broken peer or a timeout becomes one ``PeerLost`` line."""
    try:
        return fn(*a, **kw)
    except PureFastError:
        raise
    except Exception as exc:  # noqa: BLE001 - DistBackendError, RuntimeError (gloo: connection closed / timeout)
        import re

        _state.failure_known = True
        detail = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc)).split(". This is typically")[0]
        raise PeerLost(f"lost contact with another process during {what} (it crashed, was killed or timed out "
                       f"after {timeout_s():.0f} s: PURE_FAST_DIST_TIMEOUT): {detail}") from None


def exchange_status(error: BaseException | None) -> list[tuple[int, str]]:
    """Every rank's (exit code, message): 0 and '' for ranks that are fine."""
    import torch.distributed as dist

    code, msg = (0, "") if error is None else one_line(error)
    if error is not None:
        code = code or 1
    buf = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
    buf[0] = min(max(int(code), 0), 255)
    raw = msg.encode("utf-8")[:MESSAGE_BYTES]
    buf[1 : 1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else buf[1:1]
    buf = buf.to(_control_device())
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
    _collective("a status exchange", dist.all_gather, out, buf)
    res = []
    for t in out:
        t = t.cpu()
        text = bytes(t[1:].numpy()).rstrip(b"\0").decode("utf-8", errors="replace")
        res.append((int(t[0]), text))
    return res


def agree(error: BaseException | None = None) -> None:
    """Exchange outcomes; raise ``PeerFailed`` (lowest failed rank's code and message) if another rank failed.

    With ``error`` (this rank failed) it returns after the exchange and the caller raises its own error.
    """
    if not _group_ready() or _state.local_depth > 0 or _state.failure_known:
        return
    status = exchange_status(error)
    failed = [(r, c, m) for r, (c, m) in enumerate(status) if c != 0]
    if not failed:
        return
    _state.failure_known = True
    if error is not None:
        return
    r, c, m = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    raise PeerFailed(f"process {r} of {len(status)} failed{more}: {m}", exit_code=c)


@contextlib.contextmanager
def stage(name: str = ""):
    """A block that may fail on one rank alone: at its end all ranks learn whether any failed."""
    try:
        yield
    except Exception as exc:
        agree(exc)
        raise
    agree()


# ---- splitting work --------------------------------------------------------------------------------------
def block(n: int, r: int | None = None, w: int | None = None) -> range:
    """Rank r's contiguous block of n items (the first n % w ranks get one more)."""
    w = world_size() if w is None else w
    r = rank() if r is None else r
    return range(n * r // w, n * (r + 1) // w)


def split(sizes: Sequence[int], what: str) -> range:
    """This rank's batches: a contiguous block of the single-process batches (``sizes``: samples per batch).

    Records the split (samples and batches per rank) for the edit's stats; warns once when some ranks get
    no batch (fewer batches than processes: lower --batch-size to use them all)."""
    if not active():
        return range(len(sizes))
    w = world_size()
    blocks = [block(len(sizes), r, w) for r in range(w)]
    samples = [sum(sizes[i] for i in b) for b in blocks]
    _state.records.append({"stage": what, "batches_per_rank": [len(b) for b in blocks], "samples_per_rank": samples})
    idle = sum(1 for b in blocks if len(b) == 0)
    if idle and rank() == 0:
        warnings.warn(f"{what}: {len(sizes)} batch(es) for {w} processes, {idle} of them idle; lower --batch-size "
                      "to use every process", stacklevel=2)
    return blocks[rank()]


def take_records() -> list[dict]:
    """The splits recorded since the last call (and forget them)."""
    out, _state.records = _state.records, []
    return out


def run_summary(records: list[dict]) -> dict:
    """What an edit's stats record about the run: world size and the samples each rank ran."""
    if not records:
        return {"world_size": world_size(), "samples_per_rank": None,
                "note": "no trajectory to split (text-space method): every rank computed the same edit"}
    per_rank = [0] * world_size()
    for rec in records:
        for r, n in enumerate(rec["samples_per_rank"]):
            per_rank[r] += n
    return {"world_size": world_size(), "samples_per_rank": per_rank, "splits": records}


# ---- progress: one bar, all ranks' work ------------------------------------------------------------------
class _SharedBar:
    """update(n) adds n to a counter in the process group's store; rank 0's bar shows the total."""

    def __init__(self, bar, store, key: str):
        self.bar, self.store, self.key = bar, store, key

    def update(self, n=1):
        total = self.store.add(self.key, int(n))
        if self.bar is not None:
            self.bar.update(total - self.bar.n)

    def set_postfix_str(self, s):
        if self.bar is not None and hasattr(self.bar, "set_postfix_str"):
            self.bar.set_postfix_str(s)


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no shared store: each rank counts its own work
        return None


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """``progress.progress_bar`` over all ranks: one bar (rank 0's) counting every rank's work."""
    from .progress import progress_bar as plain

    if not active():
        with plain(total, desc, enabled, unit=unit) as bar:
            yield bar
        return
    _state.counter += 1
    store = _store()
    with plain(total, desc, enabled and rank() == 0, unit=unit) as bar:
        if store is None:
            yield bar
            return
        shown = bar if hasattr(bar, "n") else None
        yield _SharedBar(shown, store, f"pure_fast/progress/{_state.counter}")


# ---- moving data -----------------------------------------------------------------------------------------
def all_gather_1d(t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), in rank order, on every rank."""
    import torch.distributed as dist

    dev = _data_device(t)
    t = t.reshape(-1).to(dev)
    n = torch.tensor([t.numel()], dtype=torch.int64, device=dev)
    ns = [torch.empty_like(n) for _ in range(dist.get_world_size())]
    _collective(what, dist.all_gather, ns, n)
    ns = [int(x.item()) for x in ns]
    m = max(ns)
    padded = torch.zeros(m, dtype=t.dtype, device=dev)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in ns]
    _collective(what, dist.all_gather, out, padded)
    return [o[:k] for o, k in zip(out, ns)]


def all_reduce_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    import torch.distributed as dist

    dev = _data_device(t)
    x = t.to(dev).contiguous()
    _collective(what, dist.all_reduce, x)
    return x.to(t.device)


def pack(obj, allowed: dict[str, type] | None = None) -> torch.Tensor:
    """An object as safetensors bytes in a uint8 tensor: a JSON skeleton plus its arrays (never pickle).

    Handles dict (str keys), list, tuple, str, int, float (NaN included), bool, None, numpy arrays and
    scalars, CPU/GPU tensors (returned on CPU), dataclasses named in ``allowed``, and edits (meta + tensors)."""
    import numpy as np
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def add(t: torch.Tensor) -> str:
        key = f"t{len(tensors)}"
        tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def walk(x):
        from .edits.edit import Edit

        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return {"__nd__": add(torch.from_numpy(np.ascontiguousarray(x)))}
        if isinstance(x, torch.Tensor):
            return {"__pt__": add(x)}
        if isinstance(x, Edit):
            keys = {name: add(t) for name, t in x.tensors().items()}
            return {"__edit__": x.meta(), "tensors": keys}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError("pack: dict keys must be strings")
            return {"__dict__": {k: walk(v) for k, v in x.items()}}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if is_dataclass(x) and allowed and type(x).__name__ in allowed:
            return {"__dc__": type(x).__name__, "fields": {f.name: walk(getattr(x, f.name)) for f in fields(x)}}
        raise TypeError(f"pack: cannot send a {type(x).__name__} across processes")

    skeleton = json.dumps(walk(obj)).encode("utf-8")
    tensors["__skeleton__"] = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8).clone()
    return torch.frombuffer(bytearray(save(tensors)), dtype=torch.uint8).clone()


def unpack(blob: torch.Tensor, allowed: dict[str, type] | None = None):
    """The inverse of :func:`pack`."""
    from safetensors.torch import load

    tensors = load(bytes(blob.cpu().numpy()))
    skeleton = json.loads(bytes(tensors.pop("__skeleton__").numpy()).decode("utf-8"))

    def walk(x):
        if isinstance(x, list):
            return [walk(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__nd__" in x:
            return tensors[x["__nd__"]].numpy()
        if "__pt__" in x:
            return tensors[x["__pt__"]]
        if "__dict__" in x:
            return {k: walk(v) for k, v in x["__dict__"].items()}
        if "__tuple__" in x:
            return tuple(walk(v) for v in x["__tuple__"])
        if "__edit__" in x:
            from . import edits  # noqa: F401 - importing the package registers every edit kind
            from .edits.io import KINDS

            meta = x["__edit__"]
            return KINDS[meta["kind"]].from_tensors(meta, {n: tensors[k] for n, k in x["tensors"].items()})
        if "__dc__" in x:
            cls = (allowed or {})[x["__dc__"]]
            return cls(**{k: walk(v) for k, v in x["fields"].items()})
        raise ValueError(f"unpack: unknown entry {sorted(x)[:3]}")

    return walk(skeleton)


def all_gather_objects(obj, what: str, allowed: dict[str, type] | None = None) -> list:
    """Every rank's object, in rank order, on every rank (through :func:`pack`)."""
    with stage(f"packing {what}"):
        blob = pack(obj, allowed)
    return [unpack(b, allowed) for b in all_gather_1d(blob.to(_control_device()), what)]


def map_jobs(jobs: Sequence, run: Callable[[Any], Any], what: str, *, progress: bool = True,
             allowed: dict[str, type] | None = None) -> list:
    """``[run(j) for j in jobs]``, the jobs dealt round-robin over the ranks (each run in :func:`local` mode,
    so exactly as one process runs it), the results gathered in job order on every rank."""
    if not active():
        from .progress import progress_bar as plain

        out = []
        with plain(len(jobs), what, progress) as bar:
            for j in jobs:
                out.append(run(j))
                bar.update(1)
        return out
    w, r = world_size(), rank()
    mine = list(range(r, len(jobs), w))
    _state.records.append({"stage": what, "jobs_per_rank": [len(range(k, len(jobs), w)) for k in range(w)],
                           "samples_per_rank": [len(range(k, len(jobs), w)) for k in range(w)]})
    results = {}
    with progress_bar(len(jobs), what, progress) as bar, stage(what):
        for i in mine:
            with local():
                results[str(i)] = run(jobs[i])
            bar.update(1)
    out: list = [None] * len(jobs)
    for part in all_gather_objects(results, f"{what} results", allowed):
        for k, v in part.items():
            out[int(k)] = v
    return out


# ---- PURE's statistics -----------------------------------------------------------------------------------
def merge_group_stats(stats: dict[str, list], order: Sequence[str], device: torch.device) -> dict[str, list]:
    """Every rank's ``GroupStats`` (one contiguous block of the single-process batches each) merged into the
    statistics one process would hold, on every rank. See the module docstring for rows vs Gram."""
    if not active():
        return {g: stats[g] for g in order}
    with stage("packing statistics"):
        n_layers = len(stats[order[0]]) if order else 0
        counts = torch.tensor([[s.n_rows for s in stats[g]] for g in order], dtype=torch.int64).reshape(-1)
    all_counts = torch.stack([c.cpu() for c in all_gather_1d(counts.to(_control_device()), "row counts")])
    total = all_counts.sum(0).reshape(len(order), n_layers)
    with stage("packing statistics"):
        gathered, lengths, reduced = [], [], []
        for gi, g in enumerate(order):
            for li, s in enumerate(stats[g]):
                if int(total[gi, li]) <= s.max_rows:  # rows on every rank: gather them
                    chunks = [r.float() for r in s.rows]
                    lengths.append(len(chunks))
                    lengths.extend(c.shape[0] for c in chunks)
                    gathered.extend(c.reshape(-1).to(device) for c in chunks)
                else:
                    reduced.append((g, li, s))
        rows_flat = torch.cat(gathered) if gathered else torch.zeros(0, device=device)
        lengths = torch.tensor(lengths, dtype=torch.int64)
    all_lengths = [x.cpu().tolist() for x in all_gather_1d(lengths.to(_control_device()), "row blocks")]
    all_rows = all_gather_1d(rows_flat, "rows")
    out = {g: [None] * n_layers for g in order}
    pos = [0] * len(all_rows)  # per rank: read position in its lengths list and its rows
    offs = [0] * len(all_rows)
    for gi, g in enumerate(order):
        for li, s in enumerate(stats[g]):
            if int(total[gi, li]) > s.max_rows:
                continue
            merged = type(s)(s.d, s.max_rows)
            for r, (lens, flat) in enumerate(zip(all_lengths, all_rows)):
                k = lens[pos[r]]
                for n in lens[pos[r] + 1 : pos[r] + 1 + k]:
                    merged.add(flat[offs[r] : offs[r] + n * s.d].view(n, s.d))
                    offs[r] += n * s.d
                pos[r] += 1 + k
            out[g][li] = merged
    if reduced:
        with stage("packing statistics"):
            grams, sums = [], []
            for _g, _li, s in reduced:
                if s.is_gram:
                    grams.append(s.gram.float().reshape(-1).to(device))
                elif s.rows:
                    h = torch.cat(s.rows).float().to(device)
                    grams.append((h.T @ h).reshape(-1))
                else:
                    grams.append(torch.zeros(s.d * s.d, device=device))
                rs = s.row_sum if s.row_sum is not None else torch.zeros(s.d, dtype=torch.float64)
                sums.append(rs.to(device=device, dtype=torch.float64))
            grams, sums = torch.cat(grams), torch.cat(sums)
        grams = all_reduce_sum(grams, "Gram matrices")
        sums = all_reduce_sum(sums, "row sums")
        go = so = 0
        for g, li, s in reduced:
            gi = order.index(g)
            merged = type(s)(s.d, s.max_rows, n_rows=int(total[gi, li]))
            merged.gram = grams[go : go + s.d * s.d].view(s.d, s.d)
            merged.row_sum = sums[so : so + s.d]
            go += s.d * s.d
            so += s.d
            out[g][li] = merged
    return out


def bytes_moved(stats: dict[str, list], world: int) -> dict:
    """Communication volume of :func:`merge_group_stats` for merged statistics (per layer, per reduction):
    rows gathered (each rank receives every row once, 4 bytes per value) and Gram matrices all-reduced
    (d*d*4 + d*8 bytes per layer and group; a ring all-reduce sends and receives 2 (W-1)/W of it per rank)."""
    rows_b = gram_b = 0
    per_layer = []
    for g, layers in stats.items():
        for s in layers:
            if s.is_gram:
                b = s.d * s.d * 4 + s.d * 8
                gram_b += b
                per_layer.append({"group": g, "d": s.d, "mode": "gram", "bytes": b})
            else:
                b = s.n_rows * s.d * 4
                rows_b += b
                per_layer.append({"group": g, "d": s.d, "mode": "rows", "rows": s.n_rows, "bytes": b})
    ring = 2 * (world - 1) / world if world > 1 else 0.0
    return {"rows_gathered_bytes": rows_b, "gram_reduced_bytes": gram_b,
            "per_rank_traffic_bytes": rows_b * (world - 1) / max(world, 1) + gram_b * ring, "layers": per_layer}


def gather_images(images: list[list[Any]], done: Sequence[tuple[int, int]]) -> None:
    """Fill ``images[i][j]`` (PIL) on every rank with the images each rank made (``done``: its (i, j))."""
    import numpy as np
    from PIL import Image

    mine = {"ij": [list(ij) for ij in done], "pixels": [np.asarray(images[i][j]) for i, j in done],
            "modes": [images[i][j].mode for i, j in done]}
    for part in all_gather_objects(mine, "images"):
        for (i, j), px, mode in zip(part["ij"], part["pixels"], part["modes"]):
            if images[i][j] is None:
                img = Image.fromarray(px)
                images[i][j] = img if img.mode == mode else img.convert(mode)
