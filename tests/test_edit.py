"""Edit objects: exact apply/revert, save/load round trip, fingerprints, stacks, bad files."""
import json
import os

import pytest
import torch

import pure_fast
from pure_fast.adapters import wrap_pipeline
from pure_fast.edits.edit import LowRankEdit, applied_stack, kv_weights, revert_all
from pure_fast.edits.io import load_edit
from pure_fast.errors import EditFileError, FingerprintMismatch, NumericalError

from pure_fast.testing import FAST_COLLECT as FAST


@pytest.fixture(scope="module")
def pure_edit(tiny_sd1):
    return pure_fast.erase(wrap_pipeline(tiny_sd1), ["Van Gogh"], ["Claude Monet"], category="style", **FAST)


def _snapshot(pipe):
    return {k: v.detach().clone() for k, v in kv_weights(pipe.unet).items()}


def test_apply_changes_only_targets_and_revert_is_bit_exact(tiny_sd1, pure_edit):
    before = _snapshot(tiny_sd1)
    pure_edit.apply(tiny_sd1)
    after = _snapshot(tiny_sd1)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(pure_edit.target_weights()) and changed
    pure_edit.revert(tiny_sd1)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(tiny_sd1).items())
    assert applied_stack(tiny_sd1.unet) == []


def test_applied_weights_equal_dense_formula(tiny_sd1, pure_edit):
    name = pure_edit.target_weights()[0]
    W = kv_weights(tiny_sd1.unet)[name].detach().double().clone()
    up, down = pure_edit.factors[name]
    pure_edit.apply(tiny_sd1)
    got = kv_weights(tiny_sd1.unet)[name].detach().double()
    pure_edit.revert(tiny_sd1)
    torch.testing.assert_close(got, (W + up.double() @ down.double()).float().double())


def test_save_load_round_trip_exact(tmp_path, pure_edit):
    path = str(tmp_path / "e.safetensors")
    pure_edit.save(path)
    e2 = load_edit(path)
    assert isinstance(e2, LowRankEdit) and e2.meta() == pure_edit.meta()
    for k, t in pure_edit.tensors().items():
        assert torch.equal(t, e2.tensors()[k])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_fingerprint_refuses_other_weights(tiny_sd1, pure_edit):
    from pure_fast.testing import build_tiny_pipeline

    other = build_tiny_pipeline("sd1", seed=5)
    before = _snapshot(other)
    with pytest.raises(FingerprintMismatch, match="other weights"):
        pure_edit.apply(other)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(other).items())
    pure_edit.apply(other, force=True)
    revert_all(other)


def test_fingerprint_accepts_lower_precision_copy(tiny_sd1, pure_edit):
    from copy import deepcopy

    unet16 = deepcopy(tiny_sd1.unet).to(torch.float16)
    pure_edit.apply(unet16)
    pure_edit.revert(unet16)


def test_stack_chain_and_revert_order(tiny_sd1, pure_edit):
    ad = wrap_pipeline(tiny_sd1)
    base = _snapshot(tiny_sd1)
    pure_edit.apply(tiny_sd1)
    second = pure_fast.erase(ad, ["Picasso"], ["Claude Monet"], category="style", **FAST)  # made on top of the first
    pure_edit.revert(tiny_sd1)
    with pytest.raises(FingerprintMismatch):
        second.apply(tiny_sd1)  # its base is (model + first edit)
    pure_edit.apply(tiny_sd1)
    second.apply(tiny_sd1)  # chain: second.base == first.result
    with pytest.raises(EditFileError, match="revert the 1 edit"):
        pure_edit.revert(tiny_sd1)
    assert revert_all(tiny_sd1) == 2
    assert all(torch.equal(base[k], v) for k, v in _snapshot(tiny_sd1).items())


def test_nonfinite_edit_refused(tiny_sd1, pure_edit):
    bad = LowRankEdit(**{**{k: getattr(pure_edit, k) for k in ("method", "family", "concepts", "options")},
                         "factors": {n: (u.clone(), d.clone()) for n, (u, d) in pure_edit.factors.items()},
                         "shapes": dict(pure_edit.shapes)})
    name = next(iter(bad.factors))
    bad.factors[name][0][0, 0] = float("nan")
    before = _snapshot(tiny_sd1)
    with pytest.raises(NumericalError):
        bad.apply(tiny_sd1)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(tiny_sd1).items())


def test_edit_for_other_family_refused(tiny_sdxl, pure_edit):
    with pytest.raises(EditFileError, match="another model family|another model"):
        pure_edit.apply(tiny_sdxl)


@pytest.mark.parametrize("mutate", ["truncate", "garbage", "not_edit", "bad_json", "bad_shape", "nan"])
def test_bad_files_give_clear_errors(tmp_path, pure_edit, mutate):
    from safetensors.torch import save_file

    path = str(tmp_path / "e.safetensors")
    pure_edit.save(path)
    data = open(path, "rb").read()
    if mutate == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif mutate == "garbage":
        open(path, "wb").write(b"\x00\x01garbage" * 10)
    elif mutate == "not_edit":
        save_file({"x": torch.zeros(2)}, path)
    elif mutate == "bad_json":
        save_file({"x": torch.zeros(2)}, path, metadata={"pure_fast": "{nope"})
    elif mutate == "bad_shape":
        meta = pure_edit.meta()
        name = next(iter(meta["weights"]))
        meta["weights"][name] = [3, 3]
        save_file(pure_edit.tensors(), path, metadata={"pure_fast": json.dumps(meta)})
    elif mutate == "nan":
        t = pure_edit.tensors()
        k = next(iter(t))
        t[k] = t[k].clone()
        t[k][0, 0] = float("inf")
        save_file(t, path, metadata={"pure_fast": json.dumps(pure_edit.meta())})
    with pytest.raises(EditFileError):
        load_edit(path)


def test_low_rank_storage_is_small(tiny_sd1, pure_edit):
    """One round stores less than the dense fp16 K/V it changes. The closed loop (default 3 rounds) concatenates
    each round's factors: at most ``rounds`` times the rank, which on this tiny model's 32-wide layers can exceed
    dense storage (measured 70656 vs 45056 bytes); on SD's 320-1280-wide layers the ranks stay far below d."""
    one = pure_fast.erase(wrap_pipeline(tiny_sd1), ["Van Gogh"], ["Claude Monet"], category="style", rounds=1,
                          **FAST)
    dense = sum(torch.Size(s).numel() * 2 for s in one.shapes.values())  # fp16 dense K/V it changes
    assert one.nbytes() < dense
    assert max(one.ranks().values()) <= 8
    assert max(pure_edit.ranks().values()) <= 3 * 8 and pure_edit.options["rounds"] == 3
