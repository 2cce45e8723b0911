"""Tiny pipelines with random weights, built in-process (tests, the no-weights demo, shape work).

Tokenizers use the real CLIP BPE vocabulary shipped by ``open-clip-torch`` (installed with --no-deps), so
different prompts get different token ids exactly as with real Stable Diffusion. ``build_unet_architecture``
gives the full SD1.5 / SD2 / SDXL UNets with random weights (or on the ``meta`` device) for speed work.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache

import torch

from .errors import PureFastError


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_bpe_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        from .deps import MissingDependency, missing_message

        raise MissingDependency(missing_message("open_clip", "the CLIP vocabulary of the tiny test pipelines"))
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise PureFastError(f"CLIP BPE vocabulary not found at {path}; reinstall open-clip-torch (--no-deps)")
    return path


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> str:
    """A folder with vocab.json + merges.txt of the real CLIP BPE (49408 tokens), built once per process."""
    merges = gzip.open(_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tempfile.mkdtemp(prefix="pure_fast_clip_tok_")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    return folder


@lru_cache(maxsize=1)
def byte_tokenizer_files() -> str:
    """A CLIP-format vocabulary of single bytes (no merges) with CLIP's special-token ids: one token per
    character, for the tiny demo where open-clip-torch (the real BPE) is not installed."""
    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})  # the ids the tiny text configs expect
    folder = tempfile.mkdtemp(prefix="pure_fast_byte_tok_")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return folder


def has_clip_vocabulary() -> bool:
    """Is open-clip-torch (the real CLIP BPE vocabulary) importable?"""
    import importlib.util

    try:
        return importlib.util.find_spec("open_clip") is not None
    except (ValueError, AttributeError):  # a None / spec-less entry in sys.modules: hidden on purpose
        return False


def clip_tokenizer(pad_token: str | None = None, vocabulary: str = "clip"):
    """A CLIPTokenizer with the real CLIP BPE (``vocabulary='clip'``, needs open-clip-torch) or one token per
    byte (``'bytes'``, no extra package)."""
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_files() if vocabulary == "clip" else byte_tokenizer_files()
    kwargs = {"model_max_length": 77}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), **kwargs)


def _clip_text_config(hidden: int, layers: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden, intermediate_size=2 * hidden,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=layers, vocab_size=49408,
        max_position_embeddings=77, hidden_act="quick_gelu",
    )
    if projection is not None:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4,
        sample_size=32,
    )


def _ddim(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def build_tiny_pipeline(family: str = "sd1", seed: int = 0, vocabulary: str = "clip"):
    """A randomly initialised pipeline of the given family ('sd1', 'sd2', 'sdxl'), ~1-3M parameters.

    Several cross-attention layers of two widths (32 and 64) so shape groups are exercised; 32 px images.
    ``vocabulary``: the tokenizers' vocabulary, 'clip' (real BPE) or 'bytes' (see ``clip_tokenizer``).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family in ("sd1", "sd2"):
        d_txt = 32 if family == "sd1" else 48
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=d_txt, attention_head_dim=(2, 4) if family == "sd2" else 4,
            use_linear_projection=family == "sd2", norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(_clip_text_config(d_txt))
        pipe = StableDiffusionPipeline(
            vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=clip_tokenizer(vocabulary=vocabulary), unet=unet,
            scheduler=_ddim("v_prediction" if family == "sd2" else "epsilon"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif family == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8,
        )
        te1 = CLIPTextModel(_clip_text_config(32))
        te2 = CLIPTextModelWithProjection(_clip_text_config(32, projection=32))
        pipe = StableDiffusionXLPipeline(
            vae=_tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=clip_tokenizer(vocabulary=vocabulary),
            tokenizer_2=clip_tokenizer(pad_token="!", vocabulary=vocabulary), unet=unet, scheduler=_ddim(),
            force_zeros_for_empty_prompt=True,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; use sd1, sd2 or sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_distinct_widths(seed: int = 0):
    """The tiny SDXL with a 48-wide second text encoder (UNet context 32 + 48), for single-file checkpoints.

    diffusers' ``from_single_file`` picks the conversion of each text encoder by comparing the width of the
    checkpoint's position embeddings with the encoder it builds; the stock tiny SDXL has two 32-wide
    encoders, so its ``text_encoder_2`` would be filled from ``conditioner.embedders.0`` (real SDXL: 768 vs 1280).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    pipe = build_tiny_pipeline("sdxl", seed)
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(_clip_text_config(48, projection=32))
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 32 + 48})
    pipe.register_modules(text_encoder_2=te2, unet=unet)
    return pipe


def save_tiny_pipeline(path: str, family: str = "sd1", seed: int = 0) -> str:
    """Build and save a tiny pipeline as a diffusers folder (safetensors); returns the path."""
    pipe = build_tiny_pipeline(family, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---- full-size architectures (random weights) -------------------------------------------------------
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD2_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
ARCHITECTURES = {"sd15": SD15_UNET, "sd2": SD2_UNET, "sdxl": SDXL_UNET}


def build_unet_architecture(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The full UNet of SD1.5 / SD2 / SDXL with random weights (device='meta' for shapes only)."""
    from diffusers import UNet2DConditionModel

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**ARCHITECTURES[name])
    return unet.to(dtype=dtype)


# fast collection settings for tests on tiny pipelines: 32 px, 1 seed, 4-step schedule, 2 recorded steps
FAST_COLLECT = dict(size=32, seeds=(0,), steps=4, record_steps=2)


def _architecture_parts(name: str, dtype: torch.dtype, seed: int) -> dict:
    """Every component of a full-size SD1.5 / SD2 / SDXL pipeline except the UNet (random weights)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; use one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512).to(dtype)

    def te(hidden, layers, heads, proj=None, act="quick_gelu"):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act=act,
                             **({"projection_dim": proj} if proj else {}))
        return (CLIPTextModelWithProjection(cfg) if proj else CLIPTextModel(cfg)).to(dtype)

    if name == "sdxl":
        return dict(vae=vae, text_encoder=te(768, 12, 12), text_encoder_2=te(1280, 32, 20, proj=1280, act="gelu"),
                    tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"), scheduler=_ddim())
    hidden, layers, heads = (768, 12, 12) if name == "sd15" else (1024, 23, 16)
    return dict(vae=vae, text_encoder=te(hidden, layers, heads, act="quick_gelu" if name == "sd15" else "gelu"),
                tokenizer=clip_tokenizer(), scheduler=_ddim("epsilon" if name == "sd15" else "v_prediction"),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _architecture_class(name: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline


def build_architecture_pipeline(name: str = "sd15", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A full-size SD1.5 / SD2 / SDXL pipeline with random weights (UNet, text encoder(s), VAE) for timing.

    Timing does not depend on weight values; tokenizers are the real CLIP BPE.
    """
    parts = _architecture_parts(name, dtype, seed)
    unet = build_unet_architecture(name, dtype=dtype, seed=seed)
    return _architecture_class(name)(unet=unet, **parts)


def save_architecture_folder(path: str, name: str = "sd15", dtype: torch.dtype = torch.float32, seed: int = 0,
                             max_shard_size: str = "10GB") -> str:
    """Save a full-size random-weight pipeline as a diffusers folder, one component at a time (the SDXL UNet
    alone is 10.3 GB in float32: it is built after the other components are saved and freed). The UNet is
    sharded (``*.safetensors.index.json``) when larger than ``max_shard_size``. Returns ``path``."""
    import gc
    import json as _json

    pipe = _architecture_class(name)(unet=None, **_architecture_parts(name, dtype, seed))
    pipe.save_pretrained(path, safe_serialization=True)
    del pipe
    gc.collect()
    unet = build_unet_architecture(name, dtype=dtype, seed=seed)
    unet.save_pretrained(os.path.join(path, "unet"), safe_serialization=True, max_shard_size=max_shard_size)
    del unet
    gc.collect()
    index_path = os.path.join(path, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = _json.load(f)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    with open(index_path, "w", encoding="utf-8") as f:
        _json.dump(index, f, indent=2)
    return path


# ---- several processes on one machine (tests, bench/bench_distributed.py) ----------------------------------
def free_port() -> int:
    """A TCP port free on localhost now (for MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, threads: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), PURE_FAST_PROGRESS="0",
                      HF_HUB_OFFLINE="1")
    torch.set_num_threads(threads)
    from . import distributed

    distributed._state.joined_group = True  # the workers' groups: end as the pure-fast program does
    try:
        fn(rank, *args)
    except BaseException:  # noqa: BLE001 - report like multiprocessing does, then the same exit path
        import traceback

        traceback.print_exc()
        distributed.exit_process(1)
    distributed.exit_process(0)


def run_ranks(fn, args: tuple = (), world: int = 2, timeout: float = 600, threads: int = 1) -> list:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes with the environment torchrun sets (localhost,
    a free port); returns their exit codes (None: still running at ``timeout``, then killed).
    ``fn`` must be importable by name (a module-level function)."""
    import multiprocessing
    import time

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, threads, fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes
