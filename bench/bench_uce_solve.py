"""UCE's closed-form solve (also CURE's budget and SPACE's start): Woodbury vs the d x d Cholesky, same run.

``uce_factors`` applies ``M⁻¹`` (``M = λI + FᵀF``, F: the k erase + preserve token embeddings) through a
k x k Cholesky when k < d (``methods/uce.py``); the reference is the textbook d x d route: form M
(``uce_matrices``) and ``cholesky_solve``. SDXL's text width d = 2048; k = 3, 30 and 300 tokens (one
concept with two retained ones, ~10 concepts, ~100 concepts). Verified first: ``V`` of both routes agree to
1e-10 (relative). Both run in float64 on the host, where the method runs them, whatever ``--device`` says.

    python bench/bench_uce_solve.py        # or: python bench/run_all.py --device cpu --only uce_solve
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

D = 2048
LAM, S_E, S_P = 0.5, 1.0, 0.5


def _dense_reference(tok):
    from pure_fast.methods.uce import uce_matrices

    M, _ = uce_matrices(tok, LAM, S_E, S_P)
    return torch.cholesky_solve(tok.C_e.T.contiguous(), torch.linalg.cholesky(M))


def run(device: str = "cpu") -> list[dict]:
    from pure_fast.methods.uce import TextTokens, uce_factors

    rows = []
    for k in (3, 30, 300):
        g = torch.Generator().manual_seed(k)
        n_e = max(1, k // 3)
        tok = TextTokens(C_e=torch.randn(n_e, D, generator=g, dtype=torch.float64),
                         C_g=torch.randn(n_e, D, generator=g, dtype=torch.float64),
                         C_p=torch.randn(k - n_e, D, generator=g, dtype=torch.float64))
        V_ref = _dense_reference(tok)
        _, V = uce_factors(tok, LAM, S_E, S_P)
        err = float((V - V_ref).norm() / V_ref.norm())
        if not err <= 1e-10:
            raise AssertionError(f"k={k}: Woodbury V differs from the d x d solve by {err:.1e}")
        timing = dict(warmup=1, repeats=5)
        t_ref = common.time_fn(lambda: _dense_reference(tok), "cpu", **timing)
        t_w = common.time_fn(lambda: uce_factors(tok, LAM, S_E, S_P), "cpu", **timing)
        base = {"bench": "uce_solve", "case": f"d={D}, k={k} tokens", "dtype": "fp64"}
        rows.append({**base, "provider": "dense_cholesky", **t_ref, "ratio": 1.0, "check": "reference"})
        rows.append({**base, "provider": "uce_factors", **t_w, "ratio": t_ref["ms"] / t_w["ms"],
                     "check": f"V rel err {err:.1e} <= 1e-10",
                     "note": "Woodbury (k x k Cholesky)" if k < D else "d x d Cholesky"})
    return rows


if __name__ == "__main__":
    common.main(run, __doc__)
