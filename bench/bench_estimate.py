"""Batched subspace estimation (``ops/batched_svd.py``) vs a per-layer loop, on SDXL's 70 attn2 layers.

PURE estimates one basis per layer from the pooled activations ``H [n, d_out]`` (SDXL: 10 layers of width
640, 60 of width 1280). Cases, each over all layers of both shape groups:

* ``rows n=<n>``: n < d rows per layer (the anchors x seeds x recorded steps of one group): the batched
  call takes the small ``H H^T`` route; the loop does one ``torch.linalg.svd`` per layer (what a plain
  implementation does: ``subspace_basis_loop``, the reference and the baseline, ratio 1.0).
* ``gram``: a streamed ``H^T H`` per layer (many anchors): batched ``eigh`` vs a per-layer ``eigh`` loop.
* ``randomized``: the same rows through ``method="randomized"`` (batched range finder) vs the loop.
* ``union`` (table ``union``): the forget basis of many concepts erased in one call, the orthonormal basis
  of the sum of 50 per-concept bases of rank 13: ``union_basis`` (blocked Gram-Schmidt, batched GEMMs and
  small eigenproblems) vs ``union_basis_svd`` (one SVD of the [d, 650] stack per layer, the reference and
  baseline), verified by equal ranks and projector distance <= 1e-8. CPU: the 60 layers of width 1280;
  CUDA: all 70 layers.
* ``eigh`` (table ``eigh``, CUDA only): the small batched eigenproblems PURE solves ([70, 80, 80], [70, 160, 160]
  Gram matrices, the union's [60, 130, 130] blocks), torch's CUDA ``linalg.eigh`` (``device``, baseline)
  vs the host route ``batched_eigh`` takes by default (``host``: copy, LAPACK, copy back), verified by equal
  eigenvalues (1e-9) and the reconstruction ``V diag(w) Vᵀ = A`` (1e-8).

Providers: ``loop`` (baseline), ``batched`` (one call per shape group), ``batched_per_layer`` (the batched
function called once per layer: separates the algorithm's gain from the batching's). Every provider is
verified before timing: same ranks as the loop and projector distance ``||P - P_ref||_F`` under a bound
(1e-8 exact routes, 1e-5 randomized: an approximation whose error shrinks with the spectral gap). Data: a planted spectrum per layer (12 decaying directions + noise,
threshold 0.95 as PURE's default), float32 input as collected, float64 work as the op does.

CPU: 6 of the 70 layers (2 of width 640, 4 of width 1280; the Gram case 4 of width 640), median of 3: the
per-layer loop over all 70 layers takes over a minute per call on 2 loaded cores, too long for
``make bench``; the CPU ratios therefore say little about batching 70 layers. CUDA: the full 70 layers for
every case, n = 160 and n = 640, median of 10.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from pure_fast.ops.batched_svd import (projector_distance, subspace_basis, subspace_basis_loop,  # noqa: E402
                                      union_basis, union_basis_svd)

SDXL_GROUPS = {640: 10, 1280: 60}  # attn2 width -> layers
THRESHOLD = 0.95


def planted(L: int, n: int, d: int, device, seed: int, rank: int = 12, noise: float = 0.05) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(L, d, rank, generator=g))[0]
    scale = torch.logspace(1, 0, rank)
    coef = torch.randn(L, n, rank, generator=g) * scale
    H = coef @ basis.transpose(1, 2) + noise * torch.randn(L, n, d, generator=g)
    return H.to(device)


def _verify(name, V, ranks, ref_V, ref_ranks, bound):
    if ranks.cpu().tolist() != ref_ranks.cpu().tolist():
        raise AssertionError(f"{name}: ranks {ranks.tolist()[:6]}... differ from the loop's {ref_ranks.tolist()[:6]}...")
    dist = float(projector_distance(V.to(ref_V.device), ref_V).max())
    if not dist <= bound:
        raise AssertionError(f"{name}: projector distance {dist:.3g} > {bound:.0e}")
    return dist


def run(device: str = "cpu") -> list[dict]:
    device = torch.device(device).type
    cuda = device == "cuda"
    rows: list[dict] = []
    cases = [("rows", 160), ("randomized", 160), ("gram", None)]
    if cuda:
        cases += [("rows", 640), ("randomized", 640)]
    timing = dict(warmup=2, repeats=10) if cuda else dict(warmup=0, repeats=3, min_runs=3)  # CPU: verified = warm
    for kind, n in cases:
        groups = dict(SDXL_GROUPS) if cuda else ({640: 4} if kind == "gram" else {640: 2, 1280: 4})
        data = {}
        for d, L in groups.items():
            H = planted(L, n or 2 * d, d, device, seed=d)
            data[d] = (H.transpose(1, 2).double() @ H.double()) if kind == "gram" else H
        is_gram = kind == "gram"
        method = "randomized" if kind == "randomized" else "exact"
        layers = sum(groups.values())
        case = (f"SDXL {layers} layers " + " + ".join(f"{L}x{d}" for d, L in groups.items())
                + (", gram d x d" if is_gram else f", rows n={n}") + (", randomized" if method == "randomized" else ""))

        def loop():
            return {d: subspace_basis_loop(x, THRESHOLD, is_gram=is_gram)[:2] for d, x in data.items()}

        def batched():
            return {d: subspace_basis(x, THRESHOLD, is_gram=is_gram, method=method)[:2] for d, x in data.items()}

        def batched_per_layer():
            out = {}
            for d, x in data.items():
                parts = [subspace_basis(x[i : i + 1], THRESHOLD, is_gram=is_gram, method=method)[:2]
                         for i in range(x.shape[0])]
                k = max(p[0].shape[2] for p in parts)
                V = torch.zeros(x.shape[0], d, k, dtype=torch.float64, device=x.device)
                for i, p in enumerate(parts):
                    V[i, :, : p[0].shape[2]] = p[0][0]
                out[d] = (V, torch.cat([p[1] for p in parts]))
            return out

        ref = loop()
        bound = 1e-5 if method == "randomized" else 1e-8
        base = {"bench": "estimate", "case": case, "dtype": "fp64 work (fp32 in)" if not is_gram else "fp64"}
        checks = {}
        for name, fn in (("batched", batched), ("batched_per_layer", batched_per_layer)):
            got = fn()
            dist = max(_verify(name, got[d][0], got[d][1], ref[d][0], ref[d][1], bound) for d in data)
            checks[name] = f"ranks equal, max ||P-P_ref|| {dist:.1e} <= {bound:.0e}"
        common.log(f"   {case}: verified")
        t_loop = common.time_fn(loop, device, **timing)
        rows.append({**base, "provider": "loop", **t_loop, "ratio": 1.0,
                     "check": "reference (per-layer torch.linalg.svd / eigh)",
                     "note": f"ranks {min(int(r.min()) for _, r in ref.values())}-"
                             f"{max(int(r.max()) for _, r in ref.values())}"})
        for name, fn in (("batched", batched), ("batched_per_layer", batched_per_layer)):
            t = common.time_fn(fn, device, **timing)
            rows.append({**base, "provider": name, **t, "ratio": t_loop["ms"] / t["ms"], "check": checks[name],
                         "note": "one call per shape group" if name == "batched" else "same op, one call per layer"})
        del data, ref
        if cuda:
            torch.cuda.empty_cache()
    rows += union_rows(device, timing)
    if cuda:
        rows += eigh_rows(device, timing)
    return rows


def eigh_rows(device: str, timing: dict) -> list[dict]:
    """Small batched eigenproblems on CUDA: torch's device eigh vs the host route (``PURE_FAST_EIGH``)."""
    import os

    from pure_fast.ops.batched_svd import batched_eigh

    rows = []
    g = torch.Generator(device="cpu").manual_seed(11)
    saved = os.environ.get("PURE_FAST_EIGH")
    try:
        for L, n in ((70, 80), (70, 160), (60, 130)):
            a = torch.randn(L, n, n, generator=g, dtype=torch.float64)
            a = (a @ a.transpose(1, 2) / n).to(device)
            res, t = {}, {}
            for mode in ("device", "host"):
                os.environ["PURE_FAST_EIGH"] = mode
                w, v = batched_eigh(a)
                err = float((v @ torch.diag_embed(w) @ v.transpose(1, 2) - a).abs().max() / a.abs().max())
                if not err <= 1e-8:
                    raise AssertionError(f"eigh {mode} [{L},{n},{n}]: reconstruction error {err:.1e}")
                res[mode] = (w, err)
                t[mode] = common.time_fn(lambda: batched_eigh(a), device, **timing)
            werr = float((res["host"][0] - res["device"][0]).abs().max() / res["device"][0].abs().max())
            if not werr <= 1e-9:
                raise AssertionError(f"eigh [{L},{n},{n}]: host and device eigenvalues differ by {werr:.1e}")
            base = {"bench": "estimate", "table": "eigh", "case": f"eigh [{L}, {n}, {n}]", "dtype": "fp64"}
            for mode in ("device", "host"):
                rows.append({**base, "provider": mode, **t[mode], "ratio": t["device"]["ms"] / t[mode]["ms"],
                             "check": f"V diag(w) V^T = A ({res[mode][1]:.0e}); eigenvalues agree ({werr:.0e})",
                             "note": "torch.linalg.eigh on CUDA" if mode == "device" else
                                     "batched_eigh default: to host, LAPACK, back"})
    finally:
        if saved is None:
            os.environ.pop("PURE_FAST_EIGH", None)
        else:
            os.environ["PURE_FAST_EIGH"] = saved
    return rows


def union_rows(device: str, timing: dict, concepts: int = 50, rank: int = 13) -> list[dict]:
    """``union_basis`` vs the SVD reference on the forget bases of ``concepts`` concepts (verified first)."""
    groups = dict(SDXL_GROUPS) if device == "cuda" else {1280: 60}
    g = torch.Generator(device="cpu").manual_seed(7)
    data = {d: [torch.linalg.qr(torch.randn(L, d, rank, generator=g, dtype=torch.float64))[0].to(device)
                for _ in range(concepts)] for d, L in groups.items()}
    ref = {d: union_basis_svd(b) for d, b in data.items()}
    got = {d: union_basis(b) for d, b in data.items()}
    dist = max(_verify("union_basis", got[d][0], got[d][1], ref[d][0], ref[d][1], 1e-8) for d in data)
    case = (f"union of {concepts} bases of rank {rank}, SDXL {sum(groups.values())} layers "
            + " + ".join(f"{L}x{d}" for d, L in groups.items()))
    base = {"bench": "estimate", "table": "union", "case": case, "dtype": "fp64"}
    t_svd = common.time_fn(lambda: {d: union_basis_svd(b) for d, b in data.items()}, device, **timing)
    t_gs = common.time_fn(lambda: {d: union_basis(b) for d, b in data.items()}, device, **timing)
    ranks = max(int(r.max()) for _, r in ref.values())
    return [
        {**base, "provider": "svd", **t_svd, "ratio": 1.0, "check": "reference (SVD of the stacked bases)",
         "note": f"rank of the union {ranks}"},
        {**base, "provider": "blocked_gram_schmidt", **t_gs, "ratio": t_svd["ms"] / t_gs["ms"],
         "check": f"ranks equal, max ||P-P_ref|| {dist:.1e} <= 1e-08", "note": "union_basis (PURE's default)"},
    ]


if __name__ == "__main__":
    common.main(run, __doc__)
