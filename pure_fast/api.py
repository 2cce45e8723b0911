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
    t0 = time.perf_counter()
    if method == "pure":
        from .methods.pure import pure_edit

        edit = pure_edit(adapter, f_prompts, r_prompts, opts, progress=progress)
    else:
        from importlib import import_module

        mod = import_module(f".methods.{method}", __package__)
        edit = mod.make_edit(adapter, forget, retain, f_prompts, r_prompts, options=opts, progress=progress)
    edit.concepts["forget"] = list(forget)
    edit.concepts["retain"] = list(retain)
    if category:
        edit.options["category"] = category
    edit.stats.setdefault("timings", {})["total_s"] = time.perf_counter() - t0
    if fingerprint:
        t1 = time.perf_counter()
        stamp_fingerprints(edit, adapter)
        edit.stats["timings"]["fingerprint_s"] = time.perf_counter() - t1
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


def stamp_fingerprints(edit: Edit, model) -> None:
    """Record the base fingerprint, and the result fingerprint by applying and reverting in place."""
    from .edits.edit import resolve_unet

    unet = resolve_unet(model)
    edit.base_fingerprint = fp.fingerprints(kv_weights(unet))
    if edit.target_weights():
        edit.apply(unet, check=False)
        try:
            edit.result_fingerprint = fp.fingerprints(kv_weights(unet))
        finally:
            edit.revert(unet)
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
