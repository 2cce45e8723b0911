"""End to end: ``pure_fast.erase`` on the SD1.5 / SDXL architectures (random weights), stage by stage.

Rows (table ``end_to_end``):

* PURE erasing 1, 10 and 50 concepts in one call: total, and the stages (text encoding, collection,
  estimation, edit, fingerprint, save). PURE's ``collect_s`` includes its text encoding; the encoding of
  the same prompts is also timed alone (``encode_s``) so the two can be told apart.
* UCE, CURE (text encoding, solve, apply to the UNet) and SPACE (1000 FISTA iterations on CUDA): through
  ``pure_fast.erase(method=...)``; a method whose module is not there yet is reported as not available.
* collection vs its floor (table ``collect_floor``): PURE's collection (hooked trajectory, pooled
  statistics) against plain trajectories of the same prompts, seeds, batches and steps (encode + UNet
  passes + scheduler, default attention processors): the floor collection cannot beat. Ratio
  ``floor / collect`` (target >= 1/1.10 = 0.91).
* FISTA matrix products (table ``fista_peak``, CUDA): ``Y @ M`` at SPACE's SDXL shape (all 140 K/V rows,
  166,400 x 2048 times 2048 x 2048) in bf16 and fp32, as TFLOP/s and as a fraction of the device's dense
  bf16 datasheet peak; and the rate SPACE's solve reached (its ``Y M`` products over its FISTA time).

Verification before timing: PURE's collection with the fast path (``auto`` backend: the fused hook on CUDA)
is compared with the plain-torch path (``PURE_FAST_BACKEND=torch``) on the same model and trajectories
(relative error of the pooled statistics per group and layer; estimation and application are verified at
full size in ``bench_estimate`` / ``bench_apply``).
Text-space edits are checked by applying them (finite weights, the recorded result fingerprint
reproduced) and reverting bit-exactly.

CUDA: bf16, SDXL and SD1.5 architectures, PURE's defaults (collection at 512 px SDXL / 256 px SD1.5,
10-step schedule, 5 recorded steps, 2 seeds), timed after one warm-up call. CPU: SD1.5 architecture in
fp32 at 64 px, 4 of the 8 style templates, a 4-step schedule with 1 recorded step, 1 seed, 1 concept
(UCE/CURE as on GPU, SPACE with 10 iterations), so ``make bench`` finishes in minutes; CPU figures are for
the pipeline's shape, not for speed.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

NAMES = ["Van Gogh", "Claude Monet", "Pablo Picasso", "Frida Kahlo", "Salvador Dali", "Andy Warhol",
         "Rembrandt", "Hokusai", "Edvard Munch", "Gustav Klimt"]
RETAIN = ["a photograph", "a watercolor"]
# dense bf16 tensor-core peak (TFLOP/s, datasheet, no sparsity) by device-name fragment
BF16_PEAK = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
             "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def _style_templates():
    from pure_fast.prompts import TEMPLATES

    return list(TEMPLATES["style"])


STYLE_TEMPLATES = _style_templates()


def concepts(n: int) -> list[str]:
    return [NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES)}") for i in range(n)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def method_available(method: str) -> bool:
    from pure_fast.methods import method_names

    return method in method_names()


# ------------------------------------------------------------------------------------------ settings
def settings(device: str):
    cuda = device == "cuda"
    if cuda:
        return {
            "dtype": torch.bfloat16,
            "archs": ("sdxl", "sd15"),
            "pure_counts": {"sdxl": (1, 10, 50), "sd15": (1, 10, 50)},
            "collect": {},  # PURE's defaults
            "space": {"mu": 0.02, "max_iter": 1000, "tol": 1e-12, "history_every": 0, "history": False},
            "repeats": 3,  # 1-concept runs; 10 / 50 concepts are timed once (after the 1-concept warm-ups)
            "templates": None,  # the category's 8 templates
            "floor_warmup": True,
        }
    return {
        "dtype": torch.float32,
        "archs": ("sd15",),
        "pure_counts": {"sd15": (1,)},
        "collect": dict(size=64, seeds=(0,), steps=4, record_steps=1),
        "space": {"mu": 0.02, "max_iter": 10, "tol": 1e-12, "history_every": 0, "history": False},
        "repeats": 1,
        "templates": STYLE_TEMPLATES[:4],  # 4 anchors per concept: 12 samples per collection
        "floor_warmup": False,  # the verification's collections warmed up
    }


# ------------------------------------------------------------------------------------------ verification
def verify_pure(adapter, collect: dict, templates=None) -> str:
    """Fast path vs the plain-torch path: PURE's collected statistics, and the edit built from them.

    The fast path (``auto``: the fused hook on CUDA) and the torch path (``PURE_FAST_BACKEND=torch``: SDPA +
    mean, per-layer references) run the same trajectories; their pooled statistics are compared per group and
    layer, on the first trajectory step (relative Frobenius error). bf16: the two hooks round ``out`` differently
    and that difference propagates through the later layers of the pass, hence the loose sanity bound 0.1; the
    kernel itself is verified against fp64 with a derived bound in ``bench_hook``. Estimation and application are
    verified at full size by ``bench_estimate`` / ``bench_apply``.
    """
    from pure_fast.collect.activations import CollectOptions, collect_activations
    from pure_fast.ops import backend
    from pure_fast.prompts import anchor_sets

    f_prompts, r_prompts = anchor_sets(concepts(1), RETAIN, "style", templates)
    groups = {f"forget:{c}": p for c, p in f_prompts.items()}
    groups["retain"] = r_prompts
    opts = CollectOptions(**{k: (tuple(v) if k == "seeds" else v) for k, v in collect.items()})
    opts.record_steps = 1  # one UNet pass per batch: differences do not compound along the trajectory
    fast = collect_activations(adapter, groups, opts, progress=False)
    with backend.force("torch"):
        ref = collect_activations(adapter, groups, opts, progress=False)
    low = adapter.dtype in (torch.float16, torch.bfloat16)
    bound = 1e-1 if low else 1e-4  # bf16: the fused kernel's rounding propagates through ~70 layers of one pass
    worst = 0.0
    for g in groups:
        for i, (a, b) in enumerate(zip(fast.stats[g], ref.stats[g])):
            if a.n_rows != b.n_rows:
                raise AssertionError(f"{g} layer {i}: {a.n_rows} rows vs {b.n_rows} on the torch path")
            x, y = (a.gram, b.gram) if a.is_gram else (a.matrix().double(), b.matrix().double())
            worst = max(worst, float((x.double() - y.double()).norm() / (y.double().norm() + 1e-30)))
    if not worst <= bound:
        raise AssertionError(f"fast collection differs from the torch path: rel err {worst:.3g} > {bound:g}")
    return f"collected stats vs torch path: max rel err {worst:.1e} <= {bound:g}"


def verify_applies(edit, adapter) -> tuple[str, float]:
    from pure_fast.edits import fingerprint as fp
    from pure_fast.edits.edit import kv_weights

    unet = adapter.unet
    before = {k: v.detach().clone() for k, v in kv_weights(unet).items()}
    _, t_apply = _timed(lambda: edit.apply(unet, check=False), adapter.device)
    try:
        after = kv_weights(unet)
        if not all(torch.isfinite(after[n]).all() for n in edit.target_weights()):
            raise AssertionError(f"{edit.method}: applied weights are not finite")
        if edit.result_fingerprint and not fp.matches(edit.result_fingerprint, after):
            raise AssertionError(f"{edit.method}: applying does not reproduce the recorded result fingerprint")
    finally:
        edit.revert(unet)
    if not all(torch.equal(v.detach(), before[k]) for k, v in kv_weights(unet).items()):
        raise AssertionError(f"{edit.method}: revert is not bit-exact")
    return "applies (finite, result fingerprint reproduced), reverts bit-exactly", t_apply


# ------------------------------------------------------------------------------------------ measurements
def _save_s(edit) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "e.safetensors")
        t0 = time.perf_counter()
        edit.save(path)
        return time.perf_counter() - t0, os.path.getsize(path)


def pure_rows(arch, adapter, n_concepts, cfg, check) -> dict:
    import pure_fast
    from pure_fast.prompts import anchor_sets

    forget = concepts(n_concepts)
    kw = dict(category="style", progress=False, templates=cfg["templates"], **cfg["collect"])
    f_prompts, r_prompts = anchor_sets(forget, RETAIN, "style", cfg["templates"])
    prompts = [p for ps in f_prompts.values() for p in ps] + r_prompts
    runs = []
    for _ in range(cfg["repeats"] if n_concepts == 1 else 1):
        edit, total = _timed(lambda: pure_fast.erase(adapter, forget, RETAIN, **kw), adapter.device)
        runs.append((total, edit))
    total, edit = sorted(runs, key=lambda x: x[0])[len(runs) // 2]
    _, encode_s = _timed(lambda: [adapter.encode(prompts[i : i + 16]) for i in range(0, len(prompts), 16)],
                         adapter.device)
    save_s, size = _save_s(edit)
    t = edit.stats.get("timings", {})
    return {
        "arch": arch, "method": "pure", "concepts": n_concepts, "prompts": len(prompts), "total_s": total,
        "encode_s": encode_s, "collect_s": t.get("collect_s"), "estimate_s": t.get("estimate_s"),
        "edit_s": t.get("edit_s"), "fingerprint_s": t.get("fingerprint_s"), "save_s": save_s,
        "edit_bytes": size, "check": check, "runs": len(runs),
        "note": "collect_s includes text encoding (encode_s: the same prompts encoded alone)",
    }


def text_method_row(arch, adapter, method, n_concepts, cfg, extra: dict | None = None) -> dict:
    """One UCE / CURE / SPACE row; ``extra``: more options (e.g. SPACE's ``gram_route``), shown in the case.
    The edit is kept under ``_edit`` (removed by ``run`` after the cross-route check)."""
    import pure_fast

    base = {"arch": arch, "method": method, "concepts": n_concepts, "variant": extra or {}}
    if not method_available(method):
        return {**base, "check": None, "note": f"not available: pure_fast/methods/{method}.py is not there yet"}
    kw = {**(space_options(cfg["space"]) if method == "space" else {}), **(extra or {})}
    try:
        pure_fast.erase(adapter, concepts(n_concepts), RETAIN, method=method, category="style", progress=False,
                        fingerprint=False, **({**kw, "max_iter": 2} if method == "space" else kw))  # warm-up
        edit, total = _timed(lambda: pure_fast.erase(adapter, concepts(n_concepts), RETAIN, method=method,
                                                     category="style", progress=False, **kw), adapter.device)
        check, apply_s = verify_applies(edit, adapter)
    except Exception as exc:  # reported in the row; the other rows still run
        return {**base, "check": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    save_s, size = _save_s(edit)
    t = dict(edit.stats.get("timings", {}))
    row = {**base, "total_s": total, "encode_s": t.get("tokens_s"), "apply_s": apply_s, "save_s": save_s,
           "edit_bytes": size, "check": check, "stage_timings": t, "_edit": edit}
    if method in ("uce", "cure"):
        solve = t.get("solve_s") if t.get("solve_s") is not None else t.get("edit_s")
        row["edit_s"] = solve
        if solve is not None:
            row["after_encoding_ms"] = 1e3 * (solve + apply_s)
        row["note"] = "after_encoding_ms = solve + apply to the UNet (target <= 50 ms on SDXL)"
    if method == "space":
        row["edit_s"] = t.get("fista_s")
        row["iterations"] = edit.stats.get("iterations")
        row["zero_fraction"] = edit.stats.get("zero_fraction")
        row["gram_route"] = edit.stats.get("gram_route")
        flops = 0.0
        for s in edit.stats.get("fista", []):
            d_out, d_in = s["shape"]
            k = s.get("gram_rank")  # factored: Y M = lam Y + (Y F^T) F, 4k flops per entry; dense: 2 d_in
            per_entry = 4.0 * k if k is not None else 2.0 * d_in
            flops += per_entry * s["weights"] * d_out * d_in * s["iterations"]
        fista_s = sum(s.get("time_s", 0.0) for s in edit.stats.get("fista", []))
        # the factored route is memory bound: per iteration ~9 fp32 passes over the weights (Y read twice and YM
        # written by the two thin products; the fused step reads Y, YM, N, W and writes W, Y)
        passes = 9.0 * 4.0 * sum(s["weights"] * s["shape"][0] * s["shape"][1] * s["iterations"]
                                 for s in edit.stats.get("fista", []))
        if fista_s > 0:
            row["fista_effective_GBps"] = passes / fista_s / 1e9
            row["fista_tflops"] = flops / fista_s / 1e12
            peak = bf16_peak(adapter.device)
            if peak:
                row["fraction_of_bf16_peak"] = row["fista_tflops"] / peak
        row["note"] = (f"{row['iterations']} FISTA iterations, Y M route {row['gram_route']}; fista_tflops: the Y M "
                       "products over the solve time (lower bound: includes the elementwise steps); "
                       "fista_effective_GBps: 9 fp32 passes over the weights per iteration over the solve time "
                       "(the factored route's roofline is memory bandwidth)")
    return row


def compare_space_routes(auto_row: dict, dense_row: dict) -> None:
    """Reference check of SPACE's factored ``Y M`` route against the dense GEMM on the same solve.

    Both iterate in float32 with adaptive restart for the configured number of iterations (CUDA: 1000 at
    tol 1e-12, i.e. not to convergence), so the two paths may part where a restart test sits at 0 and the
    stored (fp16) weights then differ by more than rounding: on an H100 max |dW| / max |W| was 4e-3 after
    1000 iterations. The check therefore bounds what matters for the edit: the relative Frobenius distance
    of the stored weights (<= 1e-2) and their zero fractions (within 1e-3). The routes' exact equivalence
    (same iterates to rounding, fixed momentum) is verified in ``bench_fista``'s ``fista_iteration`` table and
    in tests/test_space_factored.py. A mismatch fails the benchmark."""
    a, d = auto_row.get("_edit"), dense_row.get("_edit")
    if a is None or d is None:
        return
    num = den = 0.0
    worst = 0.0
    nz_a = nz_d = total = 0
    for n in d.target_weights():
        wa, wd = a.dense(n).double(), d.dense(n).double()
        num += float((wa - wd).pow(2).sum())
        den += float(wd.pow(2).sum())
        worst = max(worst, float((wa - wd).abs().max() / wd.abs().max().clamp_min(1e-30)))
        nz_a += int(torch.count_nonzero(wa))
        nz_d += int(torch.count_nonzero(wd))
        total += wd.numel()
    rel = (num / max(den, 1e-300)) ** 0.5
    dz = abs(nz_a - nz_d) / max(total, 1)
    msg = (f"factored vs dense Y M: ||dW||/||W|| = {rel:.1e} (<= 1e-2), zero fractions differ by {dz:.1e} "
           f"(<= 1e-3); max |dW|/max |W| {worst:.1e}")
    if not (rel <= 1e-2 and dz <= 1e-3):
        raise AssertionError(f"SPACE routes disagree: {msg}")
    for r in (auto_row, dense_row):
        r["check"] = f"{r['check']}; {msg}"


def space_options(wanted: dict) -> dict:
    """SPACE's options for a fixed-length solve (one solve at a fixed mu, ``max_iter`` iterations, no history),
    keeping only the fields the current ``SpaceOptions`` has (the method is still evolving)."""
    from dataclasses import fields

    from pure_fast.methods import get_method

    names = {f.name for f in fields(get_method("space").options)}
    return {k: v for k, v in wanted.items() if k in names}


def collect_floor_rows(arch, adapter, n_concepts, cfg) -> list[dict]:
    """Collection (hooked) vs plain trajectories of the same batches, interleaved runs, medians."""
    from pure_fast.collect.activations import CollectOptions, collect_activations
    from pure_fast.prompts import anchor_sets

    f_prompts, r_prompts = anchor_sets(concepts(n_concepts), RETAIN, "style", cfg["templates"])
    groups = {f"forget:{c}": p for c, p in f_prompts.items()}
    groups["retain"] = r_prompts
    opts = CollectOptions(**{k: (tuple(v) if k == "seeds" else v) for k, v in cfg["collect"].items()})
    guidance = adapter.default_guidance if opts.guidance_scale is None else opts.guidance_scale
    size = opts.size or adapter.default_collect_size
    n_steps = opts.steps if opts.record_steps is None else opts.record_steps
    samples = [(g, p, s) for g, ps in groups.items() for p in ps for s in opts.seeds]

    def plain():
        with torch.no_grad():
            for start in range(0, len(samples), opts.batch_size):
                chunk = samples[start : start + opts.batch_size]
                unique = list(dict.fromkeys(p for _, p, _ in chunk))
                cond = adapter.encode(unique).index([unique.index(p) for _, p, _ in chunk])
                adapter.denoise(cond, [s for _, _, s in chunk], steps=opts.steps, size=size,
                                guidance_scale=guidance, scheduler=opts.scheduler, max_steps=n_steps)

    def collect():
        collect_activations(adapter, groups, opts, progress=False)

    if cfg["floor_warmup"]:
        plain()
        collect()  # warm-up (cuDNN / Triton autotuning, allocator)
    times = {"plain": [], "collect": []}
    for _ in range(max(2, cfg["repeats"])):
        for name, fn in (("plain", plain), ("collect", collect)):
            times[name].append(_timed(fn, adapter.device)[1])
    t_plain, t_col = statistics.median(times["plain"]), statistics.median(times["collect"])
    unet_calls = -(-len(samples) // opts.batch_size) * n_steps
    case = (f"{arch} {n_concepts} concept(s): {len(samples)} samples, batch {opts.batch_size}"
            f"{' x2 CFG' if guidance > 1 else ''}, {n_steps} steps, {size} px ({unet_calls} UNet calls)")
    base = {"bench": "end_to_end", "table": "collect_floor", "case": case,
            "dtype": str(adapter.dtype).replace("torch.", "")}
    return [
        {**base, "provider": "plain trajectory", "ms": 1e3 * t_plain, "ratio": 1.0,
         "check": "same batches/steps, default processors", "note": "the floor: encode + UNet passes + scheduler"},
        {**base, "provider": "PURE collection", "ms": 1e3 * t_col, "ratio": t_plain / t_col,
         "check": "hooked, statistics kept", "note": f"collect / floor = {t_col / t_plain:.3f} (target <= 1.10)"},
    ]


def bf16_peak(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, peak in BF16_PEAK.items():
        if frag in name:
            return peak
    return None


def fista_matmul_rows(device, rows_total: int = 2 * (10 * 640 + 60 * 1280), n: int = 2048) -> list[dict]:
    """``Y @ M`` at SPACE's SDXL shape (every to_k/to_v row: 166,400 x 2048): TFLOP/s, fraction of bf16 peak."""
    c = common
    peak = bf16_peak(device)
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator(device="cpu").manual_seed(0)
        Y = torch.randn(rows_total, n, generator=g).to(device, dtype)
        M = torch.randn(n, n, generator=g).to(device, dtype)
        ref = (Y[:256].double() @ M.double())
        err = float((Y[:256] @ M).double().sub(ref).norm() / ref.norm())
        bound = 1e-2 if dtype == torch.bfloat16 else 1e-3
        if not err <= bound:
            raise AssertionError(f"Y @ M ({dtype}) relative error {err:.3g} > {bound}")
        t = c.time_fn(lambda: Y @ M, device, warmup=3, repeats=20)
        tflops = 2.0 * rows_total * n * n / (t["ms"] / 1e3) / 1e12
        out.append({"bench": "end_to_end", "table": "fista_peak", "case": f"Y @ M {rows_total}x{n} @ {n}x{n}",
                    "dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], "provider": "torch.matmul",
                    **t, "tflops": tflops, "fraction_of_bf16_peak": (tflops / peak) if peak else None,
                    "check": f"rel err {err:.1e} vs fp64 <= {bound:g}",
                    "note": f"{tflops:.0f} TFLOP/s = {100 * tflops / peak:.0f}% of {peak:.0f} (bf16 dense peak)"
                            if peak else f"{tflops:.0f} TFLOP/s"})
        del Y, M
    return out


# ------------------------------------------------------------------------------------------ driver
def run(device: str = "cpu") -> dict:
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.testing import build_architecture_pipeline

    os.environ["PURE_FAST_PROGRESS"] = "0"
    device = torch.device(device).type
    cfg = settings(device)
    stage_rows, floor_rows, peak_rows = [], [], []
    if device == "cuda":
        peak_rows += fista_matmul_rows(device)
    for arch in cfg["archs"]:
        t0 = time.perf_counter()
        pipe = build_architecture_pipeline(arch, dtype=cfg["dtype"])
        adapter = wrap_pipeline(pipe, device=device, dtype=cfg["dtype"])
        common.log(f"   {arch}: built in {time.perf_counter() - t0:.1f} s")
        check = verify_pure(adapter, cfg["collect"], cfg["templates"])
        common.log(f"   {arch}: PURE verified ({check})")
        for n in cfg["pure_counts"][arch]:
            stage_rows.append(pure_rows(arch, adapter, n, cfg, check))
            common.log(f"   {arch}: PURE {n} concept(s) {stage_rows[-1]['total_s']:.2f} s")
        floor_rows += collect_floor_rows(arch, adapter, 1, cfg)
        for method, extra in (("uce", None), ("cure", None), ("space", None), ("space", {"gram_route": "dense"})):
            stage_rows.append(text_method_row(arch, adapter, method, 1, cfg, extra))
            common.log(f"   {arch}: {method} {extra or ''}: {stage_rows[-1].get('total_s')} "
                       f"{stage_rows[-1].get('check')}")
        compare_space_routes(stage_rows[-2], stage_rows[-1])
        for r in stage_rows:
            r.pop("_edit", None)
        del adapter, pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    for r in stage_rows:  # the shared table columns
        r.setdefault("bench", "end_to_end")
        r.pop("_edit", None)
        variant = "".join(f", {k}={v}" for k, v in (r.pop("variant", None) or {}).items())
        r["case"] = f"{r['arch']} {r['method'].upper()} {r['concepts']} concept(s){variant}"
        r["dtype"] = str(cfg["dtype"]).replace("torch.", "")
        r["provider"] = "pure_fast.erase"
        r["ms"] = None if r.get("total_s") is None else 1e3 * r["total_s"]
        stages = [f"{k[:-2]} {r[k]:.3g}s" for k in ("encode_s", "collect_s", "estimate_s", "edit_s", "apply_s",
                                                      "fingerprint_s", "save_s") if r.get(k) is not None]
        extra = r.get("note")
        r["note"] = "; ".join([", ".join(stages)] + ([extra] if extra else [])) if stages else extra
    out = {"end_to_end": stage_rows, "collect_floor": floor_rows}
    if peak_rows:
        out["fista_peak"] = peak_rows
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    res = run(args.device)
    for name, rows in res.items():
        print(f"\n## {name}\n")
        print(common.table(rows))
