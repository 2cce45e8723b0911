"""Activation-patch edits (ActErase): no weight changes, an inference-time replacement of a small subspace
of the cross-attention output, installed as forward pre-hooks and removed exactly.

What is stored, per patched ``attn2`` layer and per forget concept k (float32 tensors):

- ``{layer}.c{k}.basis``  V [d, r]: orthonormal directions where the concept's prompts differ from their
  neutral (anchor) twins; d = the layer's attention width (``to_k.out_features``).
- ``{layer}.c{k}.anchor`` μ_a [r]: the neutral prompts' mean coordinates along V (what the component is
  replaced with).
- ``{layer}.c{k}.forget`` μ_f [r]: the forget prompts' mean coordinates along V (used by the gate).

The runtime settings (``strength`` s, ``gate``, ``gate_threshold`` t, ``mode``) live in the metadata
(``options``) and are validated on load. ``weights`` in the metadata maps ``{layer}.to_k.weight`` to the
layer's K-weight shape ``[d, d_in]`` for every patched layer: it pins the layer width *and* the text width,
so a patch for another family (or another model size) is refused before anything is installed.

The operation (h = the attention output ``softmax(QK^T/sqrt(d)) V`` of one sample, rows = spatial
positions, *before* ``to_out``; c = h V its coordinates, c̄ their spatial mean, w = μ_f − μ_a):

    presence  π = (c̄ − μ_a)·w / |w|²          (≈ 1 on forget prompts, ≈ 0 on their neutral twins)
    gate      g = clamp((π − t) / (1 − t), 0, 1)   (gate='soft');  g = 1 (gate='off')
    replace   h ← h − s·g·(c − μ_a) Vᵀ          (mode='replace': every position's component → μ_a)
    shift     h ← h − s·g·(c̄ − μ_a) Vᵀ          (mode='shift': one offset per sample, keeps the layout)

Concepts are applied one after the other (each with its own V and gate). A sample whose gates are all 0
is returned untouched (bit-identical), so an unrelated prompt — and the unconditional CFG branch whenever
its π stays ≤ t — runs exactly the original computation.

Why forward pre-hooks on ``attn2.to_out[0]`` instead of a replacement attention processor: the input of
``to_out[0]`` *is* the attention output before ``to_out`` for every diffusers processor (AttnProcessor2_0,
xformers, PURE's collector, ...), so

1. nothing of diffusers' attention is re-implemented: with no patch active the model runs its own
   processors, unchanged (the processor objects are never touched; tests check identity and bit-equal
   outputs after revert);
2. the patch survives anything that swaps processors: PURE's collection installs its recording
   processors and restores the previous ones afterwards, ``set_attn_processor`` by a user, xformers.
   The one interaction to know: a collector running on a patched model records the *unpatched* output of
   each layer (it pools before ``to_out``), while every later layer sees the patched stream;
3. removal is exact: ``revert`` removes the hook handles it created (kept per UNet and edit id).

Compute happens in float32 and is cast back to the activation dtype once; rows with g = 0 keep their
original values via ``torch.where``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..adapters.layers import find_cross_attention_layers
from ..errors import EditFileError, NumericalError
from ..ops.finite import finite_stats
from .edit import Edit, _common_fields, kv_weights, register

GATES = ("soft", "off")
MODES = ("replace", "shift")
RUNTIME_KEYS = ("strength", "gate", "gate_threshold", "mode")


def check_runtime(strength, gate, gate_threshold, mode, err=EditFileError) -> None:
    """Validate the runtime settings (shared by the options dataclass and the file loader)."""
    if not (isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 < strength <= 1):
        raise err(f"strength={strength!r} is out of range; use a value in (0, 1]")
    if gate not in GATES:
        raise err(f"gate={gate!r} is not valid; use one of {', '.join(GATES)}")
    if not (isinstance(gate_threshold, (int, float)) and not isinstance(gate_threshold, bool)
            and 0 <= gate_threshold < 1):
        raise err(f"gate_threshold={gate_threshold!r} is out of range; use a value in [0, 1)")
    if mode not in MODES:
        raise err(f"mode={mode!r} is not valid; use one of {', '.join(MODES)}")


@dataclass
class ConceptPatch:
    """One concept at one layer: V [d, r], μ_a [r], μ_f [r] (float32)."""

    basis: torch.Tensor
    anchor: torch.Tensor
    forget: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])


def patch_reference(h: torch.Tensor, entries: list[ConceptPatch], *, strength: float = 1.0, gate: str = "soft",
                    gate_threshold: float = 0.0, mode: str = "replace") -> torch.Tensor:
    """Plain float64 loop reference of the patch on one layer's attention output h [B, N, d].

    Written sample by sample from the formulas in the module docstring (independent of ``PatchHook``)."""
    out = h.detach().to(torch.float64).clone()
    for b in range(out.shape[0]):
        x = out[b]
        touched = False
        for e in entries:
            V = e.basis.double()
            mu_a, mu_f = e.anchor.double(), e.forget.double()
            c = x @ V
            cbar = c.mean(0)
            g = 1.0
            if gate == "soft":
                w = mu_f - mu_a
                ww = float(w @ w)
                pi = float((cbar - mu_a) @ w) / ww if ww > 0 else 0.0
                g = min(max((pi - gate_threshold) / (1 - gate_threshold), 0.0), 1.0)
            if g <= 0:
                continue
            touched = True
            delta = (c - mu_a) if mode == "replace" else (cbar - mu_a).expand_as(c)
            x = x - strength * g * delta @ V.T
        if touched:
            out[b] = x
    return out


class PatchHook:
    """Forward pre-hook of ``attn2.to_out[0]``: patches its input (the attention output before to_out)."""

    def __init__(self, entries: list[ConceptPatch], strength: float, gate: str, gate_threshold: float, mode: str):
        self.strength = float(strength)
        self.gate = gate
        self.gate_threshold = float(gate_threshold)
        self.mode = mode
        self.enabled = True
        self.entries = []
        for e in entries:
            if e.rank == 0:
                continue
            w = (e.forget - e.anchor).float()
            self.entries.append((e.basis.float(), e.anchor.float(), w, float(w @ w)))
        self.last_gate: torch.Tensor | None = None  # [B, n_concepts], for inspection and tests

    def to(self, device) -> "PatchHook":
        self.entries = [(V.to(device), a.to(device), w.to(device), ww) for V, a, w, ww in self.entries]
        return self

    def __call__(self, module, args):
        if not self.enabled or not self.entries or not args:
            return None
        h = args[0]
        if h.dim() != 3:  # [B, N, d] is what every diffusers processor feeds to_out[0]
            return None
        x = h.float()
        touched = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        gates = []
        for V, mu_a, w, ww in self.entries:
            c = x @ V  # [B, N, r]
            cbar = c.mean(1)  # [B, r]
            if self.gate == "soft":
                pi = ((cbar - mu_a) @ w) / ww if ww > 0 else torch.zeros(x.shape[0], device=x.device)
                g = ((pi - self.gate_threshold) / (1.0 - self.gate_threshold)).clamp(0.0, 1.0)
            else:
                g = torch.ones(x.shape[0], device=x.device)
            gates.append(g)
            on = g > 0
            if not bool(on.any()):
                continue
            touched |= on
            delta = (c - mu_a) if self.mode == "replace" else (cbar - mu_a).unsqueeze(1)
            x = x - (self.strength * g)[:, None, None] * (delta @ V.T)
        self.last_gate = torch.stack(gates, 1).detach()
        if not bool(touched.any()):
            return None
        out = torch.where(touched[:, None, None], x.to(h.dtype), h)
        return (out,) + tuple(args[1:])


def _handles(unet) -> dict:
    reg = getattr(unet, "_pure_fast_patch_hooks", None)
    if reg is None:
        reg = {}
        object.__setattr__(unet, "_pure_fast_patch_hooks", reg)
    return reg


def installed_hooks(unet) -> dict[str, dict[str, PatchHook]]:
    """edit_id -> {layer name: PatchHook} for the patches currently installed on ``unet``."""
    return {eid: {name: hook for name, (hook, _) in layers.items()} for eid, layers in _handles(unet).items()}


@register
@dataclass
class PatchEdit(Edit):
    """ActErase activation patch: ``patches[layer][k]`` is concept k's ConceptPatch at that layer."""

    kind: ClassVar[str] = "patch"
    patches: dict[str, list[ConceptPatch]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (d, d_in)

    # ---- Edit interface ----------------------------------------------------------------------------
    def target_weights(self) -> list[str]:
        return []

    def expected_shapes(self):
        return {f"{layer}.to_k.weight": tuple(s) for layer, s in self.shapes.items()}

    def runtime(self) -> dict:
        o = self.options
        return {"strength": o.get("strength", 1.0), "gate": o.get("gate", "soft"),
                "gate_threshold": o.get("gate_threshold", 0.0), "mode": o.get("mode", "replace")}

    def ranks(self) -> dict[str, int]:
        return {layer: sum(e.rank for e in entries) for layer, entries in self.patches.items()}

    def tensors(self):
        out = {}
        for layer, entries in self.patches.items():
            for k, e in enumerate(entries):
                out[f"{layer}.c{k}.basis"] = e.basis.float().contiguous()
                out[f"{layer}.c{k}.anchor"] = e.anchor.float().contiguous()
                out[f"{layer}.c{k}.forget"] = e.forget.float().contiguous()
        return out

    @classmethod
    def from_tensors(cls, meta, tensors):
        rt = meta.get("options", {})
        check_runtime(rt.get("strength", 1.0), rt.get("gate", "soft"), rt.get("gate_threshold", 0.0),
                      rt.get("mode", "replace"))
        n_concepts = len(meta.get("concepts", {}).get("forget", [])) or None
        shapes, patches, used = {}, {}, set()
        for wname, (d, d_in) in meta["weights"].items():
            if not wname.endswith(".to_k.weight"):
                raise EditFileError(f"patch metadata names {wname!r}; expected '<layer>.to_k.weight' entries")
            layer = wname[: -len(".to_k.weight")]
            shapes[layer] = (d, d_in)
            entries, k = [], 0
            while f"{layer}.c{k}.basis" in tensors:
                names = [f"{layer}.c{k}.{s}" for s in ("basis", "anchor", "forget")]
                missing = [n for n in names if n not in tensors]
                if missing:
                    raise EditFileError(f"patch file lacks {missing[0]}")
                V, a, f = (tensors[n] for n in names)
                if V.dim() != 2 or V.shape[0] != d or a.shape != (V.shape[1],) or f.shape != (V.shape[1],):
                    raise EditFileError(
                        f"patch of {layer} (concept {k}) has shapes {tuple(V.shape)}, {tuple(a.shape)}, "
                        f"{tuple(f.shape)}; expected [{d}, r], [r], [r]"
                    )
                check_orthonormal(V, f"{layer}.c{k}.basis")
                entries.append(ConceptPatch(V.float(), a.float(), f.float()))
                used.update(names)
                k += 1
            if not entries:
                raise EditFileError(f"patch file lists layer {layer} but holds no tensors for it")
            if n_concepts is not None and len(entries) != n_concepts:
                raise EditFileError(f"patch of {layer} has {len(entries)} concept(s), metadata names {n_concepts}")
            patches[layer] = entries
        extra = set(tensors) - used
        if extra:
            raise EditFileError(f"patch file has unexpected tensors (e.g. {sorted(extra)[0]})")
        return cls(patches=patches, shapes=shapes, **_common_fields(meta))

    def validate_against(self, unet):
        layers = {l.name: l for l in find_cross_attention_layers(unet)}
        missing = [n for n in self.shapes if n not in layers]
        if missing:
            raise EditFileError(
                f"this {self.family} patch targets {len(missing)} layer(s) the model does not have "
                f"(e.g. {missing[0]}); it was made for another model family"
            )
        for name, (d, d_in) in self.shapes.items():
            l = layers[name]
            if (l.d_out, l.d_in) != (d, d_in):
                raise EditFileError(
                    f"{name}: patch expects attention width {d} and text width {d_in}, model has "
                    f"{l.d_out} and {l.d_in}; the patch was made for another model"
                )
            for k, e in enumerate(self.patches.get(name, [])):
                if e.basis.shape[0] != d:
                    raise EditFileError(f"{name}: concept {k} basis has {e.basis.shape[0]} rows, layer width is {d}")
        for tname, t in self.tensors().items():
            bad, _ = finite_stats(t)
            if bad:
                raise NumericalError(f"patch tensor {tname} has {bad} NaN/Inf values; refusing to apply it")
        check_runtime(**self.runtime(), err=EditFileError)
        return kv_weights(unet)

    def _install(self, unet) -> None:
        rt = self.runtime()
        reg = _handles(unet)
        if self.edit_id in reg:
            raise EditFileError(f"patch {self.edit_id} is already installed on this model")
        installed = {}
        try:
            for layer, entries in self.patches.items():
                mod = unet.get_submodule(layer)
                target = mod.to_out[0]
                ref = next(iter(target.parameters()), None)
                hook = PatchHook(entries, **rt)
                if ref is not None:
                    hook.to(ref.device)
                installed[layer] = (hook, target.register_forward_pre_hook(hook))
        except Exception:
            for _, handle in installed.values():
                handle.remove()
            raise
        reg[self.edit_id] = installed

    def _uninstall(self, unet) -> None:
        reg = _handles(unet)
        for _, handle in reg.pop(self.edit_id, {}).values():
            handle.remove()

    def inspect(self):
        m = super().inspect()
        r = list(self.ranks().values())
        m["layers"] = len(self.patches)
        m["patched_layers"] = len(self.patches)
        m["rank_min"], m["rank_max"] = (min(r), max(r)) if r else (0, 0)
        rt = self.runtime()
        gate = f"soft gate t={rt['gate_threshold']}" if rt["gate"] == "soft" else "no gate"
        n = len(self.concepts.get("forget", [])) or max((len(e) for e in self.patches.values()), default=0)
        m["details"] = (f"activation patch (no weight change) on {len(self.patches)} attn2 layers, {n} concept(s), "
                        f"{rt['mode']} at strength {rt['strength']}, {gate}; active only while applied "
                        "(generate --edit, Edit.apply), nothing to bake into weights")
        return m


def check_orthonormal(V: torch.Tensor, name: str, tol: float = 1e-3) -> None:
    """V^T V must be the identity (a basis that is not orthonormal would not be a projection)."""
    if V.shape[1] == 0:
        return
    G = V.double().T @ V.double()
    err = float((G - torch.eye(G.shape[0], dtype=torch.float64)).abs().max())
    if not math.isfinite(err) or err > tol:
        raise EditFileError(f"{name} is not an orthonormal basis (max |V^T V - I| = {err:.2e})")
