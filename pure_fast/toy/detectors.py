"""Concept detectors for the toy world, independent of the diffusion model.

- colour: no learning. Foreground = pixels with HSV saturation >= ``SAT_MIN`` (backgrounds are grey);
  a saturation-weighted hue histogram of those pixels is compared with the colour hue centres
  (``world.HUES``): the probability of a colour is its share of foreground weight within its hue cell
  (half-way to the neighbouring centres). Images with too few foreground pixels get "none".
- shape and background: a small CNN trained on renders (``python -m pure_fast.toy.detectors --train``),
  weights shipped in ``pure_fast/toy/weights/detector.safetensors`` (+ ``detector.json``).

``detect(images)`` takes uint8 [B, H, W, 3] (any H=W; resized to 16 for the CNN) and returns
{"shape": [labels], "colour": [...], "background": [...], "probs": {category: float array [B, K]}}.
``features(images)`` returns the CNN's penultimate features [B, 128] (for image-distance metrics).
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelLoadError
from ..fileio import save_safetensors, write_text
from . import world
from .model import WEIGHTS_DIR

SAT_MIN = 0.5
VAL_MIN = 0.25
MIN_FG_FRACTION = 0.03
CNN_SIZE = 16
CNN_CATEGORIES = ("shape", "background")


# ---- colour --------------------------------------------------------------------------------------------
def _hsv(images: np.ndarray):
    x = images.astype(np.float64) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    sat = np.where(mx > 0, d / np.maximum(mx, 1e-8), 0.0)
    dd = np.maximum(d, 1e-8)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60.0
    return h % 360.0, sat, mx


def colour_probs(images: np.ndarray, hues: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probs [B, n_colours], foreground fraction [B]) from hue statistics of saturated pixels.
    ``hues``: colour name -> hue centre in degrees (default: this world's ``world.HUES``)."""
    hues = hues or world.HUES
    names = list(hues)
    centres = np.array([hues[c] for c in names])
    hue, sat, val = _hsv(images)
    fg = (sat >= SAT_MIN) & (val >= VAL_MIN)
    w = np.where(fg, sat, 0.0)  # [B, H, W]
    diff = np.abs(((hue[..., None] - centres) + 180.0) % 360.0 - 180.0)  # [B, H, W, K]
    nearest = diff.argmin(-1)
    onehot = np.eye(len(names))[nearest]  # [B, H, W, K]
    mass = (onehot * w[..., None]).sum((1, 2))
    tot = mass.sum(-1, keepdims=True)
    probs = np.where(tot > 0, mass / np.maximum(tot, 1e-12), 1.0 / len(names))
    return probs, fg.mean((1, 2))


def detect_colour(images: np.ndarray, hues: dict[str, float] | None = None) -> tuple[list[str], np.ndarray]:
    probs, frac = colour_probs(images, hues)
    names = list(hues or world.HUES)
    labels = [names[int(i)] if f >= MIN_FG_FRACTION else "none" for i, f in zip(probs.argmax(-1), frac)]
    return labels, probs


# ---- CNN -----------------------------------------------------------------------------------------------
class ShapeBackgroundNet(nn.Module):
    def __init__(self, width: int = 32, feat: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * w * (CNN_SIZE // 4) ** 2, feat), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({c: nn.Linear(feat, len(world.CATEGORIES[c])) for c in CNN_CATEGORIES})

    def forward(self, x):
        f = self.body(x)
        return f, {c: h(f) for c, h in self.heads.items()}


def _to_input(images: np.ndarray, size: int = CNN_SIZE) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return x


@functools.lru_cache(maxsize=2)
def load_cnn(path: str | None = None) -> ShapeBackgroundNet:
    from safetensors.torch import load_file

    p = Path(path) if path else WEIGHTS_DIR / "detector.safetensors"
    if not p.exists():
        raise ModelLoadError(f"detector weights not found at {p}; train them with `python -m pure_fast.toy.detectors --train`")
    net = ShapeBackgroundNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return net.eval().requires_grad_(False)


@torch.no_grad()
def _cnn(images: np.ndarray, net=None, batch: int = 512):
    net = net or load_cnn()
    feats, logits = [], {c: [] for c in CNN_CATEGORIES}
    for i in range(0, len(images), batch):
        f, lg = net(_to_input(images[i : i + batch]))
        feats.append(f)
        for c in CNN_CATEGORIES:
            logits[c].append(lg[c])
    return torch.cat(feats), {c: torch.cat(v) for c, v in logits.items()}


def _as_array(images) -> np.ndarray:
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8:
        raise TypeError("detect() expects uint8 images [B, H, W, 3] (or a list of PIL images)")
    return images


def detect(images, net=None) -> dict:
    """Labels per category and probabilities for uint8 images [B, H, W, 3] (or a list of PIL images)."""
    images = _as_array(images)
    _, logits = _cnn(images, net)
    out: dict = {"probs": {}}
    for c in CNN_CATEGORIES:
        p = torch.softmax(logits[c], -1).numpy()
        out[c] = [world.CATEGORIES[c][int(i)] for i in p.argmax(-1)]
        out["probs"][c] = p
    out["colour"], out["probs"]["colour"] = detect_colour(images)
    return out


def features(images, net=None) -> np.ndarray:
    """The CNN's penultimate features [B, 128] (float32)."""
    f, _ = _cnn(_as_array(images), net)
    return f.numpy()


# ---- training ------------------------------------------------------------------------------------------
def _labels_idx(labs, cat):
    return torch.tensor([world.CATEGORIES[cat].index(l[cat]) for l in labs])


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Robustness to generated images: noise, mild blur, contrast/brightness jitter."""
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.3
    k = torch.tensor([0.25, 0.5, 0.25])
    k2 = (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    xb = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    x = torch.where(blur, 0.5 * x + 0.5 * xb, x)
    scale = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1)
    shift = 0.1 * (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1)
    x = x * scale + shift
    x = x + torch.randn(x.shape, generator=g) * (0.08 * torch.rand(b, 1, 1, 1, generator=g))
    return x.clamp(-1.2, 1.2)


def evaluate(n: int = 2000, seed: int = 12345, net=None, size: int = 16) -> dict:
    """Accuracy of every detector on ``n`` fresh renders (seed distinct from training)."""
    imgs, _, labs = world.batch(seed, n, size)
    det = detect(imgs, net)
    return {c: round(float(np.mean([d == l[c] for d, l in zip(det[c], labs)])), 4) for c in world.CATEGORIES}


def train(steps: int = 1500, batch: int = 128, n_train: int = 30000, seed: int = 7, lr: float = 2e-3, log=print):
    torch.manual_seed(seed)
    t0 = time.time()
    imgs, _, labs = world.batch(seed, n_train, CNN_SIZE)
    x_all = _to_input(imgs)
    y_all = {c: _labels_idx(labs, c) for c in CNN_CATEGORIES}
    net = ShapeBackgroundNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch,), generator=g)
        x = _augment(x_all[idx], g)
        _, lg = net(x)
        loss = sum(nn.functional.cross_entropy(lg[c], y_all[c][idx]) for c in CNN_CATEGORIES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"detector step {step + 1} loss {loss.item():.4f}")
    net.eval()
    return net, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.detectors")
    p.add_argument("--train", action="store_true", help="train the CNN and write the shipped weights")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-n", type=int, default=3000)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.train:
        net, secs = train(args.steps)
        acc = evaluate(args.eval_n, net=net)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(out / "detector.safetensors"))
        info = {"heldout_accuracy": acc, "heldout_n": args.eval_n, "heldout_seed": 12345, "train_steps": args.steps,
                "train_seconds": round(secs, 1), "train_seed": 7, "input_size": CNN_SIZE,
                "colour_rule": f"saturation>={SAT_MIN}, value>={VAL_MIN}, nearest hue centre, weighted by saturation"}
        write_text(out / "detector.json", json.dumps(info, indent=1))
        load_cnn.cache_clear()
        print(json.dumps(info))
    else:
        print(json.dumps(evaluate(args.eval_n)))


if __name__ == "__main__":
    main()
