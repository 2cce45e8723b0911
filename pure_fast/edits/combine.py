"""Combine a chain of edits into ONE edit that does what applying them in order does.

``combine([A, B, ...])`` needs edits of one kind and one model family, made as a *chain*: each edit's base
fingerprint is the previous edit's result fingerprint (B was computed on the model with A applied; the
same check ``Edit.apply`` does on a stack). What each kind gives, and why it is exact:

- ``lowrank`` (PURE, any ``W + up·down``): the stored factors are absolute changes, so applying A then B is
  ``W + U_A D_A + U_B D_B``; the combined edit concatenates the factors per weight,
  ``up = [U_A, U_B]``, ``down = [D_A; D_B]`` (ranks add; weights only one edit touches keep its factors).
- ``shared_right`` (UCE, CURE: ``W ← W·A`` with one right matrix for every weight): A then B is
  ``W·A_A·A_B``. With ``A = I + U Vᵀ`` the product stays in factor form,
  ``A_A A_B = I + [U_A, U_B + U_A (V_Aᵀ U_B)] · [V_A, V_B]ᵀ`` (computed in float64, stored like any
  shared edit: factors while ``2r < d_in``, else dense). Both edits must target the same weights (one
  matrix for every weight is what the kind means).
- ``csr_weights`` (SPACE: the weights are *replaced* by stored CSR matrices): A then B leaves B's weights where
  B writes, A's where only A writes; the combined edit holds exactly those.
- ``patch`` (ActErase, no weight change): A's hooks then B's hooks on a layer equal one hook that runs A's
  concepts then B's (the hook applies its concepts one after the other), so per layer the concept lists
  are concatenated; a layer only one edit patches gets rank-0 placeholders for the other's concepts (they
  are skipped at run time). The runtime settings (strength, gate, threshold, mode) must be equal, and both
  patches must be made for the same weights (same base fingerprint).

Refused, with the reason in one line: fewer than two edits, different kinds (a LoRA-style sum of a
right-multiplication and a replacement is not an edit of either kind), different families, edits that do
not form a chain (B made on the original model, not on A's result: then ``W + ΔA + ΔB`` is *not* what the
methods compute), edits without fingerprints (the chain cannot be checked; ``force=True`` skips the check).
The result carries A's base fingerprint and the last edit's result fingerprint, so it applies to the
original model and can itself be chained; ``stats['combined_from']`` lists the parts.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import EditFileError, UsageError
from .edit import Edit, LowRankEdit
from .patch import ConceptPatch, PatchEdit
from .shared import SharedRightEdit
from .sparse import SparseWeightsEdit

COMBINERS: dict[str, Callable[[list[Edit]], Edit]] = {}


def combiner(kind: str):
    def deco(fn):
        COMBINERS[kind] = fn
        return fn

    return deco


def fingerprints_match(result: dict, base: dict) -> bool:
    """Does fingerprint set ``base`` describe the same weights as ``result`` (same rule as apply's chain check)?"""
    if not result or not base:
        return False
    if result.get("exact") and result.get("exact") == base.get("exact") and result.get("dtype") == base.get("dtype"):
        return True
    return any(result.get(k) and result.get(k) == base.get(k) for k in ("float16", "bfloat16"))


def _merge_lists(a: list, b: list) -> list:
    return list(dict.fromkeys([*a, *b]))


def _common(edits: list[Edit], options: dict | None = None) -> dict:
    methods = list(dict.fromkeys(e.method for e in edits))
    concepts: dict[str, list] = {}
    for e in edits:
        for k, v in (e.concepts or {}).items():
            concepts[k] = _merge_lists(concepts.get(k, []), list(v))
    return {
        "method": methods[0] if len(methods) == 1 else "+".join(methods),
        "family": edits[0].family,
        "concepts": concepts,
        "options": options if options is not None else {"combined": [e.options for e in edits]},
        "base_fingerprint": dict(edits[0].base_fingerprint),
        "result_fingerprint": dict(edits[-1].result_fingerprint),
        "stats": {"combined_from": [{"edit_id": e.edit_id, "method": e.method, "kind": e.kind} for e in edits]},
    }


def check_combinable(edits: list[Edit], *, force: bool = False) -> None:
    if len(edits) < 2:
        raise UsageError("combine needs at least two edits")
    kinds = list(dict.fromkeys(e.kind for e in edits))
    if len(kinds) > 1:
        raise UsageError(f"cannot combine edits of different kinds ({', '.join(kinds)}): their changes do not compose "
                         "into one edit of either kind; apply them as a stack instead (pure-fast apply --edit A --edit B)")
    families = list(dict.fromkeys(e.family for e in edits))
    if len(families) > 1:
        raise UsageError(f"cannot combine edits for different model families ({', '.join(families)})")
    if kinds[0] not in COMBINERS:
        raise UsageError(f"edits of kind {kinds[0]!r} cannot be combined (supported: {', '.join(sorted(COMBINERS))})")
    if force:
        return
    for i, (a, b) in enumerate(zip(edits, edits[1:])):
        if not a.result_fingerprint or not b.base_fingerprint:
            raise UsageError(f"edit {(a if not a.result_fingerprint else b).edit_id} has no fingerprints, so the chain "
                             "cannot be checked; pass --force to combine anyway")
        if kinds[0] == "patch":
            ok = fingerprints_match(a.base_fingerprint, b.base_fingerprint)
            why = "were made for different weights"
        else:
            ok = fingerprints_match(a.result_fingerprint, b.base_fingerprint)
            why = (f"do not form a chain: edit {b.edit_id} was not made on the result of edit {a.edit_id} "
                   "(combining edits made side by side on one model is not what applying them in order computes)")
        if not ok:
            raise UsageError(f"edits {i + 1} and {i + 2} {why}")


def combine(edits: list[Edit], *, force: bool = False) -> Edit:
    """One edit equal to applying ``edits`` in order (see the module notes for what is supported)."""
    edits = list(edits)
    check_combinable(edits, force=force)
    return COMBINERS[edits[0].kind](edits)


# ---- kinds ----------------------------------------------------------------------------------------------------
@combiner("lowrank")
def _combine_lowrank(edits: list[LowRankEdit]) -> LowRankEdit:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for e in edits:
        for n, (up, down) in e.factors.items():
            if n in shapes and tuple(shapes[n]) != tuple(e.shapes[n]):
                raise EditFileError(f"{n}: the edits disagree on its shape ({shapes[n]} vs {e.shapes[n]})")
            shapes[n] = tuple(e.shapes[n])
            if n in factors:
                u0, d0 = factors[n]
                dt = torch.promote_types(u0.dtype, up.dtype)
                factors[n] = (torch.cat([u0.to(dt), up.to(dt)], 1), torch.cat([d0.to(dt), down.to(dt)], 0))
            else:
                factors[n] = (up, down)
    return LowRankEdit(factors=factors, shapes=shapes, **_common(edits))


@combiner("shared_right")
def _combine_shared(edits):
    shapes = dict(edits[0].shapes)
    for e in edits[1:]:
        if set(e.shapes) != set(shapes):
            raise UsageError("cannot combine shared-right-matrix edits that change different sets of weights "
                             "(one right matrix for every weight is what the kind means); apply them as a stack")
    dtype = edits[0].U.dtype if edits[0].U is not None else edits[0].A.dtype
    if all(e.A is None for e in edits):
        U, V = edits[0].U.double(), edits[0].V.double()
        for e in edits[1:]:
            Ub, Vb = e.U.double(), e.V.double()
            U, V = torch.cat([U, Ub + U @ (V.T @ Ub)], 1), torch.cat([V, Vb], 1)
        packed = SharedRightEdit.pack(U, V, dtype=dtype)
    else:
        A = edits[0].right_matrix()
        for e in edits[1:]:
            A = A @ e.right_matrix()
        packed = {"A": A.to(dtype).contiguous(), "U": None, "V": None}
    return SharedRightEdit(shapes=shapes, **packed, **_common(edits))


@combiner("csr_weights")
def _combine_sparse(edits):
    stored: dict = {}
    shapes: dict = {}
    for e in edits:  # later edits replace what earlier ones wrote (CSR- or dense-stored alike)
        for n, item in e.stored().items():
            if n in shapes and tuple(shapes[n]) != tuple(e.shapes[n]):
                raise EditFileError(f"{n}: the edits disagree on its shape ({shapes[n]} vs {e.shapes[n]})")
            stored[n], shapes[n] = item, tuple(e.shapes[n])
    return SparseWeightsEdit.from_stored(stored, shapes, **_common(edits))


@combiner("patch")
def _combine_patch(edits):
    rt = edits[0].runtime()
    for e in edits[1:]:
        if e.runtime() != rt:
            raise UsageError(f"cannot combine patches with different runtime settings ({rt} vs {e.runtime()})")
    shapes: dict[str, tuple[int, int]] = {}
    for e in edits:
        for layer, s in e.shapes.items():
            if layer in shapes and tuple(shapes[layer]) != tuple(s):
                raise EditFileError(f"{layer}: the patches disagree on its shape")
            shapes[layer] = tuple(s)
    counts = []
    for e in edits:
        n = len(e.concepts.get("forget", [])) or max((len(v) for v in e.patches.values()), default=0)
        counts.append(n)
    patches: dict[str, list] = {}
    for layer, (d, _) in shapes.items():
        entries = []
        for e, n in zip(edits, counts):
            mine = e.patches.get(layer)
            if mine is None:
                mine = [ConceptPatch(torch.zeros(d, 0), torch.zeros(0), torch.zeros(0)) for _ in range(n)]
            entries += list(mine)
        patches[layer] = entries
    common = _common(edits, options=dict(edits[0].options))
    forget = [c for e in edits for c in e.concepts.get("forget", [])]
    common["concepts"] = {**common["concepts"], "forget": forget}
    if len(set(forget)) != len(forget):
        raise UsageError("cannot combine patches that erase the same concept twice")
    return PatchEdit(patches=patches, shapes=shapes, **common)
