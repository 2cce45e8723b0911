"""The v2 toy model: SD-like shape, the exact space-to-depth VAE, training steps, resumption, and PURE through
the adapter on a randomly initialised v2 UNet."""
import json

import numpy as np
import pytest
import torch

from pure_fast.toy.v2 import model as M


def _meta_unet(cfg):
    with torch.device("meta"):
        return M.build_unet(cfg)


def test_config_meets_the_sd_shape_constraints():
    unet = _meta_unet(M.UNET_CONFIG)
    assert M.sd_shape_violations(unet) == []
    s = M.shape_summary(unet)
    assert s["levels"] >= 3 and min(s["kv_widths"]) >= 128 and min(s["head_channels"]) >= 32
    # cross-attention in every down, mid and up block: 3 down + 1 mid + 2 per up level
    assert s["cross_attention_layers"] == 3 + 1 + 2 * 3
    for _, m in ((n, m) for n, m in unet.named_modules() if n.endswith("attn2")):
        assert m.to_k.in_features == 384 and m.to_k.out_features == m.to_v.out_features >= 128
    # the fp16 export fits the 40 MB budget
    assert s["parameters"] * 2 <= 40e6
    # the check can fail: v1's narrow shape, two levels, and 16-channel heads are each refused
    narrow = _meta_unet(M.unet_config((32, 64, 64)))
    assert any("K/V width 32" in v for v in M.sd_shape_violations(narrow))
    two = _meta_unet(M.unet_config((128, 128)))
    assert any("resolution levels" in v for v in M.sd_shape_violations(two))
    small_heads = _meta_unet(M.unet_config((128, 128, 128), heads=(8, 8, 8)))
    assert any("heads of 16 channels" in v for v in M.sd_shape_violations(small_heads))
    no_attn_top = _meta_unet(dict(M.UNET_CONFIG, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D")))
    assert any("down_blocks.0 has no transformer block" in v for v in M.sd_shape_violations(no_attn_top))


def test_space_to_depth_vae_is_exact():
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32))).float() / 127.5 - 1
    for f in (2, 4):
        z = M.encode_pixels(x, f)
        assert z.shape == (3, 3 * f * f, 32 // f, 32 // f)
        assert torch.equal(M.decode_latents(z, f), x)
        # each latent pixel holds its f x f pixel block
        assert torch.equal(z[0, :, 3, 5].view(3, f, f), x[0, :, 3 * f:4 * f, 5 * f:6 * f])
    assert M.encode_pixels(x).shape[1] == 3 * M.LATENT["factor"] ** 2  # the default is the model's
    assert M.latent_of(M.UNET_CONFIG) == M.LATENT and M.latent_of(M.unet_config(factor=2))["factor"] == 2


TINY = "32,32,32"


def _train_args(out, *extra):
    return ["--channels", TINY, "--batch-size", "2", "--steps", "4", "--warmup", "2", "--ckpt-every", "1000",
            "--out", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def minilm():
    from pure_fast.adapters.toy import weights_available  # noqa: F401
    from pure_fast.toy.text import model_dir

    try:
        model_dir()
    except Exception:  # noqa: BLE001
        pytest.skip("MiniLM text encoder package not installed")


def test_step_data_is_a_function_of_seed_and_step():
    from pure_fast.toy.v2.train import step_batch

    a = step_batch(0, 5, 3, 0.1, "cpu")
    b = step_batch(0, 5, 3, 0.1, "cpu")
    c = step_batch(0, 6, 3, 0.1, "cpu")
    assert all(torch.equal(x, y) for x, y in zip((a[0], a[2], a[3]), (b[0], b[2], b[3]))) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    f = M.LATENT["factor"]
    assert a[0].shape == (3, 3 * f * f, 32 // f, 32 // f) and a[0].abs().max() <= 1
    assert step_batch(0, 5, 3, 0.1, "cpu", 2)[0].shape == (3, 12, 16, 16)


def _load_run(out):
    from safetensors.torch import load_file

    return {n: load_file(str(out / f"{n}.safetensors")) for n in ("model", "ema", "optim")}, \
        json.loads((out / "state.json").read_text())


def test_training_runs_and_resume_equals_uninterrupted(tmp_path, minilm):
    from pure_fast.toy.v2 import train

    torch.set_num_threads(1)
    train.main(_train_args(tmp_path / "a"))
    train.main(_train_args(tmp_path / "b", "--stop-at", "2"))
    mid, st_mid = _load_run(tmp_path / "b")
    assert st_mid["step"] == 2 and st_mid["data_rng"]["next_step"] == 2
    train.main(_train_args(tmp_path / "b", "--resume"))
    a, st_a = _load_run(tmp_path / "a")
    b, st_b = _load_run(tmp_path / "b")
    assert st_a["step"] == st_b["step"] == 4
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # training changed the weights, and the loss is finite
    assert any(not torch.equal(mid["model"][k], a["model"][k]) for k in a["model"])
    assert np.isfinite(st_a["final_loss"])
    assert st_a["running_loss"] == st_b["running_loss"]


def _random_v2_folder(tmp_path, channels=(32, 32, 32)):
    """A weights folder with a randomly initialised v2-structured UNet (config.json + unet.safetensors)."""
    from safetensors.torch import save_file

    cfg = M.unet_config(channels)
    torch.manual_seed(0)
    unet = M.build_unet(cfg)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    meta = {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "scheduler": M.SCHEDULER_CONFIG, "text_encoder": {"max_tokens": 32}, "size": 32, "latent": M.LATENT,
            "null_caption": ""}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    return tmp_path


def test_adapter_and_pure_on_a_random_v2_unet(tmp_path, minilm):
    import pure_fast
    from pure_fast.adapters.toy import load_toy

    torch.set_num_threads(1)
    adapter = load_toy(weights_dir=_random_v2_folder(tmp_path))
    f = M.LATENT["factor"]
    assert adapter.vae_scale_factor == f and adapter.latent_shape(32) == (3 * f * f, 32 // f, 32 // f)
    assert adapter.default_size == 32
    lat = adapter.denoise(adapter.encode(["a red letter Q"]), [3], steps=2)
    assert lat.shape == (1, 3 * f * f, 32 // f, 32 // f)
    img = adapter.decode_array(lat)
    assert img.shape == (1, 32, 32, 3) and img.dtype == np.uint8
    # decoding is the exact depth-to-space of the latents (up to the uint8 rounding)
    px = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = M.encode_pixels(px)
    assert torch.allclose(z, lat.clamp(-1, 1), atol=1 / 127.5)
    layers = adapter.cross_attention_layers()
    assert len(layers) == 10
    before = {n: t.clone() for n, t in adapter.unet.state_dict().items() if "attn2.to_" in n}
    edit = pure_fast.erase(adapter, ["letter Q"], ["letter R"], method="pure", templates=["a red {}", "a blue {}"],
                           steps=2, record_steps=2, seeds=(0,), progress=False, fingerprint=False)
    edit.apply(adapter, check=False)
    changed = [n for n, t in adapter.unet.state_dict().items() if n in before and not torch.equal(t, before[n])]
    assert changed and all(".to_k." in n or ".to_v." in n for n in changed)
    edit.revert(adapter)
    assert all(torch.equal(adapter.unet.state_dict()[n], t) for n, t in before.items())


def test_card_measures_and_lists_every_concept(tmp_path, minilm):
    from pure_fast.adapters.toy import load_toy
    from pure_fast.toy.v2 import card, detectors, world

    if not (detectors.WEIGHTS_DIR / "detector.safetensors").exists():
        pytest.skip("v2 detector weights not shipped")
    torch.set_num_threads(1)
    wd = _random_v2_folder(tmp_path)
    adapter = load_toy(weights_dir=wd)
    acc = card.measure(adapter, ["Q", "teal"], seeds=(1000, 1001), steps=1, canonical_per_concept=2,
                       heldout_per_concept=1, progress=False)
    assert set(acc) == {"Q", "teal"}
    for a in acc.values():
        assert a["n_heldout"] == 2 and a["n_canonical"] >= 4 and 0 <= a["canonical"] <= 1 and 0 <= a["heldout"] <= 1
    c = card.write_card(wd, accuracy=acc, evaluation={"seeds": [1000, 1001]})
    md = (wd / "MODEL_CARD.md").read_text()
    assert c["shape"]["violations"]  # the 32-wide test UNet is refused by the shape check
    for concept in world.all_concepts():  # every concept is listed, measured or not
        assert f"| {concept} |" in md
    assert "**not measured**" in md and "Below the requirement" in md
    # the summary counts what the table shows: a concept not measured fails; means over the measured ones
    summ = c["concept_accuracy_summary"]
    n = len(world.all_concepts())
    passing = [k for k, a in acc.items() if a["canonical"] >= card.REQUIRED_CANONICAL and a["heldout"] >= card.REQUIRED_HELDOUT]
    assert summ["n_concepts"] == n and summ["n_pass"] == len(passing) and len(summ["failing"]) == n - len(passing)
    assert summ["canonical_mean"] == pytest.approx((acc["Q"]["canonical"] + acc["teal"]["canonical"]) / 2, abs=1e-4)
    assert summ["categories"]["shape"]["canonical"] is None and summ["categories"]["glyph"]["n"] == 36
    assert f"({n - len(passing)} of {n})" in md


def test_set_total_moves_the_schedule_end_and_is_recorded(tmp_path, minilm):
    from pure_fast.toy.v2 import train

    torch.set_num_threads(1)
    train.main(_train_args(tmp_path, "--stop-at", "2"))
    with pytest.raises(SystemExit, match="--set-total needs --resume"):
        train.main(_train_args(tmp_path, "--set-total", "3"))
    with pytest.raises(SystemExit, match="past the checkpoint's step 2"):
        train.main(_train_args(tmp_path, "--resume", "--set-total", "2"))
    train.main(_train_args(tmp_path, "--resume", "--set-total", "3"))
    st = json.loads((tmp_path / "state.json").read_text())
    assert st["step"] == st["total_steps"] == 3
    assert st["total_changes"] == [{"at_step": 2, "from": 4, "to": 3}]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_prediction_targets_invert(kind):
    """x0 and eps recovered from each prediction type's target are the ones x_t was made from."""
    from pure_fast.toy.v2 import train

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 48, 8, 8, generator=g), torch.randn(3, 48, 8, 8, generator=g)
    a = torch.tensor([0.999, 0.5, 0.006]).view(-1, 1, 1, 1).double()
    x0, noise = x0.double(), noise.double()
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = train.prediction_target(x0, noise, a, kind)
    assert torch.allclose(train.x0_from_prediction(xt, pred, a, kind), x0, atol=1e-9)
    assert torch.allclose(train.eps_from_prediction(xt, pred, a, kind), noise, atol=1e-9)
    if kind == "v_prediction":  # nearly the noise at low noise (a ~ 1), nearly -x0 at high noise (a ~ 0)
        assert (pred[0] - noise[0]).abs().max() < 0.2 and (pred[2] + x0[2]).abs().max() < 0.4
        assert (pred[0] + x0[0]).abs().mean() > 0.9 and (pred[2] - noise[2]).abs().mean() > 0.9


def test_v_prediction_run_exports_its_scheduler_and_keeps_its_kind(tmp_path, minilm):
    """A v-prediction run trains, records its kind, exports a scheduler config the adapter samples with; a resumed
    run cannot switch kinds; an older run without the record counts as epsilon."""
    from pure_fast.adapters.toy import load_toy
    from pure_fast.toy.v2 import train

    torch.set_num_threads(1)
    train.main(_train_args(tmp_path / "v", "--prediction-type", "v_prediction", "--stop-at", "2"))
    assert json.loads((tmp_path / "v" / "state.json").read_text())["prediction_type"] == "v_prediction"
    with pytest.raises(SystemExit, match="cannot change --prediction-type"):
        train.main(_train_args(tmp_path / "v", "--resume", "--prediction-type", "epsilon"))
    train.main(_train_args(tmp_path / "v", "--resume", "--export", str(tmp_path / "exp")))
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["scheduler"]["prediction_type"] == "v_prediction" and cfg["training"]["prediction_type"] == "v_prediction"
    ad = load_toy(weights_dir=tmp_path / "exp")
    assert ad.make_scheduler().config.prediction_type == "v_prediction"
    # a snapshot mid-run: the checkpoint's EMA exported as is, no training step taken
    with pytest.raises(SystemExit, match="--export-now needs --resume"):
        train.main(_train_args(tmp_path / "v", "--export-now", "--export", str(tmp_path / "snap")))
    train.main(_train_args(tmp_path / "v", "--resume", "--export-now", "--export", str(tmp_path / "snap")))
    assert json.loads((tmp_path / "v" / "state.json").read_text())["step"] == 4
    from safetensors.torch import load_file
    snap, exp = load_file(str(tmp_path / "snap" / "unet.safetensors")), load_file(str(tmp_path / "exp" / "unet.safetensors"))
    assert all(torch.equal(snap[k], exp[k]) for k in exp)
    assert ad.generate(["a red circle"], [1000], steps=2, progress=False)[0][0].size == (32, 32)
    # a run from before the option (no prediction_type in its state) is an epsilon run
    train.main(_train_args(tmp_path / "e", "--stop-at", "2"))
    st = json.loads((tmp_path / "e" / "state.json").read_text())
    st.pop("prediction_type")
    (tmp_path / "e" / "state.json").write_text(json.dumps(st))
    with pytest.raises(SystemExit, match="this run trains epsilon"):
        train.main(_train_args(tmp_path / "e", "--resume", "--prediction-type", "v_prediction"))
