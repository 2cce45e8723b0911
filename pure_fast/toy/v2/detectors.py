"""Concept detectors for toy world v2, independent of the diffusion model.

- colour: by hue, no learning (v1's rule, ``toy.detectors.colour_probs``, with v2's ten hue centres).
- object (glyph or shape, or "none": a background without an object) and background: a small CNN trained
  on 32x32 renders (``python -m pure_fast.toy.v2.detectors --train``), weights shipped in
  ``pure_fast/toy/v2/weights/detector.safetensors`` (+ ``detector.json`` with the held-out accuracy per
  category and per concept).

``detect(images)`` takes uint8 [B, H, W, 3] (resized to 32 when H != 32) and returns v1's structure over
v2's categories: {"glyph": [labels], "shape": [...], "colour": [...], "background": [...],
"probs": {category: float array [B, K]}}. An image's glyph label is its detected object when that is a
glyph and "none" otherwise (likewise shape), so "rate of glyph Q" counts images that show a Q.
``features(images)`` returns the CNN's penultimate features [B, 128] (for image-distance metrics).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import detectors as _v1
from . import world

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CNN_SIZE = world.SIZE
OBJECT_CLASSES = world.OBJECTS + ["none"]
NO_OBJECT_FRACTION = 0.05  # share of training renders without an object
HELDOUT_SEED = 12345
TRAIN_SEED = 7


class ObjectBackgroundNet(nn.Module):
    """conv 24 @32 -> pool -> 2x conv 48 @16 -> pool -> 2x conv 96 @8 -> pool -> 128 features -> heads."""

    def __init__(self, width: int = 24, feat: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w * (CNN_SIZE // 8) ** 2, feat), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({"object": nn.Linear(feat, len(OBJECT_CLASSES)),
                                    "background": nn.Linear(feat, len(world.CATEGORIES["background"]))})

    def forward(self, x):
        f = self.body(x)
        return f, {c: h(f) for c, h in self.heads.items()}


@functools.lru_cache(maxsize=2)
def load_cnn(path: str | None = None) -> ObjectBackgroundNet:
    from safetensors.torch import load_file

    from ...errors import ModelLoadError

    p = Path(path) if path else WEIGHTS_DIR / "detector.safetensors"
    if not p.exists():
        raise ModelLoadError(f"v2 detector weights not found at {p}; train them with "
                             "`python -m pure_fast.toy.v2.detectors --train`")
    net = ObjectBackgroundNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return net.eval().requires_grad_(False)


@torch.no_grad()
def _cnn(images: np.ndarray, net=None, batch: int = 512):
    net = net or load_cnn()
    feats, logits = [], {"object": [], "background": []}
    for i in range(0, len(images), batch):
        f, lg = net(_v1._to_input(images[i : i + batch], CNN_SIZE))
        feats.append(f)
        for c in logits:
            logits[c].append(lg[c])
    return torch.cat(feats), {c: torch.cat(v) for c, v in logits.items()}


def detect(images, net=None) -> dict:
    """Labels per category and probabilities for uint8 images [B, H, W, 3] (or a list of PIL images)."""
    images = _v1._as_array(images)
    _, logits = _cnn(images, net)
    p_obj = torch.softmax(logits["object"], -1).numpy()
    best = [OBJECT_CLASSES[int(i)] for i in p_obj.argmax(-1)]
    out: dict = {"probs": {"object": p_obj}, "object": best}
    for cat in world.OBJECT_CATEGORIES:
        cols = [OBJECT_CLASSES.index(c) for c in world.CATEGORIES[cat]]
        out[cat] = [b if b in world.CATEGORIES[cat] else "none" for b in best]
        out["probs"][cat] = p_obj[:, cols]
    p_bg = torch.softmax(logits["background"], -1).numpy()
    out["background"] = [world.CATEGORIES["background"][int(i)] for i in p_bg.argmax(-1)]
    out["probs"]["background"] = p_bg
    out["colour"], out["probs"]["colour"] = _v1.detect_colour(images, world.HUES)
    return out


def features(images, net=None) -> np.ndarray:
    """The CNN's penultimate features [B, 128] (float32)."""
    f, _ = _cnn(_v1._as_array(images), net)
    return f.numpy()


# ---- data ---------------------------------------------------------------------------------------------
def labelled_renders(seed: int, n: int, size: int = CNN_SIZE, no_object: float = NO_OBJECT_FRACTION,
                     chunk: int = 512):
    """``n`` renders (uint8 [n, H, W, 3]) with labels: object index into OBJECT_CLASSES [n], background [n],
    colour names. Objects, colours and backgrounds uniform; a ``no_object`` share shows no object."""
    rng = np.random.default_rng(seed)
    objs, cols, bgs, params = [], [], [], []
    for _ in range(n):
        lab = world.random_labels(rng)
        obj = None if rng.random() < no_object else world.object_of(lab)
        params.append(world.render_params(obj, lab["colour"], lab["background"], rng))
        objs.append(OBJECT_CLASSES.index(obj if obj is not None else "none"))
        cols.append(lab["colour"])
        bgs.append(world.CATEGORIES["background"].index(lab["background"]))
    imgs = np.concatenate([world.to_uint8(world.draw(params[i : i + chunk], size)) for i in range(0, n, chunk)])
    return imgs, torch.tensor(objs), torch.tensor(bgs), cols


def evaluate(n: int = 4000, seed: int = HELDOUT_SEED, net=None) -> dict:
    """Held-out accuracy on ``n`` fresh renders (a seed distinct from training): per category (glyph on
    glyph images, shape on shape images, colour on images with an object, background and the "none" class
    on all) and per concept (its images in its category), plus the worst concept of each category."""
    imgs, obj, bg, cols = labelled_renders(seed, n)
    det = detect(imgs, net)
    truth_obj = [OBJECT_CLASSES[int(i)] for i in obj]
    per: dict[str, list[bool]] = {}
    for k, t in enumerate(truth_obj):
        if t != "none":
            per.setdefault(t, []).append(det["object"][k] == t)
            per.setdefault(cols[k], []).append(det["colour"][k] == cols[k])
        b = world.CATEGORIES["background"][int(bg[k])]
        per.setdefault(b, []).append(det["background"][k] == b)
    none_idx = [k for k, t in enumerate(truth_obj) if t == "none"]
    acc = {c: round(float(np.mean(v)), 4) for c, v in per.items()}
    cat_acc = {cat: round(float(np.mean([x for c in members for x in per.get(c, [])])), 4)
               for cat, members in world.CATEGORIES.items()}
    worst = {cat: min(((acc[c], c) for c in members if c in acc), default=(None, None))
             for cat, members in world.CATEGORIES.items()}
    return {"category_accuracy": cat_acc,
            "worst_concept": {cat: {"concept": w[1], "accuracy": w[0]} for cat, w in worst.items()},
            "none_accuracy": round(float(np.mean([det["object"][k] == "none" for k in none_idx])), 4)
            if none_idx else None,
            "concept_accuracy": acc, "n": n, "seed": seed}


def train(steps: int = 1500, batch: int = 128, n_train: int = 30000, seed: int = TRAIN_SEED, lr: float = 2e-3,
          log=print):
    torch.manual_seed(seed)
    t0 = time.time()
    imgs, y_obj, y_bg, _ = labelled_renders(seed, n_train)
    x_all = _v1._to_input(imgs, CNN_SIZE)
    log(f"rendered {n_train} training images in {time.time() - t0:.0f}s")
    net = ObjectBackgroundNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        _, lg = net(_v1._augment(x_all[idx], g))
        loss = nn.functional.cross_entropy(lg["object"], y_obj[idx]) + nn.functional.cross_entropy(lg["background"], y_bg[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"detector step {step + 1} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    return net, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.v2.detectors")
    p.add_argument("--train", action="store_true", help="train the CNN and write the shipped weights")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n-train", type=int, default=30000)
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=4000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.train:
        from ...fileio import save_safetensors, write_text

        net, secs = train(args.steps, n_train=args.n_train)
        ev = evaluate(args.eval_n, net=net)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.half().contiguous() for k, v in net.state_dict().items()},
                         str(out / "detector.safetensors"))
        info = {"heldout": ev, "train_steps": args.steps, "train_n": args.n_train, "train_seconds": round(secs, 1),
                "train_seed": TRAIN_SEED, "input_size": CNN_SIZE, "no_object_fraction": NO_OBJECT_FRACTION,
                "colour_rule": f"saturation>={_v1.SAT_MIN}, value>={_v1.VAL_MIN}, nearest of the 10 hue centres, "
                               f"weighted by saturation; 'none' under {_v1.MIN_FG_FRACTION:.0%} foreground",
                "command": "python -m pure_fast.toy.v2.detectors " + " ".join(sys.argv[1:] if argv is None else argv)}
        write_text(out / "detector.json", json.dumps(info, indent=1))
        load_cnn.cache_clear()
        print(json.dumps({k: v for k, v in ev.items() if k != "concept_accuracy"}))
    else:
        print(json.dumps(evaluate(args.eval_n)))


if __name__ == "__main__":
    main()
