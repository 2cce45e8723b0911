"""Batched edit application (pure_fast/ops/apply_edit.py) against per-layer references and independent
formulas; LowRankEdit.apply through the batched override equals the old per-weight float64 path."""
import pytest
import torch

from pure_fast.ops import apply_edit as ae
from pure_fast.ops import backend

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _factors(m, n, ranks, dtype, seed=0):
    g = _gen(seed)
    ups = [torch.randn(m, r, generator=g, dtype=F64).to(dtype) for r in ranks]
    downs = [torch.randn(r, n, generator=g, dtype=F64).to(dtype) for r in ranks]
    return ups, downs


def _weights(shapes, dtype, seed=1):
    g = _gen(seed)
    return [torch.randn(*s, generator=g, dtype=F64).to(dtype) for s in shapes]


def _outer_sum(w, u, d):
    """Independent formula: W + sum_j u_j d_j^T as explicit rank-one terms in float64."""
    out = w.to(F64).clone()
    for j in range(u.shape[1]):
        out += torch.outer(u[:, j].to(F64), d[j].to(F64))
    return out


# ------------------------------------------------------------------------------ low-rank, per layer
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("m,n,ranks", [
    (67, 40, [3, 0, 7, 1, 5]),       # awkward shape, ragged ranks with a zero
    (1, 5, [1, 2]),                  # single row
    (13, 1, [4, 4, 4]),              # single column, equal ranks (no padding)
    (40, 67, [0, 0]),                # nothing to add
])
def test_lowrank_batched_equals_reference_and_formula(dtype, m, n, ranks):
    ups, downs = _factors(m, n, ranks, dtype)
    Ws = _weights([(m, n)] * len(ranks), dtype)
    got = ae.lowrank_update_batched(Ws, ups, downs)
    ref = ae.lowrank_update_reference(Ws, ups, downs)
    assert len(got) == len(Ws)
    for g_, r_, w, u, d in zip(got, ref, Ws, ups, downs):
        assert g_.dtype == dtype and g_.shape == (m, n)
        # the stated tolerance against the per-layer reference (BLAS may sum in another order)
        assert ((g_ - r_).abs() <= ae.lowrank_tolerance(w, u, d)).all()
        eps = torch.finfo(dtype).eps
        bound = 4 * eps * (w.abs().to(F64) + u.abs().to(F64) @ d.abs().to(F64)).max() * max(u.shape[1], 1)
        assert (g_.to(F64) - _outer_sum(w, u, d)).abs().max() <= bound
    # inputs untouched
    assert all(torch.equal(a, b) for a, b in zip(Ws, _weights([(m, n)] * len(ranks), dtype)))


def test_lowrank_stack_and_padded_inputs_and_chunks():
    m, n, ranks = 31, 23, [2, 9, 0, 4, 1, 6, 3]
    ups, downs = _factors(m, n, ranks, F64, seed=3)
    W = torch.stack(_weights([(m, n)] * len(ranks), F64, seed=4))
    ref = ae.lowrank_update_reference(W, ups, downs)
    assert isinstance(ref, torch.Tensor) and ref.shape == W.shape
    U, D = ae.pad_factors(ups, downs)
    assert U.shape == (7, m, 9) and D.shape == (7, 9, n)
    # zero padding is exact up to summation order: padded factors give the ragged product within tolerance
    tol = torch.stack([ae.lowrank_tolerance(w, u, d) for w, u, d in zip(W, ups, downs)])
    assert ((ae.lowrank_update_reference(W, list(U), list(D)) - ref).abs() <= tol).all()
    assert (U[2] == 0).all() and (D[0, 2:] == 0).all()  # padding is zeros
    first = ae.lowrank_update_batched(W, ups, downs)
    for chunk in (1, m * n * 8 * 3, ae.DEFAULT_CHUNK_BYTES):  # one layer per chunk, three, all
        for got in (ae.lowrank_update_batched(W, ups, downs, max_chunk_bytes=chunk),
                    ae.lowrank_update_batched(W, U, D, max_chunk_bytes=chunk)):
            assert ((got - ref).abs() <= tol).all()
    # deterministic: the same call gives the same bits
    assert torch.equal(ae.lowrank_update_batched(W, ups, downs), first)


def test_lowrank_dispatch_and_forced_reference(monkeypatch):
    ups, downs = _factors(9, 11, [2, 3], F64)
    Ws = _weights([(9, 11)] * 2, F64)
    ref = ae.lowrank_update_reference(Ws, ups, downs)
    calls = []
    real = ae.lowrank_update_batched
    monkeypatch.setattr(ae, "lowrank_update_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    # auto: the per-layer loop (batching measured not to pay), so exactly the reference
    assert all(torch.equal(a, b) for a, b in zip(ae.lowrank_update(Ws, ups, downs), ref)) and calls == []
    with backend.force("native"):  # a non-torch backend forced: the batched path, within the stated tolerance
        close = [((a - b).abs() <= ae.lowrank_tolerance(w, u, d)).all()
                 for a, b, w, u, d in zip(ae.lowrank_update(Ws, ups, downs), ref, Ws, ups, downs)]
    assert all(close) and calls == [1]
    with backend.force("torch"):
        assert all(torch.equal(a, b) for a, b in zip(ae.lowrank_update(Ws, ups, downs), ref))
    assert calls == [1]  # the forced torch backend used the per-layer reference


def test_dispatch_takes_the_loop_unless_a_batched_backend_is_forced(monkeypatch):
    """The rule behind every dispatch (measured: batching does not pay on an H100 nor on a CPU): the loop under
    auto / torch on any device, the batched path when native or triton is forced."""
    Ws = _weights([(4, 3)] * 2, F64)
    assert ae._use_loop()
    with backend.force("torch"):
        assert ae._use_loop()
    for forced in ("native", "triton"):
        with backend.force(forced):
            assert not ae._use_loop()
    U, V = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    calls = []
    real = ae.shared_update_batched
    monkeypatch.setattr(ae, "shared_update_batched", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ae.shared_update(Ws, U, V)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(got, ae.shared_update_reference(Ws, U, V)))


def test_lowrank_errors():
    ups, downs = _factors(5, 4, [1, 2], F64)
    with pytest.raises(ValueError, match="same shape"):
        ae.lowrank_update_batched(_weights([(5, 4), (5, 5)], F64), ups, downs)
    with pytest.raises(ValueError, match="2 weights but 1"):
        ae.lowrank_update_batched(_weights([(5, 4)] * 2, F64), ups[:1], downs[:1])
    with pytest.raises(ValueError, match="factor pair 1"):
        ae.pad_factors(ups, [downs[0], torch.zeros(3, 4, dtype=F64)])
    with pytest.raises(ValueError, match=r"\[6, 4\]"):
        ae.lowrank_update_batched(_weights([(6, 4)] * 2, F64), ups, downs)


# ------------------------------------------------------------------------------ shared right matrices
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_shared_update_equals_reference_and_projector_formula(dtype):
    n = 37
    Ws = _weights([(11, n), (64, n), (1, n), (11, n)], dtype, seed=5)  # mixed row counts, one width
    g = _gen(6)
    Vf = torch.linalg.qr(torch.randn(n, 4, generator=g, dtype=F64))[0]
    f = torch.tensor([1.0, 0.8, 0.5, 0.1], dtype=F64)
    U, V = Vf.to(dtype), (-(Vf * f)).to(dtype)  # W (I - Vf diag(f) Vf^T), CURE-like
    got = ae.shared_update_batched(Ws, U, V)
    ref = ae.shared_update_reference(Ws, U, V)
    P = Vf @ torch.diag(f) @ Vf.T
    for g_, r_, w in zip(got, ref, Ws):
        tol = ae.shared_tolerance(w, U, V)
        assert ((g_ - r_).abs() <= tol).all()
        dense = w.to(F64) @ (torch.eye(n, dtype=F64) - P)  # independent formula, fp64
        assert ((g_.to(F64) - dense).abs() <= tol.to(F64) + 4 * torch.finfo(dtype).eps * dense.abs()).all()
    for chunk in (1, 12 * n * 8):
        for a, b, w in zip(ae.shared_update_batched(Ws, U, V, max_chunk_bytes=chunk), ref, Ws):
            assert ((a - b).abs() <= ae.shared_tolerance(w, U, V)).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_right_multiply_equals_reference(dtype):
    Ws = _weights([(7, 29), (40, 29), (7, 29)], dtype, seed=7)
    A = torch.randn(29, 29, generator=_gen(8), dtype=F64).to(dtype)
    got = ae.right_multiply_batched(Ws, A)
    ref = ae.right_multiply_reference(Ws, A)
    for g_, r_, w in zip(got, ref, Ws):
        tol = ae.shared_tolerance(w, A=A)
        assert ((g_ - r_).abs() <= tol).all()
        assert ((g_.to(F64) - w.to(F64) @ A.to(F64)).abs() <= tol.to(F64)).all()
    with backend.force("torch"):
        assert all(torch.equal(a, b) for a, b in zip(ae.right_multiply(Ws, A), ref))


def test_shared_errors():
    Ws = _weights([(3, 5), (3, 6)], F64)
    with pytest.raises(ValueError, match="input width"):
        ae.shared_update_batched(Ws, torch.zeros(5, 1, dtype=F64), torch.zeros(5, 1, dtype=F64))
    with pytest.raises(ValueError, match="must both be"):
        ae.shared_update_batched(Ws[:1], torch.zeros(5, 1, dtype=F64), torch.zeros(5, 2, dtype=F64))
    with pytest.raises(ValueError, match="either U and V"):
        ae.apply_shared({"a": Ws[0]})
    with pytest.raises(ValueError, match="either U and V"):
        ae.apply_shared({"a": Ws[0]}, U=torch.zeros(5, 1), V=torch.zeros(5, 1), A=torch.eye(5))


# ------------------------------------------------------------------------------ dict helpers
def test_apply_lowrank_dict_groups_shapes_and_keeps_order():
    shapes = {"a.to_k": (8, 6), "b.to_k": (12, 6), "c.to_v": (8, 6), "d.to_v": (12, 6), "e.to_k": (8, 6)}
    current = dict(zip(shapes, _weights(list(shapes.values()), F64, seed=9)))
    ranks = {"a.to_k": 2, "b.to_k": 0, "c.to_v": 5, "d.to_v": 1}  # e has no factors
    factors = {}
    for i, (name, r) in enumerate(ranks.items()):
        m, n = shapes[name]
        (u,), (d,) = _factors(m, n, [r], torch.float32, seed=10 + i)  # stored fp32, applied in fp64
        factors[name] = (u, d)
    out = ae.apply_lowrank(current, factors)
    assert list(out) == list(current)
    assert out["e.to_k"] is current["e.to_k"]
    for name, (u, d) in factors.items():
        expected = current[name] + u.to(F64) @ d.to(F64)
        assert out[name].dtype == F64
        assert ((out[name] - expected).abs() <= ae.lowrank_tolerance(current[name], u.to(F64), d.to(F64))).all()


def test_apply_shared_dense_and_lowrank_dicts():
    current = dict(zip(["k1", "v1", "k2"], _weights([(10, 16), (10, 16), (20, 16)], F64, seed=11)))
    A = torch.randn(16, 16, generator=_gen(12), dtype=F64)
    out = ae.apply_shared(current, A=A)
    assert list(out) == list(current)
    assert all(((out[k] - current[k] @ A).abs() <= ae.shared_tolerance(current[k], A=A)).all() for k in current)
    U, V = torch.randn(16, 3, generator=_gen(13), dtype=F64), torch.randn(16, 3, generator=_gen(14), dtype=F64)
    out = ae.apply_shared(current, U=U, V=V)
    assert all(((out[k] - (current[k] + (current[k] @ U) @ V.T)).abs() <= ae.shared_tolerance(current[k], U, V)).all()
               for k in current)


# ------------------------------------------------------------------------------ through Edit.apply
def test_lowrank_edit_apply_equals_per_weight_path(tiny_sd1):
    from pure_fast.edits.edit import Edit, LowRankEdit, applied_stack, kv_weights

    unet = tiny_sd1.unet
    weights = kv_weights(unet)
    before = {k: v.detach().clone() for k, v in weights.items()}
    g = _gen(21)
    factors, shapes = {}, {}
    for i, (name, w) in enumerate(weights.items()):
        if i % 5 == 4:
            continue  # some weights untouched
        r = [1, 3, 0, 6][i % 4]
        factors[name] = (0.01 * torch.randn(w.shape[0], r, generator=g), torch.randn(r, w.shape[1], generator=g))
        shapes[name] = tuple(w.shape)
    edit = LowRankEdit(method="test", family="sd1", concepts={}, options={}, factors=factors, shapes=shapes)
    assert len({s for s in shapes.values()}) > 1  # several shape groups
    current = {n: before[n].to(F64) for n in factors}
    batched = edit.new_weights(current)
    per_weight = Edit.new_weights(edit, current)  # the base class: a loop over new_weight
    for n, (u, d) in factors.items():
        assert ((batched[n] - per_weight[n]).abs() <= ae.lowrank_tolerance(current[n], u.to(F64), d.to(F64))).all()

    edit.apply(unet, check=False)
    try:
        after = kv_weights(unet)
        differing = 0
        for name, w0 in before.items():
            if name in factors:
                expected = per_weight[name].to(w0.dtype)
                got = after[name].detach()
                # after the single rounding: equal, or one storage ulp apart where fp64 sat on a boundary
                ulp = torch.finfo(w0.dtype).eps * expected.abs().clamp(min=torch.finfo(w0.dtype).tiny)
                assert ((got - expected).abs() <= ulp).all(), name
                differing += int((got != expected).sum())
            else:
                assert torch.equal(after[name].detach(), w0), name
    finally:
        edit.revert(unet)
    assert differing <= 1e-4 * sum(before[n].numel() for n in factors)
    assert applied_stack(unet) == []
    assert all(torch.equal(kv_weights(unet)[k].detach(), v) for k, v in before.items())


@pytest.mark.gpu
def test_batched_on_cuda_within_stated_tolerance():
    m, n, ranks = 1280, 2048, [4, 17, 0, 9]
    ups, downs = _factors(m, n, ranks, F64)
    Ws = _weights([(m, n)] * len(ranks), F64)
    got = ae.lowrank_update_batched([w.cuda() for w in Ws], [u.cuda() for u in ups], [d.cuda() for d in downs])
    for g_, w, u, d in zip(got, Ws, ups, downs):
        assert ((g_.cpu() - (w + u @ d)).abs() <= ae.lowrank_tolerance(w, u, d)).all()


# ------------------------------------------------ fp32 shared update for 16-bit weights (UCE / CURE apply)
def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at the float64 values ``x`` (the spacing of the binade of |x|; tiny at 0)."""
    fi = torch.finfo(dtype)
    e = torch.floor(torch.log2(x.abs().clamp_min(fi.tiny)))
    return torch.exp2(e) * fi.eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shapes,r,dense", [
    ([(67, 40), (1, 40), (130, 40)], 3, False),   # awkward rows, one input width
    ([(13, 77)], 1, False),                        # rank one, odd width
    ([(45, 256), (90, 256)], 9, False),            # a longer reduction
    ([(33, 24), (7, 24)], 24, True),               # dense A (W A)
])
def test_shared_fp32_within_stated_bound_of_float64(dtype, shapes, r, dense):
    """fp32 result vs the float64 reference: |fp32 - exact| <= bound before rounding, so after the one
    rounding to the storage dtype every element is within half an ulp + the bound of the exact value, and
    equals the float64 route's rounding except where the exact value is within the bound of a rounding
    boundary (then one ulp apart; more ulps only where the result cancels to far below |W||U||V|, and still
    within the bound)."""
    g = _gen(5)
    Ws = [torch.randn(*s, generator=g, dtype=F64).to(dtype) for s in shapes]
    n = shapes[0][1]
    U = (0.3 * torch.randn(n, r, generator=g, dtype=F64)).float()
    V = (0.3 * torch.randn(n, r, generator=g, dtype=F64)).float()
    A = (torch.eye(n, dtype=F64) + U.double() @ V.double().T).float() if dense else None
    kw = dict(A=A) if dense else dict(U=U, V=V)
    got = ae.shared_rounded_fp32(Ws, **kw)
    ref = ae.right_multiply_reference([w.double() for w in Ws], A.double()) if dense else \
        ae.shared_update_reference([w.double() for w in Ws], U.double(), V.double())
    differ = total = 0
    for w, out, exact in zip(Ws, got, ref):
        assert out.dtype == dtype and out.shape == w.shape
        bound = ae.shared_fp32_error_bound(w, **kw)
        err = (out.double() - exact).abs()
        assert bool((err <= 0.5 * _ulp(exact, dtype) + bound + ae.shared_tolerance(w.double(), **(
            dict(A=A.double()) if dense else dict(U=U.double(), V=V.double())))).all())
        rounded = exact.to(dtype)
        diff = (out.double() - rounded.double()).abs()
        # one ulp from the float64 route, or (where the result cancels far below |W||U||V|) the bound + one ulp
        assert bool((diff <= _ulp(exact, dtype) * 1.0001 + bound).all())
        differ += int((diff > 0).sum())
        total += diff.numel()
    assert differ <= max(2, total // 100)


def test_shared_fp32_keeps_matmul_precision_setting():
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        ae.shared_rounded_fp32([torch.randn(5, 8).bfloat16()], U=torch.randn(8, 2), V=torch.randn(8, 2))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_first_nonfinite_finds_the_first_bad_tensor():
    from pure_fast.ops.finite import first_nonfinite

    ts = [torch.randn(3, 4), torch.randn(2, 2).bfloat16(), torch.randn(5)]
    assert first_nonfinite(ts) is None
    ts[2][1] = float("inf")
    assert first_nonfinite(ts) == 2
    ts[1][0, 0] = float("nan")
    assert first_nonfinite(ts) == 1


def _bf16_shared_edit(tiny_sd1, scale=0.2):
    import copy

    from pure_fast.api import stamp_fingerprints
    from pure_fast.edits.edit import kv_weights
    from pure_fast.edits.shared import SharedRightEdit

    unet = copy.deepcopy(tiny_sd1.unet).to(torch.bfloat16)
    kv = kv_weights(unet)
    d_in = next(iter(kv.values())).shape[1]
    g = _gen(7)
    U, V = scale * torch.randn(d_in, 3, generator=g), scale * torch.randn(d_in, 3, generator=g)
    e = SharedRightEdit(method="uce", family="sd1", concepts={"forget": ["c"]}, options={},
                        shapes={n: tuple(w.shape) for n, w in kv.items()}, **SharedRightEdit.pack(U, V))
    stamp_fingerprints(e, unet)
    return e, unet


def test_shared_edit_on_bf16_model_fp32_route_fingerprint_and_revert(tiny_sd1):
    """A shared edit on a bf16 UNet writes the fp32 route's values (no float64 pass), the recorded result
    fingerprint describes exactly what is written, every weight is within one ulp of the float64 route, and
    revert is bit-exact."""
    from pure_fast.edits import fingerprint as fp
    from pure_fast.edits.edit import Edit, kv_weights

    e, unet = _bf16_shared_edit(tiny_sd1)
    before = {n: w.detach().clone() for n, w in kv_weights(unet).items()}
    e.apply(unet)
    after = kv_weights(unet)
    assert fp.matches(e.result_fingerprint, after)
    fp64 = Edit.rounded_new_weights(e, before)  # the base class's float64 route
    fp32 = ae.shared_rounded_fp32([before[n] for n in e.target_weights()], U=e.U, V=e.V)
    for name, want in zip(e.target_weights(), fp32):
        assert torch.equal(after[name].detach(), want)
        d = (after[name].double() - fp64[name].double()).abs()
        w = before[name]
        assert bool((d <= _ulp(fp64[name].double(), torch.bfloat16) * 1.0001
                     + ae.shared_fp32_error_bound(w, U=e.U, V=e.V)).all())
    e.revert(unet)
    assert all(torch.equal(w.detach(), before[n]) for n, w in kv_weights(unet).items())


def test_shared_edit_non_finite_result_is_refused_with_the_weight_named(tiny_sd1):
    from pure_fast.edits.edit import kv_weights
    from pure_fast.errors import NumericalError

    e, unet = _bf16_shared_edit(tiny_sd1)
    e.U, e.V = e.U * 1e30, e.V * 1e30  # finite factors, overflowing products
    before = {n: w.detach().clone() for n, w in kv_weights(unet).items()}
    with pytest.raises(NumericalError, match=r"makes .*to_[kv]\.weight non-finite; the model was not changed"):
        e.apply(unet, check=False)
    assert all(torch.equal(w.detach(), before[n]) for n, w in kv_weights(unet).items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_fp32_on_cuda_sdxl_shape_with_tf32_on():
    """On CUDA at an SDXL K/V shape, with TF32 allowed globally (it must not leak into the fp32 route):
    within the stated bound of the float64 result; the batched finiteness check needs no per-weight sync."""
    from pure_fast.ops.finite import first_nonfinite

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        g = _gen(9)
        Ws = [torch.randn(1280, 2048, generator=g, dtype=F64).mul_(0.02).to(torch.bfloat16) for _ in range(3)]
        U, V = torch.randn(2048, 10, generator=g), 0.05 * torch.randn(2048, 10, generator=g)
        got = ae.shared_rounded_fp32([w.cuda() for w in Ws], U=U, V=V)
        assert first_nonfinite(got) is None
        for w, out in zip(Ws, got):
            exact = w.double() + (w.double() @ U.double()) @ V.double().T
            err = (out.cpu().double() - exact).abs()
            assert bool((err <= 0.5 * _ulp(exact, torch.bfloat16) + ae.shared_fp32_error_bound(w, U=U, V=V)).all())
        got[1][3, 5] = float("nan")
        assert first_nonfinite(got) == 1
    finally:
        torch.set_float32_matmul_precision(prev)
