"""Subcommands that make edits travel: ``export`` (LoRA / UNet tensors), ``combine`` (one edit from a chain),
``revert`` (undo an ``apply --in-place``).

    pure-fast export  --edit EDIT [--model PATH] --format lora-diffusers|lora-kohya|unet-state-dict
                      [--rank R] [--dtype float32|float16|bfloat16] [--kohya-names diffusers|ldm] --out FILE
    pure-fast combine --edit A --edit B [--edit C ...] --out AB.safetensors [--force]
    pure-fast revert  --model DIR --revert-file FILE [--keep]

``--model`` of ``export`` is only needed when the LoRA depends on the model's weights (a shared right
matrix: ΔW = (W U) Vᵀ; SPACE's replacement weights) or for full tensors (unet-state-dict); the model is
loaded in the precision it is stored in, and ``--dtype`` is the storage precision of the export
(LoRA default float32; unet-state-dict default: the model's). No ``--model`` means the toy model where one is
needed, as everywhere else. Each export says which programs load it and warns where a common one will not
(``export.lora.consumer_notes``).
"""
from __future__ import annotations

import os
import warnings

from .cli import _emit, edit_out_path
from .errors import UsageError

LORA_FORMATS = {"lora-diffusers": "diffusers", "lora-kohya": "kohya"}
UNET_STATE_DICT_CONSUMERS = ("for diffusers / PyTorch (unet.load_state_dict(safetensors.torch.load_file(F), strict=False)); "
                             "not a checkpoint for ComfyUI or A1111: for them use pure-fast apply --format single-file")
FORMATS = (*LORA_FORMATS, "unet-state-dict")


def add_commands(sub, add_model, add_common) -> None:
    p = sub.add_parser("export", help="write an edit as a LoRA (diffusers / kohya) or as edited UNet tensors")
    p.add_argument("--edit", required=True, metavar="EDIT", help="edit file")
    p.add_argument("--model", default=None, help="the model the edit was made for (diffusers folder, single file "
                   "with --config, a toy weights folder, or 'toy'); needed unless the edit is low rank by itself; "
                   "unet-state-dict without --model means the toy model")
    p.add_argument("--config", default=None, help="local diffusers folder with the configs of a single-file model")
    p.add_argument("--device", default="cpu", help="where the model is loaded and SVDs run (cpu or cuda)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="lora-kohya: ComfyUI, A1111 and diffusers; lora-diffusers: diffusers only (ComfyUI and A1111 "
                   "ignore its keys); unet-state-dict: the edited to_k/to_v tensors for diffusers / PyTorch")
    p.add_argument("--rank", type=int, default=None,
                   help="LoRA rank: truncation for edits that are not low rank (the error is printed)")
    p.add_argument("--dtype", default=None, help="storage dtype: float32, float16 or bfloat16")
    p.add_argument("--kohya-names", default="diffusers", choices=("diffusers", "ldm"),
                   help="lora-kohya module names: diffusers (SD1/SD2 sd-scripts) or ldm (SDXL sd-scripts; needs --model; "
                   "diffusers loads ldm names for SDXL only)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.add_argument("--force", action="store_true", help="skip the check that --model is the edit's base model")
    add_common(p)

    p = sub.add_parser("combine", help="merge a chain of edits of one kind into one edit file")
    p.add_argument("--edit", action="append", required=True, metavar="EDIT",
                   help="edit file, in the order they were made (repeat)")
    p.add_argument("--out", required=True, metavar="EDIT.safetensors")
    p.add_argument("--force", action="store_true", help="combine even when the fingerprints do not show a chain")
    add_common(p)

    p = sub.add_parser("revert", help="undo an `apply --in-place` bit-exactly from its revert file")
    p.add_argument("--model", required=True, metavar="DIR", help="the model folder the edit was applied to")
    p.add_argument("--revert-file", required=True, metavar="FILE", help="the revert file apply --in-place wrote")
    p.add_argument("--keep", action="store_true", help="keep the revert file after restoring")
    add_common(p)


def cmd_export(args) -> int:
    from .edits.io import load_edit
    from .export.checkpoint import _inside, load_model_any, model_folder
    from .export.lora import _dtype, consumer_notes, export_lora, export_unet_state_dict, refuse_patch

    out = edit_out_path(args.out)
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
    if args.dtype is not None:
        _dtype(args.dtype)
    if args.model not in (None, "toy") and os.path.isdir(args.model) and _inside(out, model_folder(args.model)):
        raise UsageError("--out must not be inside the model folder")
    edit = load_edit(args.edit)
    refuse_patch(edit, "a LoRA or UNet tensors")
    if args.format == "unet-state-dict" and args.model is None:
        if edit.family != "toy":
            raise UsageError(f"--format unet-state-dict writes full edited weights of the model: this {edit.family} "
                             "edit needs --model (the model it was made for; no --model means the toy model)")
        args.model = "toy"  # as everywhere else: no --model means the shipped toy model
    model = None
    if args.model is not None:
        # only the K/V weights, read from the files one at a time (never the UNet, VAE or text encoders)
        model = load_model_any(args.model, config=args.config, device=args.device, dtype=None, parts="kv")
    if args.format == "unet-state-dict":
        rep = export_unet_state_dict(edit, model, out, dtype=args.dtype, force=args.force)
        rep["consumers"] = UNET_STATE_DICT_CONSUMERS
        text = (f"wrote {out} ({rep['weights']} edited UNet tensors, {rep['dtype']}, {rep['bytes'] / 1024:.1f} KiB) "
                f"{UNET_STATE_DICT_CONSUMERS}")
    else:
        rep = export_lora(edit, model, out, format=LORA_FORMATS[args.format], rank=args.rank,
                          dtype=args.dtype or "float32", kohya_names=args.kohya_names, force=args.force,
                          device=args.device if model is not None else None)
        ranks = f"rank {rep['rank_min']}" if rep["rank_min"] == rep["rank_max"] else f"ranks {rep['rank_min']}..{rep['rank_max']}"
        how = "exact" if rep["exact"] else (f"truncated: relative error {rep['rel_error']:.3e} "
                                            f"(worst weight {rep['max_rel_error']:.3e})")
        consumers, warning = consumer_notes(LORA_FORMATS[args.format], args.kohya_names, edit.family)
        rep["consumers"], rep["warning"] = consumers, warning
        if warning:
            warnings.warn(warning, stacklevel=2)
        text = (f"wrote {out} ({args.format}, {rep['modules']} modules, {ranks}, {rep['dtype']}, "
                f"{rep['bytes'] / 1024:.1f} KiB; {how}) {consumers}")
        rep = {k: v for k, v in rep.items() if k != "weights"} if not args.json else rep
    _emit(args, rep, text)
    return 0


def cmd_combine(args) -> int:
    from .edits.combine import combine
    from .edits.io import load_edit

    out = edit_out_path(args.out)
    if len(args.edit) < 2:
        raise UsageError("combine needs at least two --edit files (in the order they were made)")
    edits = [load_edit(p) for p in args.edit]
    combined = combine(edits, force=args.force)
    combined.save(out)
    summary = {"out": out, "kind": combined.kind, "method": combined.method, "edits": [e.edit_id for e in edits],
               "combined_from": combined.stats.get("combined_from"), "bytes": os.path.getsize(out),
               "changed_weights": len(combined.target_weights())}
    _emit(args, summary, f"wrote {out} ({combined.kind}, {len(edits)} edits combined, "
          f"{len(combined.target_weights())} weights, {summary['bytes'] / 1024:.1f} KiB)")
    return 0


def cmd_revert(args) -> int:
    from .export.checkpoint import revert_in_place

    if not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model} is not a folder (revert restores a folder edited with apply --in-place)")
    rep = revert_in_place(args.model, args.revert_file, remove=not args.keep)
    _emit(args, rep, f"restored {rep['restored']} tensors in {rep['model']} ({', '.join(rep['files'])})"
          + ("" if args.keep else "; revert file removed"))
    return 0


COMMANDS = {"export": cmd_export, "combine": cmd_combine, "revert": cmd_revert}
