"""The Python entry point: ``pure_fast.erase(model, forget=..., retain=..., method=...) -> Edit``.

Methods come from the registry (``methods.base``); ``erase`` checks the input (``EraseContext.prepare``:
concepts, method, anchor prompts, options), then runs the method on the model (``run_erase``) and stamps
the edit with fingerprints of the weights it was made for and of the weights it leaves.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from . import distributed
from .adapters import ModelAdapter, load_model, wrap_pipeline
from .adapters.loading import is_toy_spec
from .edits import fingerprint as fp
from .edits.edit import Edit, kv_weights, model_kv_weights
from .methods import EraseContext, get_method


def load_for(method: str, spec, **kwargs) -> ModelAdapter:
    """``load_model`` with only the parts ``method`` reads (``Method.model_parts``: the text-space methods
    UCE, CURE and SPACE take the text encoder(s) and the K/V weights read lazily from the files, never the
    UNet or the VAE); the adapter is this run's own, so a text-only adapter frees its text encoders as soon
    as the embeddings exist (``done_with_text``)."""
    adapter = load_model(spec, parts=get_method(method).model_parts, **kwargs)
    adapter.free_text_after_use = True
    return adapter


def _adapter(model, method: str) -> ModelAdapter:
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, str) or model is None:
        return load_for(method, model)
    return wrap_pipeline(model)


def erase(
    model,
    forget: Sequence[str] | str,
    retain: Sequence[str] | str = (),
    *,
    method: str = "pure",
    category: str | None = None,
    templates: Sequence[str] | str | None = None,
    options=None,
    progress: bool = True,
    fingerprint: bool = True,
    **kwargs,
) -> Edit:
    """Erase ``forget`` concepts while keeping ``retain`` ones; returns an Edit (not yet applied).

    ``model``: a diffusers pipeline, a ModelAdapter, a path, or None/'toy' for the shipped toy model.
    ``method``: a registered method (``pure_fast.methods.method_names()``). ``options``: the method's options
    dataclass; or pass its fields as keyword arguments (collection fields such as ``steps`` by their own
    names), applied over the category's preset.
    """
    ctx = EraseContext.prepare(method, forget, retain, category=category, templates=templates, options=options,
                               values=kwargs, toy=is_toy_model(model))
    return run_erase(ctx, model, progress=progress, fingerprint=fingerprint)


def is_toy_model(model) -> bool:
    """Is ``model`` (an adapter, a --model value, or a pipeline) the toy model? (its concepts pick the category)"""
    if isinstance(model, ModelAdapter):
        return model.family == "toy"
    return (model is None or isinstance(model, (str, os.PathLike))) and is_toy_spec(model)


def run_erase(ctx: EraseContext, model, *, progress: bool = True, fingerprint: bool = True) -> Edit:
    """Run a prepared erase (``EraseContext.prepare``) on ``model``."""
    adapter = _adapter(model, ctx.method.name)
    ctx.bind(adapter, progress)
    base = start_base_fingerprint(adapter) if fingerprint else None
    t0 = time.perf_counter()
    distributed.take_records()  # inside a process group: how this erase's work is split across ranks
    try:
        edit = ctx.run()
    except BaseException:
        if base is not None:
            base.cancel()
        raise
    edit.concepts["forget"] = list(ctx.forget)
    edit.concepts["retain"] = list(ctx.retain)
    if ctx.category:
        edit.options["category"] = ctx.category
    edit.stats.setdefault("timings", {})["total_s"] = time.perf_counter() - t0
    if distributed.active():
        edit.stats["distributed"] = distributed.run_summary(distributed.take_records())
    if fingerprint:
        t1 = time.perf_counter()
        stamp_fingerprints(edit, adapter, base=base)
        timings = edit.stats["timings"]
        timings["fingerprint_s"] = time.perf_counter() - t1  # the caller's time, waiting included
        if base is not None:
            timings["fingerprint_base_wait_s"] = base.wait_s
            timings["fingerprint_base_background_s"] = base.busy_s
    return edit


def background_fingerprint_wanted(unet_or_weights) -> bool:
    """Take the base fingerprint in a background thread during the method's work?

    Yes when the K/V weights are on CUDA: the GPU is busy with collection and the CPU cores would idle. No on
    CPU, where the method's own torch work already uses every core: measured on a 2-core CPU with SDXL-sized
    bf16 K/V weights and a GEMM workload standing in for the method, 4.60 s in the background against 4.50 s
    sequential (the work slowed down by what the hashing cost).
    ``PURE_FAST_FP_BACKGROUND=1`` / ``0`` forces it on / off (tests use it to run the threaded path on CPU).
    """
    env = os.environ.get("PURE_FAST_FP_BACKGROUND", "").strip()
    if env in ("0", "1"):
        return env == "1"
    weights = unet_or_weights if isinstance(unet_or_weights, dict) else kv_weights(unet_or_weights)
    return any(t.device.type == "cuda" for t in weights.values())


def start_base_fingerprint(model) -> fp.Background | None:
    """The base fingerprint started in the background (or None when it is taken afterwards, see above).

    Safe because no method changes the K/V weights before it returns its edit (pure, uce, cure and space only
    read them, acterase only builds activation patches); ``stamp_fingerprints`` still checks cheaply that the
    weights are the same tensors, unmodified, and takes the fingerprint again when they are not.
    """
    weights = model_kv_weights(model)
    if fp.is_lazy(weights):  # read from the files: streamed once, after the method (stamp_fingerprints)
        return None
    return fp.Background(weights) if background_fingerprint_wanted(weights) else None


def stamp_fingerprints(edit: Edit, model, *, base: fp.Background | None = None) -> None:
    """Record the base fingerprint, and the result fingerprint: of the weights ``edit.apply`` would leave.

    The result is taken over the values ``apply`` would write (``Edit.new_values``: same checks, same
    float64 computation and rounding, so the same bytes) without writing them: no backup copies, no copy
    into the model and back (measured on SDXL-sized bf16 K/V weights on CPU: apply + revert cost 3 full
    passes more than ``new_values``, page faults of the backups included), and the model is never modified.
    ``base``: the base fingerprint taken in the background (``start_base_fingerprint``); its errors are
    raised here. Weights the edit does not change keep their base per-tensor digests in the result.
    """
    weights = model_kv_weights(model)
    if fp.is_lazy(weights):
        _stamp_streamed(edit, weights)
        return
    parts = None
    if base is not None:
        parts = base.result()
        if not base.unchanged(weights):
            parts = None
    if parts is None:
        parts = fp.fingerprint_parts(weights)
    edit.base_fingerprint = fp.summarize(parts, weights)
    targets = set(edit.target_weights())
    if targets:
        after = dict(edit.validate_against(weights))
        after.update(edit.new_values(after))
        known = {key: d for key, d in parts.items() if key[0] not in targets}
        edit.result_fingerprint = fp.fingerprints(after, known=known)
    else:
        edit.result_fingerprint = dict(edit.base_fingerprint)


def _stamp_streamed(edit: Edit, weights) -> None:
    """``stamp_fingerprints`` for weights read from the files (a text-only adapter): one pass, one tensor
    per worker, each K/V tensor hashed as it is and, when the edit changes it, its new value (``new_values``
    of that one weight: the same bits as all at once under the default per-layer dispatch)."""
    edit.validate_against(weights)
    targets = set(edit.target_weights())

    def after(name, w):
        return edit.new_values({name: w}, names=[name])[name] if name in targets else None

    edit.base_fingerprint, result = fp.stream_fingerprints(weights, after)
    edit.result_fingerprint = result if targets else dict(edit.base_fingerprint)
