"""The ``pure-fast`` command line (also ``python -m pure_fast``).

User errors print one line on stderr and exit 2 (usage) or 1 (runtime); ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import api, distributed
from .adapters.loading import is_toy_spec
from .errors import PureFastError, UsageError, one_line
from .fileio import _CREATED_DIRS, make_parents
from .methods import EraseContext, get_method, method_names
from .options import option_specs


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _add_model(p, required=False):
    p.add_argument("--model", default=None, required=required,
                   help="diffusers folder, .safetensors file (with --config), or 'toy' (default: the toy model)")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file model")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as stored / float32)")


def _add_common(p):
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="let diffusers / transformers print their own warnings and loading bars (silenced otherwise)")


def _seed(text: str) -> int:
    """argparse type of --seed: a non-negative integer (seeds name output files and torch generators)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}; use a non-negative integer") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"seed {v} is out of range; use an integer in [0, 2**63)")
    return v


def edit_out_path(path: str, flag: str = "--out") -> str:
    """An edit / LoRA file to write: must end in .safetensors (every reader refuses other suffixes as pickles)."""
    out = os.path.abspath(path)
    if os.path.isdir(out):
        raise UsageError(f"{flag} {path} is a folder; give a file name ending in .safetensors")
    if not out.lower().endswith(".safetensors"):
        raise UsageError(f"{flag} {path} must end in .safetensors (other suffixes are read back as pickles and refused)")
    return make_parents(out, flag)


def _remove_created_dirs() -> None:
    while _CREATED_DIRS:
        d = _CREATED_DIRS.pop()
        try:
            os.rmdir(d)
        except OSError:
            pass


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="pure-fast", description="Closed-form concept erasure for diffusion models")
    ap.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("erase", help="compute an erasure edit file")
    _add_model(p)
    p.add_argument("--forget", action="append", default=[], metavar="TEXT", help="concept to erase (repeatable)")
    p.add_argument("--retain", action="append", default=[], metavar="TEXT", help="concept to keep (repeatable)")
    p.add_argument("--category", default=None,
                   help="style, object, ip, celebrity, nsfw, or the toy world's shape, colour, background (default: "
                   "on the toy model, the category of the toy concepts given; otherwise object)")
    p.add_argument("--templates", default=None, metavar="FILE", help="custom anchor templates (one per line, '{}' slot)")
    p.add_argument("--out", required=True, metavar="EDIT.safetensors")
    _add_method_options(p)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="any method option")
    _add_common(p)

    p = sub.add_parser("apply", help="write a model with edits applied (a new folder / file, or in place)")
    _add_model(p, required=True)
    p.add_argument("--edit", action="append", required=True, metavar="EDIT", help="edit file (repeatable: a stack)")
    p.add_argument("--out", default=None, metavar="DIR|FILE",
                   help="new folder (--format folder) or .safetensors file (--format single-file)")
    p.add_argument("--format", default="folder", choices=("folder", "single-file"),
                   help="folder: a copy of the model folder; single-file: one LDM/SGM checkpoint")
    p.add_argument("--in-place", action="store_true",
                   help="rewrite the UNet weights of the --model folder itself (a revert file is written first)")
    p.add_argument("--revert-file", default=None, metavar="FILE",
                   help="with --in-place: where to write the revert file (default: beside the weight file)")
    p.add_argument("--force", action="store_true", help="apply even if the edit was made for other weights")
    _add_common(p)

    p = sub.add_parser("generate", help="images, optionally before/after an edit")
    _add_model(p)
    p.add_argument("--edit", action="append", default=[], metavar="EDIT",
                   help="edit file to render with (repeatable: applied in order); images are written without and "
                   "with the edits, side by side (original/, edited/); the edits are checked against the model first")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="prompt to render (repeatable)")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="more prompts, one per line")
    p.add_argument("--seed", type=_seed, action="append", default=None,
                   help="initial-noise seed, a non-negative integer (repeatable; default 0); one image per prompt and seed")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (default: the model's own, UNet sample_size x VAE scale factor)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4, help="images per UNet call (lower it to save memory; default 4)")
    p.add_argument("--out-dir", required=True, metavar="DIR",
                   help="new (or empty) folder for the PNGs, grid.png and prompts.json; missing parents are created")
    p.add_argument("--force", action="store_true", help="apply the edits even if they were made for other weights")
    _add_common(p)

    p = sub.add_parser("inspect", help="show what an edit file holds")
    p.add_argument("edit", metavar="EDIT")
    p.add_argument("--residual", action="store_true",
                   help="toy edits: measure where the forget concept survives (per layer and denoising step) "
                        "on held-out prompts and fresh seeds")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="with --residual: write residual.json, residual.md and residual.png here")
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="with --residual: evaluation seed (repeatable; default 7001 7002)")
    p.add_argument("--steps", type=int, default=None, help="with --residual: DDIM steps (default 10)")
    _add_common(p)

    p = sub.add_parser("demo", help="the whole flow on the toy model (or a tiny random pipeline)")
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--tiny", action="store_true", help="use a tiny random pipeline instead of the toy model")
    _add_common(p)

    from .cli_more import add_more_commands

    add_more_commands(sub, _add_model, _add_common)
    return ap


OPTION_DEST = "method_option_"  # argparse dest prefix of the flags generated from the methods' options


def _add_method_options(p) -> None:
    """``--method`` and one flag per option of every registered method, from the options' field metadata
    (``options.option``). An option several methods share (``--forget-threshold``) is one flag; its help
    names each method's default. Unset flags stay None, so the method's defaults and category presets apply."""
    names = method_names()
    p.add_argument("--method", default="pure", choices=names, help="erasure method (default: pure): " + "; ".join(
        get_method(n).description.replace("%", "%%") for n in names))
    flags: dict[str, list] = {}
    for name in names:
        for spec in option_specs(get_method(name).options):
            if spec.flag and spec.kind is not None:
                flags.setdefault(spec.flag, []).append((name, spec))
    g = p.add_argument_group("method options", "defaults are the method's (or its --category preset); "
                             "--option KEY=VALUE sets any option, JSON values")
    for flag, uses in flags.items():
        spec = uses[0][1]
        if any((s.kind, s.many, s.path[-1]) != (spec.kind, spec.many, spec.path[-1]) for _, s in uses):
            raise TypeError(f"methods {', '.join(m for m, _ in uses)} declare {flag} with different meanings")
        helps = list(dict.fromkeys(s.help for _, s in uses))
        text = helps[0] if len(helps) == 1 else "; ".join(f"{m}: {s.help}" for m, s in uses)
        text += " [" + ", ".join(f"{m}: {s.default!r}" for m, s in uses) + "]"
        kw = {"dest": OPTION_DEST + spec.name, "default": None, "help": text.replace("%", "%%")}
        if spec.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = spec.kind
            kw["metavar"] = spec.name.upper()
            if spec.many:
                kw["action"] = "append"
            if spec.choices and all(s.choices == spec.choices for _, s in uses):
                kw["choices"] = spec.choices
                kw.pop("metavar")
        g.add_argument(flag, **kw)


def _method_option_values(args) -> dict:
    """The options set on the command line: ``--option KEY=VALUE`` items, then the generated flags."""
    values = _parse_option_values(args.option)
    for dest, v in vars(args).items():
        if dest.startswith(OPTION_DEST) and v is not None:
            values[dest[len(OPTION_DEST):]] = tuple(v) if isinstance(v, list) else v
    return values


_COMMAND_START = time.perf_counter()  # reset by main(): the whole command's clock


def command_seconds() -> float:
    """Seconds since the command started (main() entered; imports and model loading included)."""
    return time.perf_counter() - _COMMAND_START


def _emit(args, summary: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(text)


def _parse_option_values(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--option {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def cmd_erase(args) -> int:
    if not args.forget:
        raise UsageError("no --forget concept given; pass at least one --forget TEXT")
    # every check of the input (concepts, category / templates, options) before the (slow) model load; on the
    # toy model a missing --category is the toy concepts' own
    ctx = EraseContext.prepare(args.method, args.forget, args.retain, category=args.category,
                               templates=args.templates, values=_method_option_values(args),
                               toy=is_toy_spec(args.model))
    # under torchrun only rank 0 writes (other nodes may not have the folder)
    out = edit_out_path(args.out) if distributed.is_writer() else os.path.abspath(args.out)
    t0 = time.perf_counter()
    # only the parts the method reads (UCE, CURE, SPACE: text encoders + K/V weights, never the UNet or VAE)
    with distributed.stage("load"):  # a failure on any rank stops every rank here, before the work
        model = api.load_for(args.method, args.model, config=args.config, device=args.device, dtype=args.dtype)
    t1 = time.perf_counter()
    with distributed.stage("erase"):  # every rank builds the edit; nothing is written unless all succeeded
        edit = api.run_erase(ctx, model, progress=not (args.quiet or args.json))
    if not distributed.is_writer():
        return 0
    t2 = time.perf_counter()
    edit.save(out)
    timings = {"load_s": t1 - t0, **edit.stats.get("timings", {}), "save_s": time.perf_counter() - t2}
    elapsed = command_seconds()
    timings["command_s"] = elapsed
    info = edit.inspect()
    summary = {"edit": out, "method": edit.method, "family": edit.family, "category": ctx.category,
               "concepts": edit.concepts, "timings": timings, "file_bytes": os.path.getsize(out),
               "changed_weights": info["changed_weights"], "elapsed_s": elapsed}
    _emit(args, summary, f"wrote {out} ({edit.method}, {info['changed_weights']} weights, "
          f"{os.path.getsize(out) / 1024:.1f} KiB) in {elapsed:.1f} s (load {t1 - t0:.1f} s, "
          f"erase {t2 - t1:.1f} s; --json for every stage)")
    return 0


def _load_edits(paths):
    from .edits.io import load_edit

    return [load_edit(p) for p in paths]


def cmd_apply(args) -> int:
    """Bake a stack of edits into a model: a new folder, one single-file checkpoint, or --in-place."""
    from .edits.edit import kv_weights, revert_all
    from .export.checkpoint import (
        _inside,
        apply_in_place,
        check_new_output,
        load_model_any,
        model_folder,
        write_edited_folder,
        write_single_file,
    )

    folder = model_folder(args.model)
    if args.in_place:
        if args.out:
            raise UsageError("--in-place rewrites the --model folder; do not also pass --out")
        if args.format != "folder":
            raise UsageError("--in-place rewrites the model's own weight files; for --format single-file pass --out FILE")
        if args.model in (None, "toy"):
            raise UsageError("--in-place on the shipped toy model is refused (package data); write a copy with --out DIR")
        if folder is None:
            raise UsageError(f"--in-place needs a model folder (diffusers or toy weights); {args.model} is a single file")
    else:
        if args.revert_file:
            raise UsageError("--revert-file only goes with --in-place")
        if not args.out:
            raise UsageError("pass --out (a new folder, or a .safetensors file with --format single-file), "
                             "or --in-place to rewrite the --model folder")
        out = check_new_output(args.out)
        if folder is not None and _inside(out, folder):
            raise UsageError("--out must not be inside the input model folder (use --in-place to edit it)")
        if args.format == "single-file":
            from .export.checkpoint import is_toy_folder

            if args.model in (None, "toy") or is_toy_folder(args.model):
                raise UsageError("the toy model has no single-file (LDM) layout; use --format folder")
            if os.path.exists(out):
                raise UsageError(f"--out {args.out} already exists; choose a new file")
            if not out.endswith(".safetensors"):
                raise UsageError(f"--out {args.out} must end in .safetensors for --format single-file")
    edits = _load_edits(args.edit)
    patches = [e for e in edits if not e.target_weights()]
    if patches:
        raise UsageError(f"edit {args.edit[edits.index(patches[0])]} ({patches[0].method}) changes no weights (an "
                         "activation patch); it cannot be baked into a checkpoint: use it with pure-fast generate --edit")
    if not args.in_place:
        make_parents(out)
    model = load_model_any(args.model, config=args.config, device=args.device, dtype=args.dtype)
    try:
        for e in edits:
            e.apply(model, force=args.force)
        weights = kv_weights(model.unet)
        changed = sorted({n for e in edits for n in e.target_weights()})
        new = {n: weights[n].detach().cpu().clone() for n in changed}
        extra = {}
        if args.in_place:
            rep = apply_in_place(folder, new, edits, revert_file=args.revert_file)
            out, extra = rep["model"], {"revert_file": rep["revert_file"]}
        elif args.format == "single-file":
            out = write_single_file(model, out, metadata={"pure_fast.edits": [e.edit_id for e in edits]})
        elif folder is not None:
            out = write_edited_folder(folder, out, new)
        else:
            from .fileio import atomic_dir

            if os.path.exists(out):
                os.rmdir(out)
            with atomic_dir(out) as tmp:
                model.pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        revert_all(model)
    summary = {"out": out, "format": "in-place" if args.in_place else args.format,
               "edits": [e.edit_id for e in edits], "changed_weights": len(changed), **extra}
    text = f"wrote {out} with {len(edits)} edit(s) applied ({len(changed)} weights changed)"
    if extra:
        text += f"; revert with: pure-fast revert --model {out} --revert-file {extra['revert_file']}"
    _emit(args, summary, text)
    return 0


def _read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"--prompts-file {args.prompts_file} does not exist")
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UsageError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    return prompts


def _check_edits_fit(model, edits, paths, force: bool) -> None:
    """Apply every edit (family, layer names and shapes, fingerprint of the chain) and revert them all: the
    same checks ``apply`` makes, done before any image is rendered."""
    from .edits.edit import revert_all
    from .errors import EditFileError

    for path, e in zip(paths, edits):
        if e.family != model.family and not force:
            raise EditFileError(f"edit {path} was made for a {e.family} model; --model is a {model.family} model")
    try:
        for e in edits:
            e.apply(model, force=force)
    finally:
        revert_all(model)


def _warn_truncated(model, prompts) -> None:
    import warnings

    limit = getattr(model, "max_prompt_tokens", None)
    if limit is None:
        return
    for i, p in enumerate(prompts):
        n = model.prompt_tokens(p)
        if n > limit:
            warnings.warn(f"prompt {i} is {n} tokens long and will be cut to the model's {limit} "
                          f"(its end is ignored): {p[:60]!r}...", stacklevel=2)


def cmd_generate(args) -> int:
    from .adapters import load_model
    from .edits.edit import revert_all
    from .fileio import atomic_dir
    from .images import grid

    prompts = _read_prompts(args)
    seeds = args.seed or [0]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seed {sorted(s for s in seeds if seeds.count(s) > 1)[0]} is given twice")
    if args.steps < 1 or args.steps > 1000:
        raise UsageError(f"--steps {args.steps} is out of range; use 1..1000")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
    edits = _load_edits(args.edit)
    out = os.path.abspath(args.out_dir)
    if distributed.is_writer() and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out-dir {args.out_dir} exists and is not empty; choose a new folder")
    if distributed.is_writer():
        make_parents(out, "--out-dir")
    with distributed.stage("load"):
        model = load_model(args.model, config=args.config, device=args.device, dtype=args.dtype)
    if edits:
        _check_edits_fit(model, edits, args.edit, args.force)  # before any rendering
    _warn_truncated(model, prompts)
    kw = dict(steps=args.steps, size=args.size, guidance_scale=args.guidance, batch_size=args.batch_size,
              progress=not (args.quiet or args.json))
    sets = {}
    if edits:
        sets["original"] = model.generate(prompts, seeds, desc="generate original", **kw)
        for e in edits:
            e.apply(model, force=args.force)
        try:
            sets["edited"] = model.generate(prompts, seeds, desc="generate edited", **kw)
        finally:
            revert_all(model)
    else:
        sets[""] = model.generate(prompts, seeds, **kw)
    if not distributed.is_writer():  # rank 0 writes every rank's images
        return 0
    if os.path.isdir(out):
        os.rmdir(out)
    with atomic_dir(out) as tmp:
        for sub, images in sets.items():
            folder = os.path.join(tmp, sub) if sub else tmp
            os.makedirs(folder, exist_ok=True)
            for i, row in enumerate(images):
                for s, img in zip(seeds, row):
                    img.save(os.path.join(folder, f"{i:03d}_{s}.png"))
        labels = [f"{i:03d} {p}" for i, p in enumerate(prompts)]
        if edits:
            rows = [sets["original"][i] + sets["edited"][i] for i in range(len(prompts))]
            cols = [f"orig s{s}" for s in seeds] + [f"edit s{s}" for s in seeds]
            g = grid(rows, labels, cols, split_after=len(seeds))
        else:
            g = grid(sets[""], labels, [f"seed {s}" for s in seeds])
        g.save(os.path.join(tmp, "grid.png"))
        with open(os.path.join(tmp, "prompts.json"), "w", encoding="utf-8") as f:
            json.dump({"prompts": prompts, "seeds": seeds, "steps": args.steps, "size": args.size or model.default_size,
                       "guidance": args.guidance, "edits": args.edit, "world_size": distributed.processes()},
                      f, indent=2)
    summary = {"out_dir": out, "images": len(prompts) * len(seeds) * len(sets), "grid": os.path.join(out, "grid.png"),
               "elapsed_s": command_seconds()}
    _emit(args, summary, f"wrote {summary['images']} images and {summary['grid']} in {summary['elapsed_s']:.1f} s")
    return 0


def cmd_inspect(args) -> int:
    from .edits import fingerprint as fp
    from .edits.io import load_edit

    if not args.residual and (args.out_dir or args.seed or args.steps is not None):
        raise UsageError("--out-dir, --seed and --steps belong to --residual; add --residual")
    e = load_edit(args.edit)
    if args.residual:
        from .cli_eval import inspect_residual

        return inspect_residual(args, e)
    info = e.inspect()
    info["file_bytes"] = os.path.getsize(args.edit)
    if getattr(e, "ranks", None):
        info["ranks"] = e.ranks()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    lines = [
        f"edit      {os.path.abspath(args.edit)} ({info['file_bytes'] / 1024:.1f} KiB)",
        f"method    {e.method} ({e.kind}) for {e.family}, pure_fast {e.version}, created {e.created}",
        f"forget    {', '.join(e.concepts.get('forget', [])) or '-'}",
        f"retain    {', '.join(e.concepts.get('retain', [])) or '-'}",
        f"category  {e.options.get('category') or '- (none given: object templates)'}",
        f"changes   {info['changed_weights']} weights in {info['layers']} layers",
    ]
    if "rank_min" in info:
        lines.append(f"ranks     {info['rank_min']}..{info['rank_max']}")
    if info.get("details"):
        lines.append(f"details   {info['details']}")
    run = e.stats.get("distributed") if isinstance(e.stats, dict) else None
    if isinstance(run, dict) and "world_size" in run:
        per_rank = run.get("samples_per_rank")
        lines.append(f"run       {run['world_size']} processes (torch.distributed), " + (
            f"samples per rank: {', '.join(str(n) for n in per_rank)}" if isinstance(per_rank, list)
            else "each computed the whole edit (no trajectory to split)"))
    if e.stats.get("residual"):
        res = " -> ".join(f"{r:.3f}" for r in e.stats["residual"])
        lines.append(f"loop      {e.stats.get('rounds', 1)} round(s); forget-specific residual on the anchors "
                     f"after each: {res}")
    lines.append(f"base      {fp.short(e.base_fingerprint)}")
    lines.append(f"result    {fp.short(e.result_fingerprint)}")
    opts = {k: v for k, v in e.options.items() if k != "collect"}
    lines.append(f"options   {json.dumps(opts, default=str)}")
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    make_parents(args.out_dir, "--out-dir")
    return run_demo(args)


COMMANDS = {"erase": cmd_erase, "apply": cmd_apply, "generate": cmd_generate, "inspect": cmd_inspect,
            "demo": cmd_demo}


def _one_line_warnings() -> None:
    """Warnings (numerical-health notes, ...) print as one ``pure-fast: warning: ...`` line each."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"pure-fast: warning: {str(message).splitlines()[0] if str(message) else category.__name__}",
              file=file or sys.stderr)

    warnings.showwarning = show


def entry() -> None:
    """The ``pure-fast`` program (console script and ``python -m pure_fast``): :func:`main`, then exit.
    A process that ran under torchrun ends through ``distributed.exit_process`` (see there why)."""
    distributed.exit_process(main())


def main(argv=None) -> int:
    global _COMMAND_START
    _COMMAND_START = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        _one_line_warnings()
    verbose_before = os.environ.get("PURE_FAST_VERBOSE")
    if "--verbose" in argv:
        os.environ["PURE_FAST_VERBOSE"] = "1"
    else:
        from .progress import quiet_third_party

        quiet_third_party()  # before diffusers / transformers are imported: their env switches apply
    command = "pure-fast"
    _CREATED_DIRS.clear()
    rc = 1
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            rc = 2
            return rc
        command = f"pure-fast {args.command}"
        if getattr(args, "quiet", False) or getattr(args, "json", False):
            os.environ["PURE_FAST_PROGRESS"] = "0"
        from .cli_more import MORE_COMMANDS

        handler = COMMANDS.get(args.command) or MORE_COMMANDS[args.command]
        with distributed.cli_session(args.command, args):  # torchrun / accelerate launch: one job, N processes
            rc = handler(args)
        return rc
    except PureFastError as exc:
        if debug:
            raise
        print(f"pure-fast: error: {distributed.rank_prefix()}{exc}", file=sys.stderr)
        rc = exc.exit_code
        return rc
    except KeyboardInterrupt as exc:
        why = "stopped by the launcher (SIGTERM)" if isinstance(exc, distributed.Terminated) else "interrupted"
        print(f"pure-fast: {distributed.rank_prefix()}{why} (no partial output was kept)", file=sys.stderr)
        rc = 130
        return rc
    except ModuleNotFoundError as exc:
        from .deps import missing_message

        msg = missing_message(exc.name or "", command)
        if debug:
            raise
        print(f"pure-fast: error: {msg or f'unexpected ModuleNotFoundError: {exc} (rerun with --debug for details)'}",
              file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort (out of memory, the unexpected): still one line
        if debug:
            raise
        rc, line = one_line(exc)
        print(f"pure-fast: error: {distributed.rank_prefix()}{line}", file=sys.stderr)
        return rc
    finally:
        if rc != 0:
            _remove_created_dirs()
        _CREATED_DIRS.clear()
        if verbose_before is None:
            os.environ.pop("PURE_FAST_VERBOSE", None)
        else:
            os.environ["PURE_FAST_VERBOSE"] = verbose_before
