"""Compiled PURE collection (collect/compiled.py): the hooked UNet compiles without graph breaks, does not
recompile per call, and records the same statistics as eager collection.

On CPU the tests compile with the ``aot_eager`` backend (the same dynamo graph and AOT tracing, no code
generation: seconds instead of minutes on 2 cores); the statistics must then equal eager's exactly. The
inductor and CUDA-graph variants run in the GPU test at the end (and in ``bench/bench_compile.py``).
"""
from __future__ import annotations

import functools

import pytest
import torch

from pure_fast.adapters import wrap_pipeline
from pure_fast.adapters.base import Conditioning
from pure_fast.collect import compiled as cc
from pure_fast.collect.activations import (
    CollectOptions,
    PooledCrossAttnProcessor,
    Recorder,
    collect_activations,
    installed_processors,
)
from pure_fast.errors import UsageError

GROUPS = {"f": ["a painting of a cat", "a cat on a sofa", "a cat in the rain"], "r": ["a dog", "a red car"]}


def _unet_inputs(ad, n=2, size=32):
    cond = ad.encode(["a cat"] * n)
    both = Conditioning.cat([ad.encode_negative(n), cond]).to(ad.device, ad.dtype)
    c, h, w = ad.latent_shape(size)
    x = torch.randn(2 * n, c, h, w, generator=torch.Generator().manual_seed(0)).to(ad.device, ad.dtype)
    return x, torch.tensor(500, device=ad.device), both


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_hooked_unet_has_no_graph_break(family, tiny_sd1, tiny_sdxl):
    ad = wrap_pipeline(tiny_sd1 if family == "sd1" else tiny_sdxl, device="cpu")
    layers = ad.cross_attention_layers()
    rec = Recorder(layers, 10**9)
    x, t, both = _unet_inputs(ad)
    with torch.no_grad(), installed_processors(layers, lambda i, l: PooledCrossAttnProcessor(i, rec)):
        rec.active, rec.groups, rec.cond_slice, rec.deferred = True, ["f", "f"], slice(2, None), True
        torch._dynamo.reset()
        explain = torch._dynamo.explain(lambda x: ad.unet_forward(x, t, both))(x)
        torch._dynamo.reset()
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    # the stores into the recorder's slots were replayed after the graph: one pooled tensor per layer
    assert all(p is not None and p.shape == (4, l.d_out) for p, l in zip(rec.pending, layers))


def _stats(acts):
    return {g: [(s.n_rows, s.matrix(), s.gram, s.mean()) for s in acts.stats[g]] for g in acts.groups()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_compiled_collection_equals_eager_without_recompiling(family, tiny_sd1, tiny_sdxl, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    ad = wrap_pipeline(tiny_sd1 if family == "sd1" else tiny_sdxl, device="cpu")
    # batches of 4 samples over 10 (5 prompts x 2 seeds): two full batches and a partial one, 3 recorded steps
    opts = CollectOptions(steps=4, record_steps=3, seeds=(0, 1), size=32, batch_size=4, max_rows=12)
    monkeypatch.delenv("PURE_FAST_COMPILE_COLLECT", raising=False)
    eager = _stats(collect_activations(ad, GROUPS, opts, progress=False))

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(cc, "compiled_unet", functools.partial(cc.compiled_unet, backend=counter))
    monkeypatch.setenv("PURE_FAST_COMPILE_COLLECT", "1")
    torch._dynamo.reset()
    comp = _stats(collect_activations(ad, GROUPS, opts, progress=False))
    torch._dynamo.reset()
    # one graph for the full batches, one more for the partial last batch's shape; never one per call
    assert 1 <= counter.frame_count <= 2, counter.frame_count
    assert comp.keys() == eager.keys()
    for g in eager:
        for (n_e, m_e, g_e, mu_e), (n_c, m_c, g_c, mu_c) in zip(eager[g], comp[g]):
            assert n_e == n_c
            assert torch.equal(m_e, m_c) and torch.equal(mu_e, mu_c)
            assert (g_e is None) == (g_c is None) and (g_e is None or torch.equal(g_e, g_c))
    assert any(s[2] is not None for s in eager["f"])  # the streamed Gram route was exercised too
    # the UNet is back to its eager forward afterwards
    assert "forward" not in vars(ad.unet)


def test_compile_mode_values(monkeypatch):
    for value, want in (("", None), ("0", None), ("off", None), ("1", "default"), ("reduce-overhead", "reduce-overhead")):
        monkeypatch.setenv("PURE_FAST_COMPILE_COLLECT", value)
        assert cc.compile_mode() == want
    monkeypatch.setenv("PURE_FAST_COMPILE_COLLECT", "yes please")
    with pytest.raises(UsageError, match="PURE_FAST_COMPILE_COLLECT"):
        cc.compile_mode()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["1", "reduce-overhead"])
def test_compiled_collection_on_cuda(mode, tiny_sdxl, monkeypatch):
    """Inductor (and CUDA graphs) on CUDA: statistics equal eager's within fp32 kernel-order rounding."""
    ad = wrap_pipeline(tiny_sdxl, device="cuda")
    opts = CollectOptions(steps=4, record_steps=3, seeds=(0, 1), size=32, batch_size=4)
    monkeypatch.delenv("PURE_FAST_COMPILE_COLLECT", raising=False)
    eager = _stats(collect_activations(ad, GROUPS, opts, progress=False))
    monkeypatch.setenv("PURE_FAST_COMPILE_COLLECT", mode)
    torch._dynamo.reset()
    comp = _stats(collect_activations(ad, GROUPS, opts, progress=False))
    torch._dynamo.reset()
    for g in eager:
        for (n_e, m_e, _, _), (n_c, m_c, _, _) in zip(eager[g], comp[g]):
            assert n_e == n_c
            assert torch.allclose(m_c, m_e, rtol=1e-4, atol=1e-5 * float(m_e.abs().max()))
