"""Fingerprints of the cross-attention K/V weights an edit was made for.

A fingerprint is a BLAKE2b digest of (name, shape, bytes) of every ``attn2.to_k/to_v`` weight in canonical
order. Models are often loaded in another precision than the one an edit was made in, so three digests are
kept: of the weights as they are ('exact', with their dtype), and of their round-to-nearest casts to float16
and bfloat16. Two sets match when they share a digest of the same kind (and, for 'exact', the same dtype).

The definition (fixed: edit files store these digests, tests/test_fingerprint_speed.py pins it to a plain
hashlib computation):

- per tensor ``t`` (cast to the kind's dtype on its own device first for the cast kinds):
  ``blake2b(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode() + bytes of t in row-major
  order, digest_size=16).digest()``;
- per kind: ``blake2b(concatenation of the per-tensor digests in sorted name order, digest_size=16)``.

How it is made fast (the digest values do not depend on any of it):

- **Reuse.** A tensor that already has a cast kind's dtype is its own cast, so its cast digest *is* its exact
  digest (same name, shape, dtype string and bytes). Per-tensor digests are cached by (name, dtype) and each
  is computed once: a bfloat16 model costs two passes over its weights (exact = bfloat16, and float16), not
  three; ``matches`` tries the kinds in order of cost, so a bfloat16/float16 model usually needs one pass.
  ``fingerprint_parts(..., known=...)`` takes per-tensor digests already known to be valid (the weights an
  edit does not change keep their base digests when the result fingerprint is taken).
- **Parallelism.** BLAKE2b cannot be split inside one tensor (one hasher over one byte sequence), so the
  work is spread across (tensor, dtype) tasks in a thread pool (hashlib and torch's copies release the GIL)
  with one worker per usable CPU (``os.sched_getaffinity``, capped at 32; ``PURE_FAST_FP_WORKERS`` overrides),
  largest tasks first.
- **Chunks.** A host tensor in its own dtype is hashed in place (no copy). Otherwise it is fed to its hasher
  piece by piece, each piece cast / copied to the host on its own: no full-size copy of the weights is ever
  allocated (the old code cast all weights up front: +100 % memory) and the cast bytes are hashed while
  still in cache (measured here: 0.93 CPU-s instead of 1.1-1.3 for the float16 digest of SDXL's bf16 K/V
  weights). Casting piece by piece gives the same bytes as casting the whole tensor (an elementwise
  conversion). Host casts use 32768-element pieces, below torch's parallel grain, so each pool thread casts
  in itself instead of every thread starting its own OpenMP team; device pieces are up to 16 MiB.
- **CUDA.** Each pool thread works on CUDA tensors in its own side stream that first waits for an event
  recorded on the caller's current stream, so it sees every write queued before the call; a fingerprint
  taken in the background (``api.erase``) then queues no host copies between the method's kernels on the
  default stream, and one thread's copy does not wait for another's.
- **Background.** ``Background(weights)`` takes the fingerprint in a thread while the caller goes on
  (``api.erase`` on CUDA: the GPU is busy with collection, the CPU cores are idle); its errors are re-raised
  by ``result()``.
- **Measured** (2-core CPU, OMP_NUM_THREADS=2, SDXL K/V shapes in bf16: 140 random weights, 682 MB; median
  of 3 against the previous implementation in the same process): ``fingerprints`` 1.23 s -> 0.91 s (2
  passes instead of 3); ``matches`` of an edit made on the float32 model against its bf16 load 0.86 s ->
  0.38 s (one pass instead of two). More threads only pay on many-core hosts (the H100 host has 16 CPUs).
- **Lazy weights.** A mapping that reads each tensor from the model's files on access
  (``adapters.kv_files.KVFiles``, the text-space methods' path) is walked one tensor per task: each task
  reads its tensor once, hashes it in every dtype needed and drops it, so at most one tensor per worker is
  in memory; ``stream_fingerprints`` takes the base and the after-edit digests in that same single pass.
  The digests are those of the same tensors in memory (tests/test_text_only.py).
- **Cancellation.** ``fingerprint_parts(..., cancel=event)`` stops handing out tasks once the event is set
  (``api.erase`` sets it when the method fails, so it does not wait for a fingerprint nobody will use).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Mapping

import torch

from ..errors import UsageError

KINDS = ("exact", "float16", "bfloat16")
CASTS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
HOST_CAST_CHUNK = 32768  # elements per host cast piece (at::internal::GRAIN_SIZE: cast runs in the calling thread)
DEVICE_CHUNK_BYTES = 16 << 20  # bytes per device piece (cast on the device, then one copy to the host)

# per-tensor digests: (name, dtype the tensor is hashed in) -> 16-byte digest
Parts = dict[tuple[str, torch.dtype], bytes]


class Cancelled(RuntimeError):
    """Raised by ``fingerprint_parts`` when its ``cancel`` event was set before it finished."""


def workers(n_tasks: int | None = None) -> int:
    """Threads for hashing: one per usable CPU (capped at 32), at most one per task."""
    env = os.environ.get("PURE_FAST_FP_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise UsageError(f"PURE_FAST_FP_WORKERS={env!r} is not valid; use a whole number >= 1 (hashing threads)")
        n = int(env)
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        n = min(max(1, n), 32)
    return n if n_tasks is None else max(1, min(n, n_tasks))


def is_lazy(weights: Mapping[str, torch.Tensor]) -> bool:
    """A mapping that reads each tensor from disk on access (``adapters.kv_files.KVFiles``): walked one tensor
    at a time, its dtypes and shapes known without reading (``.dtype``, ``.shape(name)``)."""
    return bool(getattr(weights, "lazy", False))


def _dtype_of(weights: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    return weights.dtype if is_lazy(weights) else weights[name].dtype


def _numel_of(weights: Mapping[str, torch.Tensor], name: str) -> int:
    if is_lazy(weights):
        n = 1
        for s in weights.shape(name):
            n *= int(s)
        return n
    return weights[name].numel()


def dtypes_of(weights: Mapping[str, torch.Tensor]) -> str:
    """The 'dtype' field of a fingerprint: the sorted, comma-joined dtypes of the weights."""
    return ",".join(sorted({str(_dtype_of(weights, n)).replace("torch.", "") for n in weights}))


def _digest_one(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> bytes:
    """Digest of one tensor as ``dtype`` (its own dtype when None): the definition in the module docstring."""
    dtype = t.dtype if dtype is None else dtype
    h = hashlib.blake2b(digest_size=16)
    h.update(name.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(str(dtype).encode())
    flat = t.detach().reshape(-1)  # a view when contiguous, else a row-major copy
    n = flat.numel()
    if flat.device.type == "cpu" and dtype == flat.dtype:
        if n:
            h.update(memoryview(flat.view(torch.uint8).numpy()))
        return h.digest()
    if flat.device.type == "cpu":  # host cast: pieces into one reused buffer (little Python per piece: GIL)
        buf = torch.empty(min(n, HOST_CAST_CHUNK), dtype=dtype)
        raw = memoryview(buf.view(torch.uint8).numpy())
        full = len(raw)
        for i in range(0, n - HOST_CAST_CHUNK + 1, HOST_CAST_CHUNK):
            buf.copy_(flat[i : i + HOST_CAST_CHUNK])
            h.update(raw)
        rest = n % HOST_CAST_CHUNK
        if rest:
            buf[:rest].copy_(flat[n - rest :])
            h.update(raw[: full * rest // buf.numel()])
        return h.digest()
    step = max(1, DEVICE_CHUNK_BYTES // max(flat.element_size(), dtype.itemsize))
    for i in range(0, n, step):
        piece = flat[i : i + step].to(dtype).to("cpu")
        h.update(memoryview(piece.view(torch.uint8).numpy()))
    return h.digest()


def record_events(tensors: Iterable[torch.Tensor]) -> dict:
    """device -> CUDA event recorded now on the calling thread's current stream, per CUDA device used."""
    events = {}
    for t in tensors:
        if t.device.type == "cuda" and t.device not in events:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(t.device))
            events[t.device] = ev
    return events


class _Streams:
    """Per pool thread, per CUDA device: a side stream ordered after the caller's stream at creation time."""

    def __init__(self, tensors: Iterable[torch.Tensor], events: dict | None = None):
        self.events = dict(events or {})
        self.events.update(record_events(t for t in tensors if t.device not in self.events))
        self.local = threading.local()

    def stream(self, device):
        streams = self.local.__dict__.setdefault("streams", {})
        if device not in streams:
            s = torch.cuda.Stream(device=device)
            s.wait_event(self.events[device])
            streams[device] = s
        return streams[device]


def fingerprint_parts(
    weights: Mapping[str, torch.Tensor],
    kinds: Iterable[str] = KINDS,
    *,
    known: Parts | None = None,
    cancel: threading.Event | None = None,
    after: dict | None = None,
    max_workers: int | None = None,
) -> Parts:
    """Per-tensor digests needed for ``kinds`` (plus the valid entries of ``known``, which are not redone).

    Entries of ``known`` must describe the current content of those weights (the caller's promise).
    ``after``: device -> CUDA event the device work waits for (default: recorded now on the current stream).
    """
    if is_lazy(weights):
        return _lazy_parts(weights, kinds, known=known, cancel=cancel, max_workers=max_workers)
    parts: Parts = dict(known or {})
    todo: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    for kind in kinds:
        for name, t in weights.items():
            dt = t.dtype if kind == "exact" else CASTS[kind]
            if (name, dt) not in parts:
                todo[(name, dt)] = t
    if not todo:
        return parts
    # largest first: the pool's threads finish together
    order = sorted(todo, key=lambda k: -todo[k].numel() * max(todo[k].element_size(), k[1].itemsize))
    streams = _Streams(todo.values(), after)

    def task(key):
        if cancel is not None and cancel.is_set():
            raise Cancelled("fingerprint cancelled")
        name, dt = key
        t = todo[key]
        if t.device.type == "cuda":
            with torch.cuda.stream(streams.stream(t.device)):
                return _digest_one(name, t, dt)
        return _digest_one(name, t, dt)

    out = _run_tasks(task, order, min(workers(len(order)), max_workers or len(order)))
    parts.update(zip(order, out))
    return parts


def _kind_dtypes(dtype: torch.dtype, kinds: Iterable[str]) -> list[torch.dtype]:
    """The dtypes a tensor of ``dtype`` is hashed in for ``kinds`` (no repeats: its own dtype serves twice)."""
    out = []
    for kind in kinds:
        dt = dtype if kind == "exact" else CASTS[kind]
        if dt not in out:
            out.append(dt)
    return out


def _run_tasks(task, keys: list, n: int) -> list:
    """``[task(k) for k in keys]`` on ``n`` threads (in order); the first error cancels the rest."""
    if n <= 1:
        return [task(k) for k in keys]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="pure-fast-fp") as pool:
        futures = [pool.submit(task, k) for k in keys]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _lazy_parts(weights, kinds, *, known=None, cancel=None, max_workers=None) -> Parts:
    """``fingerprint_parts`` of a lazy mapping: one task per tensor, which reads it once, hashes it in every
    dtype needed and drops it (at most one tensor per worker in memory). Same digests as in memory."""
    parts: Parts = dict(known or {})
    todo = {}
    for name in weights:
        dts = [dt for dt in _kind_dtypes(weights.dtype, kinds) if (name, dt) not in parts]
        if dts:
            todo[name] = dts
    if not todo:
        return parts
    order = sorted(todo, key=lambda n: -_numel_of(weights, n))

    def task(name):
        if cancel is not None and cancel.is_set():
            raise Cancelled("fingerprint cancelled")
        t = weights[name]
        return {(name, dt): _digest_one(name, t, dt) for dt in todo[name]}

    for got in _run_tasks(task, order, min(workers(len(order)), max_workers or len(order))):
        parts.update(got)
    return parts


def stream_fingerprints(weights: Mapping[str, torch.Tensor], after=None) -> tuple[dict[str, str], dict[str, str]]:
    """The fingerprints of a lazy mapping's weights, and of the weights after an edit, in one pass that
    holds one tensor per worker: ``after(name, tensor)`` gives a changed weight's new value (None: unchanged).
    Returns ``(base, result)``; the same digests as ``fingerprints`` of the weights in memory."""
    base_dtypes = {n: _dtype_of(weights, n) for n in weights}
    order = sorted(weights, key=lambda n: -_numel_of(weights, n))

    def task(name):
        t = weights[name]
        mine = {(name, dt): _digest_one(name, t, dt) for dt in _kind_dtypes(t.dtype, KINDS)}
        new = after(name, t) if after is not None else None
        del t
        if new is None:
            return mine, None, None
        return mine, {(name, dt): _digest_one(name, new, dt) for dt in _kind_dtypes(new.dtype, KINDS)}, new.dtype

    base_parts: Parts = {}
    result_parts: Parts = {}
    result_dtypes = dict(base_dtypes)
    for name, (mine, new_parts, new_dtype) in zip(order, _run_tasks(task, order, workers(len(order)))):
        base_parts.update(mine)
        result_parts.update(new_parts if new_parts is not None else mine)
        if new_dtype is not None:
            result_dtypes[name] = new_dtype
    return _summarize_dtypes(base_parts, base_dtypes), _summarize_dtypes(result_parts, result_dtypes)


def _kind_digest_dtypes(parts: Parts, dtypes: Mapping[str, torch.dtype], kind: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(dtypes):
        dt = dtypes[name] if kind == "exact" else CASTS[kind]
        h.update(parts[(name, dt)])
    return h.hexdigest()


def _summarize_dtypes(parts: Parts, dtypes: Mapping[str, torch.dtype]) -> dict[str, str]:
    out = {"dtype": ",".join(sorted({str(d).replace("torch.", "") for d in dtypes.values()}))}
    for kind in KINDS:
        out[kind] = _kind_digest_dtypes(parts, dtypes, kind)
    return out


def kind_digest(parts: Parts, weights: Mapping[str, torch.Tensor], kind: str) -> str:
    """The digest of one kind from per-tensor digests (sorted name order)."""
    return _kind_digest_dtypes(parts, {n: _dtype_of(weights, n) for n in weights}, kind)


def digest(weights: Mapping[str, torch.Tensor], cast: torch.dtype | None = None) -> str:
    """One digest: of the weights as they are (``cast=None``), or of their casts to ``cast``."""
    if cast is None:
        return kind_digest(fingerprint_parts(weights, ("exact",)), weights, "exact")
    kind = {v: k for k, v in CASTS.items()}.get(cast)
    if kind is None:  # not a fingerprint kind; same definition
        cast_weights = {n: t.to(cast) for n, t in weights.items()}
        return kind_digest(fingerprint_parts(cast_weights, ("exact",)), cast_weights, "exact")
    return kind_digest(fingerprint_parts(weights, (kind,)), weights, kind)


def summarize(parts: Parts, weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The fingerprint dict (dtype + one digest per kind) from per-tensor digests covering every kind."""
    return _summarize_dtypes(parts, {n: _dtype_of(weights, n) for n in weights})


def fingerprints(weights: Mapping[str, torch.Tensor], *, known: Parts | None = None) -> dict[str, str]:
    """{'dtype', 'exact', 'float16', 'bfloat16'} of ``weights`` (see the module docstring)."""
    return summarize(fingerprint_parts(weights, KINDS, known=known), weights)


def _cast_cost(kind: str, weights: Mapping[str, torch.Tensor]) -> int:
    if kind == "exact":
        return 0
    return sum(_numel_of(weights, n) for n in weights if _dtype_of(weights, n) != CASTS[kind])


def matches(recorded: Mapping[str, str], weights: Mapping[str, torch.Tensor]) -> bool:
    """True when ``weights`` are the weights ``recorded`` describes (possibly in another precision).

    Same answer as comparing every recorded kind; kinds are tried cheapest first (the exact per-tensor
    digests serve 'exact' and the kind of the weights' own dtype), and digests are computed lazily.
    """
    checks = []
    if recorded.get("dtype") == dtypes_of(weights) and recorded.get("exact"):
        checks.append("exact")
    checks += [k for k in CASTS if recorded.get(k)]
    checks.sort(key=lambda k: _cast_cost(k, weights))  # stable: exact first among the free ones
    parts: Parts = {}
    for kind in checks:
        parts = fingerprint_parts(weights, (kind,), known=parts)
        if recorded[kind] == kind_digest(parts, weights, kind):
            return True
    return False


def _state(weights: Mapping[str, torch.Tensor]) -> dict:
    """What changes when a weight is replaced or written in place through autograd-visible ops (``.data``
    writes are not seen: a cheap guard, not a proof)."""
    def version(t):
        try:
            return t._version
        except RuntimeError:  # inference tensors have no version counter
            return None

    return {n: (id(t), t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device, version(t))
            for n, t in weights.items()}


class Background:
    """``fingerprint_parts(weights)`` (every kind) in a background thread, started at construction.

    ``result()`` waits and returns the parts, re-raising any error of the thread; ``cancel()`` stops it early.
    The thread pool leaves one CPU to the caller (it keeps launching the method's GPU work meanwhile).
    ``unchanged(weights)`` tells whether ``weights`` are still the same tensors, unmodified as far as cheap
    checks can see (same objects, storage, dtype, shape, strides, version counters). Work on CUDA waits for
    what was queued on the caller's current streams at construction, and no longer.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor]):
        self.weights = dict(weights)
        self._state = _state(self.weights)
        self._events = record_events(self.weights.values())
        self._cancel = threading.Event()
        self._parts: Parts | None = None
        self._error: BaseException | None = None
        self.busy_s = 0.0  # the thread's wall time
        self.wait_s = 0.0  # how long result() waited for it

        def run():
            t0 = time.perf_counter()
            try:
                self._parts = fingerprint_parts(self.weights, KINDS, cancel=self._cancel, after=self._events,
                                                max_workers=max(1, workers() - 1))
            except BaseException as e:  # re-raised in the caller's thread by result()
                self._error = e
            finally:
                self.busy_s = time.perf_counter() - t0

        self._thread = threading.Thread(target=run, name="pure-fast-fp-base", daemon=True)
        self._thread.start()

    def result(self) -> Parts:
        t0 = time.perf_counter()
        self._thread.join()
        self.wait_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        assert self._parts is not None
        return self._parts

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()

    def unchanged(self, weights: Mapping[str, torch.Tensor]) -> bool:
        return _state(weights) == self._state


def short(fp: Mapping[str, str] | None) -> str:
    if not fp:
        return "-"
    return f"{fp.get('exact', '')[:12]} ({fp.get('dtype', '?')})"
