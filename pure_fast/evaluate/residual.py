"""Where does a concept survive an edit? Per layer and per denoising step, for any method's edit.

Run on prompts and seeds the edit never saw (held-out paraphrases, evaluation seeds disjoint from the
edit's collection seeds), once on the unedited model and once with the edit applied:

- **forget residual** (per layer l, step s): every ``attn2`` records the spatial mean of the input of
  ``to_out[0]`` (the cross-attention output ``h``, *after* any activation patch such as ActErase's, so
  every kind of edit is seen the same way) for the conditional rows. Measuring bases come from the
  *unedited* model only, all steps pooled: ``V_R`` = the retain prompts' basis (mean direction + centred
  principal directions to ``retain_threshold``), ``Q`` = the top directions of the forget rows with the
  retain subspace removed, ``H_F (I - P_R)``, to ``forget_threshold`` of their energy (the forget-*specific*
  directions). The residual is ``sum ||Q^T (I - P_R) h_edited||^2 / sum ||Q^T (I - P_R) h_unedited||^2``
  over the forget prompts' samples at (l, s): 1 = nothing erased, 0 = the specific signal is gone. The
  edited rows follow the edited model's own trajectory (what a user gets), not the unedited one's.
- **retain movement** (l, s): ``||h_edited - h_unedited||_F / ||h_unedited||_F`` over the neighbour
  prompts' samples (0 = untouched).
- **when the decision is made** (toy model: images can be judged): after every step the scheduler's x0
  prediction is decoded and judged by the detectors. Per step: the fraction of forget-prompt images
  whose x0 already shows the concept; per image: the first step from which that verdict never changes
  again (``decided_at``), unedited and edited.

Totals over layers are weighted by layer width (as ``evaluate/metrics.py``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import UsageError


@dataclass
class ResidualSettings:
    seeds: tuple[int, ...] = (7001, 7002)  # evaluation seeds; must be disjoint from the edit's collection seeds
    steps: int = 10  # DDIM schedule; every step is recorded
    guidance: float | None = None  # None: the model's default
    n_forget: int = 8  # held-out prompts per forget concept
    n_retain: int = 8  # held-out prompts of the retain concepts (the measuring retain basis)
    n_neighbour: int = 2  # canonical prompts per neighbour (retain movement)
    forget_threshold: float = 0.99
    retain_threshold: float = 0.99
    batch_size: int = 256

    def validate(self) -> None:
        if not self.seeds:
            raise UsageError("no evaluation seeds; give at least one")
        if not 1 <= self.steps <= 1000:
            raise UsageError(f"steps={self.steps} is out of range; use [1, 1000]")
        for name in ("n_forget", "n_retain", "n_neighbour", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("forget_threshold", "retain_threshold"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise UsageError(f"{name}={v} is out of range; use a value in (0, 1]")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def collection_seeds(edit) -> set[int]:
    """Seeds an edit collected activations on (PURE, ActErase: ``options.collect.seeds``); empty otherwise."""
    col = (edit.options or {}).get("collect") if edit is not None else None
    return {int(s) for s in (col or {}).get("seeds", [])}


def check_fresh_seeds(edit, seeds: Sequence[int]) -> None:
    both = sorted(collection_seeds(edit) & {int(s) for s in seeds})
    if both:
        raise UsageError(f"evaluation seed(s) {both} were used to build the edit; use seeds it never saw")


# ---- recording ----------------------------------------------------------------------------------------------
def record_trajectories(adapter, prompts: Sequence[str], seeds: Sequence[int], *, steps: int, guidance=None,
                        batch_size: int = 256, x0: bool = True):
    """Pooled ``to_out[0]`` inputs at every layer and step, and the decoded x0 prediction after every step.

    Samples are (prompt, seed) pairs, prompt-major. Returns (pooled: list over layers of float64
    [steps, n_samples, d], x0: uint8 [steps, n_samples, H, W, 3] or None when the adapter cannot decode to
    arrays or ``x0`` is False).
    """
    layers = adapter.cross_attention_layers()
    guidance = adapter.default_guidance if guidance is None else guidance
    samples = [(p, s) for p in prompts for s in seeds]
    rows: list[list[list[torch.Tensor]]] = [[[] for _ in range(steps)] for _ in layers]
    frames: list[list[np.ndarray]] = [[] for _ in range(steps)]
    state = {"step": 0, "cond": slice(None)}

    def make_hook(li):
        def hook(module, args):
            h = args[0]
            rows[li][state["step"]].append(h[state["cond"]].double().mean(1).cpu())
        return hook

    decode = getattr(adapter, "decode_array", None) if x0 else None
    handles = [l.module.to_out[0].register_forward_pre_hook(make_hook(i)) for i, l in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                uniq = list(dict.fromkeys(p for p, _ in chunk))
                enc = adapter.encode(uniq)
                cond = enc.index([uniq.index(p) for p, _ in chunk])
                state["cond"] = slice(len(chunk), None) if guidance > 1.0 else slice(None)

                def on_step(i, t):
                    state["step"] = i

                def on_x0(i, x):
                    if decode is not None:
                        frames[i].append(decode(x))

                adapter.denoise(cond, [s for _, s in chunk], steps=steps, guidance_scale=guidance, scheduler="ddim",
                                on_step=on_step, on_x0=on_x0)
    finally:
        for h in handles:
            h.remove()
    pooled = [torch.stack([torch.cat(rows[li][s]) for s in range(steps)]) for li in range(len(layers))]
    imgs = np.stack([np.concatenate(f) for f in frames]) if decode is not None else None
    return pooled, imgs


# ---- the measures -------------------------------------------------------------------------------------------
def measuring_bases(forget_rows: torch.Tensor, retain_rows: torch.Tensor, forget_threshold: float,
                    retain_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [d, q], V_R [d, m]) for one layer from unedited rows [n, d]: V_R the retain basis (mean + centred
    principal directions), Q the forget-specific directions (principal directions of H_F (I - P_R))."""
    from ..ops.batched_svd import centered_basis, subspace_basis

    R = retain_rows.double()
    V_R, r = centered_basis(R[None], retain_threshold, mean=R.mean(0)[None], count=R.shape[0])
    V_R = V_R[0, :, : int(r[0])]
    X = forget_rows.double()
    X = X - (X @ V_R) @ V_R.T
    Q, q, _ = subspace_basis(X[None], forget_threshold)
    return Q[0, :, : int(q[0])], V_R


def specific_energy(h: torch.Tensor, Q: torch.Tensor, V_R: torch.Tensor) -> torch.Tensor:
    """``||Q^T (I - P_R) h||^2`` per row of h [..., d]."""
    x = h - (h @ V_R) @ V_R.T
    return (x @ Q).pow(2).sum(-1)


def decided_at(hits: np.ndarray) -> np.ndarray:
    """hits [steps, n] bool (verdict per step). Per image, the first step from which the verdict stays the
    same until the last step."""
    S = hits.shape[0]
    out = np.full(hits.shape[1], S - 1)
    for s in range(S - 2, -1, -1):
        same = np.all(hits[s:] == hits[-1][None], axis=0)
        out = np.where(same, s, out)
    return out


def _weighted(vals: Sequence[float], widths: Sequence[int]) -> float:
    w = np.asarray(widths, float)
    return float(np.sum(np.asarray(vals, float) * w) / max(w.sum(), 1e-30))


def residual_for_concept(before: dict, after: dict, layers, settings: ResidualSettings, *, concept=None,
                         category=None, n_seeds: int = 1) -> dict:
    """``before`` / ``after``: {"forget": (pooled, x0), "retain": (pooled, x0), "neighbour": (pooled, x0)}."""
    fb, fa = before["forget"][0], after["forget"][0]
    rb = before["retain"][0]
    nb, na = before["neighbour"][0], after["neighbour"][0]
    L, S = len(layers), fb[0].shape[0]
    res = np.zeros((L, S))
    move = np.zeros((L, S))
    res_layer, move_layer, ranks = [], [], []
    for li in range(L):
        d = fb[li].shape[-1]
        Q, V_R = measuring_bases(fb[li].reshape(-1, d), rb[li].reshape(-1, d), settings.forget_threshold,
                                 settings.retain_threshold)
        e0 = specific_energy(fb[li], Q, V_R).sum(-1)  # [S]
        e1 = specific_energy(fa[li], Q, V_R).sum(-1)
        res[li] = (e1 / e0.clamp(min=1e-30)).numpy()
        res_layer.append(float(e1.sum() / e0.sum().clamp(min=1e-30)))
        diff = (na[li] - nb[li]).pow(2).sum((-1, -2))
        base = nb[li].pow(2).sum((-1, -2)).clamp(min=1e-30)
        move[li] = (diff / base).sqrt().numpy()
        move_layer.append(float((diff.sum() / base.sum()).sqrt()))
        ranks.append({"specific": int(Q.shape[1]), "retain": int(V_R.shape[1])})
    widths = [l.d_out for l in layers]
    out = {
        "concept": concept, "category": category,
        "layers": [l.name for l in layers], "widths": widths, "measuring_ranks": ranks,
        "residual": res.tolist(), "residual_layer": res_layer,
        "residual_step": [_weighted(res[:, s], widths) for s in range(S)],
        "residual_total": _weighted(res_layer, widths),
        "retain_move": move.tolist(), "retain_move_layer": move_layer,
        "retain_move_step": [_weighted(move[:, s], widths) for s in range(S)],
        "retain_move_total": _weighted(move_layer, widths),
    }
    xb, xa = before["forget"][1], after["forget"][1]
    if xb is not None and concept is not None and category is not None:
        out["x0"] = x0_decisions(xb, xa, concept, category)
    return out


def x0_decisions(x0_before: np.ndarray, x0_after: np.ndarray, concept: str, category: str) -> dict:
    """Judge every step's x0 prediction: per-step concept rate and per-image decision step."""
    from ..toy.detectors import detect

    def hits(x0):
        S, n = x0.shape[:2]
        labels = detect(x0.reshape(S * n, *x0.shape[2:]))[category]
        return np.array([lab == concept for lab in labels]).reshape(S, n)

    hb, ha = hits(x0_before), hits(x0_after)
    db, da = decided_at(hb), decided_at(ha)
    S = hb.shape[0]
    return {
        "rate_unedited": hb.mean(1).tolist(), "rate_edited": ha.mean(1).tolist(),
        "decided_by_unedited": [float(np.mean(db <= s)) for s in range(S)],
        "decided_by_edited": [float(np.mean(da <= s)) for s in range(S)],
        "median_decided_unedited": float(np.median(db)), "median_decided_edited": float(np.median(da)),
        "n_images": int(hb.shape[1]),
    }


# ---- the toy world --------------------------------------------------------------------------------------------
def toy_prompt_sets(forget: str, retain: Sequence[str], settings: ResidualSettings) -> dict[str, list[str]]:
    """Held-out prompts of the forget concept and of the retain concepts, canonical prompts of every other
    member of its category (none of them an anchor prompt any method collects on)."""
    from ..toy import world
    from .toy_bench import _spread

    f = _spread(world.heldout_prompts(forget), settings.n_forget)
    r_all = [p for c in retain for p in world.heldout_prompts(c)]
    r = _spread(r_all, settings.n_retain)
    nbs = []
    for k, nb in enumerate(world.neighbours(forget)):
        can = [p for p, _ in world.canonical_prompts(nb)]
        rot = can[(7 * k) % len(can):] + can[: (7 * k) % len(can)]
        nbs += _spread(rot, settings.n_neighbour)
    return {"forget": f, "retain": r, "neighbour": nbs}


def toy_residual(adapter, edit, forget: Sequence[str] | None = None, retain: Sequence[str] | None = None,
                 settings: ResidualSettings | None = None, *, unedited_cache: dict | None = None) -> dict:
    """The diagnostic of ``edit`` (any kind; None = unedited, a zero reference) on the toy model, per forget
    concept. ``unedited_cache``: a dict reused across calls for the unedited recordings (same prompts and
    settings give the same rows)."""
    from ..toy import world
    from .toy_bench import default_retain

    s = settings or ResidualSettings()
    s.validate()
    check_fresh_seeds(edit, s.seeds)
    forget = list(forget or (edit.concepts.get("forget", []) if edit is not None else []))
    if not forget:
        raise UsageError("no forget concept to measure")
    for c in forget:
        world.category_of(c)  # KeyError -> caller turns it into a usage error
    if retain is None:
        retain = (edit.concepts.get("retain") if edit is not None else None) or default_retain(forget)
    retain = list(retain)
    layers = adapter.cross_attention_layers()
    cache = {} if unedited_cache is None else unedited_cache
    sets = {c: toy_prompt_sets(c, [r for r in retain if world.category_of(r) == world.category_of(c)]
                               or default_retain([c]), s) for c in forget}

    def run_all():
        out = {}
        for c, ps in sets.items():
            for g, prompts in ps.items():
                out[(c, g)] = record_trajectories(adapter, prompts, s.seeds, steps=s.steps, guidance=s.guidance,
                                                  batch_size=s.batch_size, x0=(g == "forget"))
        return out

    key = (tuple(forget), tuple(retain), repr(s.to_json()))
    if key not in cache:
        cache[key] = run_all()
    before = cache[key]
    if edit is None:
        after = before
    else:
        edit.apply(adapter, check=False)
        try:
            after = run_all()
        finally:
            edit.revert(adapter)
    concepts = {}
    for c in forget:
        b = {g: before[(c, g)] for g in ("forget", "retain", "neighbour")}
        a = {g: after[(c, g)] for g in ("forget", "retain", "neighbour")}
        concepts[c] = residual_for_concept(b, a, layers, s, concept=c, category=world.category_of(c))
        concepts[c]["prompts"] = sets[c]
    return {"method": edit.method if edit is not None else "none", "forget": forget, "retain": retain,
            "settings": s.to_json(), "concepts": concepts,
            "rounds": (edit.stats.get("rounds") if edit is not None else None)}


# ---- presentation ------------------------------------------------------------------------------------------
def short_layer(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2' -> 'down1.0'."""
    p = name.split(".")
    if p[0] == "mid_block":
        return f"mid.{p[2]}"
    return f"{p[0].split('_')[0]}{p[1]}.{p[3]}"


def text_table(result: dict) -> str:
    """Per concept: a layers x steps table of the forget residual (%), then per-step totals, retain
    movement and the x0 decision curve."""
    lines = []
    for c, r in result["concepts"].items():
        S = len(r["residual_step"])
        lines.append(f"{result['method']} / {c}: forget residual {r['residual_total']:.3f}, "
                     f"retain movement {r['retain_move_total']:.3f} (evaluation seeds {result['settings']['seeds']})")
        lines.append("layer        width " + " ".join(f"s{s:<4d}" for s in range(S)) + "  all")
        for li, name in enumerate(r["layers"]):
            vals = " ".join(f"{100 * v:5.0f}" for v in r["residual"][li])
            lines.append(f"{short_layer(name):<12} {r['widths'][li]:5d} {vals} {100 * r['residual_layer'][li]:5.0f}")
        lines.append("residual %       " + " ".join(f"{100 * v:5.0f}" for v in r["residual_step"]))
        lines.append("retain move %    " + " ".join(f"{100 * v:5.1f}" for v in r["retain_move_step"]))
        if "x0" in r:
            x = r["x0"]
            lines.append("x0 rate before   " + " ".join(f"{v:5.2f}" for v in x["rate_unedited"]))
            lines.append("x0 rate after    " + " ".join(f"{v:5.2f}" for v in x["rate_edited"]))
            lines.append("decided by (bef) " + " ".join(f"{v:5.2f}" for v in x["decided_by_unedited"]))
            lines.append("decided by (aft) " + " ".join(f"{v:5.2f}" for v in x["decided_by_edited"]))
        lines.append("")
    return "\n".join(lines)


def residual_plot(results: Sequence[dict], path: str) -> str:
    """One row per result (method): a layer x step heatmap of the forget residual per concept, and the
    x0 concept rate per step (dashed: unedited)."""
    from .report import _plt, _save_fig

    plt = _plt()
    concepts = list(results[0]["concepts"])
    fig, axes = plt.subplots(len(results), len(concepts) + 1, figsize=(2.4 * (len(concepts) + 1), 2.2 * len(results)),
                             squeeze=False)
    for i, res in enumerate(results):
        for j, c in enumerate(concepts):
            ax = axes[i][j]
            r = res["concepts"][c]
            im = ax.imshow(np.asarray(r["residual"]), vmin=0, vmax=1.2, cmap="magma", aspect="auto")
            ax.set_title(f"{res.get('label', res['method'])}: {c} ({r['residual_total']:.2f})", fontsize=7)
            ax.set_yticks(range(len(r["layers"])))
            ax.set_yticklabels([short_layer(n) for n in r["layers"]], fontsize=5)
            ax.tick_params(axis="x", labelsize=5)
            if i == len(results) - 1:
                ax.set_xlabel("denoising step", fontsize=6)
        ax = axes[i][-1]
        for c in concepts:
            x = res["concepts"][c].get("x0")
            if x:
                line, = ax.plot(x["rate_edited"], label=c, lw=1)
                ax.plot(x["rate_unedited"], ls="--", lw=0.7, color=line.get_color())
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("x0 concept rate per step", fontsize=7)
        ax.tick_params(labelsize=5)
        if i == 0:
            ax.legend(fontsize=5)
    fig.subplots_adjust(right=0.88, hspace=0.45, wspace=0.45)
    fig.colorbar(im, cax=fig.add_axes([0.91, 0.35, 0.015, 0.3]), label="forget residual")
    return _save_fig(fig, path)
