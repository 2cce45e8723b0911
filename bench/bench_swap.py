"""Swapping edits on a loaded model: apply + revert of each edit kind, against reloading the UNet weights.

The point of edit files: switching between erasures (or back to the original) on a pipeline that stays
loaded. For every kind, an edit of realistic size is built on the loaded UNet (random weights; timing does
not depend on values), verified, then timed:

- ``lowrank`` (PURE): rank 8 per K/V weight (the SD1.5 edit of the README's stage benchmark, 1.55 MB, has
  rank ~8), ``W + up·down``;
- ``shared_right`` (UCE / CURE): one right matrix ``A = I + U Vᵀ`` with r = 10 (tokens), ``W + (W U) Vᵀ``;
- ``csr_weights`` (SPACE): the weights replaced by CSR matrices with 85 % zeros (the paper reports 80–90 %
  on SDXL), fp16 values;
- ``patch`` (ActErase): a rank-4 subspace patch on every attn2 layer (hooks installed / removed).

Verification before timing: ``apply`` gives the independently computed new weights (float64 formula,
rounded once: equal up to one storage-dtype ulp), ``revert`` gives back every K/V weight bit-exactly, and
the patch installs and removes its hooks. Rows: ``apply`` (with the fingerprint check, the default),
``apply`` with ``check=False``, ``revert``; the baseline (``ratio`` 1.0) is reloading the UNet weights the
usual way, ``load_state_dict`` of the full UNet from a safetensors file already in the page cache
(``safetensors.torch.load_file`` + ``load_state_dict``), which is what switching models without edits costs
at least. ``ratio`` = reload ms / row ms.

    python bench/bench_swap.py --device cpu     # SD1.5 UNet architecture, fp32 (table + bench/results/swap_cpu.json)
    python bench/bench_swap.py --device cuda    # SDXL UNet architecture, bf16
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

LOWRANK_RANK = 8
SHARED_RANK = 10
SPARSITY = 0.85
PATCH_RANK = 4


def _build_edits(unet, family: str):
    from pure_fast.adapters.layers import find_cross_attention_layers
    from pure_fast.api import stamp_fingerprints
    from pure_fast.edits.edit import LowRankEdit, kv_weights

    kv = kv_weights(unet)
    g = torch.Generator().manual_seed(0)
    shapes = {n: tuple(w.shape) for n, w in kv.items()}
    edits = {}
    factors = {n: (0.01 * torch.randn(s[0], LOWRANK_RANK, generator=g), 0.01 * torch.randn(LOWRANK_RANK, s[1], generator=g))
               for n, s in shapes.items()}
    edits["lowrank"] = LowRankEdit(method="pure", family=family, concepts={}, options={}, factors=factors, shapes=shapes)
    try:
        from pure_fast.edits.shared import SharedRightEdit

        d_in = next(iter(shapes.values()))[1]
        U, V = 0.01 * torch.randn(d_in, SHARED_RANK, generator=g), 0.01 * torch.randn(d_in, SHARED_RANK, generator=g)
        edits["shared_right"] = SharedRightEdit(method="uce", family=family, concepts={}, options={}, shapes=shapes,
                                                **SharedRightEdit.pack(U, V))
    except ImportError:
        common.log("shared_right kind not available; skipped")
    try:
        from pure_fast.edits.sparse import SparseWeightsEdit

        new = {}
        for n, w in kv.items():
            d = w.detach().float().cpu().clone()
            d[torch.rand(d.shape, generator=g) < SPARSITY] = 0.0
            new[n] = d
        edits["csr_weights"] = SparseWeightsEdit.from_dense(new, storage_dtype=torch.float16, method="space",
                                                            family=family, concepts={}, options={})
    except ImportError:
        common.log("csr_weights kind not available; skipped")
    try:
        from pure_fast.edits.patch import ConceptPatch, PatchEdit

        patches, pshapes = {}, {}
        for layer in find_cross_attention_layers(unet):
            Vb = torch.linalg.qr(torch.randn(layer.d_out, PATCH_RANK, generator=g))[0].contiguous()
            patches[layer.name] = [ConceptPatch(Vb, torch.zeros(PATCH_RANK), torch.ones(PATCH_RANK))]
            pshapes[layer.name] = (layer.d_out, layer.d_in)
        edits["patch"] = PatchEdit(method="acterase", family=family, concepts={"forget": ["x"]}, options={},
                                   patches=patches, shapes=pshapes)
    except ImportError:
        common.log("patch kind not available; skipped")
    for e in edits.values():
        stamp_fingerprints(e, unet)
    return edits


def _verify(edit, unet) -> str:
    """apply == the float64 formula rounded once (≤ 1 ulp), revert bit-exact; returns the check text."""
    from pure_fast.edits.edit import applied_stack, kv_weights

    kv = kv_weights(unet)
    before = {n: w.detach().clone() for n, w in kv.items()}
    names = edit.target_weights()
    want = {}
    for n in names:
        w = before[n].double()
        if edit.kind == "lowrank":
            up, down = edit.factors[n]
            new = w + up.to(w.device, torch.float64) @ down.to(w.device, torch.float64)
        elif edit.kind == "shared_right":
            new = w + (w @ edit.U.to(w.device, torch.float64)) @ edit.V.to(w.device, torch.float64).T
        elif edit.kind == "csr_weights":
            new = edit.dense(n).to(w.device, torch.float64)
        else:
            new = edit.new_weight(n, w)
        want[n] = new.to(before[n].dtype)
    edit.apply(unet)
    worst_ulps = 0.0
    for n in names:
        got = kv[n].detach()
        ulp = torch.finfo(got.dtype).eps * want[n].double().abs().clamp_min(torch.finfo(got.dtype).tiny)
        worst_ulps = max(worst_ulps, float(((got.double() - want[n].double()).abs() / ulp).max()))
    if edit.kind == "patch":
        from pure_fast.edits.patch import installed_hooks

        assert edit.edit_id in installed_hooks(unet), "patch hooks not installed"
    edit.revert(unet)
    if edit.kind == "patch":
        assert edit.edit_id not in installed_hooks(unet), "patch hooks not removed"
    assert not applied_stack(unet)
    bad = [n for n in before if not torch.equal(kv[n], before[n])]
    if bad:
        raise AssertionError(f"{edit.kind}: revert is not bit-exact ({len(bad)} weights differ, e.g. {bad[0]})")
    if worst_ulps > 1.0:
        raise AssertionError(f"{edit.kind}: apply differs from the formula by {worst_ulps:.1f} ulp")
    return f"apply ≤{max(worst_ulps, 0):.0f} ulp of formula; revert bit-exact ({len(before)} K/V)"


def _once(fn, device) -> float:
    """One call's wall time in ms (apply and revert alternate, so common.time_fn's repeated calls do not fit)."""
    import time

    common.sync(device)
    t0 = time.perf_counter()
    fn()
    common.sync(device)
    return (time.perf_counter() - t0) * 1e3


def run(device: str = "cpu", repeats: int = 5) -> list[dict]:
    from safetensors.torch import load_file, save_file

    from pure_fast.testing import build_unet_architecture

    if torch.device(device).type == "cuda":
        arch, family, dtype = "sdxl", "sdxl", torch.bfloat16
    else:
        arch, family, dtype = "sd15", "sd1", torch.float32
    common.log(f"building the {arch} UNet on {device} ({dtype})")
    unet = build_unet_architecture(arch, device=device, dtype=dtype).eval().requires_grad_(False)
    edits = _build_edits(unet, family)
    dt = str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_swap_") as tmp:
        path = os.path.join(tmp, "unet.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, path)
        nbytes = os.path.getsize(path)

        def reload():
            sd = load_file(path, device=str(device))
            unet.load_state_dict(sd)

        reload()
        base = common.time_fn(reload, device, warmup=1, repeats=3, max_time_s=60)["ms"]
        rows.append({"case": f"{arch} UNet reload ({nbytes / 2**20:.0f} MiB)", "dtype": dt, "provider": "reload",
                     "ms": base, "ratio": 1.0, "check": "load_state_dict strict",
                     "note": "safetensors file in page cache -> load_state_dict"})
    for kind, e in edits.items():
        check = _verify(e, unet)
        n = len(e.target_weights()) or len(getattr(e, "patches", {}))
        case = f"{arch} {kind} ({n} {'layers' if kind == 'patch' else 'weights'}, {e.nbytes() / 2**20:.2f} MiB)"

        def apply_checked():
            e.apply(unet)

        def apply_fast():
            e.apply(unet, check=False)

        def revert():
            e.revert(unet)

        for label, fn in (("apply", apply_checked), ("apply check=False", apply_fast)):
            fn()  # warm-up
            e.revert(unet)
            times = []
            for _ in range(repeats):
                times.append(_once(fn, device))
                e.revert(unet)
            ms = sorted(times)[len(times) // 2]
            rows.append({"case": case, "dtype": dt, "provider": label, "ms": ms, "ratio": base / ms, "check": check,
                         "note": "fingerprint check of every K/V weight" if label == "apply" else ""})
        times = []
        for _ in range(repeats):
            e.apply(unet, check=False)
            times.append(_once(revert, device))
        ms = sorted(times)[len(times) // 2]
        rows.append({"case": case, "dtype": dt, "provider": "revert", "ms": ms, "ratio": base / ms, "check": check,
                     "note": "copy back the kept tensors" if kind != "patch" else "remove hooks"})
        common.log(f"{kind}: done")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="output JSON (default bench/results/swap_<device>.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    rows = run(args.device, args.repeats)
    for r in rows:
        r.setdefault("bench", "swap")
    print(common.table(rows))
    out = args.json or str(common.RESULTS_DIR / f"swap_{args.device}.json")
    env = common.environment(args.device)
    # the layout of run_all.py's files, so bench/README's results section renders it too
    common.write_json(out, {"device_name": env["device_name"], "device": args.device, "env": env,
                            "benches": {"swap": {"env": env, "rows": rows, "error": None}}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
