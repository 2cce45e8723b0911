"""Single-file (LDM / SGM layout) export: exact round trips through diffusers' own ``from_single_file``."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pure_fast.errors import ModelLoadError  # noqa: E402
from pure_fast.export.single_file import (  # noqa: E402
    ldm_unet_key,
    open_clip_to_ldm,
    pipeline_to_ldm_state_dict,
    save_single_file,
)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, what: str):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), what
    bad = [k for k in sa if sa[k].device.type == "meta" or sb[k].device.type == "meta" or not torch.equal(sa[k], sb[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def _sdxl_distinct_widths():
    from pure_fast.testing import build_tiny_sdxl_distinct_widths

    return build_tiny_sdxl_distinct_widths()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_from_single_file_round_trip_is_exact(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pure_fast.testing import build_tiny_pipeline

    pipe = _sdxl_distinct_widths() if family == "sdxl" else build_tiny_pipeline(family)
    folder = str(tmp_path / "config")
    pipe.save_pretrained(folder, safe_serialization=True)
    path = str(tmp_path / "model.safetensors")
    assert save_single_file(pipe, path) == path
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    if family == "sdxl":
        back = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True)
        comps = ["unet", "vae", "text_encoder", "text_encoder_2"]
    else:
        back = StableDiffusionPipeline.from_single_file(path, config=folder, local_files_only=True, safety_checker=None)
        comps = ["unet", "vae", "text_encoder"]
    for c in comps:
        _assert_same(getattr(pipe, c), getattr(back, c), f"{family} {c}")


def test_layout_keys_and_stock_tiny_sdxl_text_encoder_2(tiny_sdxl):
    """The stock tiny SDXL: every key in its place, OpenCLIP encoder exact through diffusers' converter."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, convert_open_clip_checkpoint

    sd = pipeline_to_ldm_state_dict(tiny_sdxl)
    te2 = tiny_sdxl.text_encoder_2
    assert CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in sd and CHECKPOINT_KEY_NAMES["clip_sdxl"] in sd
    p = "conditioner.embedders.1.model."
    assert sd[p + "text_projection"].shape == te2.text_projection.weight.T.shape
    assert torch.equal(sd[p + "transformer.resblocks.1.attn.in_proj_weight"][32:64],
                       te2.text_model.encoder.layers[1].self_attn.k_proj.weight)
    back = convert_open_clip_checkpoint(te2, sd, prefix=p)
    ref = te2.state_dict()
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    # dtype option casts floats only
    half = pipeline_to_ldm_state_dict(tiny_sdxl, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_full_size_unet_layout_inverts_diffusers_converter(arch):
    """Real SD1.5 / SD2 / SDXL UNets (meta tensors): diffusers' converter maps every key back to itself."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from pure_fast.export.single_file import UNET_PREFIX, unet_to_ldm
    from pure_fast.testing import ARCHITECTURES

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ARCHITECTURES[arch])
    cfg = dict(unet.config)
    ref = unet.state_dict()
    keys = list(ref)
    tagged = {UNET_PREFIX + ldm_unet_key(k, cfg): torch.tensor(i) for i, k in enumerate(keys)}
    assert len(tagged) == len(keys)
    back = convert_ldm_unet_checkpoint(tagged, cfg)
    assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
    ldm = unet_to_ldm(unet)
    assert set(ldm) == set(tagged)
    known = {
        "sd15": {"input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                 "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
                 "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                 "input_blocks.9.0.op.weight": (1280, 1280, 3, 3), "middle_block.1.proj_in.weight": (1280, 1280, 1, 1)},
        "sd2": {"input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                "middle_block.1.proj_in.weight": (1280, 1280)},
        "sdxl": {"input_blocks.4.1.transformer_blocks.1.attn2.to_v.weight": (640, 2048),
                 "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                 "label_emb.0.2.weight": (1280, 1280), "middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048)},
    }[arch]
    for k, shape in known.items():
        assert tuple(ldm[UNET_PREFIX + k].shape) == shape, k
    assert ldm_unet_key("up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight", unet.config) == (
        "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight")
    assert ldm_unet_key("down_blocks.1.downsamplers.0.conv.bias", unet.config) == "input_blocks.6.0.op.bias"


def test_full_size_vae_layout_inverts_diffusers_converter():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from pure_fast.export.single_file import VAE_PREFIX, ldm_vae_key, vae_to_ldm

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
    cfg = dict(vae.config)
    keys = list(vae.state_dict())
    tagged = {VAE_PREFIX + ldm_vae_key(k, cfg)[0]: torch.tensor(i) for i, k in enumerate(keys)}
    assert len(tagged) == len(keys)
    back = convert_ldm_vae_checkpoint(tagged, cfg)
    assert {k: int(v) for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
    ldm = vae_to_ldm(vae)
    for k in ["encoder.down.0.downsample.conv.weight", "decoder.up.3.upsample.conv.weight", "decoder.up.0.block.2.conv2.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "decoder.mid.attn_1.q.weight", "encoder.norm_out.bias"]:
        assert VAE_PREFIX + k in ldm, k
    assert ldm[VAE_PREFIX + "decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert ldm[VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)


def test_unknown_parameter_is_refused():
    cfg = {"layers_per_block": 1, "up_block_types": ("CrossAttnUpBlock2D",)}
    with pytest.raises(ModelLoadError):
        ldm_unet_key("encoder_hid_proj.weight", cfg)
    with pytest.raises(ModelLoadError):
        ldm_unet_key("down_blocks.0.resnets.0.unknown.weight", cfg)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    with pytest.raises(ModelLoadError):
        open_clip_to_ldm(Odd(), "x.")
