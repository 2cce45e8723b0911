"""PURE's collection with the UNet compiled: ``torch.compile`` (and CUDA graphs) over the hooked UNet.

The recording processors (``collect/activations.py``) compute the pooled cross-attention output inside the
UNet's forward. Eagerly they add it to the per-group statistics at once (Python lists, growing row counts,
Gram matrices). Traced by ``torch.compile`` that bookkeeping would be baked into the graph and its guards
(row counts, list lengths) would fail on every call: a recompilation per call until dynamo gives up. So in
compiled mode the recorder *defers*: inside the graph a processor only stores its pooled tensor in the
recorder's slot for its layer (``Recorder.pending[i] = pooled``, one preallocated slot per layer), which
dynamo turns into a graph output plus a replayed store; after each UNet call :meth:`Recorder.flush` adds the
slots to the statistics eagerly, in the same order as the eager path, so the statistics are the same
(tests/test_collect_compiled.py: 0 graph breaks on the tiny SD1 / SDXL UNets, no recompilation across
batches, statistics equal to eager's). Under CUDA graphs (mode ``reduce-overhead``) the outputs live in
memory the next replay overwrites, so flush copies them first.

Selected by ``PURE_FAST_COMPILE_COLLECT``: unset / ``0`` / ``off`` eager (the default on every device: on a
2-core CPU the compiled pass measured 0.62-0.73x eager, ``bench/bench_compile.py``; on CUDA not yet measured
with the deferred recorder, ``bash bench/gpu/session.sh compile`` measures it), ``1`` / ``default`` inductor,
``reduce-overhead`` inductor with CUDA graphs. The first call compiles (tens of seconds; reported apart by
the benchmarks); inductor caches its kernels and graphs on disk (``TORCHINDUCTOR_CACHE_DIR``, default
``/tmp/torchinductor_<user>``), so a later process pays much less.
"""
from __future__ import annotations

import contextlib
import os

import torch

from ..errors import UsageError

MODES = {"": None, "0": None, "off": None, "1": "default", "default": "default",
         "reduce-overhead": "reduce-overhead", "cudagraphs": "reduce-overhead"}


def compile_mode() -> str | None:
    """The compile mode asked for by ``PURE_FAST_COMPILE_COLLECT`` (None: eager)."""
    value = os.environ.get("PURE_FAST_COMPILE_COLLECT", "").strip().lower()
    if value not in MODES:
        raise UsageError(f"PURE_FAST_COMPILE_COLLECT={value!r} is not valid; use 0 (eager), 1 (torch.compile) "
                         "or reduce-overhead (torch.compile with CUDA graphs)")
    return MODES[value]


@contextlib.contextmanager
def compiled_unet(unet: torch.nn.Module, recorder, mode: str = "default", backend: str = "inductor"):
    """Inside: ``unet(...)`` runs compiled and the recorder defers (module docstring); restored on exit.

    ``backend``: the ``torch.compile`` backend (tests use ``aot_eager``: the same graph without code
    generation)."""
    from ..ops.pooled_attention import measured_default

    device = next(unet.parameters()).device
    measured_default(device)  # decided before tracing: the hook's dispatch then reads a dict (no graph break)
    kwargs = {"backend": backend}
    if mode != "default":
        kwargs["mode"] = mode
    eager_forward = unet.forward
    compiled = torch.compile(eager_forward, **kwargs)
    clone = mode == "reduce-overhead"

    def forward(*args, **kw):
        out = compiled(*args, **kw)
        recorder.flush(clone=clone)
        return out

    recorder.deferred = True
    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward  # the instance attribute; the class's forward is back
        recorder.flush(clone=clone)
        recorder.deferred = False
