"""The official UCE erasing procedure, restated (not copied) for timing against ``pure-fast erase --method uce``.

Source restated: Gandikota et al., "Unified Concept Editing in Diffusion Models" (arXiv:2308.14761), public
code github.com/rohitgandikota/unified-concept-editing, ``train-scripts/train_erase.py``: its ``__main__``
(build the erase / guide / preserve text lists, ``StableDiffusionPipeline.from_pretrained``, ``edit_model``,
``torch.save(unet.state_dict())``) and ``edit_model`` with ``technique='replace'``, ``with_to_k=True`` and
``lamb=0.5`` as ``__main__`` calls it. What this file mirrors, step by step:

1. load the WHOLE pipeline (UNet, VAE, text encoder(s)) in float32, as ``from_pretrained`` does by default;
2. list every ``attn2`` of the UNet's down / up / mid blocks; the edited projections are all ``to_v`` then
   all ``to_k``; a deep copy of each is kept (the official code keeps ``og_matrices`` and puts fresh deep
   copies back into the layers before editing);
3. for EVERY edited projection (layer loop), starting from ``mat1 = λ W`` and ``mat2 = λ I``:
   - for every (erase text, guide text) pair: tokenise both (padding to 77, truncation), encode them again,
     take the erase tokens from the last subject token (``attention_mask.sum() - 2``) to the end and the
     guide tokens likewise, both trimmed so that they have the same length; compute the guide values through
     EVERY projection (the official code evaluates all layers inside the loop and uses the current one), and
     add ``s_e Σ v cᵀ`` to mat1 and ``s_e Σ c cᵀ`` to mat2;
   - for every preserved text: tokenise ``[text, text]``, encode, and add ``s_p Σ v cᵀ`` / ``s_p Σ c cᵀ``
     over all 77 tokens (values again through every projection);
   - ``W ← mat1 @ torch.inverse(mat2)``;
4. ``torch.save`` the UNet state dict (a pickle file, as the official script writes it).

An empty guide becomes ``' '`` (as in the official code). SDXL is not covered by the official script (it
loads ``StableDiffusionPipeline`` and uses ``text_encoder`` alone); for SDXL the same procedure is run on
``StableDiffusionXLPipeline`` with the embeddings its ``encode_prompt`` gives (both encoders, 2048 wide),
the attention mask from its first tokenizer. Settings: ``erase_scale`` 1, ``preserve_scale`` from the
command line (the issue's comparison uses 1), guide ``art``.

    python bench/reference/uce_official_procedure.py --model DIR --forget "Van Gogh" --guide art \\
        --retain "Claude Monet" --preserve-scale 1 --out unet.pt

Only the benchmark runs this (``bench/bench_text_cold.py``); it is not part of the package.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch


def cross_attention_layers(unet):
    """attn2 of every transformer block of the down, up and mid blocks (the official traversal)."""
    out = []
    for name, child in unet.named_children():
        if "up" in name or "down" in name:
            for block in child:
                if "Cross" in type(block).__name__:
                    out += [t.attn2 for a in block.attentions for t in a.transformer_blocks]
        if "mid" in name:
            out += [t.attn2 for a in child.attentions for t in a.transformer_blocks]
    return out


def encode(pipe, texts, xl: bool):
    """(token embeddings [2, 77, d], attention mask [2, 77]) of two texts, tokenised and encoded again."""
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    if xl:
        emb = pipe.encode_prompt(texts, device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)[0]
    else:
        emb = pipe.text_encoder(tok.input_ids.to(pipe.device))[0]
    return emb, tok.attention_mask


@torch.no_grad()
def edit_model(pipe, erase_texts, guide_texts, retain_texts, *, lam=0.5, erase_scale=1.0, preserve_scale=0.1,
               xl=False):
    layers = cross_attention_layers(pipe.unet)
    originals = [copy.deepcopy(l.to_v) for l in layers] + [copy.deepcopy(l.to_k) for l in layers]
    n = len(layers)
    for i, l in enumerate(layers):  # fresh copies of the originals go back into the model
        l.to_v = copy.deepcopy(originals[i])
        l.to_k = copy.deepcopy(originals[n + i])
    projections = [l.to_v for l in layers] + [l.to_k for l in layers]
    guides = [g if g != "" else " " for g in guide_texts]
    retain = list(retain_texts) if retain_texts else [""]
    for p in range(len(projections)):
        W = projections[p].weight
        mat1 = lam * W
        mat2 = lam * torch.eye(W.shape[1], device=W.device)
        for old, new in zip(erase_texts, guides):
            emb, mask = encode(pipe, [old, new], xl)
            last_o, last_n = int(mask[0].sum()) - 2, int(mask[1].sum()) - 2
            far = max(last_o, last_n)
            old_emb = emb[0][last_o: emb.shape[1] - max(0, far - last_o)]
            new_emb = emb[1][last_n: emb.shape[1] - max(0, far - last_n)]
            values = [proj(new_emb) for proj in projections]
            c, v = old_emb, values[p]
            mat1 += erase_scale * (v[:, :, None] @ c[:, None, :]).sum(0)
            mat2 += erase_scale * (c[:, :, None] @ c[:, None, :]).sum(0)
        for text in retain:
            emb, _ = encode(pipe, [text, text], xl)
            c, new_emb = emb[0], emb[1]
            values = [proj(new_emb) for proj in projections]
            v = values[p]
            mat1 += preserve_scale * (v[:, :, None] @ c[:, None, :]).sum(0)
            mat2 += preserve_scale * (c[:, :, None] @ c[:, None, :]).sum(0)
        projections[p].weight = torch.nn.Parameter(mat1 @ torch.inverse(mat2))
    return pipe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="diffusers folder (StableDiffusion or StableDiffusionXL)")
    ap.add_argument("--forget", action="append", required=True)
    ap.add_argument("--guide", default="")
    ap.add_argument("--retain", action="append", default=[])
    ap.add_argument("--preserve-scale", type=float, default=0.1)
    ap.add_argument("--erase-scale", type=float, default=1.0)
    ap.add_argument("--out", required=True, help="where to torch.save the UNet state dict")
    ap.add_argument("--kv-out", default=None, help="also write the edited attn2 K/V weights as safetensors "
                    "(the benchmark's check; not part of the official procedure)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    with open(os.path.join(args.model, "model_index.json"), encoding="utf-8") as f:
        xl = "XL" in json.load(f)["_class_name"]
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    kw = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(args.model, local_files_only=True, **kw).to("cpu")
    edit_model(pipe, args.forget, [args.guide] * len(args.forget), args.retain, lam=0.5,
               erase_scale=args.erase_scale, preserve_scale=args.preserve_scale, xl=xl)
    torch.save(pipe.unet.state_dict(), args.out)
    if args.kv_out:
        from safetensors.torch import save_file

        kv = {f"{n}.{p}.weight": getattr(m, p).weight.detach().contiguous() for n, m in pipe.unet.named_modules()
              if n.endswith("attn2") for p in ("to_k", "to_v")}
        save_file(kv, args.kv_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
