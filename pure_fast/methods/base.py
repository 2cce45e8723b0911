"""The method seam: a registry of erasure methods and the erase context they share.

A method is a :class:`Method`: its name, its options dataclass (each field declared with
``options.option``, whose metadata is the one source of the option's default, range or choices, help and
CLI flag) and ``make_edit(context) -> Edit``. The :class:`EraseContext` owns the steps every method shares:
concepts and anchor prompts, options (category presets from ``prompts.method_preset``, then the caller's
values, validated once), collection with its timing, the recorded options and the timings.

Adding a method: one module in ``pure_fast/methods/`` defining ``METHOD = Method(...)``, and its entry in
the registering tuple of ``methods/__init__.py``. The Python API (``pure_fast.erase(..., method=name,
**options)``), the CLI (``pure-fast erase --method name`` with one flag per option) and ``inspect`` pick it
up from there.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Callable, Sequence

import torch

from ..collect.activations import Activations, collect_activations
from ..errors import UsageError
from ..options import options_from_values, options_meta, validate_options
from ..prompts import anchor_sets, check_concepts, default_category, method_preset


@dataclass(frozen=True)
class Method:
    """An erasure method. ``options``: its options dataclass; ``make_edit``: context -> Edit (not applied)."""

    name: str
    options: type
    make_edit: Callable[["EraseContext"], Any]
    description: str
    # what of a model the method reads: 'all' (the whole pipeline) or 'text' (the text encoder(s) and the K/V
    # weights only, read lazily from the files: ``adapters.load_model(parts='text')``, ``adapters/text_only.py``)
    model_parts: str = "all"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name registers once)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    if not is_dataclass(method.options):
        raise TypeError(f"{method.name}: options must be a dataclass")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests register toy methods and remove them again)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_options(method: Method, options=None, values: dict | None = None, category: str | None = None):
    """The method's options: ``options`` as given, or the category's preset (or the named preset
    ``values['preset']`` of the options class's ``PRESETS``) updated with ``values``; validated (the one
    place options are validated)."""
    if options is not None:
        if values:
            raise UsageError("pass either options=... or keyword options, not both")
        if not isinstance(options, method.options):
            raise UsageError(f"options for {method.name} must be {method.options.__name__}, "
                             f"not {type(options).__name__}")
    else:
        values = dict(values or {})
        named = getattr(method.options, "PRESETS", {}).get(values.get("preset"))
        # a named preset (PURE's preset='paper') replaces the category's and fixes every option it names;
        # the caller's explicit values still override it
        base = dict(named) if named is not None else method_preset(category, method.name)
        options = options_from_values(method.options, {**base, **values})
    validate_options(options)
    return options


@dataclass
class EraseContext:
    """What a method's ``make_edit`` works from: the concepts, their anchor prompts, validated options, the
    model (``adapter``, set by ``bind``) and the shared steps (collection, timings, recorded options)."""

    method: Method
    forget: list[str]
    retain: list[str]
    forget_prompts: dict[str, list[str]]
    retain_prompts: list[str]
    options: Any
    category: str | None = None
    adapter: Any = None
    progress: bool = True
    timings: dict = field(default_factory=dict)

    @classmethod
    def prepare(cls, method: str, forget: Sequence[str] | str, retain: Sequence[str] | str = (), *,
                category: str | None = None, templates=None, options=None, values: dict | None = None,
                toy: bool = False) -> "EraseContext":
        """Every check of the user's input, before any model is loaded: concepts, method, category /
        templates (anchor prompts), options. ``toy``: the model is the toy model, so a missing category is
        inferred from the toy concept names (``prompts.default_category``)."""
        forget = [forget] if isinstance(forget, str) else list(forget)
        retain = [retain] if isinstance(retain, str) else list(retain)
        forget, retain = check_concepts(forget, retain)
        category = default_category(forget, retain, category, templates, toy=toy)
        m = get_method(method)
        f_prompts, r_prompts = anchor_sets(forget, retain, category, templates)
        opts = build_options(m, options, values, category)
        return cls(m, forget, retain, f_prompts, r_prompts, opts, category)

    @classmethod
    def from_prompts(cls, method: str, adapter, forget: Sequence[str], retain: Sequence[str] = (),
                     forget_prompts: dict[str, list[str]] | None = None, retain_prompts: Sequence[str] | None = None,
                     options=None, *, progress: bool = False, **values) -> "EraseContext":
        """A context with the anchor prompts given as they are (default: each concept its own prompt), bound
        to ``adapter``: for running one method's ``make_edit`` directly (tests, benchmarks)."""
        m = get_method(method)
        f_prompts = {c: [c] for c in forget} if forget_prompts is None else dict(forget_prompts)
        r_prompts = list(retain) if retain_prompts is None else list(retain_prompts)
        opts = build_options(m, options, values)
        return cls(m, list(forget), list(retain), f_prompts, r_prompts, opts).bind(adapter, progress)

    def run(self):
        """The method's edit (not applied, not fingerprinted: ``api.run_erase`` does both)."""
        return self.method.make_edit(self)

    def bind(self, adapter, progress: bool = True) -> "EraseContext":
        self.adapter, self.progress = adapter, progress
        return self

    @contextmanager
    def timed(self, key: str):
        """Record the wall time of the block as ``timings[key]`` (CUDA work synchronised first)."""
        t0 = time.perf_counter()
        yield
        if self.adapter is not None and self.adapter.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings[key] = time.perf_counter() - t0

    def collect(self, groups: dict[str, Sequence[str]]) -> Activations:
        """Pooled cross-attention activations of every prompt group (``collect.activations``) with the
        method's collection options, timed as ``collect_s``."""
        with self.timed("collect_s"):
            return collect_activations(self.adapter, groups, self.options.collect, progress=self.progress)

    def options_meta(self, **extra) -> dict:
        """The options as the edit records them (plus ``extra``); with collection options, also the
        collection resolution actually used (``size``)."""
        meta = options_meta(self.options)
        if "collect" in meta:
            meta["size"] = self.options.collect.size or self.adapter.default_collect_size
        meta.update(extra)
        return meta

    def stats(self, **extra) -> dict:
        return {"timings": self.timings, **extra}



def run_method(method: str, adapter, forget: Sequence[str], retain: Sequence[str] = (),
               forget_prompts: dict[str, list[str]] | None = None, retain_prompts: Sequence[str] | None = None,
               options=None, *, progress: bool = False, **values):
    """One method's edit from anchor prompts given as they are (``EraseContext.from_prompts``)."""
    return EraseContext.from_prompts(method, adapter, forget, retain, forget_prompts, retain_prompts, options,
                                     progress=progress, **values).run()
