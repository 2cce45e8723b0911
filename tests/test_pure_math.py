"""PURE's edit on planted subspaces: what E = I - P_F (I - P_R) removes, keeps, and equals."""
import torch

from pure_fast.methods.pure import pure_factors
from pure_fast.ops.batched_svd import union_basis


def _orth(*cols):
    q, _ = torch.linalg.qr(torch.stack(cols, 1))
    return q


def _dense_E(VF, VR):
    d = VF.shape[0]
    PF, PR = VF @ VF.T, VR @ VR.T
    return torch.eye(d, dtype=VF.dtype) - PF @ (torch.eye(d, dtype=VF.dtype) - PR)


def test_factors_equal_dense_formula():
    g = torch.Generator().manual_seed(0)
    L, d, d_in = 3, 67, 40
    VF = torch.linalg.qr(torch.randn(L, d, 5, generator=g, dtype=torch.float64))[0]
    VR = torch.linalg.qr(torch.randn(L, d, 7, generator=g, dtype=torch.float64))[0]
    W = torch.randn(L, d, d_in, generator=g, dtype=torch.float64)
    up, down = pure_factors(VF, VR, W)
    for l in range(L):
        dense = _dense_E(VF[l], VR[l]) @ W[l]
        torch.testing.assert_close(W[l] + up[l] @ down[l], dense, rtol=0, atol=1e-12)
    assert up.shape == (L, d, 5) and down.shape == (L, 5, d_in)  # rank <= rank(V_F), never d x d


def test_removes_forget_only_keeps_retain():
    d = 16
    e = torch.eye(d, dtype=torch.float64)
    # forget spans e0 (forget only) and e1 (shared with retain); retain spans e1, e2
    VF = _orth(e[0], e[1])
    VR = _orth(e[1], e[2])
    W = torch.randn(1, d, 9, dtype=torch.float64)
    up, down = pure_factors(VF[None], VR[None], W)
    E = torch.eye(d, dtype=torch.float64) + up[0] @ down[0] @ torch.linalg.pinv(W[0])
    # on vectors: E e0 = 0 (forget-only direction erased), E e1 = e1, E e2 = e2 (retain kept), E e5 = e5
    En = _dense_E(VF, VR)
    torch.testing.assert_close(En @ e[0], torch.zeros(d, dtype=torch.float64))
    for k in (1, 2, 5):
        torch.testing.assert_close(En @ e[k], e[k])
    # applied to weights: the output of W_new c has no e0 component, keeps e1/e2 components
    c = torch.randn(9, dtype=torch.float64)
    y_old, y_new = W[0] @ c, (W[0] + up[0] @ down[0]) @ c
    assert abs(y_new[0]) < 1e-12
    torch.testing.assert_close(y_new[1:3], y_old[1:3])
    assert E.shape == (d, d)


def test_empty_retain_is_plain_projection():
    d = 10
    VF = _orth(torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64))
    VR = torch.zeros(d, 0, dtype=torch.float64)
    W = torch.randn(1, d, 4, dtype=torch.float64)
    up, down = pure_factors(VF[None], VR[None], W)
    P = VF @ VF.T
    torch.testing.assert_close(W[0] + up[0] @ down[0], (torch.eye(d, dtype=torch.float64) - P) @ W[0])


def test_multi_concept_union_erases_each():
    d = 20
    e = torch.eye(d, dtype=torch.float64)
    a = _orth(e[0], e[3])[None]
    b = _orth(e[3], e[7])[None]  # shares e3 with a: kept once
    V, ranks = union_basis([a, b])
    assert int(ranks[0]) == 3
    VR = _orth(e[10])[None]
    W = torch.eye(d, dtype=torch.float64)[None]
    up, down = pure_factors(V, VR, W)
    Wn = W[0] + up[0] @ down[0]
    for k in (0, 3, 7):
        assert Wn[:, k].abs().max() < 1e-12 or Wn[k].abs().max() < 1e-12
        torch.testing.assert_close(Wn[k], torch.zeros(d, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Wn[10], W[0][10])
