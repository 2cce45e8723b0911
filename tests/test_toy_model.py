"""The shipped toy model loads through load_toy and renders what it is asked for."""
import numpy as np
import pytest
import torch

from pure_fast.toy.model import WEIGHTS_DIR

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "unet.safetensors").exists(), reason="toy weights not shipped")


@pytest.fixture(scope="module")
def toy():
    from pure_fast.adapters.toy import load_toy

    return load_toy()


def test_adapter_interface(toy):
    assert toy.family == "toy"
    assert toy.latent_shape(16) == (3, 16, 16)
    layers = toy.cross_attention_layers()
    assert layers and all(l.d_in == 384 for l in layers)
    te = toy.encode_tokens(["a red circle", "a blue star on a striped background"])
    assert te.embeds.shape[0] == 2 and te.embeds.shape[2] == 384
    assert te.mask.shape == te.ids.shape == te.embeds.shape[:2]
    # [CLS] a red circle [SEP]: last subject token is 'circle'
    assert te.last_subject[0].item() == 3
    assert toy.tokenize("a red circle") == ["a", "red", "circle"]
    assert toy.encode_negative(3).embeds.shape == (3, te.embeds.shape[1], 384)
    assert type(toy.make_scheduler()).__name__ == "DDIMScheduler"


def test_same_seed_same_image(toy):
    a = toy.generate(["a green square"], [3], steps=4, progress=False)[0][0]
    b = toy.generate(["a green square", "a red star"], [3], steps=4, batch_size=1, progress=False)[0][0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_canonical_colour_prompt_renders_that_colour(toy):
    from pure_fast.toy.detectors import detect
    from pure_fast.toy.world import canonical_prompt

    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompts = [canonical_prompt("square", "blue", "plain"), canonical_prompt("circle", "yellow", "plain")]
    imgs = toy.generate(prompts, [0, 1], steps=20, batch_size=4, progress=False)
    det = detect([im for row in imgs for im in row])
    assert det["colour"][:2].count("blue") >= 1 and det["colour"][2:].count("yellow") >= 1, det["colour"]
    assert sum(c in ("blue", "yellow") for c in det["colour"]) >= 3, det["colour"]
