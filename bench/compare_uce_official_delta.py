"""How close is pure-fast's UCE ΔW to the restated official procedure's, per ``token_mode``?

    python bench/compare_uce_official_delta.py --model /tmp/textfast_bench/sd15 [--work DIR] \\
        [--json bench/results/uce_official_delta.json]

Runs ``bench/reference/uce_official_procedure.py`` once (writing its K/V weights as safetensors), then
``pure-fast erase --method uce`` with the bench's settings (``bench_text_cold.py``: forget "Van Gogh", retain
"Claude Monet", ``guide=art``, ``preserve_scale=1``) for every ``token_mode``, and reports the relative
Frobenius difference of ΔW over all K/V weights, ``||ΔW_ours - ΔW_official|| / ||ΔW_official||``. The official
code edits the tokens from the LAST subject token to the end of the 77-token sequence and preserves all 77
tokens of each retain text (BOS included); ``subject_to_end`` starts at the FIRST subject token and selects
the retain tokens the same way, so even that mode is not an exact match.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_text_cold as B  # noqa: E402

MODES = ("last_subject", "subject_to_eos", "subject_to_end")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default=None, help="folder for the official K/V weights (reused when present)")
    ap.add_argument("--json", default=str(B.REPO / "bench" / "results" / "uce_official_delta.json"))
    args = ap.parse_args()
    from safetensors.torch import load_file

    from pure_fast.adapters import load_model
    from pure_fast.edits.io import load_edit
    from pure_fast.fileio import write_text

    work = args.work or tempfile.mkdtemp(prefix="uce_delta_")
    os.makedirs(work, exist_ok=True)
    off_path = os.path.join(work, "official_kv.safetensors")
    if not os.path.exists(off_path):
        B.run_child(B.providers(args.model, work)["official UCE procedure"] + ["--kv-out", off_path])
    kv = load_model(args.model, parts="kv").kv_weights()
    official = {n: t.to(torch.float64) for n, t in load_file(off_path).items()}
    rows = {}
    for mode in MODES:
        out = os.path.join(work, f"ours_{mode}.safetensors")
        B.run_child(B.pure_fast_cmd(args.model, out, ["--option", f"token_mode={mode}"]))
        e = load_edit(out)
        num = den = 0.0
        for name in kv:
            w0 = kv[name].to(torch.float64)
            d_ours, d_off = e.delta(name, w0), official[name] - w0
            num += float((d_ours - d_off).pow(2).sum())
            den += float(d_off.pow(2).sum())
        rows[mode] = round((num / den) ** 0.5, 4)
        print(f"token_mode={mode}: relative difference of ΔW {rows[mode]}", flush=True)
    doc = {"what": __doc__.split("\n")[0], "command": "python " + " ".join(sys.argv), "model": args.model,
           "settings": {"forget": B.FORGET, "retain": B.RETAIN, "guide": B.GUIDE, "preserve_scale": 1},
           "relative_difference": rows, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": B._git("rev-parse", "--short", "HEAD")}
    write_text(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
