"""PURE's collection across processes (torch.distributed): throughput with 1..N processes, communication volume.

    python bench/bench_distributed.py                      # CPU: 1 process x 1 and x 2 threads, 2 processes x 1
    python bench/bench_distributed.py --device cuda        # GPU: 1..torch.cuda.device_count() processes
        [--arch sd15|sdxl|tiny] [--size PX] [--concepts N] [--batch-size B] [--steps S] [--record-steps R]
        [--dtype float32|bfloat16] [--worlds 1 2 ...] [--json PATH]

Each configuration starts fresh processes with the environment torchrun sets (``pure_fast.testing.run_ranks``;
gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPU, rank r on ``cuda:r``). Every rank builds the same random-weight
pipeline (timing does not depend on weight values): on CPU the full SD1.5 UNet (fp32) with a 2-layer
768-wide CLIP text encoder and a tiny VAE (collection never decodes), on GPU ``build_architecture_pipeline``.
Each rank runs one warm-up batch alone, then all ranks meet at a barrier and ``collect_activations`` runs the
timed collection of ``--concepts`` style concepts (their anchor prompts, 1 seed) sharded over the ranks;
``merge_s`` is the time of ``distributed.merge_group_stats`` (the collectives, inside the wall time).

Reported per configuration: wall time, samples/s, the speed-up over the 1-process run with the same
threads per process, and the communication volume of the merge per layer per reduction
(``distributed.bytes_moved``). The JSON also holds the projection for 8 processes, arithmetic shown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NAMES = ["Van Gogh", "Claude Monet", "Pablo Picasso", "Frida Kahlo", "Salvador Dali", "Andy Warhol",
         "Rembrandt", "Hokusai", "Edvard Munch", "Gustav Klimt"]


def _pipeline(arch: str, dtype):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from pure_fast import testing

    if arch == "tiny":
        return testing.build_tiny_pipeline("sd1")
    if arch == "sd15-unet":  # the full SD1.5 UNet; text encoder / VAE reduced (collection cost is the UNet)
        torch.manual_seed(0)
        return StableDiffusionPipeline(
            vae=testing._tiny_vae(), text_encoder=CLIPTextModel(testing._clip_text_config(768, layers=2)),
            tokenizer=testing.clip_tokenizer(), unet=testing.build_unet_architecture("sd15"),
            scheduler=testing._ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).to(dtype=dtype)
    return testing.build_architecture_pipeline(arch, dtype=dtype)


def _worker(rank: int, cfg: dict, result_path: str) -> None:
    import torch
    import torch.distributed as dist

    from pure_fast import distributed
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.prompts import anchor_sets
    from pure_fast.collect.activations import CollectOptions, collect_activations

    world = cfg["world"]
    cuda = cfg["device"] == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    dtype = getattr(torch, cfg["dtype"])
    adapter = wrap_pipeline(_pipeline(cfg["arch"], dtype), device=device, dtype=dtype)
    forget, _ = anchor_sets(NAMES[: cfg["concepts"]], [], "style")
    groups = {f"forget:{c}": p for c, p in forget.items()}
    opts = CollectOptions(size=cfg["size"], seeds=(0,), steps=cfg["steps"], record_steps=cfg["record_steps"],
                          batch_size=cfg["batch_size"])
    first = next(iter(groups.values()))[: cfg["batch_size"]]
    with distributed.local():
        collect_activations(adapter, {"warmup": first}, opts, progress=False)
    merge_s = []
    merge = distributed.merge_group_stats

    def timed_merge(*a, **k):
        t = time.perf_counter()
        out = merge(*a, **k)
        if cuda:
            torch.cuda.synchronize()
        merge_s.append(time.perf_counter() - t)
        return out

    distributed.merge_group_stats = timed_merge
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    acts = collect_activations(adapter, groups, opts, progress=False)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    records = distributed.take_records()
    n = sum(len(p) for p in groups.values()) * len(opts.seeds)
    walls = [wall]
    if world > 1:
        t = torch.tensor([wall], dtype=torch.float64)
        got = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(got, t)
        walls = [float(x) for x in got]
    volume = distributed.bytes_moved(acts.stats, world)
    if rank == 0:
        by_mode: dict = {}
        for lay in volume["layers"]:
            key = f"{lay['mode']} d={lay['d']}"
            by_mode.setdefault(key, []).append(lay["bytes"])
        res = {"world": world, "threads": cfg["threads"], "samples": n, "wall_s": max(walls), "rank_wall_s": walls,
               "samples_per_s": n / max(walls), "merge_s": merge_s[0] if merge_s else 0.0,
               "split": records, "rows_gathered_bytes": volume["rows_gathered_bytes"],
               "gram_reduced_bytes": volume["gram_reduced_bytes"],
               "per_rank_traffic_bytes": volume["per_rank_traffic_bytes"],
               "bytes_per_layer_per_reduction": {k: {"layers": len(v), "min": min(v), "max": max(v)}
                                                 for k, v in sorted(by_mode.items())},
               "rows_per_group": {g: st[0].n_rows for g, st in acts.stats.items()}}
        with open(result_path, "w") as f:
            json.dump(res, f)
    if world > 1:
        dist.destroy_process_group()


def _projection(runs: list[dict], w: int = 8) -> dict:
    """What 8 processes should give: per-process throughput x 8, minus the communication of the merge."""
    one = [r for r in runs if r["world"] == 1 and r["threads"] == min(x["threads"] for x in runs)][0]
    per_proc = one["samples_per_s"]
    n = one["samples"]
    traffic = one["rows_gathered_bytes"] * (w - 1) / w + one["gram_reduced_bytes"] * 2 * (w - 1) / w
    lines = [
        f"per-process throughput (1 process, {one['threads']} thread(s)): {per_proc:.3g} samples/s",
        f"{n} samples / ({w} x {per_proc:.3g} samples/s) = {n / (w * per_proc):.3g} s of collection per rank "
        f"(vs {n / per_proc:.3g} s in one process), if the batches divide evenly",
        f"merge traffic per rank: rows {one['rows_gathered_bytes']:,} B x {w - 1}/{w} (all_gather) + Gram "
        f"{one['gram_reduced_bytes']:,} B x 2 x {w - 1}/{w} (ring all_reduce) = {traffic:,.0f} B",
    ]
    return {"world": w, "per_process_samples_per_s": per_proc, "collect_s": n / (w * per_proc),
            "single_process_s": n / per_proc, "traffic_bytes_per_rank": traffic, "arithmetic": lines}


def main() -> None:
    import torch

    from common import environment, write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--arch", default=None, help="sd15-unet (CPU default), sd15, sdxl (GPU default), tiny")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--concepts", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--record-steps", type=int, default=1)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--worlds", type=int, nargs="*", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    arch = args.arch or ("sdxl" if cuda else "sd15-unet")
    cfg = {"device": args.device, "arch": arch, "concepts": args.concepts, "steps": args.steps,
           "record_steps": args.record_steps, "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
           "size": args.size or (512 if cuda else 16), "batch_size": args.batch_size or (16 if cuda else 2)}
    if cuda:
        n_gpu = torch.cuda.device_count()
        configs = [(w, 1) for w in (args.worlds or sorted({1, 2, n_gpu})) if w <= n_gpu]
    else:
        configs = [(1, 1), (1, 2), (2, 1)] if args.worlds is None else [(w, 1) for w in args.worlds]
    from pure_fast.testing import run_ranks

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in configs:
            path = os.path.join(tmp, f"w{world}_t{threads}.json")
            codes = run_ranks(_worker, (dict(cfg, world=world, threads=threads), path), world=world, threads=threads,
                              timeout=3600)
            if codes != [0] * world:
                raise SystemExit(f"world {world}: exit codes {codes}")
            with open(path) as f:
                runs.append(json.load(f))
            r = runs[-1]
            print(f"{world} process(es) x {threads} thread(s): {r['samples']} samples in {r['wall_s']:.2f} s = "
                  f"{r['samples_per_s']:.3g} samples/s (merge {r['merge_s'] * 1e3:.1f} ms, rows gathered "
                  f"{r['rows_gathered_bytes']:,} B, Gram reduced {r['gram_reduced_bytes']:,} B)", flush=True)
    for r in runs:
        base = [x for x in runs if x["world"] == 1 and x["threads"] == r["threads"]]
        r["speedup_vs_1_process_same_threads"] = base[0]["wall_s"] / r["wall_s"] if base else None
    proj = _projection(runs)
    for line in proj["arithmetic"]:
        print(line)
    out = {"bench": "distributed", "config": cfg, "runs": runs, "projection_8": proj,
           "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "environment": environment(args.device)}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"distributed_{'gpu' if cuda else 'cpu'}.json")
    write_json(path, out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
