"""The fast fingerprint path keeps the digest values edit files store.

- digests equal an independent hashlib computation of the definition (and golden values computed with the
  previous implementation), on mixed dtypes, a non-contiguous tensor and one longer than a host cast piece;
- a tensor already in a cast kind's dtype is hashed once (its cast digest is its exact digest), and
  ``matches`` tries the cheap kinds first (one pass for a bfloat16 model);
- the base fingerprint taken in a background thread (``api.erase`` on CUDA; forced here on CPU with
  PURE_FAST_FP_BACKGROUND=1) gives the same edit as the sequential path, re-raises the thread's errors, is
  cancelled when the method fails, and is discarded when the weights changed under it;
- the result fingerprint is taken over ``Edit.new_values`` without touching the model, and equals the
  fingerprint of the model after a real ``apply``.
"""
from __future__ import annotations

import hashlib
import threading
import warnings

import pytest
import torch

import pure_fast
from pure_fast import api
from pure_fast.edits import fingerprint as fp
from pure_fast.edits.edit import LowRankEdit, applied_stack, kv_weights, revert_all
from pure_fast.errors import NumericalError

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ------------------------------------------------------------------------------------- reference definition
def _ref_tensor(name: str, t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    raw = t.view(_INT[t.element_size()]).numpy().tobytes()  # row-major bytes, independent of torch's uint8 view
    return hashlib.blake2b(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode() + raw,
                           digest_size=16).digest()


def _ref_kind(weights, cast=None) -> str:
    parts = b"".join(_ref_tensor(n, weights[n] if cast is None else weights[n].to(cast)) for n in sorted(weights))
    return hashlib.blake2b(parts, digest_size=16).hexdigest()


def _ref_fingerprints(weights) -> dict:
    return {"dtype": ",".join(sorted({str(t.dtype).replace("torch.", "") for t in weights.values()})),
            "exact": _ref_kind(weights), "float16": _ref_kind(weights, torch.float16),
            "bfloat16": _ref_kind(weights, torch.bfloat16)}


def _ref_matches(recorded, weights) -> bool:
    ref = _ref_fingerprints(weights)
    if recorded.get("dtype") == ref["dtype"] and recorded.get("exact") == ref["exact"]:
        return True
    return any(recorded.get(k) and recorded[k] == ref[k] for k in ("float16", "bfloat16"))


def sample_weights():
    """Deterministic K/V-like weights: mixed dtypes, a non-contiguous one, one longer than a host cast piece."""
    def vals(n, scale):
        x = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
        return (torch.sin(x * 37.0) * scale + x / 3).float()

    return {
        "down.0.attn2.to_k.weight": vals(35, 2.0).reshape(5, 7),
        "down.0.attn2.to_v.weight": vals(12, 1e5).reshape(4, 3).t().to(torch.bfloat16),  # beyond float16's range
        "mid.attn2.to_k.weight": vals(75001, 0.5).reshape(1, 75001),
        "mid.attn2.to_v.weight": vals(6, 3.0).reshape(2, 3).to(torch.float16),
    }


# computed with the implementation before the fast path (commit a4c40f8); edit files store such values
GOLDEN_MIXED = {"dtype": "bfloat16,float16,float32", "exact": "be34b9bc609d36c959f0ce95785e091c",
                "float16": "6a8edb0d059fa25593c5b94c95a48026", "bfloat16": "bccd79d63a6db30279afa8f375ae3583"}
GOLDEN_BF16 = {"dtype": "bfloat16", "exact": "bccd79d63a6db30279afa8f375ae3583",
               "float16": "79582cf449a12ecd19525124decd9745", "bfloat16": "bccd79d63a6db30279afa8f375ae3583"}


@pytest.fixture
def count_hashes(monkeypatch):
    """Counts per-tensor digests computed (name, dtype) by the fingerprint module."""
    calls = []
    real = fp._digest_one

    def counting(name, t, dtype=None):
        calls.append((name, t.dtype if dtype is None else dtype))
        return real(name, t, dtype)

    monkeypatch.setattr(fp, "_digest_one", counting)
    return calls


# ------------------------------------------------------------------------------------------- definition
def test_digests_equal_independent_hashlib_and_golden_values():
    w = sample_weights()
    assert not w["down.0.attn2.to_v.weight"].is_contiguous()
    assert w["mid.attn2.to_k.weight"].numel() > fp.HOST_CAST_CHUNK  # several pieces, a ragged last one
    got = fp.fingerprints(w)
    assert got == _ref_fingerprints(w) == GOLDEN_MIXED
    bf = {n: t.to(torch.bfloat16) for n, t in w.items()}
    assert fp.fingerprints(bf) == _ref_fingerprints(bf) == GOLDEN_BF16
    for cast in (None, torch.float16, torch.bfloat16, torch.float64):
        assert fp.digest(w, cast) == _ref_kind(w, cast)


@pytest.mark.parametrize("workers", ["1", "3"])
def test_digest_values_do_not_depend_on_thread_count(monkeypatch, workers):
    monkeypatch.setenv("PURE_FAST_FP_WORKERS", workers)
    assert fp.workers() == int(workers)
    assert fp.fingerprints(sample_weights()) == GOLDEN_MIXED


def test_workers_follow_the_cpus(monkeypatch):
    import os

    monkeypatch.delenv("PURE_FAST_FP_WORKERS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert fp.workers() == min(cpus, 32)
    assert fp.workers(1) == 1
    monkeypatch.setenv("PURE_FAST_FP_WORKERS", "3")
    assert fp.workers() == 3
    from pure_fast.errors import UsageError

    for bad in ("x", "0", "-2", "1.5"):
        monkeypatch.setenv("PURE_FAST_FP_WORKERS", bad)
        with pytest.raises(UsageError, match="PURE_FAST_FP_WORKERS"):
            fp.workers()


@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_cast_digest_is_the_exact_digest_when_dtypes_agree(dtype, kind, count_hashes):
    """The claim the reuse rests on, checked on the independent definition, then the reuse itself."""
    w = {n: t.to(dtype) for n, t in sample_weights().items()}
    assert _ref_kind(w, None) == _ref_kind(w, dtype)  # t.to(own dtype) is t: same name, shape, dtype, bytes
    got = fp.fingerprints(w)
    assert got == _ref_fingerprints(w) and got["exact"] == got[kind]
    assert len(count_hashes) == 2 * len(w)  # exact (= own kind) and the other cast: not 3 passes
    assert len(set(count_hashes)) == len(count_hashes)


def test_mixed_dtypes_reuse_per_tensor(count_hashes):
    w = sample_weights()  # float32 x2, bfloat16, float16
    fp.fingerprints(w)
    # float32 tensors: exact + 2 casts; the bf16 / fp16 tensor: exact (= its own kind) + the other cast
    assert len(count_hashes) == 2 * 3 + 2 * 2


def test_known_parts_are_not_recomputed(count_hashes):
    w = sample_weights()
    parts = fp.fingerprint_parts(w)
    changed = dict(w)
    changed["mid.attn2.to_v.weight"] = w["mid.attn2.to_v.weight"] + 1
    known = {k: d for k, d in parts.items() if k[0] != "mid.attn2.to_v.weight"}
    count_hashes.clear()
    assert fp.fingerprints(changed, known=known) == _ref_fingerprints(changed)
    assert {n for n, _ in count_hashes} == {"mid.attn2.to_v.weight"}


# ---------------------------------------------------------------------------------------------- matches
def _variants():
    base = sample_weights()
    f32 = {n: t.float() for n, t in base.items()}
    other = {n: t.float() + 0.25 for n, t in base.items()}
    return {"f32": f32, "bf16": {n: t.to(torch.bfloat16) for n, t in f32.items()},
            "fp16": {n: t.to(torch.float16) for n, t in f32.items()}, "other": other,
            "other_bf16": {n: t.to(torch.bfloat16) for n, t in other.items()}, "mixed": base}


def test_matches_agrees_with_comparing_every_kind():
    v = _variants()
    recorded = {k: _ref_fingerprints(w) for k, w in v.items()}
    recorded["partial"] = {"dtype": "float32", "exact": recorded["f32"]["exact"]}  # older/partial sets
    recorded["no_exact"] = {k: x for k, x in recorded["f32"].items() if k != "exact"}
    seen = set()
    for rk, rec in recorded.items():
        for wk, w in v.items():
            want = _ref_matches(rec, w)
            assert fp.matches(rec, w) == want, (rk, wk)
            seen.add(want)
    assert seen == {True, False}


def test_matches_needs_one_pass_for_a_bf16_model(count_hashes):
    v = _variants()
    rec = _ref_fingerprints(v["f32"])  # made on the float32 model, checked on its bfloat16 load
    assert fp.matches(rec, v["bf16"])
    assert len(count_hashes) == len(v["bf16"]) and {d for _, d in count_hashes} == {torch.bfloat16}
    count_hashes.clear()
    assert not fp.matches(_ref_fingerprints(v["other"]), v["bf16"])
    assert len(count_hashes) == 2 * len(v["bf16"])  # bfloat16 (= exact) then float16, each once


# ------------------------------------------------------------------------------------------ background
def test_background_equals_sequential():
    w = sample_weights()
    bg = fp.Background(w)
    assert bg.result() == fp.fingerprint_parts(w)
    assert fp.summarize(bg.result(), w) == GOLDEN_MIXED
    assert bg.unchanged(w) and bg.busy_s > 0


def test_background_reraises_the_thread_error(monkeypatch):
    real = fp._digest_one

    def failing(name, t, dtype=None):
        if name.startswith("mid"):
            raise OSError("disk on fire")
        return real(name, t, dtype)

    monkeypatch.setattr(fp, "_digest_one", failing)
    bg = fp.Background(sample_weights())
    with pytest.raises(OSError, match="disk on fire"):
        bg.result()


def test_background_cancel_stops_handing_out_work(monkeypatch):
    started, release = threading.Event(), threading.Event()
    real, calls = fp._digest_one, []

    def slow(name, t, dtype=None):
        calls.append(name)
        started.set()
        release.wait(5)
        return real(name, t, dtype)

    monkeypatch.setattr(fp, "_digest_one", slow)
    monkeypatch.setenv("PURE_FAST_FP_WORKERS", "2")  # background keeps one CPU free: one worker
    w = sample_weights()
    bg = fp.Background(w)
    assert started.wait(5)
    threading.Timer(0.05, release.set).start()
    bg.cancel()
    assert len(calls) < 2 * 3 + 2 * 2
    with pytest.raises(fp.Cancelled):
        bg.result()


def test_background_notices_replaced_or_modified_weights():
    w = sample_weights()
    bg = fp.Background(w)
    bg.result()
    with torch.no_grad():
        w2 = dict(w)
        w2["mid.attn2.to_k.weight"].add_(1)  # in place: version counter
    assert not bg.unchanged(w2)
    w3 = dict(sample_weights())
    assert not bg.unchanged(w3)  # other tensor objects


# ------------------------------------------------------------------------------------- erase / stamp
def _erase(pipe, method, **kw):
    opts = dict(size=32, seeds=(0,), steps=4, record_steps=2) if method == "pure" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pure_fast.erase(pipe, ["Van Gogh"], ["Claude Monet"], method=method, progress=False, **opts, **kw)


@pytest.mark.parametrize("method", ["uce", "pure"])
def test_erase_background_equals_sequential(tiny_sd1, monkeypatch, method):
    monkeypatch.setenv("PURE_FAST_FP_BACKGROUND", "0")
    seq = _erase(tiny_sd1, method)
    assert "fingerprint_base_wait_s" not in seq.stats["timings"]
    monkeypatch.setenv("PURE_FAST_FP_BACKGROUND", "1")
    bg = _erase(tiny_sd1, method)
    assert bg.content_digest() == seq.content_digest()
    assert (bg.base_fingerprint, bg.result_fingerprint) == (seq.base_fingerprint, seq.result_fingerprint)
    t = bg.stats["timings"]
    assert 0 <= t["fingerprint_base_wait_s"] <= t["fingerprint_s"] and t["fingerprint_base_background_s"] > 0
    assert bg.base_fingerprint == _ref_fingerprints(kv_weights(tiny_sd1.unet))


def test_erase_background_error_propagates(tiny_sd1, monkeypatch):
    monkeypatch.setenv("PURE_FAST_FP_BACKGROUND", "1")

    def failing(name, t, dtype=None):
        raise MemoryError("no room for a host copy")

    monkeypatch.setattr(fp, "_digest_one", failing)
    with pytest.raises(MemoryError, match="no room"):
        _erase(tiny_sd1, "uce")


def test_erase_method_error_wins_and_cancels_the_background(tiny_sd1, monkeypatch):
    from dataclasses import replace

    from pure_fast.methods import base, uce

    monkeypatch.setenv("PURE_FAST_FP_BACKGROUND", "1")
    cancelled = []
    real_cancel = fp.Background.cancel
    monkeypatch.setattr(fp.Background, "cancel", lambda self: (cancelled.append(self), real_cancel(self)))

    def broken(*a, **k):
        raise ValueError("method failed")

    monkeypatch.setitem(base._REGISTRY, "uce", replace(uce.METHOD, make_edit=broken))
    with pytest.raises(ValueError, match="method failed"):
        _erase(tiny_sd1, "uce")
    assert len(cancelled) == 1 and not cancelled[0]._thread.is_alive()


def test_erase_refingerprints_weights_changed_during_the_method(tiny_sd1, monkeypatch):
    """The guard: a method that (wrongly) changed a weight gets the sequential path's base fingerprint."""
    from dataclasses import replace

    from pure_fast.methods import base, uce

    real = uce.make_edit
    name = sorted(kv_weights(tiny_sd1.unet))[0]
    saved = kv_weights(tiny_sd1.unet)[name].detach().clone()

    def meddling(ctx):
        with torch.no_grad():
            kv_weights(ctx.adapter.unet)[name].mul_(2)
        return real(ctx)

    monkeypatch.setitem(base._REGISTRY, "uce", replace(uce.METHOD, make_edit=meddling))
    try:
        monkeypatch.setenv("PURE_FAST_FP_BACKGROUND", "1")
        e = _erase(tiny_sd1, "uce")
        assert e.base_fingerprint == _ref_fingerprints(kv_weights(tiny_sd1.unet))
    finally:
        with torch.no_grad():
            kv_weights(tiny_sd1.unet)[name].copy_(saved)


def _lowrank(unet, scale=0.05):
    kv = kv_weights(unet)
    names = sorted(kv)[::3]
    g = torch.Generator().manual_seed(0)
    factors = {n: (scale * torch.randn(kv[n].shape[0], 2, generator=g), scale * torch.randn(2, kv[n].shape[1], generator=g))
               for n in names}
    return LowRankEdit(method="test", family="sd1", concepts={}, options={}, factors=factors,
                       shapes={n: tuple(kv[n].shape) for n in names})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stamp_result_equals_fingerprint_after_a_real_apply(tiny_sd1, dtype):
    import copy

    unet = copy.deepcopy(tiny_sd1.unet).to(dtype)
    before = {n: t.detach().clone() for n, t in kv_weights(unet).items()}
    e = _lowrank(unet)
    api.stamp_fingerprints(e, unet)
    assert not applied_stack(unet)
    assert all(torch.equal(before[n].view(torch.uint8), t.detach().view(torch.uint8)) for n, t in kv_weights(unet).items())
    assert e.base_fingerprint == _ref_fingerprints(kv_weights(unet))
    e.apply(unet)  # the base fingerprint check passes, then the real write
    try:
        assert e.result_fingerprint == _ref_fingerprints(kv_weights(unet))
        assert e.result_fingerprint != e.base_fingerprint
    finally:
        revert_all(unet)


def test_stamp_refuses_a_non_finite_result_like_apply(tiny_sd1):
    import copy

    unet = copy.deepcopy(tiny_sd1.unet)
    e = _lowrank(unet, scale=1e30)
    with pytest.raises(NumericalError, match="non-finite"):
        api.stamp_fingerprints(e, unet)
    with pytest.raises(NumericalError, match="non-finite"):
        e.apply(unet, check=False)
    assert not applied_stack(unet)


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_digests_equal_host_digests(dtype):
    w = {n: t.to(dtype) for n, t in sample_weights().items()}
    big = torch.linspace(-2, 2, 3 * fp.DEVICE_CHUNK_BYTES // 4 + 5).reshape(1, -1).to(dtype)  # several pieces
    w["up.attn2.to_k.weight"] = big
    cuda = {n: t.cuda() for n, t in w.items()}
    assert fp.fingerprints(cuda) == fp.fingerprints(w) == _ref_fingerprints(w)
    bg = fp.Background(cuda)
    assert fp.summarize(bg.result(), cuda) == fp.fingerprints(w)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_background_sees_writes_queued_before_it():
    x = torch.zeros(4096, 4096, device="cuda")
    w = {"a.attn2.to_k.weight": x}
    torch.cuda._sleep(50_000_000)  # keep the stream busy, then write
    x.add_(1)
    bg = fp.Background(w)
    assert fp.summarize(bg.result(), w) == _ref_fingerprints({"a.attn2.to_k.weight": torch.ones(4096, 4096)})
