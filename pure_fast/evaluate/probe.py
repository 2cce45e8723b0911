"""The linear probe of Fig. 2 of "Concept Unlearning via Cross-Attention Activation Projection for Diffusion
Models" (arXiv:2605.25765) on the toy model: text-embedding basis vs activation basis.

Question: does a basis built from short *anchor* prompts capture a concept well enough that a linear
classifier trained on anchors recognises the concept in *held-out paraphrases* (held-out templates and
surface forms, never used for training)?

For every toy concept ``c`` (category ``K``), a binary task: positives = ``world.anchor_prompts(c)``,
negatives = the anchor prompts of the other members of ``K``. Two feature spaces per prompt:

- text (a): the MiniLM token states that feed ``to_k``/``to_v`` (``adapter.encode_tokens``), mean-pooled
  over the real tokens ([CLS] .. [SEP]), 384-d;
- activation (b): the pooled cross-attention outputs PURE collects (``collect/activations.py``:
  ``mean_N softmax(QK^T/sqrt d) V`` before ``to_out``, conditional branch), averaged over the recorded
  steps and seeds, per layer, and the layers concatenated (each layer's block scaled to unit mean norm
  so wide layers do not dominate). Trajectory: PURE's default ``CollectOptions`` except ``seeds``.

The basis: the training features are standardised (training mean / std per dimension), and their SVD
is cut at ``basis_threshold`` cumulative variance; training and test features are expressed in that
basis (coordinates). The classifier: L2-regularised logistic regression (``l2`` on the weights, class-
balanced loss, L-BFGS, torch, float64), decision threshold 0.5. Measured on held-out prompts:
``recall`` = fraction of ``world.heldout_prompts(c)`` classified positive, ``specificity`` = fraction of
the neighbours' held-out prompts classified negative, ``balanced accuracy`` = their mean.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..collect.activations import CollectOptions, collect_activations
from ..progress import progress_bar
from ..toy import world
from .report import _plt, _save_fig, write_json, write_text
from .toy_bench import provenance


@dataclass
class ProbeSettings:
    seeds: tuple[int, ...] = (0,)
    l2: float = 1e-2
    basis_threshold: float = 0.99
    concepts: tuple[str, ...] | None = None  # None: every toy concept

    @classmethod
    def quick(cls) -> "ProbeSettings":
        return cls(concepts=("circle", "star", "red", "blue", "stripes", "dots"))


# ---- features ------------------------------------------------------------------------------------------
@torch.no_grad()
def text_features(adapter, prompts: list[str], batch: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        te = adapter.encode_tokens(prompts[i : i + batch])
        m = te.mask.to(te.embeds.dtype).unsqueeze(-1)
        out.append(((te.embeds * m).sum(1) / m.sum(1).clamp(min=1)).double().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def activation_features(adapter, prompts: list[str], seeds=(0,), progress: bool = False) -> np.ndarray:
    opts = replace(CollectOptions(), seeds=tuple(seeds), max_rows=10**9)
    acts = collect_activations(adapter, {str(i): [p] for i, p in enumerate(prompts)}, opts, progress=progress)
    blocks = []
    for li in range(len(acts.layers)):
        x = np.stack([acts.stats[str(i)][li].matrix().double().mean(0).cpu().numpy() for i in range(len(prompts))])
        blocks.append(x)
    scale = [np.linalg.norm(b, axis=1).mean() for b in blocks]
    return np.concatenate([b / max(s, 1e-12) for b, s in zip(blocks, scale)], axis=1)


# ---- the probe --------------------------------------------------------------------------------------------
def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, basis_threshold: float = 0.99):
    """Returns predict(x_new) -> probabilities. See the module docstring."""
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 1e-8 * max(sd.max(), 1e-30), sd, 1.0)
    z = (x - mu) / sd
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    energy = np.cumsum(s**2) / max((s**2).sum(), 1e-30)
    k = int(np.searchsorted(energy, basis_threshold) + 1)
    basis = vt[:k].T  # [d, k]
    c = torch.from_numpy(z @ basis)
    yt = torch.from_numpy(y.astype(np.float64))
    pos = max(float(yt.sum()), 1.0)
    neg = max(float(len(yt) - yt.sum()), 1.0)
    wts = torch.where(yt > 0, len(yt) / (2 * pos), len(yt) / (2 * neg))
    w = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = c @ w + b
        loss = (wts * torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")).mean()
        loss = loss + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    w_, b_ = w.detach().numpy(), float(b.detach())

    def predict(xn: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(((xn - mu) / sd) @ basis @ w_ + b_)))

    predict.rank = k
    return predict


def run_probe(adapter, *, quick: bool = False, settings: ProbeSettings | None = None, progress: bool = True,
              command: str | None = None) -> dict:
    s = settings or (ProbeSettings.quick() if quick else ProbeSettings())
    t0 = time.perf_counter()
    concepts = list(s.concepts or world.all_concepts())
    cats = list(dict.fromkeys(world.category_of(c) for c in concepts))
    members = {cat: world.CATEGORIES[cat] for cat in cats}
    sets = {c: {"anchor": world.anchor_prompts(c), "heldout": world.heldout_prompts(c)}
            for cat in cats for c in members[cat]}
    prompts = list(dict.fromkeys(p for v in sets.values() for ps in v.values() for p in ps))
    idx = {p: i for i, p in enumerate(prompts)}
    feats = {"text": text_features(adapter, prompts),
             "activation": activation_features(adapter, prompts, s.seeds, progress=progress)}
    per = {}
    with progress_bar(total=len(concepts), desc="probe", enabled=progress) as bar:
        for c in concepts:
            cat = world.category_of(c)
            nbs = [n for n in members[cat] if n != c]
            tr_p = sets[c]["anchor"]
            tr_n = [p for n in nbs for p in sets[n]["anchor"] if p not in set(tr_p)]
            te_p = sets[c]["heldout"]
            te_n = [p for n in nbs for p in sets[n]["heldout"] if p not in set(te_p)]
            y = np.array([1] * len(tr_p) + [0] * len(tr_n))
            res = {"category": cat, "n_train": [len(tr_p), len(tr_n)], "n_test": [len(te_p), len(te_n)]}
            for name, f in feats.items():
                pred = fit_probe(f[[idx[p] for p in tr_p + tr_n]], y, s.l2, s.basis_threshold)
                rp = pred(f[[idx[p] for p in te_p]]) >= 0.5
                rn = pred(f[[idx[p] for p in te_n]]) < 0.5
                tr = pred(f[[idx[p] for p in tr_p + tr_n]]) >= 0.5
                res[name] = {"recall": float(rp.mean()), "specificity": float(rn.mean()),
                             "balanced_accuracy": float((rp.mean() + rn.mean()) / 2),
                             "train_accuracy": float((tr == (y == 1)).mean()), "basis_rank": int(pred.rank)}
            per[c] = res
            bar.update(1)
    summary = {}
    for group in cats + ["all"]:
        cs = [c for c in concepts if group == "all" or world.category_of(c) == group]
        summary[group] = {name: {m: float(np.mean([per[c][name][m] for c in cs]))
                                 for m in ("recall", "specificity", "balanced_accuracy")} for name in feats}
    return {"probe": "PURE paper (arXiv:2605.25765) Fig. 2 on the toy model (pure_fast.evaluate.probe)",
            "settings": {"seeds": list(s.seeds), "l2": s.l2, "basis_threshold": s.basis_threshold,
                         "concepts": concepts},
            "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()}, "n_prompts": len(prompts),
            "concepts": per, "summary": summary, "seconds": round(time.perf_counter() - t0, 1),
            "provenance": provenance(command)}


def markdown(res: dict) -> str:
    prov = res["provenance"]
    lines = ["# Linear probe: text-embedding basis vs cross-attention activation basis (toy model)", "",
             f"Command: `{prov.get('command')}`; date {prov['date']}; commit `{prov.get('commit')}`; "
             f"{res['seconds']:.0f} s; {res['n_prompts']} prompts; feature dims {res['feature_dims']}.", "",
             "Trained on anchor prompts (concept vs its category's other members), tested on held-out "
             "paraphrases (held-out templates and surface forms). `pure_fast/evaluate/probe.py` documents "
             "the features, basis and classifier.", "",
             "| category | recall (text) | recall (activation) | specificity (text) | specificity (activation) | "
             "balanced acc. (text) | balanced acc. (activation) |", "|---|---|---|---|---|---|---|"]
    for g, v in res["summary"].items():
        t, a = v["text"], v["activation"]
        lines.append(f"| {g} | {t['recall']:.3f} | {a['recall']:.3f} | {t['specificity']:.3f} | "
                     f"{a['specificity']:.3f} | {t['balanced_accuracy']:.3f} | {a['balanced_accuracy']:.3f} |")
    lines += ["", "## Per concept", "", "| concept | recall text | recall act. | spec. text | spec. act. | "
              "basis rank text / act. |", "|---|---|---|---|---|---|"]
    for c, r in res["concepts"].items():
        lines.append(f"| {c} | {r['text']['recall']:.2f} | {r['activation']['recall']:.2f} | "
                     f"{r['text']['specificity']:.2f} | {r['activation']['specificity']:.2f} | "
                     f"{r['text']['basis_rank']} / {r['activation']['basis_rank']} |")
    return "\n".join(lines) + "\n"


def chart(res: dict, path: str) -> str:
    plt = _plt()
    groups = list(res["summary"])
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 2, 3.0))
    x = np.arange(len(groups))
    for k, name in enumerate(("text", "activation")):
        ax.bar(x + (k - 0.5) * 0.38, [res["summary"][g][name]["recall"] for g in groups], 0.38,
               label=f"{name} basis")
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall on held-out paraphrases")
    ax.legend(fontsize=8)
    ax.set_title("binary probing recall (toy model; cf. arXiv:2605.25765 Fig. 2)", fontsize=9)
    return _save_fig(fig, path)


def write_probe(res: dict, out_dir: str, stem: str = "probe") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    return {"json": write_json(os.path.join(out_dir, f"{stem}.json"), res),
            "md": write_text(os.path.join(out_dir, f"{stem}.md"), markdown(res)),
            "png": chart(res, os.path.join(out_dir, f"{stem}.png"))}
