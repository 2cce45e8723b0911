"""The ``pure-fast`` command line (also ``python -m pure_fast``).

User errors print one line on stderr and exit 2 (usage) or 1 (runtime); ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import api
from .adapters import load_model
from .errors import PureFastError, UsageError
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="pure-fast", description="Closed-form concept erasure for diffusion models")
    ap.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("erase", help="compute an erasure edit file")
    _add_model(p)
    p.add_argument("--forget", action="append", default=[], metavar="TEXT", help="concept to erase (repeatable)")
    p.add_argument("--retain", action="append", default=[], metavar="TEXT", help="concept to keep (repeatable)")
    p.add_argument("--category", default=None, help="style, object, ip, celebrity, nsfw (or the toy world's categories)")
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
    p.add_argument("--edit", action="append", default=[], metavar="EDIT")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="one prompt per line")
    p.add_argument("--seed", type=int, action="append", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out-dir", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true")
    _add_common(p)

    p = sub.add_parser("inspect", help="show what an edit file holds")
    p.add_argument("edit", metavar="EDIT")
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
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"the folder of --out {args.out} does not exist")
    if os.path.isdir(out):
        raise UsageError(f"--out {args.out} is a folder; give the path of the edit file to write (EDIT.safetensors)")
    # every check of the input (concepts, category / templates, options) before the (slow) model load
    ctx = EraseContext.prepare(args.method, args.forget, args.retain, category=args.category,
                               templates=args.templates, values=_method_option_values(args))
    model = load_model(args.model, config=args.config, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    edit = api.run_erase(ctx, model, progress=not (args.quiet or args.json))
    t1 = time.perf_counter()
    edit.save(out)
    timings = dict(edit.stats.get("timings", {}))
    timings["save_s"] = time.perf_counter() - t1
    info = edit.inspect()
    summary = {"edit": out, "method": edit.method, "family": edit.family, "concepts": edit.concepts,
               "timings": timings, "file_bytes": os.path.getsize(out), "changed_weights": info["changed_weights"],
               "elapsed_s": time.perf_counter() - t0}
    _emit(args, summary, f"wrote {out} ({edit.method}, {info['changed_weights']} weights, "
          f"{os.path.getsize(out) / 1024:.1f} KiB) in {summary['elapsed_s']:.1f} s")
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
            if not os.path.isdir(os.path.dirname(out)):
                raise UsageError(f"the folder of --out {args.out} does not exist")
    edits = _load_edits(args.edit)
    patches = [e for e in edits if not e.target_weights()]
    if patches:
        raise UsageError(f"edit {args.edit[edits.index(patches[0])]} ({patches[0].method}) changes no weights (an "
                         "activation patch); it cannot be baked into a checkpoint: use it with pure-fast generate --edit")
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


def cmd_generate(args) -> int:
    from .adapters import load_model
    from .edits.edit import revert_all
    from .fileio import atomic_dir
    from .images import grid

    prompts = _read_prompts(args)
    seeds = args.seed or [0]
    if args.steps < 1 or args.steps > 1000:
        raise UsageError(f"--steps {args.steps} is out of range; use 1..1000")
    edits = _load_edits(args.edit)
    out = os.path.abspath(args.out_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out-dir {args.out_dir} exists and is not empty; choose a new folder")
    model = load_model(args.model, config=args.config, device=args.device, dtype=args.dtype)
    kw = dict(steps=args.steps, size=args.size, guidance_scale=args.guidance, batch_size=args.batch_size,
              progress=not (args.quiet or args.json))
    sets = {}
    if edits:
        sets["original"] = model.generate(prompts, seeds, **kw)
        for e in edits:
            e.apply(model, force=args.force)
        try:
            sets["edited"] = model.generate(prompts, seeds, **kw)
        finally:
            revert_all(model)
    else:
        sets[""] = model.generate(prompts, seeds, **kw)
    if os.path.isdir(out):
        os.rmdir(out)
    with atomic_dir(out) as tmp:
        for sub, images in sets.items():
            folder = os.path.join(tmp, sub) if sub else tmp
            os.makedirs(folder, exist_ok=True)
            for i, row in enumerate(images):
                for s, img in zip(seeds, row):
                    img.save(os.path.join(folder, f"{i:03d}_{s}.png"))
        if edits:
            rows = [sets["original"][i] + sets["edited"][i] for i in range(len(prompts))]
            cols = [f"orig s{s}" for s in seeds] + [f"edit s{s}" for s in seeds]
            g = grid(rows, [f"{i:03d}" for i in range(len(prompts))], cols, split_after=len(seeds))
        else:
            g = grid(sets[""], [f"{i:03d}" for i in range(len(prompts))], [f"seed {s}" for s in seeds])
        g.save(os.path.join(tmp, "grid.png"))
        with open(os.path.join(tmp, "prompts.json"), "w", encoding="utf-8") as f:
            json.dump({"prompts": prompts, "seeds": seeds, "steps": args.steps, "size": args.size,
                       "guidance": args.guidance, "edits": args.edit}, f, indent=2)
    summary = {"out_dir": out, "images": len(prompts) * len(seeds) * len(sets), "grid": os.path.join(out, "grid.png")}
    _emit(args, summary, f"wrote {summary['images']} images and {summary['grid']}")
    return 0


def cmd_inspect(args) -> int:
    from .edits import fingerprint as fp
    from .edits.io import load_edit

    e = load_edit(args.edit)
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
        f"changes   {info['changed_weights']} weights in {info['layers']} layers",
    ]
    if "rank_min" in info:
        lines.append(f"ranks     {info['rank_min']}..{info['rank_max']}")
    if info.get("details"):
        lines.append(f"details   {info['details']}")
    lines.append(f"base      {fp.short(e.base_fingerprint)}")
    lines.append(f"result    {fp.short(e.result_fingerprint)}")
    opts = {k: v for k, v in e.options.items() if k != "collect"}
    lines.append(f"options   {json.dumps(opts, default=str)}")
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        _one_line_warnings()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "quiet", False) or getattr(args, "json", False):
            os.environ["PURE_FAST_PROGRESS"] = "0"
        from .cli_more import MORE_COMMANDS

        handler = COMMANDS.get(args.command) or MORE_COMMANDS[args.command]
        return handler(args)
    except PureFastError as exc:
        if debug:
            raise
        print(f"pure-fast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pure-fast: interrupted (no partial output was kept)", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print("pure-fast: error: out of memory; lower --batch-size (or --size)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: still one line
        import torch

        if debug:
            raise
        text = str(exc).lower()
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
            print("pure-fast: error: the device ran out of memory; lower --batch-size (or --size)", file=sys.stderr)
            return 1
        msg = str(exc).splitlines()[0] if str(exc) else ""
        print(f"pure-fast: error: unexpected {type(exc).__name__}: {msg} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
