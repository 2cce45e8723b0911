"""Batched edit application (``ops/apply_edit.py``) vs per-layer loops, on SDXL-shaped K/V weights.

Cases (synthetic weights of SDXL's attn2 shapes: to_k / to_v are (640, 2048) x 10 and (1280, 2048) x 60):

* ``lowrank``: PURE's ``W + up @ down`` per weight with ragged ranks (1 concept: ranks 2-12; 50 concepts:
  ranks 60-250), float64 as ``Edit.apply`` computes. Providers: ``loop`` (``[W + up @ down for ...]``, the
  reference and the baseline), ``batched`` (``apply_lowrank``: per shape group, one zero-padded ``bmm`` per
  chunk + one multi-tensor add), and the whole ``Edit.new_weights`` step as ``Edit.apply`` runs it, factors stored
  in float32 on the CPU: ``edit_loop`` (the base class's per-weight ``new_weight``) vs ``edit_batched``
  (``LowRankEdit.new_weights``, grouped by shape; through ``ops/apply_edit``'s dispatch, which takes the
  per-weight loop unless a non-torch backend is forced).
* ``shared``: one right matrix for every weight (UCE / CURE as ``W + (W U) V^T`` with r = 24; on CUDA
  also a dense 2048 x 2048 ``W A``): ``loop`` vs ``batched`` (all rows concatenated: one or two GEMMs).

Verification before timing: every output within ``ops.apply_edit``'s stated elementwise tolerance of the
loop's; the check column also gives the number of elements that differ after rounding to float32 (the
storage dtype), which the tolerance says is at most one ulp and rare.

CPU: the K weights only (70 matrices, 170 M float64 entries) and the 1-concept ranks; CUDA: K and V
(140 matrices, 341 M entries), 1 and 50 concepts, float64.

Table ``shared_apply``: UCE / CURE's whole apply step on bf16 weights, the float64 route vs the fp32 route
(:func:`shared_apply_rows`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from pure_fast.edits.edit import Edit, LowRankEdit  # noqa: E402
from pure_fast.ops import apply_edit as ae  # noqa: E402

SDXL_SHAPES = [(640, 2048)] * 10 + [(1280, 2048)] * 60
F64 = torch.float64


def sdxl_weights(device, kv: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for i, shape in enumerate(SDXL_SHAPES):
        for proj in ("to_k", "to_v") if kv else ("to_k",):
            out[f"layer{i:02d}.attn2.{proj}.weight"] = (0.02 * torch.randn(*shape, generator=g)).to(device, F64)
    return out


def ragged_factors(weights, lo: int, hi: int, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, w in weights.items():
        r = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out[name] = (torch.randn(w.shape[0], r, generator=g) * 0.1, torch.randn(r, w.shape[1], generator=g) * 0.01)
    return out


def _check(got: list[torch.Tensor], ref: list[torch.Tensor], tols: list[torch.Tensor]) -> str:
    worst, flips, total = 0.0, 0, 0
    for a, b, t in zip(got, ref, tols):
        excess = float(((a - b).abs() - t).max())
        if excess > 0:
            raise AssertionError(f"batched result exceeds the stated tolerance by {excess:.3g}")
        worst = max(worst, float((a - b).abs().max()))
        flips += int((a.float() != b.float()).sum())
        total += a.numel()
    return f"within stated tol (max|diff| {worst:.1e}); fp32-rounded: {flips} of {total / 1e6:.0f}M differ"


def run(device: str = "cpu") -> list[dict]:
    device = torch.device(device).type
    cuda = device == "cuda"
    timing = dict(warmup=2, repeats=10) if cuda else dict(warmup=0, repeats=3, min_runs=3)  # CPU: verified = warm
    rows: list[dict] = []
    weights = sdxl_weights(device, kv=cuda)
    names = list(weights)
    Ws = list(weights.values())
    n_w = len(Ws)
    what = f"SDXL {'K+V' if cuda else 'K'} {n_w} weights (640,2048)x{n_w // 7} + (1280,2048)x{n_w * 6 // 7}"

    # ---- PURE: per-layer low-rank ------------------------------------------------------------------
    concept_cases = [("1 concept", 2, 12)] + ([("50 concepts", 60, 250)] if cuda else [])
    for label, lo, hi in concept_cases:
        factors = ragged_factors(weights, lo, hi)
        dev_f = {n: (u.to(device, F64), d.to(device, F64)) for n, (u, d) in factors.items()}
        ups = [dev_f[n][0] for n in names]
        downs = [dev_f[n][1] for n in names]
        case = f"lowrank {what}, {label} (ranks {lo}-{hi})"
        base = {"bench": "apply", "case": case, "dtype": "fp64"}

        ref = ae.lowrank_update_reference(Ws, ups, downs)
        tols = [ae.lowrank_tolerance(w, u, d) for w, u, d in zip(Ws, ups, downs)]
        got = ae.apply_lowrank(weights, dev_f)  # groups by shape, one batched call per group
        check = _check([got[n] for n in names], ref, tols)
        edit = LowRankEdit(method="bench", family="sdxl", concepts={}, options={}, factors=factors,
                           shapes={n: tuple(w.shape) for n, w in weights.items()})
        got = edit.new_weights(weights)
        per_weight = Edit.new_weights(edit, weights)
        check_edit = _check([got[n] for n in names], [per_weight[n] for n in names], tols)
        del per_weight
        del ref, got, tols
        common.log(f"   {case}: verified")

        t_loop = common.time_fn(lambda: ae.lowrank_update_reference(Ws, ups, downs), device, **timing)
        rows.append({**base, "provider": "loop", **t_loop, "ratio": 1.0, "check": "reference",
                     "note": "[W + up @ down for each weight], factors on device"})
        t = common.time_fn(lambda: ae.apply_lowrank(weights, dev_f), device, **timing)
        rows.append({**base, "provider": "batched", **t, "ratio": t_loop["ms"] / t["ms"], "check": check,
                     "note": "per shape group: padded bmm per chunk + foreach add"})
        t_el = common.time_fn(lambda: Edit.new_weights(edit, weights), device, **timing)
        rows.append({**base, "provider": "edit_loop", **t_el, "ratio": t_loop["ms"] / t_el["ms"],
                     "check": "reference (Edit.new_weight per weight)",
                     "note": "Edit.apply's step, factors fp32 on CPU (per-weight move + cast)"})
        t_eb = common.time_fn(lambda: edit.new_weights(weights), device, **timing)
        rows.append({**base, "provider": "edit_batched", **t_eb, "ratio": t_loop["ms"] / t_eb["ms"],
                     "check": check_edit,
                     "note": f"LowRankEdit.new_weights (dispatch: the per-weight loop unless native/triton is forced); "
                             f"{t_el['ms'] / t_eb['ms']:.2f}x edit_loop"})
        del dev_f, ups, downs, edit, factors

    # ---- UCE / CURE: one shared right matrix ----------------------------------------------------------
    g = torch.Generator(device="cpu").manual_seed(2)
    n_in = SDXL_SHAPES[0][1]
    A = (torch.eye(n_in, dtype=F64) + 0.01 * torch.randn(n_in, n_in, generator=g, dtype=F64)).to(device)
    U = torch.linalg.qr(torch.randn(n_in, 24, generator=g, dtype=F64))[0].to(device)
    V = -U * torch.linspace(1.0, 0.1, 24, dtype=F64, device=device)
    shared_cases = [
        ("UCE/CURE W + (W U) V^T (r=24)", lambda: ae.shared_update_reference(Ws, U, V),
         lambda: ae.shared_update_batched(Ws, U, V), lambda w: ae.shared_tolerance(w, U, V)),
    ]
    if cuda:  # 0.7 TFLOP in float64: minutes on 2 CPU cores
        shared_cases.append(("dense W A (2048x2048)", lambda: ae.right_multiply_reference(Ws, A),
                             lambda: ae.right_multiply_batched(Ws, A), lambda w: ae.shared_tolerance(w, A=A)))
    for label, loop_fn, batched_fn, tol_fn in shared_cases:
        case = f"shared {what}, {label}"
        base = {"bench": "apply", "case": case, "dtype": "fp64"}
        check = _check(batched_fn(), loop_fn(), [tol_fn(w) for w in Ws])
        common.log(f"   {case}: verified")
        t_loop = common.time_fn(loop_fn, device, **timing)
        rows.append({**base, "provider": "loop", **t_loop, "ratio": 1.0, "check": "reference",
                     "note": "one product chain per weight"})
        t = common.time_fn(batched_fn, device, **timing)
        rows.append({**base, "provider": "batched", **t, "ratio": t_loop["ms"] / t["ms"], "check": check,
                     "note": "rows concatenated, one GEMM chain per chunk"})
    del weights, Ws
    if cuda:
        torch.cuda.empty_cache()
    rows += shared_apply_rows(device, timing)
    return rows


def _old_new_values(edit, weights):
    """``Edit.new_values`` as it was before the fp32 route: float64 for every weight, rounded once, one
    finiteness check (and on CUDA one host sync) per weight."""
    from pure_fast.ops.finite import finite_stats

    out = Edit.rounded_new_weights(edit, weights)
    for n, w in out.items():
        if finite_stats(w)[0]:
            raise AssertionError(f"{n} not finite")
    return out


def shared_apply_rows(device: str, timing: dict) -> list[dict]:
    """Table ``shared_apply``: UCE / CURE's whole apply step (``SharedRightEdit.new_values``: the values
    ``Edit.apply`` writes and the result fingerprint describes, finiteness checked) on bf16 SDXL K/V weights:
    ``float64`` (the previous route: a float64 pass over every weight, a sync per weight on CUDA) vs ``fp32``
    (``ops.apply_edit.shared_rounded_fp32`` + one batched finiteness check). Verified first: every fp32
    element within half a bf16 ulp + the stated bound of the exact value; the check gives how many differ
    from the float64 route's rounding. CPU: the 70 K weights; CUDA: all 140 K/V weights (682 MB bf16)."""
    from pure_fast.edits.shared import SharedRightEdit

    cuda = device == "cuda"
    weights = {n: w.to(torch.bfloat16) for n, w in sdxl_weights(device, kv=cuda, seed=3).items()}
    names = list(weights)
    g = torch.Generator(device="cpu").manual_seed(4)
    n_in = SDXL_SHAPES[0][1]
    rows = []
    for label, r in (("UCE 1 concept (r=1)", 1), ("CURE 50 concepts (r=150)", 150)):
        U = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=F64))[0]
        V = -U * torch.linspace(1.0, 0.1, r, dtype=F64)
        edit = SharedRightEdit(method="bench", family="sdxl", concepts={}, options={},
                               shapes={n: tuple(w.shape) for n, w in weights.items()}, **SharedRightEdit.pack(U, V))
        case = f"shared_right apply (new_values) SDXL {'K+V' if cuda else 'K'} {len(names)} weights, {label}"
        base = {"bench": "apply", "table": "shared_apply", "case": case, "dtype": "bf16"}
        old = _old_new_values(edit, weights)
        new = edit.new_values(weights)
        worst, differ, total = 0.0, 0, 0
        for n in names:
            w = weights[n]
            exact = ae.shared_update_reference([w.double()], edit.U.double(), edit.V.double())[0]
            ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))))
            bound = ae.shared_fp32_error_bound(w, U=edit.U, V=edit.V)
            excess = float(((new[n].double() - exact).abs() - 0.5 * ulp - bound).max())
            if excess > 0:
                raise AssertionError(f"{case}: fp32 route exceeds its stated bound by {excess:.3g} at {n}")
            worst = max(worst, float(((new[n].double() - exact).abs() / ulp).max()))
            differ += int((new[n] != old[n]).sum())
            total += w.numel()
            del exact, ulp, bound
        check = (f"within 0.5 ulp + stated bound of exact (worst {worst:.2f} ulp); {differ} of {total / 1e6:.0f}M "
                 "differ from the float64 route")
        del old, new
        common.log(f"   {case}: verified")
        t_old = common.time_fn(lambda: _old_new_values(edit, weights), device, **timing)
        rows.append({**base, "provider": "float64", **t_old, "ratio": 1.0, "check": "reference",
                     "note": "float64 pass over every weight, rounded once; finiteness checked per weight"})
        t_new = common.time_fn(lambda: edit.new_values(weights), device, **timing)
        rows.append({**base, "provider": "fp32", **t_new, "ratio": t_old["ms"] / t_new["ms"], "check": check,
                     "note": "W + (W U) V^T in fp32 (addmm), rounded once; one batched finiteness check"})
    del weights
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
