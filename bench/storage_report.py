"""Storage: how big each method's edit file is next to the dense fp16 K/V weights it changes.

For SD1.5 and SDXL (the UNet architectures of ``pure_fast.testing``, built on the meta device for their
layer names and shapes), a REAL edit object of every kind is built with random values of the real shapes
and saved with ``Edit.save`` (and, for PURE, exported as a LoRA with ``export_lora``); the sizes are those
files' sizes on disk (header included). Values do not change sizes, except the number of nonzeros of a
sparse file, which is set by the sparsity chosen. What is *chosen* (not measured on a real erasure here,
because no real SD weights are available offline) is stated per row:

- PURE (``lowrank``, float32 factors ``up [d_out, r]``, ``down [r, d_in]`` per K/V weight): ranks 8 and
  32 (the README's SD1.5 stage benchmark, 1 concept with 24 anchors, gave a 1.55 MB file = rank ~8);
- UCE / CURE (``shared_right``, one ``A = I + U Vᵀ`` for all weights, float32 ``U, V [d_in, r]``): r = the
  number of erase tokens (UCE, ``last_subject``: one per forget concept) or forget directions (CURE):
  1, 10 and 50 concepts;
- SPACE (``csr_weights``: the whole K/V weights as CSR, float16 values, int16 column indices, int64 row
  pointers): 80 / 85 / 90 % zeros (the sparsity SPACE reports on SDXL);
- ActErase (``patch``: per attn2 layer and concept an orthonormal basis ``[d, r]`` + two ``[r]`` vectors,
  float32): r = 4, 1 concept.

    python bench/storage_report.py            # writes bench/results/storage.md and storage.json
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

ARCHS = {"sd15": ("SD1.5", "sd1"), "sdxl": ("SDXL", "sdxl")}


def _shapes(arch: str):
    from pure_fast.adapters.layers import find_cross_attention_layers
    from pure_fast.edits.edit import kv_weights
    from pure_fast.testing import build_unet_architecture

    unet = build_unet_architecture(arch, device="meta")
    kv = kv_weights(unet)
    layers = [(l.name, l.d_out, l.d_in) for l in find_cross_attention_layers(unet)]
    return {n: tuple(w.shape) for n, w in kv.items()}, layers


def _size(edit, folder: str, name: str) -> int:
    path = os.path.join(folder, name)
    edit.save(path)
    n = os.path.getsize(path)
    os.unlink(path)
    return n


def report(archs=("sd15", "sdxl"), sparsities=(0.80, 0.85, 0.90)) -> list[dict]:
    from pure_fast.edits.edit import LowRankEdit
    from pure_fast.edits.patch import ConceptPatch, PatchEdit
    from pure_fast.edits.shared import SharedRightEdit
    from pure_fast.edits.sparse import SparseWeightsEdit
    from pure_fast.export.lora import export_lora

    rows = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="storage_") as tmp:
        for arch in archs:
            label, family = ARCHS[arch]
            shapes, layers = _shapes(arch)
            params = sum(a * b for a, b in shapes.values())
            dense = 2 * params
            common.log(f"{label}: {len(shapes)} K/V weights, {params:,} params, dense fp16 {dense / 1e6:.1f} MB")

            def row(method, kind, setting, nbytes, how):
                rows.append({"model": label, "method": method, "kind": kind, "setting": setting, "bytes": nbytes,
                             "MB": nbytes / 1e6, "pct_of_dense_fp16": 100.0 * nbytes / dense, "how": how})

            row("(dense K/V)", "fp16 weights", f"{len(shapes)} weights, {params:,} params", dense,
                "computed: params x 2 bytes")
            common_kw = dict(family=family, concepts={"forget": ["x"]}, options={})
            for r in (8, 32):
                f = {n: (torch.randn(a, r, generator=g), torch.randn(r, b, generator=g)) for n, (a, b) in shapes.items()}
                e = LowRankEdit(method="pure", factors=f, shapes=dict(shapes), **common_kw)
                row("PURE", "lowrank", f"rank {r} per weight, fp32", _size(e, tmp, "pure.safetensors"),
                    "measured: saved edit file")
                if r == 8:
                    for fmt, dt in (("kohya", "float16"), ("diffusers", "float32")):
                        p = os.path.join(tmp, "lora.safetensors")
                        rep = export_lora(e, None, p, format=fmt, dtype=dt)
                        row("PURE as LoRA", f"lora-{fmt}", f"rank {r}, {dt}", rep["bytes"], "measured: exported file")
                        os.unlink(p)
            d_in = next(iter(shapes.values()))[1]
            for concepts in (1, 10, 50):
                U, V = torch.randn(d_in, concepts, generator=g), torch.randn(d_in, concepts, generator=g)
                e = SharedRightEdit(method="uce", shapes=dict(shapes), **SharedRightEdit.pack(U, V), **common_kw)
                row("UCE / CURE", "shared_right", f"r = {concepts} ({concepts} concept{'s' if concepts > 1 else ''}), fp32",
                    _size(e, tmp, "uce.safetensors"), "measured: saved edit file")
            for p in sparsities:
                dense_w = {}
                for n, (a, b) in shapes.items():
                    w = torch.randn(a, b, generator=g).to(torch.float16)
                    w[torch.rand(a, b, generator=g) < p] = 0
                    dense_w[n] = w
                e = SparseWeightsEdit.from_dense(dense_w, storage_dtype=torch.float16, method="space", **common_kw)
                del dense_w
                zeros = e.zero_fraction()
                row("SPACE", "csr_weights", f"{100 * zeros:.1f} % zeros (chosen: {100 * p:.0f} %), fp16 values",
                    _size(e, tmp, "space.safetensors"), "measured: saved edit file (sparsity from the paper's range)")
                del e
            r = 4
            patches = {name: [ConceptPatch(torch.linalg.qr(torch.randn(d, r, generator=g))[0].contiguous(),
                                           torch.zeros(r), torch.ones(r))] for name, d, _ in layers}
            e = PatchEdit(method="acterase", patches=patches, shapes={n: (d, di) for n, d, di in layers}, **common_kw)
            row("ActErase", "patch", f"rank {r} per layer, 1 concept, fp32 ({len(layers)} layers)",
                _size(e, tmp, "acterase.safetensors"), "measured: saved edit file")
    return rows


def markdown(rows) -> str:
    lines = ["| model | method | kind | setting | file size | vs dense fp16 K/V | how |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['MB']:.2f} MB" if r["MB"] >= 0.1 else f"{r['bytes'] / 1e3:.1f} KB"
        pct = "100 %" if r["method"] == "(dense K/V)" else (f"{r['pct_of_dense_fp16']:.2f} %" if r["pct_of_dense_fp16"] >= 0.01
                                                             else f"{r['pct_of_dense_fp16']:.4f} %")
        lines.append(f"| {r['model']} | {r['method']} | {r['kind']} | {r['setting']} | {size} | {pct} | {r['how']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=tuple(ARCHS), default=None)
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)
    rows = report(tuple(args.arch or ARCHS))
    md = markdown(rows)
    print(md)
    out = Path(args.out_dir)
    env = common.environment("cpu")
    head = ("# Edit file sizes\n\nGenerated by `python bench/storage_report.py` "
            f"(commit {str(env.get('git_commit'))[:10]}, {env['date']}). 1 MB = 10^6 bytes. Every size is the size of a "
            "real file written by pure_fast for edit objects of the real SD1.5 / SDXL K/V shapes with random values; "
            "the ranks, token counts and sparsities are chosen (see `bench/storage_report.py`), not measured on a real "
            "erasure.\n\n")
    tmp = out / "storage.md.tmp"
    tmp.write_text(head + md + "\n")
    tmp.replace(out / "storage.md")
    common.write_json(out / "storage.json", {"env": env, "rows": rows})
    print(f"wrote {out / 'storage.md'} and storage.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
