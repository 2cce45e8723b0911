"""Interchange exports of an Edit: LoRA files (diffusers / PEFT and kohya forms) and plain UNet tensors.

LoRA convention (both forms): per changed weight ``W`` [d_out, d_in] with change ``ΔW``,
``up`` [d_out, r] and ``down`` [r, d_in] with ``(alpha / r) · up @ down = ΔW``.

- ``LowRankEdit`` (PURE): its own factors, exactly (``alpha = r``); no model needed.
- ``SharedRightEdit`` (UCE, CURE: ``W ← W (I + U Vᵀ)``): ``ΔW = (W U) Vᵀ`` is exactly rank r *given the
  base weights*, so ``up = W U``, ``down = Vᵀ`` (the model is needed, nothing is truncated). A dense
  right matrix (stored when ``2r ≥ d_in``) is treated as full rank.
- ``PatchEdit`` (ActErase): changes no weight; refused in one line.
- any other edit (SPACE's sparse replacement weights, ...): ``ΔW = edit.delta(name, W_base)`` in float64,
  truncated SVD at the caller's ``rank``:
  ``up = U_k · S_k``, ``down = Vh_k``, ``alpha = k``; the relative Frobenius error
  ``sqrt(Σ_dropped σ²) / ‖ΔW‖_F`` is reported per weight and overall. Singular values below float64
  round-off (``σ ≤ σ_max · max(d) · eps``) are dropped too: they carry nothing.

diffusers form: keys ``unet.<module>.lora_A.weight`` (= down) / ``unet.<module>.lora_B.weight`` (= up),
no ``.alpha`` tensors; the PEFT ``LoraConfig`` (r, lora_alpha, target_modules, rank_pattern, alpha_pattern)
sits in the safetensors metadata under ``lora_adapter_metadata`` with the ``unet.`` prefix on every field,
which is what ``pipe.load_lora_weights`` (diffusers 0.42) reads back, so differing ranks load exactly.

kohya form: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (0-d tensor);
consumers scale by ``alpha / r``. Module names are the diffusers ones by default (as kohya's sd-scripts writes
for SD1/SD2); ``kohya_names="ldm"`` writes the LDM/SGM names instead (``lora_unet_input_blocks_4_1_...``, as
sd-scripts writes for SDXL). Which consumer loads what (``consumer_notes``): ComfyUI and A1111 read the kohya
form with either naming and ignore every key of the diffusers form (ComfyUI logs "lora key not loaded" and
leaves the model unchanged); diffusers reads the diffusers form, the kohya form with diffusers names, and the
kohya form with LDM names for SDXL only (for SD1/SD2 ``load_lora_weights`` raises NoMatchingPeftModuleError:
its kohya converter maps only SGM block names). diffusers 0.42 turns kohya alphas into
an ``alpha_pattern`` whose keys never match a module (``..._lora.down.weight``), so every module gets the
most common alpha: with ranks that differ, a per-module ``alpha = r`` would load with the wrong scale there.
The kohya export therefore writes ONE alpha for all modules (the most common rank) and folds ``r / alpha``
into ``up`` of the other modules, which every consumer that loads the file scales identically.
"""
from __future__ import annotations

import collections
import collections.abc
import json
import os
from typing import Any

import torch

from ..edits.edit import Edit, applied_stack, resolve_unet
from ..errors import EditFileError, UsageError
from ..fileio import save_safetensors
from .single_file import ldm_unet_key

FORMATS = ("diffusers", "kohya")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _model_of(unet_or_pipe):
    """The UNet of a pipeline / adapter, or a text-only adapter itself (no UNet: its K/V weights are read
    from the files, ``edit.model_kv_weights``), or None."""
    if unet_or_pipe is None:
        return None
    if callable(getattr(unet_or_pipe, "kv_weights", None)):
        return unet_or_pipe
    return resolve_unet(unet_or_pipe)


def _unet_config(model):
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None else model.unet_config


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise UsageError(f"LoRA dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPES[str(dtype).lower()]


def _module_path(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise EditFileError(f"edit target {weight_name!r} is not a weight (expected a name ending in .weight)")
    return weight_name[: -len(".weight")]


def base_weights(edit: Edit, unet: torch.nn.Module, *, force: bool = False) -> dict[str, torch.Tensor]:
    """The weights ``edit`` was made to change, as they are WITHOUT it (float64, on their device).

    If the edit is the last one applied on ``unet``, its backups; if it is applied under other edits, an
    error; otherwise the current weights (their fingerprint is checked unless ``force``).
    """
    weights = edit.validate_against(unet)
    stack = applied_stack(unet)
    ids = [r.edit_id for r in stack]
    if edit.edit_id in ids:
        if ids[-1] != edit.edit_id:
            raise EditFileError(
                f"edit {edit.edit_id} is applied under {len(ids) - 1 - ids.index(edit.edit_id)} later edit(s); "
                "revert those first (its base weights are no longer at hand)"
            )
        backups = stack[-1].backups
        return {n: backups[n].detach().to(torch.float64) for n in edit.target_weights()}
    if not force:
        edit.check_fingerprint(unet, weights)
    if getattr(weights, "lazy", False):  # read each from the files when it is used
        return _Float64(weights.subset(edit.target_weights()))
    return {n: weights[n].detach().to(torch.float64) for n in edit.target_weights()}


class _Float64(collections.abc.Mapping):
    """A lazy K/V mapping whose tensors come out in float64 (``base_weights`` of a text-only adapter)."""

    lazy = True

    def __init__(self, weights):
        self.weights = weights

    def __getitem__(self, name):
        return self.weights[name].to(torch.float64)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self):
        return len(self.weights)


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, dropped energy, total energy) of the best rank-``rank`` approximation (float64)."""
    total = float(delta.pow(2).sum())
    if total == 0.0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1]), 0.0, 0.0
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    tiny = float(S[0]) * max(delta.shape) * torch.finfo(torch.float64).eps
    k = min(k, int((S > tiny).sum()))
    dropped = float(S[k:].pow(2).sum())
    return U[:, :k] * S[:k], Vh[:k], dropped, total


def _lowrank_truncate(up: torch.Tensor, down: torch.Tensor, rank: int):
    """Truncated SVD of ``up @ down`` without forming it: QR of both factors, SVD of the small core."""
    Qu, Ru = torch.linalg.qr(up)
    Qd, Rd = torch.linalg.qr(down.T)
    core = Ru @ Rd.T
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    total = float(s.pow(2).sum())
    k = min(rank, s.numel())
    if total > 0:
        k = min(k, int((s > float(s[0]) * max(up.shape[0], down.shape[1]) * torch.finfo(torch.float64).eps).sum()))
    dropped = float(s[k:].pow(2).sum())
    return (Qu @ u[:, :k]) * s[:k], vh[:k] @ Qd.T, dropped, total


# ---- exact low-rank factorisations per edit kind --------------------------------------------------------------
# kind -> (needs the base weights, fn(edit, name, base_W float64 or None) -> (up, down) float64 with up·down = ΔW)
EXACT_FACTORS: dict[str, tuple[bool, Any]] = {}


def register_exact(kind: str, needs_base: bool):
    """Declare that edits of ``kind`` have an exact low-rank ΔW (a LoRA without truncation)."""

    def deco(fn):
        EXACT_FACTORS[kind] = (needs_base, fn)
        return fn

    return deco


@register_exact("lowrank", needs_base=False)
def _lowrank_exact(edit, name, base):
    return edit.factors[name]


@register_exact("shared_right", needs_base=True)
def _shared_right_exact(edit, name, base):
    # ΔW = W (A − I) = (W U) Vᵀ: rank r given the base weights, no truncation
    return edit.layer_factors({name: base})[name]


def _exact_entry(edit: Edit):
    if edit.kind == "shared_right" and getattr(edit, "A", None) is not None:
        return None  # a dense right matrix: ΔW = W (A − I) has full rank, so --rank truncates it
    entry = EXACT_FACTORS.get(edit.kind)
    if entry is None and callable(getattr(edit, "lowrank_delta", None)):
        entry = (True, lambda e, n, w: e.lowrank_delta(n, w))
    return entry


def is_activation_patch(edit: Edit) -> bool:
    return not list(edit.target_weights())


def refuse_patch(edit: Edit, what: str = "a LoRA") -> None:
    if is_activation_patch(edit):
        raise UsageError(f"edit {edit.edit_id} ({edit.method}, kind {edit.kind}) changes no weights (an activation "
                         f"patch applied at inference); it cannot be written as {what}")


def lora_factors(edit: Edit, unet_or_pipe=None, rank: int | None = None, *, force: bool = False,
                 device: str | torch.device | None = None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """Per target weight ``(up, down)`` in float64 with ``up @ down ≈ ΔW``, and the truncation report.

    Kinds with an exact low-rank ΔW (``EXACT_FACTORS``: LowRankEdit's own factors; a shared right matrix
    ``A = I + U Vᵀ`` gives ``ΔW = (W U) Vᵀ``) are written exactly unless their rank exceeds ``rank``;
    the others (SPACE's sparse replacement weights, ...) need ``rank`` (truncated SVD of the dense ΔW).
    ``unet_or_pipe`` may be None only for kinds that need no base weights. ``device``: where the SVDs run.
    """
    unet = _model_of(unet_or_pipe)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    refuse_patch(edit)
    names = list(edit.target_weights())
    entry = _exact_entry(edit)
    exact = entry is not None
    if not exact and rank is None:
        raise UsageError(f"a {edit.kind} edit ({edit.method}) is not low rank by construction: pass --rank "
                         "for a truncated-SVD LoRA (the relative error is reported)")
    needs_base = not exact or entry[0]
    if needs_base and unet is None:
        raise UsageError(f"a {edit.kind} edit ({edit.method}) changes the weights as a function of the model's own "
                         "weights: pass --model (the model the edit was made for) to export it")
    base = base_weights(edit, unet, force=force) if needs_base else None
    if not needs_base and unet is not None:
        edit.validate_against(unet)
    factors, per_weight, skipped = {}, {}, []
    dropped_all = total_all = 0.0
    for name in names:
        w = None
        if base is not None:
            w = base[name].to(device) if device is not None else base[name]
        if exact:
            up, down = entry[1](edit, name, w)
            dev = device or (w.device if w is not None else up.device)
            up, down = up.to(dev, torch.float64), down.to(dev, torch.float64)
            if rank is not None and up.shape[1] > rank:
                up, down, dropped, total = _lowrank_truncate(up, down, rank)
            else:
                # ‖up·down‖²_F = Σ (upᵀup) ∘ (down·downᵀ): no d_out × d_in matrix
                dropped, total = 0.0, float(((up.T @ up) * (down @ down.T)).sum())
        else:
            delta = edit.delta(name, w).to(torch.float64)
            up, down, dropped, total = _truncate(delta, rank)
        dropped_all += dropped
        total_all += total
        per_weight[name] = {"rank": int(up.shape[1]), "rel_error": (dropped / total) ** 0.5 if total > 0 else 0.0}
        if up.shape[1] == 0:
            skipped.append(name)
            continue
        factors[name] = (up, down)
    report = {
        "exact": exact and all(v["rel_error"] == 0.0 for v in per_weight.values()),
        "kind": edit.kind,
        "requested_rank": rank,
        "weights": per_weight,
        "rel_error": (dropped_all / total_all) ** 0.5 if total_all > 0 else 0.0,
        "max_rel_error": max((v["rel_error"] for v in per_weight.values()), default=0.0),
        "skipped_zero": skipped,
    }
    return factors, report


def _peft_metadata(ranks: dict[str, int]) -> dict[str, Any]:
    """LoraConfig kwargs with the ``unet.`` prefix diffusers strips on load; every module's rank and alpha
    are pinned (``^<module>`` patterns, as diffusers itself writes them) so differing ranks load exactly."""
    common = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{m}": r for m, r in ranks.items() if r != common}
    cfg = {
        "r": common, "lora_alpha": common, "target_modules": sorted(ranks), "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "use_dora": False, "lora_bias": False, "bias": "none",
    }
    return {f"unet.{k}": v for k, v in cfg.items()}


def _kohya_name(module: str, unet, names: str) -> str:
    if names == "ldm":
        if unet is None:
            raise UsageError("kohya LDM module names need the model's UNet config: pass --model")
        module = ldm_unet_key(module + ".weight", _unet_config(unet))[: -len(".weight")]
    return "lora_unet_" + module.replace(".", "_")


def consumer_notes(format: str, kohya_names: str = "diffusers", family: str = "sd1") -> tuple[str, str | None]:
    """(which programs load a LoRA file of this form, a warning where a common consumer will not load it)."""
    if format == "diffusers":
        return ("for diffusers (pipe.load_lora_weights)",
                "ComfyUI and A1111 ignore every key of a lora-diffusers file (ComfyUI logs 'lora key not loaded' "
                "and leaves the model unchanged); for them export --format lora-kohya")
    if kohya_names == "ldm":
        if family == "sdxl":
            return "for ComfyUI, A1111 and diffusers (pipe.load_lora_weights)", None
        return ("for ComfyUI and A1111",
                f"diffusers cannot load lora-kohya with --kohya-names ldm for a {family} model "
                "(NoMatchingPeftModuleError); for diffusers use --kohya-names diffusers")
    return "for ComfyUI, A1111 and diffusers (pipe.load_lora_weights)", None


def _base_model_version(family: str) -> str:
    return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)


def export_lora(edit: Edit, unet_or_pipe, path: str, format: str = "diffusers", rank: int | None = None, *,
                dtype="float32", kohya_names: str = "diffusers", force: bool = False,
                device: str | torch.device | None = None) -> dict:
    """Write ``edit`` as a LoRA file; returns a report (ranks, truncation errors, sizes).

    ``format``: 'diffusers' (PEFT keys, ``pipe.load_lora_weights``) or 'kohya' (ComfyUI / A1111).
    ``rank``: SVD truncation rank, required for edits that are not ``LowRankEdit``. ``dtype``: float32
    (default), float16 or bfloat16 storage. ``kohya_names``: 'diffusers' or 'ldm' module names (kohya only).
    ``force``: skip the check that the model's weights are the ones the edit was made for.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown LoRA format {format!r}; use one of {', '.join(FORMATS)}")
    if kohya_names not in ("diffusers", "ldm"):
        raise UsageError(f"kohya_names must be 'diffusers' or 'ldm', got {kohya_names!r}")
    dt = _dtype(dtype)
    unet = _model_of(unet_or_pipe)
    if kohya_names == "ldm" and format == "kohya" and unet is None:
        raise UsageError("kohya LDM module names need the model's UNet config: pass --model")
    factors, report = lora_factors(edit, unet, rank, force=force, device=device)
    if not factors:
        raise UsageError(f"edit {edit.edit_id} changes nothing (every ΔW is zero); no LoRA written")
    ranks = {_module_path(n): int(u.shape[1]) for n, (u, _) in factors.items()}
    tensors: dict[str, torch.Tensor] = {}
    edit_meta = json.dumps({"method": edit.method, "family": edit.family, "concepts": edit.concepts,
                            "edit_id": edit.edit_id, "kind": edit.kind,
                            "base_fingerprint": edit.base_fingerprint}, sort_keys=True)
    if format == "diffusers":
        for name, (up, down) in factors.items():
            m = _module_path(name)
            tensors[f"unet.{m}.lora_A.weight"] = down.to("cpu", dt).contiguous()
            tensors[f"unet.{m}.lora_B.weight"] = up.to("cpu", dt).contiguous()
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(_peft_metadata(ranks), indent=2, sort_keys=True),
                "pure_fast.edit": edit_meta}
        alpha = None
    else:
        alpha = collections.Counter(ranks.values()).most_common(1)[0][0]
        seen = {}
        for name, (up, down) in factors.items():
            m = _module_path(name)
            key = _kohya_name(m, unet, kohya_names)
            if key in seen:
                raise EditFileError(f"{name} and {seen[key]} get the same kohya name {key}")
            seen[key] = name
            r = up.shape[1]
            if r != alpha:
                up = up * (r / alpha)
            tensors[f"{key}.lora_down.weight"] = down.to("cpu", dt).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.to("cpu", dt).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dt)
        meta = {
            "ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks.values())),
            "ss_network_alpha": str(alpha), "ss_base_model_version": _base_model_version(edit.family),
            "ss_v2": str(edit.family == "sd2"), "pure_fast.edit": edit_meta,
        }
    save_safetensors(tensors, path, metadata=meta)
    report.update({
        "path": os.path.abspath(path), "format": format, "dtype": str(dt).replace("torch.", ""),
        "modules": len(ranks), "ranks": ranks, "rank_min": min(ranks.values()), "rank_max": max(ranks.values()),
        "alpha": alpha if alpha is not None else "rank", "bytes": os.path.getsize(path),
        "parameters": int(sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))),
    })
    return report


def export_unet_state_dict(edit: Edit, unet_or_pipe, path: str, *, dtype=None, force: bool = False) -> dict:
    """Write only the edited UNet weights, with their full new values, under diffusers names
    (``down_blocks.0...attn2.to_k.weight``): ``unet.load_state_dict(load_file(path), strict=False)``
    gives the edited model. Values are computed in float64 from the pre-edit weights and rounded once to
    the model's dtype (or ``dtype``), exactly as ``edit.apply`` writes them. Returns a small report."""
    refuse_patch(edit, "UNet tensors")
    if unet_or_pipe is None:
        raise UsageError("an edited UNet state dict holds full weights: pass --model (the model the edit was made for)")
    unet = _model_of(unet_or_pipe)
    base = base_weights(edit, unet, force=force)
    params = edit.validate_against(unet)
    names = list(edit.target_weights())
    dt = _dtype(dtype) if dtype is not None else None
    tensors = {}
    if getattr(base, "lazy", False):  # read from the files: one weight at a time
        for name in names:
            tensors[name] = edit.new_weights({name: base[name]})[name].to("cpu", dt or params.dtype).contiguous()
    else:
        computed = edit.new_weights({n: base[n] for n in names})
        for name in names:
            tensors[name] = computed[name].to("cpu", dt or params[name].dtype).contiguous()
    meta = {"format": "pt", "pure_fast.edit": json.dumps({"method": edit.method, "family": edit.family,
                                                          "edit_id": edit.edit_id, "kind": edit.kind}, sort_keys=True)}
    save_safetensors(tensors, path, metadata=meta)
    return {"path": os.path.abspath(path), "weights": len(tensors), "bytes": os.path.getsize(path),
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
