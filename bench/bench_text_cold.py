"""Cold-process UCE as a user runs it: ``pure-fast erase --method uce`` vs the official procedure, CPU.

    nice -n 10 python bench/bench_text_cold.py [--arch sd15 sdxl] [--runs 3] [--root DIR]
        [--official-runs N] [--old-runs N] [--json bench/results/text_cold_cpu.json]

Each provider is a whole process started fresh (``subprocess``), so the figure includes interpreter
start-up, imports, loading and saving, exactly what a user waits for; its wall time, its CPU time (user +
system: steadier than wall time on a shared machine) and its peak resident set (``os.wait4`` rusage of that
child alone, ``ru_maxrss``) are recorded per run, runs interleaved
(floor, ours, old, official, then again), medians reported. Providers:

- ``import floor``: ``python -c "import torch, transformers"``, the start-up no text-space method avoids;
- ``pure-fast (text-only)``: ``pure-fast erase --method uce`` (this commit): text encoder(s) + the K/V tensors
  read from the safetensors files, fingerprints streamed, edit file written;
- ``pure-fast (full pipeline)``: the same command with the whole pipeline loaded, as before this change
  (``api.load_for`` replaced by ``load_model`` in the child: the code path before the text-only adapter);
- ``official UCE procedure``: ``bench/reference/uce_official_procedure.py`` (a restatement of the public
  ``train_erase.py``: whole pipeline, texts re-encoded per layer and pair, ``torch.inverse`` per projection,
  ``torch.save`` of the UNet state dict).

Settings (the issue's): forget "Van Gogh", retain "Claude Monet", guide "art", preserve scale 1, erase scale
1, λ = 0.5; pure-fast with ``--option guide=art --option preserve_scale=1``. Models: the SD1.5 / SDXL
architectures with random weights saved as float32 diffusers folders (``testing.save_architecture_folder``;
the SDXL UNet in 2 GB shards), built once under ``--root``. Before timing, results are checked: the
text-only edit file equals the full-pipeline one (tensors and fingerprints), and the official K/V change is
compared with pure-fast's (an untimed run of the official procedure that also writes its K/V weights as
safetensors; relative Frobenius difference of ΔW over all K/V weights; the official procedure selects its
tokens its own way, see ``collect/text.py``, so this is a report, not an equality).

The machine is shared: ``uptime`` load averages are recorded with every run. Output: the JSON above and a
Markdown table beside it (``.md``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORGET, RETAIN, GUIDE = "Van Gogh", "Claude Monet", "art"
ARCH_SHARD = {"sd15": "10GB", "sdxl": "2GB"}
TARGETS = {"sd15": {"time": 0.75, "rss": 1.0}, "sdxl": {"time": 0.2, "rss": 0.5}}


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run_child(cmd: list[str], env=None) -> dict:
    """Wall time and peak RSS (MB) of one child process; raises when it fails."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO))
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out, err = p.stdout.read().decode(), p.stderr.read().decode()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed ({p.returncode}): {err.strip().splitlines()[-1:]}")
    return {"s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "load": _load(), "stdout": out}


def pure_fast_cmd(model: str, out: str, extra=()) -> list[str]:
    exe = Path(sys.executable).with_name("pure-fast")
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "pure_fast"]
    return head + ["erase", "--model", model, "--method", "uce", "--forget", FORGET, "--retain", RETAIN,
                   "--option", f"guide={GUIDE}", "--option", "preserve_scale=1", "--out", out, "--quiet", *extra]


OLD_PATH = ("import sys, pure_fast.api as a; from pure_fast.adapters import load_model; "
            "a.load_for = lambda method, spec, **kw: load_model(spec, **kw); "
            "from pure_fast.cli import main; raise SystemExit(main(sys.argv[1:]))")


def providers(model: str, tmp: str) -> dict[str, list[str]]:
    ours = pure_fast_cmd(model, os.path.join(tmp, "ours.safetensors"))
    old = [sys.executable, "-c", OLD_PATH] + pure_fast_cmd(model, os.path.join(tmp, "old.safetensors"))[
        (1 if Path(ours[0]).name == "pure-fast" else 3):]
    official = [sys.executable, str(REPO / "bench" / "reference" / "uce_official_procedure.py"), "--model", model,
                "--forget", FORGET, "--guide", GUIDE, "--retain", RETAIN, "--preserve-scale", "1",
                "--out", os.path.join(tmp, "official_unet.pt")]
    return {"import floor": [sys.executable, "-c", "import torch, transformers"], "pure-fast (text-only)": ours,
            "pure-fast (full pipeline)": old, "official UCE procedure": official}


def ensure_folder(root: str, arch: str) -> str:
    path = os.path.join(root, arch)
    if not os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.isdir(os.path.join(path, "unet")):
        code = ("import sys; from pure_fast.testing import save_architecture_folder as s; "
                "s(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, path, arch, ARCH_SHARD[arch]], check=True, cwd=str(REPO))
    return path


# ---- verification (before timing) ----------------------------------------------------------------------
def verify(model: str, tmp: str, with_official: bool, with_old: bool = True) -> dict:
    import torch

    from pure_fast.adapters import load_model
    from pure_fast.edits.io import load_edit

    cmds = providers(model, tmp)
    run_child(cmds["pure-fast (text-only)"])
    ours = load_edit(os.path.join(tmp, "ours.safetensors"))
    rec = {"text_only_equals_full_pipeline": "not checked here (--old-runs 0; tests/test_text_only.py checks it)"}
    if with_old:
        run_child(cmds["pure-fast (full pipeline)"])
        old = load_edit(os.path.join(tmp, "old.safetensors"))
        t_ours, t_old = ours.tensors(), old.tensors()
        same = (set(t_ours) == set(t_old) and all(torch.equal(t_ours[k], t_old[k]) for k in t_ours)
                and ours.base_fingerprint == old.base_fingerprint and ours.result_fingerprint == old.result_fingerprint)
        if not same:
            raise SystemExit("verification failed: the text-only edit differs from the full-pipeline edit")
        rec["text_only_equals_full_pipeline"] = "bit-identical tensors and fingerprints"
    if with_official:
        from safetensors.torch import load_file

        kv = load_model(model, parts="kv").kv_weights()
        off_path = os.path.join(tmp, "official_kv.safetensors")
        run_child(cmds["official UCE procedure"] + ["--kv-out", off_path])
        official = {n: t.to(torch.float64) for n, t in load_file(off_path).items()}
        num = den = 0.0
        for name in kv:
            w0 = kv[name].to(torch.float64)
            d_ours = ours.delta(name, w0)
            d_off = official[name] - w0
            num += float((d_ours - d_off).pow(2).sum())
            den += float(d_off.pow(2).sum())
        rec["official_vs_ours_rel_diff"] = (num / den) ** 0.5 if den else None
    return rec


def measure(arch: str, model: str, runs: dict[str, int]) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"text_cold_{arch}_") as tmp:
        cmds = providers(model, tmp)
        rows = {name: [] for name in cmds}
        for r in range(max(runs.values())):
            for name, cmd in cmds.items():
                if r < runs.get(name, 0):
                    rec = run_child(cmd)
                    rec.pop("stdout")
                    rows[name].append(rec)
                    print(f"{arch} run {r + 1} {name}: {rec['s']:.1f} s wall, {rec['cpu_s']:.1f} s CPU, "
                          f"{rec['peak_rss_mb']:.0f} MB (load {rec['load']})",
                          flush=True)
        shown = {}
        for name, recs in rows.items():
            if not recs:
                continue
            shown[name] = {"runs": len(recs), "median_s": statistics.median(x["s"] for x in recs),
                           "median_cpu_s": statistics.median(x["cpu_s"] for x in recs),
                           "median_peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in recs),
                           "each": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in x.items()} for x in recs],
                           "command": " ".join(c if " " not in c else repr(c) for c in cmds[name]).replace(tmp, "$TMP").replace(model, "$MODEL")}
        return shown


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=str(REPO)).stdout.strip()
    except OSError:
        return "?"


def write_markdown(data: dict, path: Path) -> None:
    lines = ["# Cold-process UCE on CPU (`bench/bench_text_cold.py`)", "",
             f"Command: `{data['command']}`  ", f"Commit {data['commit']}, {data['date']}, {data['machine']}; "
             f"torch {data['versions']['torch']}, transformers {data['versions']['transformers']}, diffusers "
             f"{data['versions']['diffusers']}. Whole processes, medians of the runs shown; peak RSS of each child "
             "(`wait4` rusage). Load average (1/5/15 min) recorded per run in the JSON.", ""]
    for arch, res in data["archs"].items():
        lines += [f"## {arch} ({res['folder_gb']:.1f} GB float32 folder)", "",
                  f"`{res.get('command', data['command'])}` ({res.get('date', data['date'])})", "",
                  "| provider | runs | median wall s | × official | median CPU s | × official | median peak RSS MB "
                  "| × official |", "|---|---|---|---|---|---|---|---|"]
        off = res["providers"].get("official UCE procedure")
        for name, p in res["providers"].items():
            rt = f"{p['median_s'] / off['median_s']:.2f}" if off else "-"
            rc = f"{p['median_cpu_s'] / off['median_cpu_s']:.2f}" if off else "-"
            rr = f"{p['median_peak_rss_mb'] / off['median_peak_rss_mb']:.2f}" if off else "-"
            lines.append(f"| {name} | {p['runs']} | {p['median_s']:.1f} | {rt} | {p['median_cpu_s']:.1f} | {rc} | "
                         f"{p['median_peak_rss_mb']:.0f} | {rr} |")
        t = res.get("targets")
        if t:
            lines += ["", f"Targets: time ≤ {t['time_target']}× official → {t['time_ratio']:.2f}× wall, "
                          f"{t['cpu_time_ratio']:.2f}× CPU "
                          f"({'met' if t['time_met'] else 'MISSED'}); peak RSS ≤ {t['rss_target']}× official → "
                          f"{t['rss_ratio']:.2f}× ({'met' if t['rss_met'] else 'MISSED'})."]
        v = res.get("verification", {})
        lines += ["", f"Checked before timing: text-only vs full pipeline: {v.get('text_only_equals_full_pipeline')}"
                      + (f"; official ΔW vs pure-fast ΔW, relative Frobenius difference "
                         f"{v['official_vs_ours_rel_diff']:.3g}" if v.get("official_vs_ours_rel_diff") is not None else "")
                      + ".", ""]
        if res.get("note"):
            lines += [res["note"], ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--official-runs", type=int, default=None, help="runs of the official procedure (default --runs)")
    ap.add_argument("--old-runs", type=int, default=None, help="runs of the full-pipeline path (default --runs)")
    ap.add_argument("--no-official-check", action="store_true", help="skip the (slow) ΔW comparison with the official")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "pure_fast_text_cold"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "text_cold_cpu.json"))
    ap.add_argument("--note", action="append", default=[], metavar="ARCH=TEXT", help="a note printed under ARCH")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import torch
    import transformers

    out = Path(args.json)
    data = json.loads(out.read_text()) if out.exists() else {"archs": {}}
    notes = dict(n.split("=", 1) for n in args.note)
    for arch in args.arch:
        model = ensure_folder(args.root, arch)
        size = sum(f.stat().st_size for f in Path(model).rglob("*") if f.is_file()) / 1e9
        with tempfile.TemporaryDirectory() as tmp:
            check = verify(model, tmp, with_official=not args.no_official_check, with_old=args.old_runs != 0)
        runs = {"import floor": args.runs, "pure-fast (text-only)": args.runs,
                "pure-fast (full pipeline)": args.runs if args.old_runs is None else args.old_runs,
                "official UCE procedure": args.runs if args.official_runs is None else args.official_runs}
        res = {"folder_gb": size, "verification": check, "providers": measure(arch, model, runs),
               "command": "nice -n 10 python bench/bench_text_cold.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        p, off = res["providers"], res["providers"].get("official UCE procedure")
        if off:
            ours = p["pure-fast (text-only)"]
            tr, rr = ours["median_s"] / off["median_s"], ours["median_peak_rss_mb"] / off["median_peak_rss_mb"]
            tg = TARGETS[arch]
            res["targets"] = {"time_target": tg["time"], "time_ratio": tr, "time_met": tr <= tg["time"],
                              "cpu_time_ratio": ours["median_cpu_s"] / off["median_cpu_s"],
                              "rss_target": tg["rss"], "rss_ratio": rr, "rss_met": rr <= tg["rss"]}
        if arch in notes:
            res["note"] = notes[arch]
        data["archs"][arch] = res
    data.update({
        "command": "nice -n 10 python bench/bench_text_cold.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": _git("rev-parse", "--short", "HEAD"), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "diffusers": diffusers.__version__},
        "settings": {"forget": FORGET, "retain": RETAIN, "guide": GUIDE, "preserve_scale": 1, "erase_scale": 1, "lam": 0.5},
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    write_markdown(data, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
