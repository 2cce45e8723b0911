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


def _pm(sp: dict | None, nd: int = 3) -> str:
    """``mean ± half-range`` of a ``protocol.spread`` dict."""
    if not sp or sp.get("mean") is None:
        return "—"
    return f"{sp['mean']:.{nd}f} ± {sp['half_range']:.{nd}f}"


def _check_report_concepts(bench: dict) -> None:
    """A report shows test concepts only (``protocol.check_split``)."""
    from .protocol import check_split

    prot = bench["protocol"]
    check_split([c for cs in prot["concepts"].values() for c in cs]
                + [c for st in prot.get("multi_sets", []) for c in st["forget"]], "test")
    for row in bench["single"]:
        check_split(list(row.get("concepts", {})), "test")


def _label(row: dict) -> str:
    if row["method"] == "none":
        return "none (unedited)"
    v = row["variant"]
    if v == "tuned" and not row.get("preset"):
        v = "toy default (no preset)"
    return f"{row['method']} ({v})"


def quality_markdown(bench: dict) -> str:
    """The bench-quality report: single-concept table (tuned and paper default, mean ± half-range over the
    seed sets), per-category H-mean, multi-concept table, settings and provenance. Test concepts only."""
    _check_report_concepts(bench)
    prov, prot = bench["provenance"], bench["protocol"]
    cats = list(prot["concepts"])
    lines = [
        "# Toy-world erasure benchmark (quality)" + (" — quick" if bench.get("quick") else ""),
        "",
        f"Command: `{prov.get('command')}`  ",
        f"Date: {prov['date']}, commit `{prov.get('commit')}`, device {prov['device']} "
        f"({prov['torch_threads']} torch threads), wall time {bench['seconds']:.0f} s  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()) + "  ",
        f"World: `{bench['world']}`; evaluation seed sets {prot['seed_sets']} (disjoint from every edit's "
        f"collection seeds and from the tuning seeds {prot['tuning_seeds']}: enforced, "
        "`pure_fast/evaluate/protocol.py`); test concepts only: "
        + "; ".join(f"{c}: {', '.join(v)}" for c, v in prot["concepts"].items()) + ".",
        "",
        "Every cell is mean ± half-range over the 3 seed sets. Each concept is erased alone (retain: the two "
        "members that follow it in its category); retention is measured on the category's other test members and "
        "the other attributes. H-mean = harmonic mean of (1 − target rate, retention, 1 − attack success, quality); "
        "`tuned` = the toy default chosen on dev concepts by `bench/sweep_defaults.py` "
        "(`pure_fast/evaluate/toy_presets.json`), `paper` = the method's paper default. FID: " + prot["fid"] + ".",
        "",
        "## Single concept",
        "",
        "| method | H-mean | target anchor | target held-out | retention | attack | quality | FID (floor) | erase s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in bench["single"]:
        sm = row.get("summary")
        if not sm:
            lines.append(f"| {_label(row)} | — | — | — | — | — | — | — | — |")
            continue
        same = " = tuned" if row.get("same_as") else ""
        lines.append(
            f"| {_label(row)}{same} | **{_pm(sm['hmean'])}** | {_pm(sm['target_anchor'], 2)} | "
            f"{_pm(sm['target_heldout'], 2)} | {_pm(sm['retention'], 2)} | {_pm(sm['attack'], 2)} | "
            f"{_pm(sm['quality'], 2)} | {_pm(sm['fid'], 3)} ({_fmt(sm['fid_floor']['mean'], 3)}) | "
            f"{_fmt(row.get('erase_s_mean'), 1)} |")
    lines += ["", "H-mean per category:", "", "| method | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for row in bench["single"]:
        lines.append(f"| {_label(row)} | " + " | ".join(_pm(row["categories"].get(c)) for c in cats) + " |")
    if bench.get("multi"):
        lines += ["", "## Several concepts in one edit", "",
                  "Each set is erased in one edit at the method's tuned default; `kept` = accuracy on the category's "
                  "not-erased test members, `other` = on the other categories' test members (— when none is left).",
                  "", "| method | set | k | erased anchor | erased held-out | kept | other | quality | FID | erase s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for mrow in bench["multi"]:
            for name, st in mrow["sets"].items():
                sm = st["summary"]
                lines.append(f"| {_label(mrow)} | {name} ({', '.join(st['forget'])}) | {st['k']} | "
                             f"{_pm(sm['target_anchor'], 2)} | {_pm(sm['target_heldout'], 2)} | {_pm(sm['kept'], 2)} | "
                             f"{_pm(sm['other'], 2)} | {_pm(sm['quality'], 2)} | {_pm(sm['fid'], 3)} | "
                             f"{st['erase_s']:.1f} |")
    errs = {f"{_label(r)}": r["errors"] for r in bench["single"] + bench.get("multi", []) if r.get("errors")}
    if bench.get("unavailable"):
        lines += ["", "Not available (module did not import): "
                  + "; ".join(f"{m} ({why})" for m, why in bench["unavailable"].items()) + "."]
    if errs:
        lines += ["", "Failed runs: " + "; ".join(f"{m} on {', '.join(e)}: {next(iter(e.values()))}"
                                                    for m, e in errs.items()) + "."]
    s = bench["settings"]
    lines += ["", f"Settings: {s['steps']} DDIM steps, guidance {s['guidance'] or 'model default'}; per concept and "
              f"seed {s['n_anchor']} anchor, {s['n_heldout']} held-out, 3×{s['n_attack']} fixed attack prompts, "
              + (f"greedy search {s['greedy_substitute']}+{s['greedy_insert']} candidates on {s['greedy_base']} base "
                 f"prompt(s) (search seeds {s['greedy_search_seeds']}), " if s["greedy"] else "no greedy search, ")
              + f"{s['n_forget_canonical']} forget canonical and {s['n_neighbour']} canonical prompt(s) per neighbour."]
    lines += ["", "Options of each row (per category):", ""]
    for row in bench["single"]:
        if row["method"] != "none" and not row.get("same_as"):
            o = next(iter(row.get("options_by_category", {}).values()), None) or {}
            short = {k: v for k, v in o.items() if k not in ("collect",) and not isinstance(v, dict)}
            lines.append(f"- {_label(row)}: `{json.dumps(short, sort_keys=True)}`")
    lines += ["", "## Per concept (mean ± half-range)", "",
              "| method | concept | H-mean | target anchor | target held-out | attack | retention | quality |",
              "|---|---|---|---|---|---|---|---|"]
    for row in bench["single"]:
        if row.get("same_as"):
            continue
        for c, r in row["concepts"].items():
            sp = r.get("spread") or {}
            lines.append(f"| {_label(row)} | {c} | {_pm(sp.get('hmean'))} | {_pm(sp.get('target_anchor'), 2)} | "
                         f"{_pm(sp.get('target_heldout'), 2)} | {_pm(sp.get('attack'), 2)} | "
                         f"{_pm(sp.get('retention'), 2)} | {_pm(sp.get('quality'), 2)} |")
    return "\n".join(lines) + "\n"


def bench_chart(bench: dict, path: str) -> str:
    """Three panels: H-mean (± half-range) per method and variant; erased target rate (held-out) against k;
    retention of the kept members against k (one line per method)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    rows = [r for r in bench["single"] if r.get("summary")]
    ax = axes[0]
    x = np.arange(len(rows))
    ax.bar(x, [r["summary"]["hmean"]["mean"] for r in rows], yerr=[r["summary"]["hmean"]["half_range"] for r in rows],
           color=["grey" if r["method"] == "none" else ("C0" if r["variant"] == "tuned" else "C1") for r in rows])
    ax.set_xticks(x, [_label(r).replace(" (", "\n(") for r in rows], fontsize=6, rotation=0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("H-mean (higher is better)")
    ax.set_title("single concept (blue: tuned, orange: paper)", fontsize=9)
    for ax, key, title in ((axes[1], "target_heldout", "erased: target rate, held-out (lower is better)"),
                           (axes[2], "kept", "not-erased members: accuracy (higher is better)")):
        for mrow in bench.get("multi", []):
            pts = sorted((st["k"], st["summary"][key]) for name, st in mrow["sets"].items() if name != "mixed")
            pts = [(k, sp) for k, sp in pts if sp["mean"] is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["half_range"] for p in pts],
                            marker="o", capsize=3, label=mrow["method"])
        ax.set_xlabel("concepts erased in one edit (k)")
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(title, fontsize=9)
    axes[2].legend(fontsize=7)
    return _save_fig(fig, path)


README_BEGIN = "<!-- quality-results:begin (generated by bench/update_readme.py from bench/results/quality.json) -->"
README_END = "<!-- quality-results:end -->"


def readme_block(bench: dict) -> str:
    """The README's results block: only numbers ``bench`` (quality.json) holds."""
    _check_report_concepts(bench)
    prov, prot = bench["provenance"], bench["protocol"]
    single = [r for r in bench["single"] if r.get("summary") and not r.get("same_as")]
    best = max((r for r in single if r["method"] != "none"), key=lambda r: r["summary"]["hmean"]["mean"], default=None)
    lines = [
        f"`{prov.get('command')}` ({'quick' if bench.get('quick') else 'full'} settings, {bench['seconds']:.0f} s, "
        f"{prov['device']}, {prov['date'][:10]}, commit `{(prov.get('commit') or '')[:10]}`; `bench/results/quality.md` "
        "has every row, the per-concept table and the options). Test concepts "
        + "; ".join(f"{c}: {', '.join(v)}" for c, v in prot["concepts"].items())
        + f"; mean ± half-range over the seed sets {prot['seed_sets']}.",
        "",
        "| method | H-mean | target anchor | target held-out | retention | attack | quality | FID |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in single:
        sm = r["summary"]
        lines.append(f"| {_label(r)} | {_pm(sm['hmean'])} | {_pm(sm['target_anchor'], 2)} | "
                     f"{_pm(sm['target_heldout'], 2)} | {_pm(sm['retention'], 2)} | {_pm(sm['attack'], 2)} | "
                     f"{_pm(sm['quality'], 2)} | {_pm(sm['fid'])} |")
    if best is not None:
        sm = best["summary"]
        lines += ["", f"Highest H-mean: {_label(best)}, {_pm(sm['hmean'])}; it leaves a target rate of "
                  f"{_pm(sm['target_anchor'], 2)} on anchor and {_pm(sm['target_heldout'], 2)} on held-out prompts."]
    if bench.get("multi"):
        lines += ["", "Several concepts in one edit (tuned defaults; erased = held-out target rate, kept = not-erased "
                  "members of the category, other = other categories):", "",
                  "| method | " + " | ".join(f"{n} (k={st['k']})" for n, st in bench["multi"][0]["sets"].items())
                  + " |", "|---|" + "---|" * len(bench["multi"][0]["sets"])]
        for mrow in bench["multi"]:
            cells = []
            for st in mrow["sets"].values():
                sm = st["summary"]
                cells.append(f"erased {_pm(sm['target_heldout'], 2)}, kept {_pm(sm['kept'], 2)}, "
                             f"other {_pm(sm['other'], 2)}")
            lines.append(f"| {_label(mrow)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NO_RESULTS = ("No `bench-quality` run under this protocol is committed yet (`bench/results/quality.json` is absent): "
              "run `python bench/sweep_defaults.py`, then `pure-fast bench-quality` (or `--quick`), then "
              "`python bench/update_readme.py`.\n")


def update_readme(readme: str, bench: dict | None) -> str:
    """``readme`` text with the block between ``README_BEGIN`` and ``README_END`` replaced by
    ``readme_block(bench)`` (``NO_RESULTS`` when ``bench`` is None); a README without the markers is an error."""
    from ..errors import UsageError

    i, j = readme.find(README_BEGIN), readme.find(README_END)
    if i < 0 or j < i:
        raise UsageError(f"the README has no results block; add the lines {README_BEGIN!r} and {README_END!r}")
    block = NO_RESULTS if bench is None else readme_block(bench)
    return readme[: i + len(README_BEGIN)] + "\n" + block + readme[j:]


def write_bench(bench: dict, out_dir: str, stem: str = "quality") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": write_json(os.path.join(out_dir, f"{stem}.json"), bench),
        "md": write_text(os.path.join(out_dir, f"{stem}.md"), quality_markdown(bench)),
        "png": bench_chart(bench, os.path.join(out_dir, f"{stem}.png")),
    }
    return paths
