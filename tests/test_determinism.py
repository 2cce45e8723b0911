"""Determinism: the same model, inputs, options and seeds give the same edit on CPU, for every method.

Definition (documented in README "Reliability" and ``Edit.content_digest``): an edit file holds
run-specific fields, ``created`` (time), ``edit_id`` (random id, used to identify an applied edit) and
wall-clock seconds inside ``stats`` (``timings``, SPACE's per-group ``time_s``). Everything else must be bit-identical between two runs: every
tensor's bytes, dtype and shape in the saved file, and every other metadata field (method, options, seeds,
concepts, ranks, fingerprints of the base and resulting weights). ``Edit.content_digest()`` hashes exactly
that. Runs use two separately built (identical) pipelines, so nothing is shared through caches. The
controls check that the digest does react: another seed (methods that sample a trajectory) or another
concept (all methods) changes it. Same machine and thread count (torch's CPU kernels are deterministic
for a fixed thread count).
"""
from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch

import pure_fast
from pure_fast.methods import method_names

FAST = dict(size=32, seeds=(0,), steps=4, record_steps=2)
COLLECTING = {"pure", "acterase"}  # methods that run a denoising trajectory (seeded)


def _options(method: str, seed: int = 0) -> dict:
    if method in COLLECTING:
        return dict(FAST, seeds=(seed,))
    if method == "space":
        return dict(max_iter=40)
    return {}


_FIRST: dict = {}


def _first(method):
    """The first run of ``method`` on the default inputs (shared by the tests below)."""
    if method not in _FIRST:
        _FIRST[method] = _erase(method)
    return _FIRST[method]


def _erase(method, forget=("Van Gogh",), seed=0):
    from pure_fast.testing import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pure_fast.erase(pipe, forget=list(forget), retain=["Claude Monet"], method=method, category="style",
                               progress=False, **_options(method, seed))


def _file_parts(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["pure_fast"])
    for key in ("created", "edit_id"):
        meta.pop(key)

    def strip(x):  # wall-clock keys at any depth of stats
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("timings", "time_s")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    meta["stats"] = strip(meta["stats"])
    return header, meta, raw[8 + n :]


@pytest.mark.parametrize("method", method_names())
def test_same_inputs_same_edit(method, tmp_path):
    a, b = _first(method), _erase(method)
    assert a.content_digest() == b.content_digest()
    pa, pb = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    a.save(pa)
    b.save(pb)
    ha, ma, da = _file_parts(pa)
    hb, mb, db = _file_parts(pb)
    assert ha == hb  # tensor names, dtypes, shapes, offsets
    assert da == db  # every tensor byte
    assert ma == mb  # every metadata field but created / edit_id / timings
    assert a.edit_id != b.edit_id  # the run id stays unique (applied edits are tracked by it)
    # the digest survives a save / load round trip
    assert pure_fast.load_edit(pa).content_digest() == a.content_digest()


@pytest.mark.parametrize("method", [m if m in ("pure", "uce") else pytest.param(m, marks=pytest.mark.slow)
                                    for m in method_names()])
def test_digest_reacts_to_inputs(method):
    base = _first(method)
    other = _erase(method, forget=("Claude Monet's teacher",))
    assert other.content_digest() != base.content_digest()
    if method in COLLECTING:
        assert _erase(method, seed=1).content_digest() != base.content_digest()


def test_volatile_fields_do_not_change_digest():
    from pure_fast.edits.edit import LowRankEdit

    f = {"x.attn2.to_k.weight": (torch.ones(3, 1), torch.ones(1, 2))}
    a = LowRankEdit(method="pure", family="sd1", concepts={}, options={}, factors=f, shapes={"x.attn2.to_k.weight": (3, 2)},
                    stats={"timings": {"collect_s": 1.0}, "rows": 3})
    b = LowRankEdit(method="pure", family="sd1", concepts={}, options={}, factors=f, shapes={"x.attn2.to_k.weight": (3, 2)},
                    stats={"timings": {"collect_s": 9.0}, "rows": 3}, created="2000-01-01T00:00:00+00:00")
    assert a.edit_id != b.edit_id and a.content_digest() == b.content_digest()
    c = LowRankEdit(method="pure", family="sd1", concepts={}, options={}, factors=f, shapes={"x.attn2.to_k.weight": (3, 2)},
                    stats={"timings": {"collect_s": 1.0}, "rows": 4})
    assert c.content_digest() != a.content_digest()
    f2 = {"x.attn2.to_k.weight": (torch.ones(3, 1), torch.tensor([[1.0, 1.0 + 2**-20]]))}
    d = LowRankEdit(method="pure", family="sd1", concepts={}, options={}, factors=f2, shapes={"x.attn2.to_k.weight": (3, 2)},
                    stats={"timings": {"collect_s": 1.0}, "rows": 3})
    assert d.content_digest() != a.content_digest()  # one ulp-scale change in one tensor
