"""pooled_attention: reference, dispatch, and the fused Triton kernel.

The Triton kernel is checked on CPU in the Triton interpreter. TRITON_INTERPRET must be set before the
kernel is first built, and setting it for the whole pytest process would also turn every other module's
GPU kernels into interpreted ones (and another module may already have imported triton). So the
interpreter checks run in ONE child process (this file run as a script with ``--worker DIR``) with
TRITON_INTERPRET=1; the child only runs the kernel and saves inputs and outputs, and the assertions
(against fp64 references, tolerances derived from plain torch's own error) happen here.

Tolerance (flash-attention style), derived from the dtype and the reduction length:
``err(kernel vs fp64) <= max(2 * err(torch at the same dtype vs fp64), floor)`` with
``floor = 2 * eps(dtype) * sqrt(L) * max|o|``: a few units in the last place of the input dtype, grown
like a random-walk rounding error with the reduction length ``L`` (``T + hd`` for the output: the logits
sum over ``hd``, ``P @ V`` over ``T``; ``N + T + hd`` for the pooled mean, which also sums ``N`` rows),
at the magnitude ``max|o|`` of the attention outputs that are summed. A bare ratio to torch's own error
is not a bound: torch's error on one case depends on how one CPU happened to round (a 2x ratio failed on
a fresh clone: fp32 pooled, kernel 3.9e-7 vs torch 1.1e-7, both a few ulps).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pure_fast.ops import backend  # noqa: E402
from pure_fast.ops import pooled_attention as pa  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# named awkward cases (B, H, N, T, hd): nothing a power of two where it can be avoided
AWKWARD = {
    "b3h5_n67_t7_hd40": (3, 5, 67, 7, 40),
    "n1_t77_hd64": (1, 2, 1, 77, 64),
    "n130_t77_hd80": (2, 2, 130, 77, 80),
    "n130_t77_hd160": (1, 2, 130, 77, 160),
}
KERNEL_CASES = [f"{name}-{dt}" for name in AWKWARD for dt in DTYPES]


def _inputs(shape, dtype, device="cpu", seed=0, layout="contiguous"):
    b, h, n, t, d = shape
    g = torch.Generator().manual_seed(seed)

    def make(rows):
        if layout == "diffusers":  # [B, rows, H, hd] memory viewed as [B, H, rows, hd], as the processor does
            x = torch.randn(b, rows, h, d, generator=g).transpose(1, 2)
        else:
            x = torch.randn(b, h, rows, d, generator=g)
        return x.to(device=device, dtype=dtype)

    return make(n), make(t), make(t)


def _fp64(q, k, v, scale=None):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    b, h, _, d = out.shape
    return out, out.transpose(1, 2).reshape(b, -1, h * d).mean(1)


def _floor(dtype: torch.dtype, reduction_length: int, magnitude: float) -> float:
    """A few ulps of ``dtype`` times sqrt(reduction length), at ``magnitude`` (module docstring)."""
    return 2.0 * torch.finfo(dtype).eps * math.sqrt(reduction_length) * magnitude


def _bound(err_torch: float, floor: float) -> float:
    return max(2.0 * err_torch, floor)


def _torch_flash_style(q, k, v, scale=None):
    """Plain torch, the flash-attention way at the input precision: fp32 logits and softmax numerator,
    P rounded to the input dtype for P @ V (fp32 accumulation), normalised after, output rounded."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    out = ((p.to(q.dtype).float() @ v.float()) / p.sum(-1, keepdim=True)).to(q.dtype)
    b, h, _, d = out.shape
    return out, torch.mean(out, dim=2, dtype=torch.float32).reshape(b, h * d)


def _check_against_fp64(q, k, v, out, pooled, scale=None):
    """The derived-tolerance check; returns the errors for the message.

    "torch's error" is the larger of two plain-torch computations at the input precision: SDPA (on CPU
    it keeps P in fp32) and the flash-style order the kernel uses (P rounded to the input dtype).
    """
    ref_out, ref_pooled = _fp64(q, k, v, scale)
    err = (out.double() - ref_out).abs().max().item()
    perr = (pooled.double() - ref_pooled).abs().max().item()
    err_t = perr_t = 0.0
    for t_out, t_pooled in (pa.pooled_attention_reference(q, k, v, scale=scale), _torch_flash_style(q, k, v, scale)):
        err_t = max(err_t, (t_out.double() - ref_out).abs().max().item())
        perr_t = max(perr_t, (t_pooled.double() - ref_pooled).abs().max().item())
    n, t, hd = q.shape[-2], k.shape[-2], q.shape[-1]
    mag = float(ref_out.abs().max())
    floor_out, floor_pooled = _floor(q.dtype, t + hd, mag), _floor(q.dtype, n + t + hd, mag)
    assert err <= _bound(err_t, floor_out), (
        f"out: kernel {err:.3g} vs torch {err_t:.3g}, floor {floor_out:.3g}"
    )
    assert perr <= _bound(perr_t, floor_pooled), (
        f"pooled: kernel {perr:.3g} vs torch {perr_t:.3g}, floor {floor_pooled:.3g}"
    )
    return err, err_t, perr, perr_t


def _check_pooled_is_mean_of_out(out, pooled):
    b, h, n, d = out.shape
    assert pooled.dtype == torch.float32 and pooled.shape == (b, h * d)
    mean = out.transpose(1, 2).reshape(b, n, h * d).double().mean(1)
    # the kernel sums exactly the stored (rounded) values in fp32: a tree inside each block, a sequential sum
    # over a program's blocks (at most ceil(N/16) of them), a tree over SPLIT programs; only fp32 summation
    # error remains, bounded by depth * eps * max|x| (module docstring)
    depth = math.log2(max(n, 2)) + math.ceil(n / 16) + 4
    tol = depth * torch.finfo(torch.float32).eps * float(out.abs().max())
    assert (pooled.double() - mean).abs().max().item() <= tol


# --------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("name", list(AWKWARD))
def test_reference_matches_fp64_and_layout(name):
    q, k, v = _inputs(AWKWARD[name], torch.float32, seed=1)
    out, pooled = pa.pooled_attention_reference(q, k, v)
    ref_out, ref_pooled = _fp64(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref_out, atol=1e-5, rtol=0)
    assert torch.allclose(pooled.double(), ref_pooled, atol=1e-5, rtol=0)
    # channel layout: pooled[:, h*hd + j] is head h, channel j
    b, h, n, d = out.shape
    assert torch.allclose(pooled.view(b, h, d)[:, 1], out[:, 1].mean(1), atol=1e-6)


def test_reference_half_precision_pools_in_fp32():
    q, k, v = _inputs((2, 3, 70, 9, 40), torch.bfloat16, seed=2)
    out, pooled = pa.pooled_attention_reference(q, k, v)
    assert out.dtype == torch.bfloat16 and pooled.dtype == torch.float32
    assert torch.allclose(pooled, out.float().mean(2).reshape(2, -1), atol=1e-6)


def test_dispatch_on_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("PURE_FAST_BACKEND", raising=False)
    q, k, v = _inputs((1, 2, 5, 3, 8), torch.float32)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with backend.force("triton"):  # forced, but Triton cannot run CPU tensors without the interpreter
            assert pa.backend_for(q, k, v) == "torch"
    assert pa.backend_for(q, k, v) == "torch"  # auto: Triton only for CUDA tensors
    with backend.force("torch"):
        out, pooled = pa.pooled_attention(q, k, v)
    r_out, r_pooled = pa.pooled_attention_reference(q, k, v)
    assert torch.equal(out, r_out) and torch.equal(pooled, r_pooled)


def test_unsupported_cases_are_named():
    q, k, v = _inputs((1, 2, 5, 3, 8), torch.float32)
    assert pa.triton_supported(q, k, v) is None
    assert "mask" in pa.triton_supported(q, k, v, attn_mask=torch.zeros(5, 3, dtype=torch.bool))
    kt = torch.randn(1, 2, pa.MAX_T + 1, 8)
    assert "MAX_T" in pa.triton_supported(q, kt, kt)
    assert "dtype" in pa.triton_supported(q.double(), k.double(), v.double())
    assert "broadcast" in pa.triton_supported(q, k[:1, :1], v[:1, :1])
    qg = q.clone().requires_grad_(True)
    assert "autograd" in pa.triton_supported(qg, k, v)
    with torch.no_grad():
        assert pa.triton_supported(qg, k, v) is None
    with pytest.raises(ValueError, match="mask|MAX_T"):
        pa.pooled_attention_triton(q, kt, kt)


def test_grid_split_covers_every_block_once():
    for bh, n_blocks, programs in [(80, 16, 528), (640, 16, 528), (1, 67, 7), (3, 1, 100), (5, 9, 45)]:
        split, per = pa.grid_split(bh, n_blocks, programs)
        assert 1 <= split <= n_blocks and split * per >= n_blocks and (split - 1) * per < n_blocks
        if bh >= programs:
            assert split == 1  # enough heads to fill the GPU: one program per head, no partial buffer


def test_custom_op_fake_and_opcheck():
    """The op's schema, fake (meta) implementation and its registration pass torch.library.opcheck, and the
    fake output has the real output's shapes, dtypes and strides (symbolic shapes included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _inputs((2, 3, 19, 7, 24), torch.float32, seed=11, layout="diffusers")
    op = torch.ops.pure_fast.pooled_attention
    torch.library.opcheck(op, (q, k, v, 0.2))
    out, pooled = op(q, k, v, 0.2)
    r_out, r_pooled = pa.pooled_attention_reference(q, k, v, scale=0.2)
    assert torch.equal(out, r_out) and torch.equal(pooled, r_pooled)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        f_out, f_pooled = op(fq, fk, fv, 0.2)
    assert f_out.shape == out.shape and f_out.stride() == out.stride() and f_out.dtype == out.dtype
    assert f_pooled.shape == pooled.shape and f_pooled.dtype == torch.float32


def test_compiled_graph_keeps_the_op(monkeypatch):
    """torch.compile(fullgraph=True) of a caller of ``pooled_attention`` with the kernel selected: no graph
    break, the custom op is a node of the graph, and the compiled result equals eager."""
    graphs = []

    def backend_(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(pa, "backend_for", lambda *a, **kw: "triton")
    q, k, v = _inputs((2, 2, 21, 5, 16), torch.float32, seed=12)

    def f(q, k, v):
        out, pooled = pa.pooled_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[3]) * 2, pooled

    torch._dynamo.reset()
    got = torch.compile(f, backend=backend_, fullgraph=True)(q, k, v)
    torch._dynamo.reset()
    assert len(graphs) == 1
    op = torch.ops.pure_fast.pooled_attention
    assert any(node.target in (op, op.default) for node in graphs[0].graph.nodes)
    r_out, r_pooled = pa.pooled_attention_reference(q, k, v)
    assert torch.equal(got[1], r_pooled) and torch.equal(got[0], r_out.transpose(1, 2).reshape(2, 21, 32) * 2)


def test_auto_rule_reads_the_measured_result(monkeypatch, tmp_path):
    """auto takes the kernel only on a GPU model whose measured entry says it wins; no file / other GPU /
    CPU: SDPA + mean."""
    import torch as _t

    f = tmp_path / "tuned.json"
    f.write_text(json.dumps({"devices": {"Fake GPU A": {"default": "triton", "configs": {"64": {"block_n": 32}}},
                                         "Fake GPU B": {"default": "torch"}}}), encoding="utf-8")
    monkeypatch.setattr(pa, "TUNED_FILE", f)
    monkeypatch.setattr(pa, "_DECISIONS", {})
    pa._tuned_entry.cache_clear()
    pa._launch_config.cache_clear()
    try:
        for name, want in (("Fake GPU A", "triton"), ("Fake GPU B", "torch"), ("Other", "torch")):
            monkeypatch.setattr(_t.cuda, "get_device_name", lambda *a, _n=name: _n)
            pa._DECISIONS.clear()
            assert pa.measured_default(torch.device("cuda", 0)) == want
        assert pa.measured_default(torch.device("cpu")) == "torch"
        assert pa._launch_config("Fake GPU A", 64) == {"block_n": 32}
        monkeypatch.setattr(pa, "TUNED_FILE", tmp_path / "missing.json")
        pa._tuned_entry.cache_clear()
        monkeypatch.setattr(_t.cuda, "get_device_name", lambda *a: "Fake GPU A")
        pa._DECISIONS.clear()
        assert pa.measured_default(torch.device("cuda", 0)) == "torch"
    finally:
        pa._tuned_entry.cache_clear()
        pa._launch_config.cache_clear()


def test_auto_rule_traces_without_a_break_once_decided(monkeypatch):
    """Once the CUDA decision is known for a device (``collect/compiled.py`` asks before compiling), a
    fullgraph compile of a caller reads it without a graph break (the device-name query is not traced)."""
    monkeypatch.setattr(pa, "_DECISIONS", {0: "triton"})

    def f(x):
        return x * 2 if pa.measured_default(torch.device("cuda", 0)) == "triton" else x

    torch._dynamo.reset()
    got = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3))
    torch._dynamo.reset()
    assert torch.equal(got, torch.full((3,), 2.0))


def test_import_does_not_import_triton():
    code = (
        "import sys; import pure_fast; import pure_fast.ops.pooled_attention as m; "
        "import torch; q = torch.randn(1, 2, 4, 8); m.pooled_attention(q, q, q); "
        "assert 'triton' not in sys.modules, 'triton imported'"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PURE_FAST_BACKEND")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------- Triton (interpreter, CPU)


def _worker(out_dir: str) -> None:
    """Child process: TRITON_INTERPRET=1 is set; run the kernel on every case and save everything."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    res: dict = {}
    for name, shape in AWKWARD.items():
        for dname, dtype in DTYPES.items():
            q, k, v = _inputs(shape, dtype, seed=3)
            out, pooled = pa.pooled_attention_triton(q, k, v)
            res[f"{name}-{dname}"] = dict(q=q, k=k, v=v, out=out, pooled=pooled)

    # diffusers layout (non-contiguous [B,N,H,hd] views), custom scale, reached through the dispatcher
    q, k, v = _inputs((2, 3, 45, 11, 40), torch.float16, seed=4, layout="diffusers")
    with backend.force("triton"):
        chosen = pa.backend_for(q, k, v)
        out, pooled = pa.pooled_attention(q, k, v, scale=0.3)
    res["diffusers_layout_scale"] = dict(q=q, k=k, v=v, out=out, pooled=pooled, backend=chosen, scale=0.3)

    # many blocks (BLOCK_N=16 over N=67: 5 blocks, last one partial) and run-to-run determinism
    q, k, v = _inputs((2, 2, 67, 20, 64), torch.float32, seed=5)
    out1, pooled1 = pa.pooled_attention_triton(q, k, v, block_n=16)
    out2, pooled2 = pa.pooled_attention_triton(q, k, v, block_n=16)
    res["multiblock"] = dict(q=q, k=k, v=v, out=out1, pooled=pooled1, out2=out2, pooled2=pooled2)

    # one program per head looping over 5 blocks (split 1: the mean written by the kernel) vs the query
    # blocks of each head spread over 3 programs (partial sums + a fixed-order sum): same output, both exact
    q, k, v = _inputs((2, 3, 75, 13, 24), torch.float16, seed=9)
    out_s1, pooled_s1 = pa.pooled_attention_triton(q, k, v, block_n=16, split=1)
    out_s3, pooled_s3 = pa.pooled_attention_triton(q, k, v, block_n=16, split=3)
    res["split"] = dict(q=q, k=k, v=v, out=out_s1, pooled=pooled_s1, out3=out_s3, pooled3=pooled_s3)

    # the custom op runs the kernel under the interpreter (the op a compiled graph keeps)
    q, k, v = _inputs((2, 2, 33, 9, 40), torch.bfloat16, seed=10, layout="diffusers")
    op_out, op_pooled = torch.ops.pure_fast.pooled_attention(q, k, v, 0.25)
    l_out, l_pooled = pa.pooled_attention_triton(q, k, v, scale=0.25)
    res["custom_op"] = dict(q=q, k=k, v=v, out=op_out, pooled=op_pooled, l_out=l_out, l_pooled=l_pooled,
                            scale=0.25, op_stride=list(op_out.stride()))

    # out-of-range case under a forced triton backend falls back to the reference
    q, k, v = _inputs((1, 2, 9, pa.MAX_T + 3, 16), torch.float32, seed=6)
    with backend.force("triton"):
        chosen = pa.backend_for(q, k, v)
        out, pooled = pa.pooled_attention(q, k, v)
    res["fallback_long_t"] = dict(q=q, k=k, v=v, out=out, pooled=pooled, backend=chosen)

    # PURE_FAST_BACKEND=triton (environment, not the context manager) selects the kernel too
    os.environ["PURE_FAST_BACKEND"] = "triton"
    q, k, v = _inputs((1, 1, 3, 2, 8), torch.float32, seed=7)
    res["env_forced"] = dict(backend=pa.backend_for(q, k, v))
    del os.environ["PURE_FAST_BACKEND"]
    res["auto_on_cpu"] = dict(backend=pa.backend_for(q, k, v))

    # facts about memory layout do not survive a (contiguous) safetensors round trip: record them here
    res["diffusers_layout_scale"]["q_is_contiguous"] = res["diffusers_layout_scale"]["q"].is_contiguous()
    res["diffusers_layout_scale"]["out_stride"] = list(res["diffusers_layout_scale"]["out"].stride())
    _save_results(res, out_dir)


def _save_results(res: dict, out_dir: str) -> None:
    """Tensors to ``results.safetensors`` (key ``case/field``), everything else to ``results.json`` (never
    pickle: the project reads only safetensors / JSON)."""
    from pure_fast.fileio import atomic_path, save_safetensors

    tensors, meta = {}, {}
    for case, fields in res.items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{case}/{field}"] = value.detach().contiguous()
            else:
                meta.setdefault(case, {})[field] = value
    save_safetensors(tensors, os.path.join(out_dir, "results.safetensors"))
    with atomic_path(os.path.join(out_dir, "results.json")) as tmp:
        Path(tmp).write_text(json.dumps(meta), encoding="utf-8")


def _load_results(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    res: dict = {case: dict(fields) for case, fields in
                 json.loads((out_dir / "results.json").read_text(encoding="utf-8")).items()}
    for key, t in load_file(str(out_dir / "results.safetensors")).items():
        case, field = key.split("/", 1)
        res.setdefault(case, {})[field] = t
    return res


@pytest.fixture(scope="module")
def interp(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    d = tmp_path_factory.mktemp("pooled_attention_interp")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("PURE_FAST_BACKEND", None)
    r = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(d)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, f"interpreter worker failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return _load_results(d)


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_triton_interpreter_matches_reference(interp, case):
    c = interp[case]
    q, out, pooled = c["q"], c["out"], c["pooled"]
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_against_fp64(c["q"], c["k"], c["v"], out, pooled)
    _check_pooled_is_mean_of_out(out, pooled)


def test_triton_interpreter_diffusers_layout_and_scale(interp):
    c = interp["diffusers_layout_scale"]
    assert c["backend"] == "triton"
    assert c["q_is_contiguous"] is False  # the kernel got the non-contiguous diffusers views
    _check_against_fp64(c["q"], c["k"], c["v"], c["out"], c["pooled"], scale=c["scale"])
    _check_pooled_is_mean_of_out(c["out"], c["pooled"])
    b, h, n, d = c["out"].shape
    out = torch.empty_strided(c["out"].shape, c["out_stride"], dtype=c["out"].dtype).copy_(c["out"])
    out.transpose(1, 2).view(b, n, h * d)  # [B,N,H,hd] storage (the kernel's strides): the processor's reshape is a view


def test_triton_interpreter_multiblock_deterministic(interp):
    c = interp["multiblock"]
    _check_against_fp64(c["q"], c["k"], c["v"], c["out"], c["pooled"])
    _check_pooled_is_mean_of_out(c["out"], c["pooled"])
    assert torch.equal(c["out"], c["out2"]) and torch.equal(c["pooled"], c["pooled2"])


def test_triton_interpreter_split_programs_agree(interp):
    c = interp["split"]
    assert torch.equal(c["out"], c["out3"])  # the output does not depend on how blocks are spread
    for pooled in (c["pooled"], c["pooled3"]):
        _check_against_fp64(c["q"], c["k"], c["v"], c["out"], pooled)
        _check_pooled_is_mean_of_out(c["out"], pooled)


def test_triton_interpreter_custom_op_is_the_kernel(interp):
    c = interp["custom_op"]
    assert torch.equal(c["out"], c["l_out"]) and torch.equal(c["pooled"], c["l_pooled"])
    _check_against_fp64(c["q"], c["k"], c["v"], c["out"], c["pooled"], scale=c["scale"])
    b, h, n, d = c["out"].shape
    assert c["op_stride"] == list(torch.empty(b, n, h, d).transpose(1, 2).stride())


def test_triton_interpreter_dispatch(interp):
    c = interp["fallback_long_t"]
    assert c["backend"] == "torch"
    r_out, r_pooled = pa.pooled_attention_reference(c["q"], c["k"], c["v"])
    assert torch.equal(c["out"], r_out) and torch.equal(c["pooled"], r_pooled)
    assert interp["env_forced"]["backend"] == "triton"
    assert interp["auto_on_cpu"]["backend"] == "torch"


# ------------------------------------------------------------------------------------------- GPU

SD_SHAPES = {"sd15_attn2": (4, 8, 4096, 77, 40), "sdxl_attn2": (4, 20, 1024, 77, 64)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiled Triton wanted")
@pytest.mark.parametrize("dname", ["fp16", "bf16"])
@pytest.mark.parametrize("shape_name", list(SD_SHAPES))
@pytest.mark.parametrize("layout", ["contiguous", "diffusers"])
def test_triton_gpu_sd_shapes(shape_name, dname, layout, monkeypatch):
    monkeypatch.delenv("PURE_FAST_BACKEND", raising=False)
    q, k, v = _inputs(SD_SHAPES[shape_name], DTYPES[dname], device="cuda", seed=8, layout=layout)
    assert pa.backend_for(q, k, v) == pa.measured_default(q.device)  # auto: what the measurement decided
    monkeypatch.setenv("PURE_FAST_BACKEND", "triton")
    assert pa.backend_for(q, k, v) == "triton"
    out, pooled = pa.pooled_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_against_fp64(q, k, v, out, pooled)
    _check_pooled_is_mean_of_out(out, pooled)
    out2, pooled2 = pa.pooled_attention(q, k, v)
    assert torch.equal(out, out2) and torch.equal(pooled, pooled2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1", reason="compiled Triton wanted")
@pytest.mark.parametrize("batch", [16, 64])
def test_triton_gpu_batches_and_cuda_graphs(batch, monkeypatch):
    """SDXL attn2 at the benchmark's batches (bf16): within tolerance, split and unsplit grids; and the
    op compiled with CUDA graphs (mode reduce-overhead, fullgraph) replays the same values."""
    monkeypatch.setenv("PURE_FAST_BACKEND", "triton")
    q, k, v = _inputs((batch, 20, 1024, 77, 64), torch.bfloat16, device="cuda", seed=13, layout="diffusers")
    out, pooled = pa.pooled_attention(q, k, v)
    _check_against_fp64(q, k, v, out, pooled)
    _check_pooled_is_mean_of_out(out, pooled)
    out3, pooled3 = pa.pooled_attention_triton(q, k, v, split=3)
    assert torch.equal(out, out3)
    _check_pooled_is_mean_of_out(out3, pooled3)
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: pa.pooled_attention(a, b, c), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        c_out, c_pooled = f(q, k, v)
    assert torch.equal(c_out, out) and torch.equal(c_pooled, pooled)
    torch._dynamo.reset()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit(pytest.main([__file__] + sys.argv[1:]))
