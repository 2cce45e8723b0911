"""Peak memory of PURE's erase for 1 and 50 concepts on the SD1.5 architecture (random weights), CPU.

    python bench/bench_memory.py [--concepts 1 50] [--size 64] [--steps 2] [--record-steps 1]
                                 [--templates 2] [--batch-size 16] [--json PATH]

Each concept count runs in a fresh subprocess (so peaks do not leak between runs): build the SD1.5
pipeline (fp32, CPU), record the resident set size (RSS) as the baseline, then run ``pure_fast.erase`` while
a thread samples RSS every 10 ms. Reported per run:

- ``rss_base_mb``: RSS after the model is built (the weights: ~4.3 GB for UNet + text encoder + VAE);
- ``rss_peak_mb`` / ``erase_extra_mb``: highest sampled RSS during erase, and its excess over the baseline
  (activations of one UNet batch, the collected statistics, bases, factors, fingerprints);
- ``ru_maxrss_mb``: the kernel's lifetime peak for the process (cross-check of the sampler);
- ``stats_mb``: bytes the collection holds at its end (rows per group and layer, or d x d Gram matrices once a
  group has more rows than the layer width, plus an fp64 row sum per group and layer for the mean), against
  ``all_rows_mb``: what keeping every pooled row of every group at every layer (plus the same sums) would take. The two coincide while every group has fewer rows than
  the layer width; past it, ``stats_mb`` stays bounded by groups x sum(d^2) x 4 bytes.

Settings (chosen so one run finishes in minutes on a 2-core CPU; memory does not depend on weight values):
64 px (8 x 8 latents), 1 seed, a 2-step DDIM schedule with 1 recorded step, ``--templates`` style
templates per concept (default 2), retain concepts "a photograph" and "a watercolor", batch size 16
(the option that bounds activation memory).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

NAMES = ["Van Gogh", "Claude Monet", "Pablo Picasso", "Frida Kahlo", "Salvador Dali", "Andy Warhol",
         "Rembrandt", "Hokusai", "Edvard Munch", "Gustav Klimt"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler(threading.Thread):
    def __init__(self, period=0.01):
        super().__init__(daemon=True)
        self.period, self.peak, self.stop_flag = period, 0.0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(self.period)


def _stats_bytes(acts) -> tuple[int, int]:
    held = full = 0
    for per_layer in acts.stats.values():
        for st in per_layer:
            if st.is_gram:
                held += st.gram.numel() * st.gram.element_size()
            else:
                held += sum(r.numel() * r.element_size() for r in st.rows)
            sums = 0 if st.row_sum is None else st.row_sum.numel() * st.row_sum.element_size()
            held += sums
            full += st.n_rows * st.d * 4 + sums
    return held, full


def worker(args) -> dict:
    import torch

    os.environ["PURE_FAST_PROGRESS"] = "0"
    import pure_fast
    import pure_fast.methods.base as collect_site  # where the methods call collect_activations
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.prompts import TEMPLATES
    from pure_fast.testing import build_architecture_pipeline

    torch.manual_seed(0)
    pipe = build_architecture_pipeline("sd15", dtype=torch.float32)
    ad = wrap_pipeline(pipe, device="cpu", dtype=torch.float32)
    forget = [NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i}") for i in range(args.concepts)]
    captured = {}
    original = collect_site.collect_activations

    def capture(*a, **k):
        acts = original(*a, **k)
        captured["held"], captured["full"] = _stats_bytes(acts)
        captured["rows"] = {g: acts.rows(g) for g in acts.groups()}
        captured["gram_groups"] = sum(any(s.is_gram for s in st) for st in acts.stats.values())
        return acts

    collect_site.collect_activations = capture
    base = _rss_mb()
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    edit = pure_fast.erase(ad, forget, ["a photograph", "a watercolor"], category="style",
                           templates=TEMPLATES["style"][: args.templates], progress=False, size=args.size, seeds=(0,),
                           steps=args.steps, record_steps=args.record_steps, batch_size=args.batch_size)
    elapsed = time.perf_counter() - t0
    sampler.stop_flag = True
    sampler.join()
    rows = captured["rows"]
    return {
        "bench": "memory", "case": f"sd15 cpu {args.concepts} concept(s)", "concepts": args.concepts,
        "anchors": sum(v for k, v in rows.items()) // max(args.record_steps, 1),
        "rows": sum(rows.values()), "groups": len(rows), "gram_groups": captured["gram_groups"],
        "rss_base_mb": round(base, 1), "rss_peak_mb": round(max(sampler.peak, _rss_mb()), 1),
        "erase_extra_mb": round(max(sampler.peak, _rss_mb()) - base, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "stats_mb": round(captured["held"] / 2**20, 3), "all_rows_mb": round(captured["full"] / 2**20, 3),
        "edit_mb": round(edit.nbytes() / 2**20, 3), "seconds": round(elapsed, 1),
        "settings": {"size": args.size, "seeds": [0], "steps": args.steps, "record_steps": args.record_steps,
                     "templates": args.templates, "batch_size": args.batch_size, "dtype": "float32",
                     "threads": torch.get_num_threads()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", type=int, nargs="+", default=[1, 50])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--record-steps", type=int, default=1)
    ap.add_argument("--templates", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the rows here (atomically)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.concepts = args.concepts[0]
        print("RESULT " + json.dumps(worker(args)))
        return 0
    rows = []
    for n in args.concepts:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--concepts", str(n), "--size", str(args.size),
               "--steps", str(args.steps), "--record-steps", str(args.record_steps), "--templates",
               str(args.templates), "--batch-size", str(args.batch_size)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(line[0][7:])
        rows.append(row)
        print(f"{n:>3} concept(s): {row['anchors']} anchors, {row['rows']} rows in {row['groups']} groups; "
              f"RSS base {row['rss_base_mb']:.0f} MB, peak {row['rss_peak_mb']:.0f} MB (+{row['erase_extra_mb']:.0f} MB "
              f"during erase); collected stats {row['stats_mb']:.2f} MB (all rows: {row['all_rows_mb']:.2f} MB); "
              f"{row['seconds']:.0f} s", flush=True)
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import environment, write_json

        write_json(args.json, {"environment": environment("cpu"), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
