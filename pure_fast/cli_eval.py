"""Evaluation subcommands on the toy world: ``eval``, ``bench-quality``, ``probe``.

- ``pure-fast eval --model toy --method M [--method M2 | all] --forget C [...] [--retain C ...] --out-dir DIR
  [--seeds N] [--steps N] [--quick]``: erase the forget concepts with each method (one edit for all of
  them), measure every forget concept (and the unedited model, method 'none'), write ``eval.json``,
  ``eval.png`` (terms and H-mean), ``samples_<method>_<concept>.png`` (before | after) and the edit files.
- ``pure-fast bench-quality [--out-dir bench/results] [--quick] [--method M ...]``: every available method
  (and 'none') on the toy world's test concepts under the protocol (``evaluate/quality_bench.py``: tuned and
  paper defaults, 3 seed sets, multi-concept sets); writes ``quality.md``, ``quality.json``, ``quality.png``.
- ``pure-fast probe [--out-dir bench/results] [--quick]``: the linear-probe comparison of Fig. 2 of the PURE paper (arXiv:2605.25765)
  (text-embedding basis vs cross-attention-activation basis); writes ``probe.md/json/png``.

Only the toy model is supported (the detectors know the toy world only): ``--model`` must be absent or
``toy``. Outputs go to a temporary folder that replaces ``--out-dir``'s files only when everything worked.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

from .errors import UsageError


def _check_toy(args) -> None:
    if args.model not in (None, "toy"):
        raise UsageError(f"--model {args.model}: the toy-world evaluation only runs on the toy model; "
                         "omit --model or pass --model toy")


def _command_line(args) -> str:
    """The command as typed, rebuilt from the parsed arguments (main() may be called with its own argv)."""
    parts = ["pure-fast", args.command]
    for key in ("model", "method", "forget", "retain", "out_dir", "seeds", "steps", "batch_size", "threads"):
        v = getattr(args, key, None)
        if v is None or v == []:
            continue
        flag = "--" + key.replace("_", "-")
        for item in (v if isinstance(v, list) else [v]):
            parts += [flag, shlex.quote(str(item))]
    if getattr(args, "quick", False):
        parts.append("--quick")
    return " ".join(parts)


def _settings(args):
    from .evaluate.toy_bench import EvalSettings

    s = EvalSettings.quick() if args.quick else EvalSettings()
    kw = _generation_overrides(args)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UsageError(f"--seeds {args.seeds} must be >= 1")
        from .evaluate.protocol import SEED_SETS

        first = SEED_SETS[0][0]  # fresh seeds: never a method's collection seeds (protocol.check_eval_seeds)
        kw["seeds"] = tuple(range(first, first + args.seeds))
    from dataclasses import replace

    s = replace(s, **kw)
    s.validate()
    return s


def _generation_overrides(args) -> dict:
    """--steps and --batch-size as EvalSettings fields (validated)."""
    kw = {}
    if args.steps is not None:
        if not 1 <= args.steps <= 1000:
            raise UsageError(f"--steps {args.steps} is out of range; use [1, 1000]")
        kw["steps"] = args.steps
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size} must be >= 1")
        kw["batch_size"] = args.batch_size
    return kw


def _threads(args) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)


def _check_methods(names: list[str], allow_all: bool = True) -> tuple[list[str], dict]:
    from .evaluate.toy_bench import available_methods
    from .methods import method_names

    ok, missing = available_methods()
    if not names or (allow_all and "all" in names):
        return ok, missing
    for m in names:
        if m != "none" and m not in method_names():
            raise UsageError(f"unknown method {m!r}; choose from none, {', '.join(method_names())}, all")
        if m in missing:
            raise UsageError(f"method {m!r} is not available here ({missing[m]})")
    return list(dict.fromkeys(names)), {}


def _check_concepts(forget: list[str], retain: list[str]) -> None:
    from .toy import world

    known = world.all_concepts()
    for c in forget + retain:
        if c not in known:
            raise UsageError(f"unknown toy concept {c!r}; known: {', '.join(known)}")
    if not forget:
        raise UsageError("no forget concept given; pass at least one --forget CONCEPT")
    dup = sorted({c for c in forget if forget.count(c) > 1} | {c for c in retain if retain.count(c) > 1})
    if dup:
        raise UsageError(f"duplicate concept(s): {', '.join(dup)}")
    both = sorted(set(forget) & set(retain))
    if both:
        raise UsageError(f"concept(s) both forgotten and retained: {', '.join(both)}")


def _fresh_out_dir(path: str):
    """A temp folder beside ``path``; the caller moves its files into ``path`` at the end."""
    import tempfile

    from .fileio import make_parents

    path = make_parents(path, "--out-dir")
    parent = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out-dir {path} exists and is not a folder")
    return path, tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)


def _publish(tmp: str, out: str) -> list[str]:
    """Move every file of ``tmp`` into ``out`` (created if needed), replacing same-named files."""
    import shutil

    os.makedirs(out, exist_ok=True)
    names = sorted(os.listdir(tmp))
    for n in names:
        os.replace(os.path.join(tmp, n), os.path.join(out, n))
    shutil.rmtree(tmp, ignore_errors=True)
    return names


def cmd_eval(args) -> int:
    import shutil

    _check_toy(args)
    forget, retain = list(args.forget), list(args.retain)
    _check_concepts(forget, retain)
    methods, _ = _check_methods(args.method or ["pure"])
    settings = _settings(args)
    _threads(args)
    from . import distributed

    writer = distributed.is_writer()  # under torchrun the jobs are dealt over the ranks; rank 0 writes
    out, tmp = _fresh_out_dir(args.out_dir) if writer else (None, None)
    try:
        from .adapters import load_model
        from .evaluate import report, toy_bench

        t0 = time.perf_counter()
        progress = not args.quiet and not distributed.active()  # under torchrun: one bar, over the methods
        with distributed.stage("load"):
            adapter = load_model("toy", device=args.device)
        retain = retain or toy_bench.default_retain(forget)
        jobs = ["none"] + [m for m in methods if m != "none"]
        results = distributed.map_jobs(
            jobs, lambda m: toy_bench.evaluate_method(adapter, m, forget, retain, settings, progress=progress,
                                                      keep_images=True),
            "eval", progress=not args.quiet and distributed.active(), allowed={"_Item": toy_bench._Item})
        if not writer:
            return 0
        base = results[0]
        for r in results[1:]:
            m = r["method"]
            if "error" in r:
                print(f"pure-fast eval: {m} failed: {r['error']}", file=sys.stderr)
                continue
            r["edit"].save(os.path.join(tmp, f"edit_{m}.safetensors"))
            for c in forget:
                _, prompts = report.sample_grid(base["concepts"][c], r["concepts"][c],
                                                os.path.join(tmp, f"samples_{m}_{c}.png"))
                r["concepts"][c]["grid_prompts"] = prompts
        report.eval_chart([r for r in results if "concepts" in r], os.path.join(tmp, "eval.png"))
        doc = {"evaluation": "toy world (pure_fast.evaluate.toy_bench)", "forget": forget, "retain": retain,
               "settings": settings.to_json(), "results": results, "seconds": round(time.perf_counter() - t0, 1),
               "provenance": toy_bench.provenance(_command_line(args)), "world_size": distributed.processes()}
        report.write_json(os.path.join(tmp, "eval.json"), doc)
        names = _publish(tmp, out)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        import json

        print(json.dumps(toy_bench.json_ready({"out_dir": out, "files": names, "results": [
            {"method": r["method"], "hmean": r.get("hmean"), "error": r.get("error")} for r in results]})))
    else:
        for r in results:
            if "error" in r:
                print(f"{r['method']:>9}: failed ({r['error']})")
                continue
            for c, cr in r["concepts"].items():
                print(f"{r['method']:>9} {c:>9}: target anchor {cr['target']['anchor']:.2f} held-out "
                      f"{cr['target']['heldout']:.2f} | attack {cr['attack']['rate']:.2f} | retention "
                      f"{cr['retention']['rate']:.2f} | quality {cr['quality']['score']:.2f} | H-mean {cr['hmean']:.3f}")
        print(f"wrote {', '.join(names)} to {out}")
    return 0


def cmd_bench_quality(args) -> int:
    import shutil

    _check_toy(args)
    methods, missing = _check_methods(args.method or [])
    if args.seeds is not None:
        raise UsageError("bench-quality evaluates on the protocol's 3 fixed seed sets "
                         "(pure_fast/evaluate/protocol.py: SEED_SETS); drop --seeds")
    from dataclasses import replace

    from .evaluate import quality_bench

    s = quality_bench.QUICK if args.quick else quality_bench.FULL
    ms = quality_bench.MULTI_QUICK if args.quick else quality_bench.MULTI_FULL
    kw = _generation_overrides(args)
    s, ms = replace(s, **kw), replace(ms, **kw)
    _threads(args)
    from . import distributed

    writer = distributed.is_writer()  # under torchrun the jobs are dealt over the ranks; rank 0 writes
    out, tmp = _fresh_out_dir(args.out_dir) if writer else (None, None)
    try:
        from .adapters import load_model
        from .evaluate import report

        with distributed.stage("load"):
            adapter = load_model("toy", device=args.device)
        bench = quality_bench.bench_quality(adapter, methods, quick=args.quick, settings=s, multi_settings=ms,
                                            progress=not args.quiet and writer, command=_command_line(args))
        if not writer:
            return 0
        bench["unavailable"] = {**missing, **bench.get("unavailable", {})}
        report.write_bench(bench, tmp)
        names = _publish(tmp, out)
    except BaseException:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        import json

        print(json.dumps({"out_dir": out, "files": names, "seconds": bench["seconds"],
                          "hmean": {f"{r['method']}/{r['variant']}": (r["summary"] or {}).get("hmean")
                                    for r in bench["single"]}}))
    else:
        print(report.quality_markdown(bench).split("\n\nH-mean per category")[0])
        print(f"wrote {', '.join(names)} to {out} in {bench['seconds']:.0f} s")
    return 0


def cmd_probe(args) -> int:
    import shutil

    _check_toy(args)
    _threads(args)
    out, tmp = _fresh_out_dir(args.out_dir)
    try:
        from .adapters import load_model
        from .evaluate import probe

        adapter = load_model("toy", device=args.device)
        res = probe.run_probe(adapter, quick=args.quick, progress=not args.quiet, command=_command_line(args))
        probe.write_probe(res, tmp)
        names = _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if args.json:
        import json

        print(json.dumps({"out_dir": out, "files": names, "summary": res["summary"]}))
    else:
        print(probe.markdown(res).split("\n\n## Per concept")[0])
        print(f"wrote {', '.join(names)} to {out}")
    return 0


def _add_eval_common(p) -> None:
    p.add_argument("--out-dir", default=None, metavar="DIR", help="output folder (eval: eval_out; bench-quality "
                   "and probe: bench/results)")
    p.add_argument("--quick", action="store_true", help="small settings (fewer prompts and a smaller greedy search "
                   "or none; 6 DDIM steps)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="eval: evaluation seeds 100..100+N-1 (fresh: "
                   "never a collection seed); bench-quality uses the protocol's fixed seed sets")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the evaluation images")
    p.add_argument("--batch-size", type=int, default=None, help="samples per UNet call")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def add_commands(sub, add_model, add_common) -> None:
    p = sub.add_parser("eval", help="toy-world benchmark of methods on given concepts")
    add_model(p)
    p.add_argument("--method", action="append", default=None, help="none, pure, uce, cure, space, acterase, all "
                   "(repeatable; default pure); the unedited model is always measured too")
    p.add_argument("--forget", action="append", default=[], metavar="CONCEPT", help="toy concept to erase")
    p.add_argument("--retain", action="append", default=[], metavar="CONCEPT",
                   help="toy concept to keep (default: the two members that follow each forget concept in its "
                   "category, e.g. red -> orange, yellow; retention is measured on every member)")
    _add_eval_common(p)
    add_common(p)
    p.set_defaults(out_dir_default="eval_out")

    p = sub.add_parser("bench-quality", help="every available method on the toy world's test concepts (protocol: "
                       "tuned and paper defaults, 3 seed sets, multi-concept sets)")
    add_model(p)
    p.add_argument("--method", action="append", default=None, help="restrict to these methods (default: all available)")
    _add_eval_common(p)
    add_common(p)
    p.set_defaults(out_dir_default=os.path.join("bench", "results"))

    p = sub.add_parser("probe", help="linear probe: text-embedding vs cross-attention activation basis (Fig. 2)")
    add_model(p)
    _add_eval_common(p)
    add_common(p)
    p.set_defaults(out_dir_default=os.path.join("bench", "results"))


def _with_out_dir(fn):
    def run(args):
        if args.out_dir is None:
            args.out_dir = args.out_dir_default
        return fn(args)

    return run


COMMANDS = {"eval": _with_out_dir(cmd_eval), "bench-quality": _with_out_dir(cmd_bench_quality),
            "probe": _with_out_dir(cmd_probe)}


def inspect_residual(args, edit) -> int:
    """``pure-fast inspect EDIT --residual``: where the forget concept survives ``edit`` on the toy model
    (``evaluate/residual.py``); a text table on stdout (``--json``: the result), files with ``--out-dir``."""
    import json

    from .evaluate.residual import ResidualSettings, residual_plot, text_table, toy_residual
    from .evaluate.toy_bench import json_ready
    from .toy import world

    if edit.family != "toy":
        raise UsageError(f"--residual needs an edit of the toy model (this one is for {edit.family}): the "
                         "diagnostic judges x0 predictions with the toy world's detectors")
    unknown = [c for c in edit.concepts.get("forget", []) if c not in world.all_concepts()]
    if unknown:
        raise UsageError(f"--residual: {unknown[0]!r} is not a toy-world concept")
    kw = {}
    if args.seed:
        kw["seeds"] = tuple(args.seed)
    if args.steps is not None:
        kw["steps"] = args.steps
    s = ResidualSettings(**kw)
    s.validate()
    out = None
    if args.out_dir:
        out = os.path.abspath(args.out_dir)
        if not os.path.isdir(os.path.dirname(out)):
            raise UsageError(f"the folder that would hold --out-dir {args.out_dir} does not exist")
    from .adapters import load_model

    adapter = load_model("toy")
    res = toy_residual(adapter, edit, settings=s)
    res["command"] = _command_line_inspect(args)
    text = text_table(res)
    if out:
        from .evaluate.report import write_json, write_text

        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "residual.json"), res)
        write_text(os.path.join(out, "residual.md"), "```\n" + text + "```\n")
        residual_plot([res], os.path.join(out, "residual.png"))
    print(json.dumps(json_ready(res), indent=1) if args.json else text)
    return 0


def _command_line_inspect(args) -> str:
    parts = ["pure-fast", "inspect", shlex.quote(args.edit), "--residual"]
    for sd in args.seed or []:
        parts += ["--seed", str(sd)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    if args.out_dir:
        parts += ["--out-dir", shlex.quote(args.out_dir)]
    return " ".join(parts)
