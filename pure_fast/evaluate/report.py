"""Reports of the toy-world benchmark: JSON, a markdown table, PNG bar charts and before/after grids.

All files are written through ``pure_fast.fileio.atomic_path`` (temp file + rename). Charts use
matplotlib's Agg backend (no display needed); the bar charts show the four H-mean terms and the H-mean
per method, the grids put the unedited model's images left of the edited model's for the same prompts
and seeds.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from ..fileio import atomic_path
from .toy_bench import TERMS, json_ready

TERM_LABELS = {"forget": "1 - target", "retention": "retention", "robustness": "1 - attack", "quality": "quality"}
GRID_ROWS = ("anchor", "heldout", "misspell", "split", "buried", "greedy", "neighbour", "neighbour")
ROW_LABELS = {"anchor": "anch", "heldout": "held", "misspell": "miss", "split": "split", "buried": "bur",
              "greedy": "grdy", "neighbour": "nbr", "forget_canonical": "canon"}


def write_json(path: str, obj) -> str:
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_ready(obj), f, indent=1)
            f.write("\n")
    return path


def write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str) -> str:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def eval_chart(results: Sequence[dict], path: str) -> str:
    """Bars: for every (method, concept) the four terms and the H-mean. ``results``: evaluate_method outputs."""
    plt = _plt()
    bars = []  # (label, values)
    for r in results:
        for c, cr in (r.get("concepts") or {}).items():
            bars.append((f"{r['method']}\n{c}", [cr["terms"][t] for t in TERMS] + [cr["hmean"]]))
    names = [TERM_LABELS[t] for t in TERMS] + ["H-mean"]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(bars) + 1.5), 3.4))
    width = 0.8 / len(names)
    x = np.arange(len(bars))
    for k, n in enumerate(names):
        ax.bar(x + (k - (len(names) - 1) / 2) * width, [b[1][k] for b in bars], width, label=n)
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (higher is better)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    return _save_fig(fig, path)


def bench_chart(bench: dict, path: str) -> str:
    """Grouped bars: H-mean per method and category (and over all concepts)."""
    plt = _plt()
    cats = list(bench["concepts"]) + ["all"]
    methods = [m for m in bench["methods"] if bench["rows"][m]["concepts"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(cats) * max(1, len(methods)) / 2 + 3, 3.4))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(cats))
    for k, m in enumerate(methods):
        row = bench["rows"][m]
        vals = [row["categories"][c]["hmean"] or 0.0 for c in cats[:-1]] + [row["hmean"] or 0.0]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(x, cats)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("H-mean (higher is better)")
    ax.set_title("toy-world erasure benchmark", fontsize=9)
    ax.legend(fontsize=7, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return _save_fig(fig, path)


def _pick(items, kinds_wanted: Sequence[str], seed) -> list[int]:
    """Indices of the first item of each wanted kind (repeated kinds take the next one) at ``seed``."""
    used: dict[str, int] = {}
    out = []
    for kind in kinds_wanted:
        k = used.get(kind, 0)
        idx = [j for j, it in enumerate(items) if it.kind == kind and it.seed == seed]
        if k < len(idx):
            out.append(idx[k])
            used[kind] = k + 1
    return out


def sample_grid(before: dict, after: dict, path: str) -> tuple[str, list[str]]:
    """A before | after grid for one concept from two evaluate_concept(keep_images=True) results.
    Rows: anchor, held-out, the attacks, neighbours; columns: the evaluation seeds. Returns (path, prompts)."""
    from PIL import Image

    from ..images import grid

    rows, labels, prompts = [], [], []
    b, a = before["_images"], after["_images"]
    seeds = list(dict.fromkeys(it.seed for it in b["items"]))
    first = _pick(b["items"], GRID_ROWS, seeds[0])
    for j in first:
        it = b["items"][j]
        row = []
        for res in (b, a):
            for sd in seeds:
                k = next(i for i, x in enumerate(res["items"]) if x.kind == it.kind and x.prompt == it.prompt
                         and x.seed == sd)
                row.append(Image.fromarray(res["images"][k]))
        rows.append(row)
        labels.append(ROW_LABELS.get(it.kind, it.kind[:5]))
        prompts.append(f"{it.kind}: {it.prompt}")
    # greedy rows: each model's own winning prompt (searched against that model)
    for name, res in (("grdy-b", b), ("grdy-a", a)):
        gp = res["greedy_prompts"]
        if gp:
            row = []
            for other in (b, a):
                # show the same prompt for both models only when it is this model's; else its own images
                src = res if other is res else None
                for sd_i, _ in enumerate(seeds):
                    if src is not None:
                        row.append(Image.fromarray(src["greedy_images"][sd_i]))
                    else:
                        row.append(Image.new("RGB", (16, 16), (255, 255, 255)))
            rows.append(row)
            labels.append(name)
            prompts.append(f"greedy ({'before' if res is b else 'after'}): {gp[0]}")
    img = grid(rows, labels, ["before"] * len(seeds) + ["after"] * len(seeds), split_after=len(seeds))
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")
    return path, prompts


def _fmt(v, nd=3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def quality_markdown(bench: dict) -> str:
    """The bench-quality table (one row per method, unedited first) with settings and provenance."""
    cats = list(bench["concepts"])
    prov = bench["provenance"]
    lines = [
        "# Toy-world erasure benchmark (quality)",
        "",
        f"Command: `{prov.get('command')}`  ",
        f"Date: {prov['date']}, commit `{prov.get('commit')}`, device {prov['device']} "
        f"({prov['torch_threads']} torch threads), wall time {bench['seconds']:.0f} s  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        "",
        "Each concept is erased alone (retain: two neighbours of its category), then measured on anchor, "
        "held-out paraphrase and adversarial prompts (`pure_fast/evaluate/toy_bench.py` defines every term). "
        "Cells: H-mean = harmonic mean of (1 − target rate, retention, 1 − attack success, quality), averaged "
        "over the category's concepts: " + "; ".join(f"{c}: {', '.join(v)}" for c, v in bench["concepts"].items())
        + ". The unedited model erases nothing, so its first term and H-mean are ~0.",
        "",
        "| method | " + " | ".join(cats) + " | H-mean | 1 − target | retention | 1 − attack | quality | erase s |",
        "|---|" + "---|" * (len(cats) + 6),
    ]
    for m in bench["methods"]:
        row = bench["rows"][m]
        if not row["concepts"]:
            lines.append(f"| {m} | " + " | ".join("—" for _ in cats) + " | — | — | — | — | — | — |")
            continue
        t = row["terms"]
        lines.append(
            f"| {'none (unedited)' if m == 'none' else m} | "
            + " | ".join(_fmt(row["categories"][c]["hmean"]) for c in cats)
            + f" | **{_fmt(row['hmean'])}** | {_fmt(t['forget'])} | {_fmt(t['retention'])} | {_fmt(t['robustness'])}"
            f" | {_fmt(t['quality'])} | {row['erase_s']:.1f} |"
        )
    errs = {m: r["errors"] for m, r in bench["rows"].items() if r["errors"]}
    if bench.get("unavailable"):
        lines += ["", "Not available (module did not import): "
                  + "; ".join(f"{m} ({why})" for m, why in bench["unavailable"].items()) + "."]
    if errs:
        lines += ["", "Failed runs: " + "; ".join(f"{m} on {', '.join(e)}: {next(iter(e.values()))}"
                                                    for m, e in errs.items()) + "."]
    s = bench["settings"]
    lines += ["", f"Settings: {len(s['seeds'])} seed(s) {s['seeds']}, {s['steps']} DDIM steps, guidance "
              f"{s['guidance'] or 'model default'}; per concept {s['n_anchor']} anchor, {s['n_heldout']} held-out, "
              f"3×{s['n_attack']} fixed attack prompts, greedy search {s['greedy_substitute']}+{s['greedy_insert']} "
              f"candidates on {s['greedy_base']} base prompt(s), {s['n_forget_canonical']} forget canonical and "
              f"{s['n_neighbour']} canonical prompt(s) per neighbour.", ""]
    lines += ["Per concept (H-mean / target rate anchor, held-out / attack success / retention / quality):", "",
              "| method | concept | H-mean | target anchor | target held-out | attack | retention | quality |",
              "|---|---|---|---|---|---|---|---|"]
    for m in bench["methods"]:
        for c, r in bench["rows"][m]["concepts"].items():
            lines.append(f"| {m} | {c} | {_fmt(r['hmean'])} | {_fmt(r['target']['anchor'], 2)} | "
                         f"{_fmt(r['target']['heldout'], 2)} | {_fmt(r['attack']['rate'], 2)} | "
                         f"{_fmt(r['retention']['rate'], 2)} | {_fmt(r['quality']['score'], 2)} |")
    return "\n".join(lines) + "\n"


def write_bench(bench: dict, out_dir: str, stem: str = "quality") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": write_json(os.path.join(out_dir, f"{stem}.json"), bench),
        "md": write_text(os.path.join(out_dir, f"{stem}.md"), quality_markdown(bench)),
        "png": bench_chart(bench, os.path.join(out_dir, f"{stem}.png")),
    }
    return paths
