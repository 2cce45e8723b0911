"""The Python entry point: ``pure_fast.erase(model, forget=..., retain=..., method=...) -> Edit``."""
from __future__ import annotations

import time
from typing import Sequence

from .adapters import ModelAdapter, wrap_pipeline
from .edits import fingerprint as fp
from .edits.edit import Edit, kv_weights
from .errors import UsageError
from .methods import METHODS
from .prompts import check_concepts, expand, load_templates


def anchor_sets(forget: Sequence[str], retain: Sequence[str], category: str | None, templates=None):
    """concept -> anchor prompts for forget; a flat list of anchors for retain."""
    if isinstance(templates, str):
        templates = load_templates(templates)
    f = {c: expand(c, category, templates) for c in forget}
    r = [p for c in retain for p in expand(c, category, templates)]
    return f, r


def _adapter(model) -> ModelAdapter:
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, str) or model is None:
        from .adapters import load_model

        return load_model(model)
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
    ``options``: the method's options dataclass; or pass its fields as keyword arguments.
    """
    if isinstance(forget, str):
        forget = [forget]
    if isinstance(retain, str):
        retain = [retain]
    forget, retain = check_concepts(forget, retain)
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    adapter = _adapter(model)
    f_prompts, r_prompts = anchor_sets(forget, retain, category, templates)
    opts = build_options(method, options, kwargs, category)
    base = start_base_fingerprint(adapter) if fingerprint else None
    t0 = time.perf_counter()
    try:
        if method == "pure":
            from .methods.pure import pure_edit

            edit = pure_edit(adapter, f_prompts, r_prompts, opts, progress=progress)
        else:
            from importlib import import_module

            mod = import_module(f".methods.{method}", __package__)
            edit = mod.make_edit(adapter, forget, retain, f_prompts, r_prompts, options=opts, progress=progress)
    except BaseException:
        if base is not None:
            base.cancel()
        raise
    edit.concepts["forget"] = list(forget)
    edit.concepts["retain"] = list(retain)
    if category:
        edit.options["category"] = category
    edit.stats.setdefault("timings", {})["total_s"] = time.perf_counter() - t0
    if fingerprint:
        t1 = time.perf_counter()
        stamp_fingerprints(edit, adapter, base=base)
        timings = edit.stats["timings"]
        timings["fingerprint_s"] = time.perf_counter() - t1  # the caller's time, waiting included
        if base is not None:
            timings["fingerprint_base_wait_s"] = base.wait_s
            timings["fingerprint_base_background_s"] = base.busy_s
    return edit


def options_class(method: str):
    from importlib import import_module

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    mod = import_module(f".methods.{method}", __package__)
    return mod.OPTIONS if hasattr(mod, "OPTIONS") else mod.PureOptions


def build_options(method: str, options=None, kwargs: dict | None = None, category: str | None = None):
    """The method's options dataclass from keyword arguments, validated (clear errors before any work)."""
    cls = options_class(method)
    if options is None:
        kw = dict(kwargs or {})
        if category and hasattr(cls, "for_category"):
            return cls.for_category(category, **kw) if not kw else _validated(_with_category(cls, category, kw))
        options = _options_from_kwargs(cls, kw)
    elif kwargs:
        raise UsageError("pass either options=... or keyword options, not both")
    return _validated(options)


def _with_category(cls, category, kw):
    base = cls.for_category(category)
    from dataclasses import replace

    top = _options_from_kwargs(cls, kw)
    changed = {k: getattr(top, k) for k in kw if hasattr(base, k)}
    if hasattr(base, "collect") and any(k not in changed for k in kw):  # collection keywords (steps, seeds, ...)
        changed["collect"] = top.collect
    return replace(base, **changed) if changed else top


def _validated(opts):
    opts.validate()
    return opts


def background_fingerprint_wanted(unet) -> bool:
    """Take the base fingerprint in a background thread during the method's work?

    Yes when the K/V weights are on CUDA: the GPU is busy with collection and the CPU cores would idle. No on
    CPU, where the method's own torch work already uses every core: measured on a 2-core CPU with SDXL-sized
    bf16 K/V weights and a GEMM workload standing in for the method, 4.60 s in the background against 4.50 s
    sequential (the work slowed down by what the hashing cost).
    ``PURE_FAST_FP_BACKGROUND=1`` / ``0`` forces it on / off (tests use it to run the threaded path on CPU).
    """
    import os

    env = os.environ.get("PURE_FAST_FP_BACKGROUND", "").strip()
    if env in ("0", "1"):
        return env == "1"
    return any(t.device.type == "cuda" for t in kv_weights(unet).values())


def start_base_fingerprint(model) -> fp.Background | None:
    """The base fingerprint started in the background (or None when it is taken afterwards, see above).

    Safe because no method changes the K/V weights before it returns its edit (pure, uce, cure and space only
    read them, acterase only builds activation patches); ``stamp_fingerprints`` still checks cheaply that the
    weights are the same tensors, unmodified, and takes the fingerprint again when they are not.
    """
    from .edits.edit import resolve_unet

    unet = resolve_unet(model)
    return fp.Background(kv_weights(unet)) if background_fingerprint_wanted(unet) else None


def stamp_fingerprints(edit: Edit, model, *, base: fp.Background | None = None) -> None:
    """Record the base fingerprint, and the result fingerprint: of the weights ``edit.apply`` would leave.

    The result is taken over the values ``apply`` would write (``Edit.new_values``: same checks, same
    float64 computation and rounding, so the same bytes) without writing them: no backup copies, no copy
    into the model and back (measured on SDXL-sized bf16 K/V weights on CPU: apply + revert cost 3 full
    passes more than ``new_values``, page faults of the backups included), and the model is never modified.
    ``base``: the base fingerprint taken in the background (``start_base_fingerprint``); its errors are
    raised here. Weights the edit does not change keep their base per-tensor digests in the result.
    """
    from .edits.edit import resolve_unet

    unet = resolve_unet(model)
    weights = kv_weights(unet)
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
        after = dict(edit.validate_against(unet))
        after.update(edit.new_values(after))
        known = {key: d for key, d in parts.items() if key[0] not in targets}
        edit.result_fingerprint = fp.fingerprints(after, known=known)
    else:
        edit.result_fingerprint = dict(edit.base_fingerprint)


def _options_from_kwargs(cls, kwargs):
    from dataclasses import fields

    from .collect.activations import CollectOptions

    names = {f.name for f in fields(cls)}
    cnames = {f.name for f in fields(CollectOptions)}
    top = {k: v for k, v in kwargs.items() if k in names}
    col = {k: v for k, v in kwargs.items() if k in cnames and k not in names}
    unknown = set(kwargs) - set(top) - set(col)
    if unknown:
        raise UsageError(f"unknown option(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    if "seeds" in col:
        col["seeds"] = tuple(col["seeds"])
    if col and "collect" in names:
        top["collect"] = CollectOptions(**col)
    return cls(**top)
