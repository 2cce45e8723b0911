"""ActErase (methods/acterase.py) and activation-patch edits (edits/patch.py)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import pure_fast
from pure_fast.edits.edit import applied_stack, revert_all
from pure_fast.edits.io import load_edit
from pure_fast.edits.patch import ConceptPatch, PatchEdit, PatchHook, installed_hooks, patch_reference
from pure_fast.errors import EditFileError, FingerprintMismatch, UsageError
from pure_fast.methods import EraseContext, run_method
from pure_fast.methods.acterase import ActEraseOptions, neutral_prompt

FAST = dict(size=32, steps=4, record_steps=2, seeds=(0,), batch_size=32)
FORGET, RETAIN = "Van Gogh", "Claude Monet"


def _adapter(pipe):
    from pure_fast.adapters import wrap_pipeline

    return wrap_pipeline(pipe)


_EDITS: dict = {}


def _erase(adapter, forget=(FORGET,), retain=(RETAIN,), **kw):
    """The edit for these arguments, computed once per model and arguments in this module (edits are
    plain values: every test applies and reverts its own)."""
    key = (id(adapter.unet), tuple(forget), tuple(retain), tuple(sorted(kw.items())))
    if key not in _EDITS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _EDITS[key] = pure_fast.erase(adapter, list(forget), list(retain), method="acterase",
                                          category="style", progress=False, **{**FAST, **kw})
    return _EDITS[key]


@torch.no_grad()
def _attn_out(adapter, prompts, seed=7):
    """Spatially pooled input of every attn2.to_out[0] (the attention output, after any patch), one UNet call
    on fixed noise at the first DDIM timestep. Returns {layer: [n_prompts, d] float64}."""
    layers = adapter.cross_attention_layers()
    got, handles = {}, []
    for l in layers:
        def rec(mod, args, name=l.name):
            got[name] = args[0].double().mean(1)
        handles.append(l.module.to_out[0].register_forward_pre_hook(rec))
    try:
        cond = adapter.encode(prompts).to(adapter.device, adapter.dtype)
        c, h, w = adapter.latent_shape(32)
        x = torch.randn((1, c, h, w), generator=torch.Generator().manual_seed(seed)).expand(len(prompts), -1, -1, -1)
        sched = adapter.make_scheduler("ddim")
        sched.set_timesteps(10)
        adapter.unet_forward(x.contiguous(), sched.timesteps[0], cond)
    finally:
        for hd in handles:
            hd.remove()
    return got


@torch.no_grad()
def _unet_out(adapter, prompts, seed=3):
    cond = adapter.encode(prompts)
    c, h, w = adapter.latent_shape(32)
    x = torch.randn((len(prompts), c, h, w), generator=torch.Generator().manual_seed(seed))
    return adapter.unet_forward(x, torch.tensor(500), cond)


def _style_prompts(concept):
    from pure_fast.prompts import expand

    return expand(concept, "style")


# ---- prompt pairs and options ---------------------------------------------------------------------
def test_neutral_prompt_generic_and_toy():
    assert neutral_prompt("a painting in the style of Van Gogh", "Van Gogh") == "a painting in the style of"
    assert neutral_prompt("art by van gogh", "Van Gogh", "a painter") == "art by a painter"
    assert neutral_prompt("Van Gogh style illustration", "Van Gogh") == "style illustration"
    assert neutral_prompt("a photo of a cat", "Van Gogh") is None
    # toy world: surface forms, whole words, a/an fixed
    assert neutral_prompt("a crimson star on a striped background", "red") == "a star on a striped background"
    assert neutral_prompt("an amber circle", "orange") == "a circle"
    assert neutral_prompt("a tomato-red square", "red") == "a square"
    assert neutral_prompt("a reddish square", "red") is None


@pytest.mark.parametrize("kw, needle", [
    ({"strength": 0.0}, "strength"), ({"strength": 1.5}, "strength"), ({"gate": "hard"}, "gate"),
    ({"gate_threshold": 1.0}, "gate_threshold"), ({"mode": "swap"}, "mode"), ({"forget_threshold": 0}, "forget_threshold"),
    ({"retain_threshold": 1.5}, "retain_threshold"), ({"max_rank": 0}, "max_rank"), ({"anchor": 3}, "anchor"),
    ({"steps": 0}, "steps"), ({"colour": 1}, "unknown option"),
])
def test_bad_options_one_clear_error(kw, needle):
    with pytest.raises(UsageError) as exc:
        EraseContext.prepare("acterase", ["Van Gogh"], category="style", values=kw)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_options_category_defaults():
    def options(category, **kw):
        return EraseContext.prepare("acterase", ["Van Gogh"], category=category, values=kw).options

    assert options("celebrity").resolved_anchor() == "a person"
    assert options("style").resolved_anchor() == ""
    o = options("style", anchor="a painter", steps=3, record_steps=1)
    assert o.resolved_anchor() == "a painter" and o.collect.steps == 3


# ---- the runtime operation --------------------------------------------------------------------------
def _random_patch(d, r, g):
    V, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    return ConceptPatch(V.float(), torch.randn(r, generator=g).float(), (torch.randn(r, generator=g) * 3).float())


@pytest.mark.parametrize("gate, mode, t", [("soft", "replace", 0.0), ("soft", "shift", 0.3), ("off", "replace", 0.0),
                                           ("off", "shift", 0.0)])
def test_hook_matches_reference(gate, mode, t):
    g = torch.Generator().manual_seed(0)
    entries = [_random_patch(40, 3, g), _random_patch(40, 2, g)]
    # samples built so that some have the concept (coords near mu_f), some not (near mu_a), some between
    h = torch.randn(6, 67, 40, generator=g) * 0.3
    for b, frac in enumerate([1.0, 0.0, 0.5, -0.5, 2.0, 0.2]):
        e = entries[0]
        h[b] += (e.basis @ (e.anchor + frac * (e.forget - e.anchor)))
    hook = PatchHook(entries, strength=0.8, gate=gate, gate_threshold=t, mode=mode)
    out = hook(None, (h,))[0]
    ref = patch_reference(h, entries, strength=0.8, gate=gate, gate_threshold=t, mode=mode)
    err = (out.double() - ref).abs().max().item()
    base = (h.double() - ref).abs().max().item()
    assert err < 1e-5 * max(1.0, ref.abs().max().item()) and base > 0.1
    if gate == "soft":
        gates = hook.last_gate[:, 0]
        untouched = [b for b in range(6) if float(hook.last_gate[b].max()) == 0.0]
        assert untouched  # sample 1 (at the anchor) and 3 (negative presence) are not gated on concept 0
        for b in untouched:
            assert torch.equal(out[b], h[b])
        assert gates[0] == 1.0 and gates[4] == 1.0


def test_replace_sets_component_to_anchor():
    g = torch.Generator().manual_seed(1)
    e = _random_patch(24, 4, g)
    h = torch.randn(3, 10, 24, generator=g) + (e.basis @ e.forget)
    out = PatchHook([e], 1.0, "off", 0.0, "replace")(None, (h,))[0]
    coords = out.double() @ e.basis.double()
    assert torch.allclose(coords, e.anchor.double().expand_as(coords), atol=1e-5)
    # the orthogonal complement is untouched
    P = torch.eye(24, dtype=torch.float64) - e.basis.double() @ e.basis.double().T
    assert torch.allclose(out.double() @ P, h.double() @ P, atol=1e-5)


# ---- tiny pipelines: effect, revert, round trip --------------------------------------------------
@pytest.fixture(params=["tiny_sd1", "tiny_sdxl"])
def fam(request):
    pipe = request.getfixturevalue(request.param)
    adapter = _adapter(pipe)
    edit = _erase(adapter)
    assert not applied_stack(adapter.unet)
    yield adapter, edit
    revert_all(adapter)


def _forget_ratio(before_f, before_n, after_f, after_n, before_r=None, before_rn=None):
    """Mean over layers of the forget-minus-neutral gap along the unpatched gap direction (1 = unchanged).

    With retain outputs (and their neutral twins) given, the direction is the forget-specific part of the
    gap: its component orthogonal to the retain-minus-neutral gap."""
    ratios = []
    for name in before_f:
        gap = before_f[name].mean(0) - before_n[name].mean(0)
        if before_r is not None:
            rg = before_r[name].mean(0) - before_rn[name].mean(0)
            gap = gap - (gap @ rg) / (rg @ rg) * rg
        gg = float(gap @ gap)
        if gg == 0:
            continue
        ratios.append(float((after_f[name].mean(0) - after_n[name].mean(0)) @ gap) / gg)
    return sum(ratios) / len(ratios)


def _rel_change(before, after):
    num = sum(float((after[n] - before[n]).norm()) ** 2 for n in before)
    den = sum(float(before[n].norm()) ** 2 for n in before)
    return (num / den) ** 0.5


PROTECT = {"retain_threshold": 0.5, "gate_threshold": 0.1}


@pytest.mark.parametrize("cfg", ["default", "protect"])
def test_patch_reduces_forget_component_keeps_retain(fam, cfg):
    """One UNet call on fresh noise (not the collection seeds), pooled attention outputs after the patch.

    default (gate at 0.5, no retain projection): on these random-weight models the retain prompts are no
    less "present" than the forget ones, so only the forget effect is asserted; 'protect' (retain
    differences projected out at 0.5 energy, gate at 0.1) must also leave the retain outputs nearly alone."""
    adapter, edit = fam
    if cfg == "protect":
        edit = _erase(adapter, **PROTECT)
    assert edit.kind == "patch" and edit.target_weights() == [] and edit.patches
    assert edit.concepts["forget"] == [FORGET] and edit.stats["pairs"][FORGET] == 8
    fp, npr = _style_prompts(FORGET), [neutral_prompt(p, FORGET) for p in _style_prompts(FORGET)]
    rp, rnp = _style_prompts(RETAIN), [neutral_prompt(p, RETAIN) for p in _style_prompts(RETAIN)]
    bf, bn, br, brn = (_attn_out(adapter, p) for p in (fp, npr, rp, rnp))
    edit.apply(adapter)
    af, an, ar = _attn_out(adapter, fp), _attn_out(adapter, npr), _attn_out(adapter, rp)
    edit.revert(adapter)
    specific = _forget_ratio(bf, bn, af, an, br, brn)
    whole = _forget_ratio(bf, bn, af, an)
    retain_change = _rel_change(br, ar)
    forget_change = _rel_change(bf, af)
    print(f"{adapter.family} {cfg}: forget-specific gap kept {specific:.3f} (whole gap {whole:.3f}), forget "
          f"outputs changed {forget_change:.4f}, retain outputs {retain_change:.4f}")
    if cfg == "default":
        assert whole < 0.5 and specific < 0.5
    else:
        assert specific < 0.25 and whole < 0.6
        assert retain_change < 0.5 * forget_change and retain_change < 0.06


def test_revert_restores_processors_and_bit_identical_outputs(fam):
    from diffusers.models.attention_processor import AttnProcessor2_0

    adapter, edit = fam
    unet = adapter.unet
    procs = dict(unet.attn_processors)
    hooks_before = {n: len(m._forward_pre_hooks) for n, m in unet.named_modules()}
    prompts = [_style_prompts(FORGET)[0], _style_prompts(RETAIN)[0]]
    ref = _unet_out(adapter, prompts)
    edit.apply(adapter)
    assert all(unet.attn_processors[k] is v for k, v in procs.items())  # processors never replaced
    assert all(isinstance(p, AttnProcessor2_0) for k, p in unet.attn_processors.items() if "attn2" in k)
    assert set(installed_hooks(unet)[edit.edit_id]) == set(edit.patches)
    patched = _unet_out(adapter, prompts)
    assert not torch.equal(patched[0], ref[0])
    edit.revert(adapter)
    assert installed_hooks(unet) == {}
    assert {n: len(m._forward_pre_hooks) for n, m in unet.named_modules()} == hooks_before
    assert all(unet.attn_processors[k] is v for k, v in procs.items())
    assert torch.equal(_unet_out(adapter, prompts), ref)


def test_zero_rank_patch_is_exactly_inactive(fam):
    adapter, edit = fam
    zero = PatchEdit(method="acterase", family=edit.family, concepts={"forget": [FORGET]}, options=dict(edit.options),
                     patches={n: [ConceptPatch(torch.zeros(d, 0), torch.zeros(0), torch.zeros(0))]
                              for n, (d, _) in edit.shapes.items()},
                     shapes=dict(edit.shapes), base_fingerprint=dict(edit.base_fingerprint))
    prompts = _style_prompts(FORGET)[:2]
    ref = _unet_out(adapter, prompts)
    zero.apply(adapter)
    try:
        assert torch.equal(_unet_out(adapter, prompts), ref)
    finally:
        zero.revert(adapter)


def test_save_load_round_trip(fam, tmp_path):
    adapter, edit = fam
    path = edit.save(str(tmp_path / "p.safetensors"))
    loaded = load_edit(path)
    assert isinstance(loaded, PatchEdit) and loaded.edit_id == edit.edit_id and loaded.family == adapter.family
    assert loaded.shapes == edit.shapes and loaded.runtime() == edit.runtime()
    a, b = edit.tensors(), loaded.tensors()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.getsize(path) < 64 * 1024
    prompts = _style_prompts(FORGET)[:2]
    edit.apply(adapter)
    x = _unet_out(adapter, prompts)
    edit.revert(adapter)
    loaded.apply(adapter)
    y = _unet_out(adapter, prompts)
    loaded.revert(adapter)
    assert torch.equal(x, y)
    info = loaded.inspect()
    assert info["patched_layers"] == len(edit.patches) and info["changed_weights"] == 0 and info["rank_max"] >= 1


def test_patch_survives_pure_collection(fam):
    """PURE's collector swaps attn2 processors and restores them: the patch (a to_out pre-hook) stays on."""
    from pure_fast.collect.activations import CollectOptions, collect_activations

    adapter, edit = fam
    prompts = _style_prompts(FORGET)[:2]
    edit.apply(adapter)
    x = _unet_out(adapter, prompts)
    collect_activations(adapter, {"a": prompts}, CollectOptions(steps=2, record_steps=1, seeds=(0,), size=32),
                        progress=False)
    assert torch.equal(_unet_out(adapter, prompts), x)
    edit.revert(adapter)
    assert not torch.equal(_unet_out(adapter, prompts), x)


# ---- multi-concept, refusal, bad files -----------------------------------------------------------------
def test_multi_concept_one_call(tiny_sd1):
    adapter = _adapter(tiny_sd1)
    edit = _erase(adapter, forget=(FORGET, "Picasso"), retain=(RETAIN,), **PROTECT)
    assert edit.concepts["forget"] == [FORGET, "Picasso"]
    assert all(len(entries) == 2 for entries in edit.patches.values())
    rp, rnp = _style_prompts(RETAIN), [neutral_prompt(p, RETAIN) for p in _style_prompts(RETAIN)]
    br, brn = _attn_out(adapter, rp), _attn_out(adapter, rnp)
    for concept in (FORGET, "Picasso"):
        fp = _style_prompts(concept)
        npr = [neutral_prompt(p, concept) for p in fp]
        bf, bn = _attn_out(adapter, fp), _attn_out(adapter, npr)
        kept = []
        for e in (edit, _erase(adapter, forget=(concept,), retain=(RETAIN,), **PROTECT)):
            e.apply(adapter)
            try:
                af, an = _attn_out(adapter, fp), _attn_out(adapter, npr)
            finally:
                e.revert(adapter)
            kept.append(_forget_ratio(bf, bn, af, an, br, brn))
        print(concept, f"forget-specific gap kept {kept[0]:.3f} (two-concept patch), {kept[1]:.3f} (alone)")
        # each concept is erased about as well as by its own single-concept patch
        assert kept[0] < 0.4 and kept[0] < kept[1] + 0.1


def test_edit_for_other_family_or_weights_refused(tiny_sd1, tiny_sdxl, tiny_sd1_other_dir, tmp_path):
    sd1 = _adapter(tiny_sd1)
    edit = _erase(sd1)
    path = edit.save(str(tmp_path / "sd1.safetensors"))
    loaded = load_edit(path)
    with pytest.raises(EditFileError, match="another model"):
        loaded.apply(tiny_sdxl)
    assert not applied_stack(tiny_sdxl.unet) and not installed_hooks(tiny_sdxl.unet)
    other = pure_fast.adapters.load_model(tiny_sd1_other_dir)
    with pytest.raises(FingerprintMismatch):
        loaded.apply(other)
    assert not installed_hooks(other.unet)
    loaded.apply(other, force=True)  # same architecture: allowed on request
    revert_all(other)


def _rewrite(path, out, mutate):
    import json

    from pure_fast.fileio import load_safetensors, save_safetensors

    tensors, meta = load_safetensors(path)
    m = json.loads(meta["pure_fast"])
    mutate(tensors, m)
    save_safetensors(tensors, out, metadata={"pure_fast": json.dumps(m)})
    return out


def test_bad_patch_files_refused(tiny_sd1, tmp_path):
    edit = _erase(_adapter(tiny_sd1))
    path = edit.save(str(tmp_path / "ok.safetensors"))
    layer = next(iter(edit.patches))

    def not_orthonormal(t, m):
        t[f"{layer}.c0.basis"] = t[f"{layer}.c0.basis"] * 2

    def nan(t, m):
        t[f"{layer}.c0.anchor"] = t[f"{layer}.c0.anchor"] * float("nan")

    def bad_shape(t, m):
        t[f"{layer}.c0.anchor"] = torch.zeros(t[f"{layer}.c0.anchor"].shape[0] + 1)

    def extra(t, m):
        t["stray"] = torch.zeros(2)

    def bad_strength(t, m):
        m["options"]["strength"] = 7

    def bad_gate(t, m):
        m["options"]["gate"] = "nope"

    for fn, needle in ((not_orthonormal, "orthonormal"), (nan, "NaN"), (bad_shape, "shapes"),
                       (extra, "unexpected"), (bad_strength, "strength"), (bad_gate, "gate")):
        bad = _rewrite(path, str(tmp_path / f"{fn.__name__}.safetensors"), fn)
        with pytest.raises(EditFileError, match=needle):
            load_edit(bad)


def test_no_pair_is_a_usage_error(tiny_sd1):
    from pure_fast.collect.activations import CollectOptions
    with pytest.raises(UsageError, match="prompt pair"):
        run_method("acterase", _adapter(tiny_sd1), ["Van Gogh"], [], {"Van Gogh": ["a photo of a cat"]}, [],
                  options=ActEraseOptions(collect=CollectOptions(**FAST)), progress=False)


# ---- CLI --------------------------------------------------------------------------------------------------
def test_cli_erase_inspect_generate(tiny_sd1_dir, tmp_path, capsys):
    import json

    from pure_fast.cli import main

    out = str(tmp_path / "patch.safetensors")
    rc = main(["erase", "--model", tiny_sd1_dir, "--method", "acterase", "--forget", FORGET, "--retain", RETAIN,
               "--category", "style", "--out", out, "--quiet", "--size", "32", "--steps", "4", "--record-steps", "2",
               "--seed", "0", "--option", "gate_threshold=0.05"])
    assert rc == 0 and os.path.isfile(out)
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "acterase" and info["kind"] == "patch" and info["options"]["gate_threshold"] == 0.05
    assert main(["inspect", out]) == 0
    assert "activation patch (no weight change)" in capsys.readouterr().out
    gen = str(tmp_path / "gen")
    rc = main(["generate", "--model", tiny_sd1_dir, "--edit", out, "--prompt", f"art by {FORGET}",
               "--prompt", "a photo of a dog", "--seed", "1", "--steps", "3", "--size", "32", "--out-dir", gen,
               "--quiet"])
    assert rc == 0
    import numpy as np
    from PIL import Image

    def img(sub, name):
        return np.asarray(Image.open(os.path.join(gen, sub, name)), dtype=np.int16)

    assert sorted(os.listdir(os.path.join(gen, "edited"))) == ["000_1.png", "001_1.png"]
    assert np.abs(img("original", "000_1.png") - img("edited", "000_1.png")).max() > 0  # the forget prompt changed
    # bad option through the CLI: one line, exit 2, no file
    bad = str(tmp_path / "bad.safetensors")
    assert main(["erase", "--model", tiny_sd1_dir, "--method", "acterase", "--forget", FORGET, "--out", bad,
                 "--option", "strength=3"]) == 2
    assert "strength" in capsys.readouterr().err and not os.path.exists(bad)


# ---- the toy model: the erased colour's detector rate drops -----------------------------------------
@pytest.mark.slow  # ~40 s CPU on an idle 2-core machine (collection + 60 toy images x 10 steps)
def test_toy_colour_erasure_lowers_detector_rate():
    """Erase 'red' on the shipped toy model (12 anchor prompts, one collection seed): the detector's red
    rate on red canonical prompts drops, orange (the nearest hue) and blue keep theirs."""
    from pure_fast.collect.activations import CollectOptions
    from pure_fast.evaluate.toy_bench import colour_rates as toy_colour_rates
    from pure_fast.toy import world

    adapter = pure_fast.load_model("toy")
    target, keep = "red", ["orange", "blue"]
    f_prompts = {target: world.anchor_prompts(target)[:12]}
    r_prompts = [p for c in keep for p in world.anchor_prompts(c)[:6]]
    opts = ActEraseOptions(collect=CollectOptions(seeds=(0,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = run_method("acterase", adapter, [target], keep, f_prompts, r_prompts, options=opts, progress=False)
    kw = dict(every=5, seeds=(10, 11), steps=10)
    before = toy_colour_rates(adapter, [target, *keep], **kw)
    edit.apply(adapter)
    try:
        after = toy_colour_rates(adapter, [target, *keep], **kw)
    finally:
        revert_all(adapter)
    print("toy detector rate before", before, "after", after)
    assert before[target] >= 0.9
    assert after[target] <= before[target] - 0.4
    assert all(after[c] >= before[c] - 0.1 for c in keep)
