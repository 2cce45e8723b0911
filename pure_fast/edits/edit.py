"""The Edit type family: one interface (apply, revert, save, load, inspect) for every method.

- ``LowRankEdit``: per weight, ``W <- W + up @ down`` (PURE; any low-rank change).
- more kinds live beside it (shared right matrix, CSR weights, activation patch) and register in ``KINDS``.

Applying checks that the model is the one the edit was made for (fingerprint of its K/V weights, or the
chain of edits already applied on it), that every tensor fits the model's layers and is finite, then
writes the new weights (computed in float64 and rounded once, so the result is the same on any device; the
shared right-matrix kind computes 16-bit weights in fp32 within a stated bound, see edits/shared.py)
and keeps the old ones, so ``revert`` restores them bit-exactly. Applied edits form a stack per UNet.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .. import __version__
from ..adapters.layers import find_cross_attention_layers
from ..errors import EditFileError, FingerprintMismatch, NumericalError
from ..ops.apply_edit import apply_lowrank
from ..ops.finite import finite_stats, first_nonfinite
from . import fingerprint as fp
from .io import KINDS, load_edit, register, save_edit  # noqa: F401 - KINDS and register: the kinds' registry


def resolve_unet(model) -> torch.nn.Module:
    """Accept an adapter, a diffusers pipeline, or a UNet."""
    if hasattr(model, "unet") and isinstance(model.unet, torch.nn.Module):
        return model.unet
    if isinstance(model, torch.nn.Module):
        return model
    raise TypeError(f"expected a pipeline, adapter or UNet, got {type(model).__name__}")


def kv_weights(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every attn2 to_k / to_v weight of the UNet by name (the set fingerprints are taken over)."""
    out = {}
    for layer in find_cross_attention_layers(unet):
        out[layer.key_weight] = layer.module.to_k.weight
        out[layer.value_weight] = layer.module.to_v.weight
    return out


def model_kv_weights(model):
    """The K/V weights of a pipeline / adapter / UNet (name -> Parameter), or, for an adapter without a UNet
    (``adapters.text_only.TextOnlyAdapter``), its lazy mapping that reads one tensor per access from the
    files (``fingerprint.is_lazy``). A mapping is returned as is."""
    if isinstance(model, Mapping):
        return model
    lazy = getattr(model, "kv_weights", None)
    if callable(lazy):
        return lazy()
    return kv_weights(resolve_unet(model))


def _shape_of(weights, name: str) -> tuple[int, ...]:
    return tuple(weights.shape(name)) if fp.is_lazy(weights) else tuple(weights[name].shape)


@dataclass
class AppliedRecord:
    edit_id: str
    edit: "Edit"
    backups: dict[str, torch.Tensor]


def applied_stack(unet: torch.nn.Module) -> list[AppliedRecord]:
    stack = getattr(unet, "_pure_fast_applied", None)
    if stack is None:
        stack = []
        object.__setattr__(unet, "_pure_fast_applied", stack)
    return stack


@dataclass
class Edit:
    """Base class. ``meta`` fields are stored in the file's JSON header."""

    kind: ClassVar[str] = "base"

    method: str
    family: str
    concepts: dict[str, list[str]]
    options: dict[str, Any]
    base_fingerprint: dict[str, str] = field(default_factory=dict)
    result_fingerprint: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: str = ""
    edit_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.version:
            self.version = __version__

    # ---- to implement -------------------------------------------------------------------------------
    def target_weights(self) -> list[str]:
        """Names of the UNet weights this edit changes (empty for activation patches)."""
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def new_weight(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """The edited value of weight ``name`` given its current value (float64)."""
        raise NotImplementedError

    def new_weights(self, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The edited values of several weights at once (float64 in, float64 out), name -> tensor.

        ``apply`` calls this once with every target weight; kinds override it to batch equally shaped
        layers into one product. The default loops over :meth:`new_weight`.
        """
        return {name: self.new_weight(name, w) for name, w in current.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "Edit":
        raise NotImplementedError

    def delta(self, name: str, current: torch.Tensor) -> torch.Tensor:
        """ΔW for weight ``name`` (float64)."""
        w = current.detach().to(torch.float64)
        return self.new_weight(name, w) - w

    # ---- shared behaviour -----------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "format": "pure_fast.edit", "format_version": 1, "kind": self.kind, "method": self.method,
            "family": self.family, "concepts": self.concepts, "options": self.options,
            "base_fingerprint": self.base_fingerprint, "result_fingerprint": self.result_fingerprint,
            "created": self.created, "version": self.version, "edit_id": self.edit_id, "stats": self.stats,
            "weights": {n: list(s) for n, s in self.expected_shapes().items()},
        }

    def validate_against(self, unet) -> dict[str, torch.nn.Parameter]:
        """Check names, shapes and the edit's own tensors against a model's K/V weights; returns them
        (``model_kv_weights``: a lazy mapping for a text-only adapter, read here for nothing but shapes)."""
        weights = model_kv_weights(unet)
        missing = [n for n in self.target_weights() if n not in weights]
        if missing:
            raise EditFileError(
                f"this {self.family} edit targets {len(missing)} layer(s) the model does not have "
                f"(e.g. {missing[0]}); it was made for another model family"
            )
        for name, shape in self.expected_shapes().items():
            if name in weights and _shape_of(weights, name) != tuple(shape):
                raise EditFileError(
                    f"{name}: edit expects shape {tuple(shape)}, model has {_shape_of(weights, name)}; "
                    "the edit was made for another model"
                )
        for name, t in self.tensors().items():
            if t.is_floating_point():
                bad, _ = finite_stats(t)
                if bad:
                    raise NumericalError(f"edit tensor {name} has {bad} NaN/Inf values; refusing to apply it")
        return weights

    def check_fingerprint(self, unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        stack = applied_stack(unet)
        if not self.base_fingerprint:
            return
        if stack and stack[-1].edit.result_fingerprint:
            top = stack[-1].edit.result_fingerprint
            if any(top.get(k) and top.get(k) == self.base_fingerprint.get(k) for k in ("float16", "bfloat16")) or (
                top.get("exact") and top.get("exact") == self.base_fingerprint.get("exact")
            ):
                return
        if fp.matches(self.base_fingerprint, weights):
            return
        where = f"after edit {stack[-1].edit_id} ({stack[-1].edit.method})" if stack else "in this model"
        raise FingerprintMismatch(
            f"edit {self.edit_id} was made for other weights (fingerprint {fp.short(self.base_fingerprint)}) than "
            f"the K/V weights {where}; apply it to the model it was made from (or pass force=True / --force)"
        )

    def rounded_new_weights(self, weights: dict[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
        """target name -> new weight in the weight's dtype (no checks). Default: :meth:`new_weights` in
        float64, rounded once, so the result does not depend on the device. Kinds with a cheaper update that
        is exact enough override it (``SharedRightEdit`` for 16-bit weights). ``names``: only these targets
        (one at a time when the weights are streamed from the files; the per-layer routes give the same bits)."""
        names = self.target_weights() if names is None else list(names)
        computed = dict(self.new_weights({n: weights[n].detach().to(torch.float64) for n in names}))
        return {name: computed.pop(name).to(weights[name].dtype) for name in names}  # pop: float64 freed as we go

    @torch.no_grad()
    def new_values(self, weights: dict[str, torch.Tensor], names=None) -> dict[str, torch.Tensor]:
        """The values ``apply`` writes: target name -> new weight in the weight's dtype (the model untouched).

        :meth:`rounded_new_weights`; raises NumericalError when a result is not finite (checked for all
        weights at once: one host synchronisation on CUDA). ``weights``: the model's K/V weights
        (``validate_against``'s result). ``stamp_fingerprints`` takes the result fingerprint over exactly
        these values.
        """
        new_values = self.rounded_new_weights(weights, names)
        names = list(new_values)
        bad = first_nonfinite([new_values[n] for n in names])
        if bad is not None:
            raise NumericalError(f"applying the edit makes {names[bad]} non-finite; the model was not changed")
        return new_values

    @torch.no_grad()
    def apply(self, model, *, check: bool = True, force: bool = False) -> "Edit":
        """Apply to a pipeline / adapter / UNet in place. Returns self."""
        unet = resolve_unet(model)
        weights = self.validate_against(unet)
        if check and not force:
            self.check_fingerprint(unet, weights)
        new_values = self.new_values(weights)
        backups = {}
        for name, new in new_values.items():
            p = weights[name]
            backups[name] = p.detach().clone()
            p.data.copy_(new)
        self._install(unet)
        applied_stack(unet).append(AppliedRecord(self.edit_id, self, backups))
        return self

    @torch.no_grad()
    def revert(self, model) -> None:
        """Undo this edit bit-exactly; it must be the last edit applied on the model."""
        unet = resolve_unet(model)
        stack = applied_stack(unet)
        if not stack or stack[-1].edit_id != self.edit_id:
            ids = [r.edit_id for r in stack]
            if self.edit_id in ids:
                raise EditFileError(
                    f"edit {self.edit_id} is not the last one applied; revert the {len(ids) - 1 - ids.index(self.edit_id)} "
                    "edit(s) applied after it first"
                )
            raise EditFileError(f"edit {self.edit_id} is not applied to this model")
        rec = stack.pop()
        weights = kv_weights(unet)
        for name, old in rec.backups.items():
            weights[name].data.copy_(old)
        self._uninstall(unet)

    def _install(self, unet) -> None:  # activation patches override
        pass

    def _uninstall(self, unet) -> None:
        pass

    def save(self, path: str) -> str:
        return save_edit(self, path)

    @staticmethod
    def load(path: str) -> "Edit":
        return load_edit(path)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # fields that describe the run, not the edit: excluded from ``content_digest``
    VOLATILE: ClassVar[tuple[str, ...]] = ("created", "edit_id")
    VOLATILE_STATS: ClassVar[tuple[str, ...]] = ("timings", "time_s")  # wall-clock keys, at any depth of stats

    def content_digest(self) -> str:
        """BLAKE2b of what the edit is: every tensor (name, dtype, shape, bytes) and the metadata without the
        run-specific fields (``created``, the random ``edit_id``, and wall-clock keys ``timings`` / ``time_s``
        anywhere inside ``stats``). Determinism is defined on it: the same model, inputs, options and seeds
        give the same digest on CPU (tests/test_determinism.py).
        """
        def strip(x):
            if isinstance(x, dict):
                return {k: strip(v) for k, v in x.items() if k not in self.VOLATILE_STATS}
            if isinstance(x, (list, tuple)):
                return [strip(v) for v in x]
            return x

        meta = {k: v for k, v in self.meta().items() if k not in self.VOLATILE}
        meta["stats"] = strip(meta.get("stats") or {})
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for name, t in sorted(self.tensors().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def inspect(self) -> dict:
        m = self.meta()
        m.pop("weights")
        m["layers"] = len({n.rsplit(".", 2)[0] for n in self.target_weights()}) if self.target_weights() else 0
        m["changed_weights"] = len(self.target_weights())
        m["tensor_bytes"] = self.nbytes()
        return m


def revert_all(model, n: int | None = None) -> int:
    """Revert the last ``n`` edits (all when None) in reverse order; returns how many were reverted."""
    unet = resolve_unet(model)
    stack = applied_stack(unet)
    count = len(stack) if n is None else min(n, len(stack))
    for _ in range(count):
        stack[-1].edit.revert(unet)
    return count


@register
@dataclass
class LowRankEdit(Edit):
    """``W <- W + up @ down`` per weight; ``up`` [d_out, r], ``down`` [r, d_in] (float32 storage)."""

    kind: ClassVar[str] = "lowrank"
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def target_weights(self) -> list[str]:
        return list(self.factors)

    def expected_shapes(self):
        return dict(self.shapes)

    def new_weight(self, name, current):
        up, down = self.factors[name]
        return current + up.to(current.device, torch.float64) @ down.to(current.device, torch.float64)

    def new_weights(self, current):
        """All weights at once: equally shaped ones in one batched product (``ops.apply_edit``).

        Equal to the per-weight :meth:`new_weight` within ``ops.apply_edit.lowrank_tolerance`` (a few float64
        ulps: BLAS may sum a batched product in another order; after rounding to the storage dtype at most
        one ulp where the value sits on a rounding boundary). Tested in tests/test_apply_edit.py.
        """
        return apply_lowrank(current, {n: self.factors[n] for n in current})

    def delta(self, name, current):
        up, down = self.factors[name]
        return up.to(current.device, torch.float64) @ down.to(current.device, torch.float64)

    def ranks(self) -> dict[str, int]:
        return {n: int(u.shape[1]) for n, (u, _) in self.factors.items()}

    def tensors(self):
        out = {}
        for n, (u, d) in self.factors.items():
            out[f"{n}.up"] = u.contiguous()
            out[f"{n}.down"] = d.contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta, tensors):
        shapes = {n: tuple(s) for n, s in meta["weights"].items()}
        factors = {}
        for n, (d_out, d_in) in shapes.items():
            up, down = tensors.get(f"{n}.up"), tensors.get(f"{n}.down")
            if up is None or down is None:
                raise EditFileError(f"edit file lacks the factors of {n}")
            if up.dim() != 2 or down.dim() != 2 or up.shape[0] != d_out or down.shape[1] != d_in or up.shape[1] != down.shape[0]:
                raise EditFileError(
                    f"factors of {n} have shapes {tuple(up.shape)} and {tuple(down.shape)}, "
                    f"which do not make a {d_out}x{d_in} change"
                )
            factors[n] = (up, down)
        extra = set(tensors) - {f"{n}.{s}" for n in shapes for s in ("up", "down")}
        if extra:
            raise EditFileError(f"edit file has unexpected tensors (e.g. {sorted(extra)[0]})")
        return cls(factors=factors, shapes=shapes, **_common_fields(meta))

    def inspect(self):
        m = super().inspect()
        r = list(self.ranks().values())
        m["rank_min"], m["rank_max"] = (min(r), max(r)) if r else (0, 0)
        return m


def _common_fields(meta: dict) -> dict:
    return {
        "method": meta["method"], "family": meta["family"], "concepts": meta.get("concepts", {}),
        "options": meta.get("options", {}), "base_fingerprint": meta.get("base_fingerprint", {}),
        "result_fingerprint": meta.get("result_fingerprint", {}), "created": meta.get("created", ""),
        "version": meta.get("version", ""), "edit_id": meta.get("edit_id", uuid.uuid4().hex[:16]),
        "stats": meta.get("stats", {}),
    }
