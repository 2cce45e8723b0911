"""Adapters reproduce their pipelines exactly; layer discovery; collection processor equivalence."""
import numpy as np
import pytest
import torch

from pure_fast.adapters import wrap_pipeline
from pure_fast.collect.activations import PooledCrossAttnProcessor, Recorder, installed_processors


@pytest.mark.parametrize("fixture", ["tiny_sd1", "tiny_sdxl"])
def test_generate_matches_pipeline_call(fixture, request):
    pipe = request.getfixturevalue(fixture)
    ad = wrap_pipeline(pipe)
    prompt, seed, steps = "a painting of a red fox", 3, 3
    ours = ad.generate([prompt], [seed], steps=steps, size=32, progress=False)[0][0]
    latents = ad.initial_noise([seed], 32)
    ref = pipe(prompt, latents=latents, num_inference_steps=steps, height=32, width=32,
               guidance_scale=ad.default_guidance, output_type="pil").images[0]
    a, b = np.asarray(ours, dtype=np.int16), np.asarray(ref, dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


def test_sdxl_negative_is_zero_and_time_ids(tiny_sdxl):
    ad = wrap_pipeline(tiny_sdxl)
    neg = ad.encode_negative(2)
    assert neg.embeds.abs().max() == 0 and neg.added["text_embeds"].abs().max() == 0
    pos = ad.encode(["a cat", "a dog"])
    assert pos.embeds.shape == (2, 77, 64) and pos.added["text_embeds"].shape == (2, 32)
    assert ad.time_ids(2, 64).tolist()[0] == [64, 64, 0, 0, 64, 64]


def test_layers_listed_with_shapes(tiny_sd1, tiny_sdxl):
    for pipe, n, d_in in ((tiny_sd1, 7, 32), (tiny_sdxl, 11, 64)):
        layers = wrap_pipeline(pipe).cross_attention_layers()
        assert len(layers) == n
        assert all(l.name.endswith("attn2") and l.d_in == d_in for l in layers)
        assert {l.d_out for l in layers} == {32, 64}
        assert layers[-1].name.startswith("mid_block")  # named_modules order


def test_distinct_prompts_get_distinct_ids(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)
    t = ad.encode_tokens(["Van Gogh", "Claude Monet"])
    assert not torch.equal(t.ids[0], t.ids[1])
    assert t.last_subject.tolist() == [int(t.mask[0].sum()) - 2, int(t.mask[1].sum()) - 2]


def test_processor_is_exact_and_restored(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)
    layers = ad.cross_attention_layers()
    originals = [l.module.processor for l in layers]
    cond = ad.encode(["a red car", "a blue boat"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ad.unet_forward(x, 500, cond)
        rec = Recorder(layers, None)
        with installed_processors(layers, lambda i, l: PooledCrossAttnProcessor(i, rec)):
            out_idle = ad.unet_forward(x, 500, cond)
            rec.active, rec.groups = True, ["a", "b"]
            out_rec = ad.unet_forward(x, 500, cond)
    torch.testing.assert_close(out_idle, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_rec, ref, rtol=1e-5, atol=1e-6)
    assert [l.module.processor for l in layers] == originals
    assert rec.stats["a"][0].n_rows == 1 and rec.stats["b"][0].n_rows == 1


def test_processors_restored_on_error(tiny_sd1):
    ad = wrap_pipeline(tiny_sd1)
    layers = ad.cross_attention_layers()
    originals = [l.module.processor for l in layers]
    with pytest.raises(RuntimeError):
        with installed_processors(layers, lambda i, l: PooledCrossAttnProcessor(i, Recorder(layers, None))):
            raise RuntimeError("boom")
    assert [l.module.processor for l in layers] == originals


def test_fused_qkv_refused(tiny_sd1):
    from copy import deepcopy

    from pure_fast.adapters.layers import find_cross_attention_layers
    from pure_fast.errors import ModelLoadError

    unet = deepcopy(tiny_sd1.unet)
    unet.fuse_qkv_projections()
    with pytest.raises(ModelLoadError, match="unfuse_qkv_projections"):
        find_cross_attention_layers(unet)


def test_recorder_spans_equal_per_group_indexing(tiny_sd1):
    """Recorder slices contiguous runs of a group instead of indexing with a Python list (a host sync on CUDA);
    the statistics must equal indexing by group, for contiguous and interleaved layouts, rows and Gram."""
    from pure_fast.collect.activations import GroupStats

    layers = wrap_pipeline(tiny_sd1).cross_attention_layers()
    g = torch.Generator().manual_seed(3)
    for groups, max_rows in ((["a", "a", "b", "b", "b"], None), (["a", "b", "a", "c", "c"], None),
                             (["a", "b", "a", "c", "c"], 2)):
        rec = Recorder(layers, max_rows)
        rec.active, rec.groups, rec.cond_slice = True, groups, slice(len(groups), None)  # CFG: uncond rows first
        d = layers[0].d_out
        pooled = [torch.randn(2 * len(groups), d, generator=g) for _ in range(3)]
        for p in pooled:
            rec.record(0, p)
        for name in dict.fromkeys(groups):
            ref = GroupStats(d, max_rows or d)
            idx = [i for i, gi in enumerate(groups) if gi == name]
            for p in pooled:
                ref.add(p[len(groups):][idx])
            got = rec.stats[name][0]
            assert got.n_rows == ref.n_rows == 3 * len(idx)
            torch.testing.assert_close(got.mean(), ref.mean(), rtol=1e-12, atol=1e-12)
            if ref.is_gram:
                assert got.is_gram
                torch.testing.assert_close(got.gram, ref.gram, rtol=1e-6, atol=1e-5)
            else:
                torch.testing.assert_close(got.matrix(), ref.matrix(), rtol=0, atol=0)
    assert Recorder(layers, None).spans == []
