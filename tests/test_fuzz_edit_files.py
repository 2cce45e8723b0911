"""Fuzzing edit files: random and mutated files end in a clear error or a correct load, never a crash.

The property checked for every generated file (``_outcome``):

- ``load_edit`` either raises :class:`EditFileError` with a one-line message, or returns an Edit;
- a loaded Edit can be inspected, and ``apply`` on the tiny SD1 UNet either raises a PureFastError
  (the weights stay bit-identical) or succeeds with finite weights, and ``revert`` restores them bit-exactly;
- ``pure-fast inspect FILE`` exits 0 or 1 with at most one line on stderr and no traceback.

Mutations: byte flips and overwrites, truncation, appended junk, a rewritten header-length field,
structured header edits (dtype, shape including huge dimensions, data offsets, names, metadata fields and
their types), and NaN/Inf values. Hypothesis runs derandomized (the same examples on every run) with a
small ``max_examples`` so the file stays well under a minute.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pure_fast.errors import EditFileError, PureFastError

FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ---- a small valid edit on the tiny SD1 UNet ----------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    from pure_fast.testing import build_tiny_pipeline

    return build_tiny_pipeline("sd1").unet


def _make(kind, unet, folder):
    """(bytes of a valid edit file of ``kind`` for ``unet``, its Edit, the folder)."""
    from pure_fast.api import stamp_fingerprints
    from pure_fast.edits.edit import LowRankEdit, kv_weights

    g = torch.Generator().manual_seed(0)
    w = kv_weights(unet)
    names = sorted(w)[:3]
    common = dict(method="pure", family="sd1", concepts={"forget": ["x"], "retain": ["y"]}, options={"t": 0.9})
    if kind == "lowrank":
        factors = {n: (torch.randn(w[n].shape[0], 2, generator=g) * 0.1, torch.randn(2, w[n].shape[1], generator=g) * 0.1)
                   for n in names}
        edit = LowRankEdit(factors=factors, shapes={n: tuple(w[n].shape) for n in names}, **common)
    elif kind == "shared_right":
        from pure_fast.edits.shared import SharedRightEdit

        d_in = w[names[0]].shape[1]
        same = [n for n in sorted(w) if w[n].shape[1] == d_in]
        U, V = torch.randn(d_in, 2, generator=g) * 0.1, torch.randn(d_in, 2, generator=g) * 0.1
        edit = SharedRightEdit(shapes={n: tuple(w[n].shape) for n in same}, **SharedRightEdit.pack(U, V), **common)
    else:
        from pure_fast.edits.sparse import SparseWeightsEdit

        dense = {n: w[n].detach() * (torch.rand(w[n].shape, generator=g) < 0.2) for n in names}
        edit = SparseWeightsEdit.from_dense(dense, **common)
    stamp_fingerprints(edit, unet)
    path = os.path.join(folder, f"good-{kind}.safetensors")
    edit.save(path)
    with open(path, "rb") as f:
        data = f.read()
    return data, edit, folder


@pytest.fixture(scope="module")
def good(unet, tmp_path_factory):
    return _make("lowrank", unet, str(tmp_path_factory.mktemp("fuzz_edit")))


@pytest.fixture(scope="module", params=["lowrank", "shared_right", "csr_weights"])
def good_kind(request, unet, tmp_path_factory):
    return _make(request.param, unet, str(tmp_path_factory.mktemp("fuzz_edit")))


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def _snapshot(unet):
    from pure_fast.edits.edit import kv_weights

    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outcome(data: bytes, unet, folder: str) -> str:
    """Write ``data`` as an edit file and run the property; returns rejected / refused / applied."""
    from pure_fast.cli import main
    from pure_fast.edits.edit import kv_weights
    from pure_fast.edits.io import load_edit

    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    try:
        # the CLI: exit 0 or 1, at most one stderr line, never a traceback
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["inspect", path])
        lines = err.getvalue().strip().splitlines()
        assert rc in (0, 1), (rc, err.getvalue())
        assert len(lines) <= 1 and "Traceback" not in err.getvalue() and "unexpected" not in err.getvalue(), lines
        assert (rc == 0) == (not lines)

        try:
            edit = load_edit(path)
        except EditFileError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg, msg
            assert rc == 1
            return "rejected"
        assert rc == 0
        edit.inspect()
        before = _snapshot(unet)
        try:
            edit.apply(unet)
        except PureFastError as exc:
            assert "\n" not in str(exc)
            assert _same(before, _snapshot(unet)), "a refused edit changed the model"
            return "refused"
        try:
            for name in edit.target_weights():
                assert torch.isfinite(kv_weights(unet)[name]).all()
        finally:
            edit.revert(unet)
        assert _same(before, _snapshot(unet)), "revert is not bit-exact"
        return "applied"
    finally:
        os.unlink(path)


# ---- the unmutated file -------------------------------------------------------------------------------------
def test_good_file_round_trips_and_applies(good_kind, unet):
    from pure_fast.edits.io import load_edit

    data, edit, folder = good_kind
    assert _outcome(data, unet, folder) == "applied"
    loaded = load_edit(os.path.join(folder, f"good-{edit.kind}.safetensors"))
    assert loaded.meta() == edit.meta() and loaded.content_digest() == edit.content_digest()
    for k, v in edit.tensors().items():
        assert torch.equal(loaded.tensors()[k], v)


# ---- byte-level mutations -----------------------------------------------------------------------------------
@FUZZ
@given(st.data())
def test_bit_flips_and_overwrites(good_kind, unet, data):
    raw, _, folder = good_kind
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8), label="n_mutations")):
        pos = data.draw(st.integers(0, len(buf) - 1), label="pos")
        if data.draw(st.booleans(), label="flip"):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        else:
            buf[pos] = data.draw(st.integers(0, 255), label="byte")
    _outcome(bytes(buf), unet, folder)


@FUZZ
@given(st.data())
def test_truncated_or_extended(good_kind, unet, data):
    raw, _, folder = good_kind
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        out = raw[:cut]
    else:
        out = raw + data.draw(st.binary(min_size=1, max_size=64), label="junk")
    result = _outcome(out, unet, folder)
    if len(out) < len(raw):
        assert result == "rejected"  # every byte of a safetensors file is accounted for


@FUZZ
@given(length=st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096)))
def test_header_length_field(good, unet, length):
    raw, _, folder = good
    (n,) = struct.unpack("<Q", raw[:8])
    out = struct.pack("<Q", length) + raw[8:]
    result = _outcome(out, unet, folder)
    if length != n:
        assert result == "rejected"


@FUZZ
@given(st.binary(min_size=0, max_size=256))
def test_random_bytes(good, unet, blob):
    _, _, folder = good
    assert _outcome(blob, unet, folder) == "rejected"


# ---- structured header mutations ----------------------------------------------------------------------------
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
DIMS = st.one_of(st.integers(-3, 70), st.sampled_from([0, 2**31, 2**40, 2**62, 2**63 - 1, 2**64]), JSON_JUNK)


@FUZZ
@given(st.data())
def test_tensor_header_entries(good_kind, unet, data):
    raw, _, folder = good_kind
    header, payload = _split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names), label="tensor")
    what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "rename", "delete", "duplicate", "entry"]),
                     label="what")
    entry = header[name]
    if what == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I64", "I32", "I16", "U8", "BOOL",
                                                    "F8_E4M3", "C64", "XYZ", ""]), label="dtype")
    elif what == "shape":
        entry["shape"] = data.draw(st.lists(DIMS, max_size=4), label="shape")
    elif what == "offsets":
        entry["data_offsets"] = data.draw(st.lists(DIMS, min_size=0, max_size=3), label="offsets")
    elif what == "rename":
        header[data.draw(st.text(min_size=1, max_size=40), label="new")] = header.pop(name)
    elif what == "delete":
        del header[name]
    elif what == "duplicate":
        header[name + "x"] = dict(entry)
    else:
        header[name] = data.draw(JSON_JUNK, label="entry")
    result = _outcome(_join(header, payload), unet, folder)
    if what in ("delete", "entry", "rename"):
        assert result in ("rejected", "refused")


META_FIELDS = ["format", "format_version", "kind", "method", "family", "concepts", "options", "weights",
               "base_fingerprint", "result_fingerprint", "created", "version", "edit_id", "stats"]


@FUZZ
@given(st.data())
def test_metadata_fields(good_kind, unet, data):
    raw, _, folder = good_kind
    header, payload = _split(raw)
    meta = json.loads(header["__metadata__"]["pure_fast"])
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        key = data.draw(st.sampled_from(META_FIELDS), label="key")
        how = data.draw(st.sampled_from(["delete", "junk", "weights_shape"]), label="how")
        if how == "delete":
            meta.pop(key, None)
        elif how == "junk":
            meta[key] = data.draw(JSON_JUNK, label="value")
        elif meta.get("weights") and isinstance(meta["weights"], dict):
            w = data.draw(st.sampled_from(sorted(meta["weights"])), label="weight")
            meta["weights"][w] = data.draw(st.lists(DIMS, max_size=3), label="dims")
    header["__metadata__"]["pure_fast"] = json.dumps(meta)
    _outcome(_join(header, payload), unet, folder)


@FUZZ
@given(st.one_of(st.text(max_size=30), JSON_JUNK.map(json.dumps)))
def test_metadata_string_itself(good, unet, text):
    raw, _, folder = good
    header, payload = _split(raw)
    header["__metadata__"]["pure_fast"] = text
    assert _outcome(_join(header, payload), unet, folder) == "rejected"


@FUZZ
@given(st.data())
def test_nonfinite_values_rejected(good, unet, data):
    raw, _, folder = good
    header, payload = _split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names), label="tensor")
    start, end = header[name]["data_offsets"]
    k = data.draw(st.integers(0, (end - start) // 4 - 1), label="element")
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    buf = bytearray(payload)
    buf[start + 4 * k : start + 4 * k + 4] = struct.pack("<f", value)
    assert _outcome(_join(header, bytes(buf)), unet, folder) == "rejected"


@FUZZ
@given(scale=st.sampled_from([1e30, 3e38, -3e38]))
def test_overflowing_values_refused_before_change(good, unet, scale):
    """Finite factors whose product overflows the model's dtype: refused, the model untouched."""
    raw, _, folder = good
    header, payload = _split(raw)
    buf = bytearray(payload)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        for off in range(s, e, 4):
            buf[off : off + 4] = struct.pack("<f", scale)
    assert _outcome(_join(header, bytes(buf)), unet, folder) == "refused"


def test_edit_for_another_model_refused(good_kind, tmp_path):
    """Same family, different layer widths: refused naming the shape; the model is unchanged."""
    from diffusers import UNet2DConditionModel

    from pure_fast.edits.io import load_edit

    data, edit, folder = good_kind
    torch.manual_seed(3)
    other = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8,
    )
    assert _outcome(data, other, folder) == "refused"
    with pytest.raises(EditFileError, match="another model"):
        load_edit(os.path.join(folder, f"good-{edit.kind}.safetensors")).apply(other)


@pytest.mark.parametrize("key", META_FIELDS)
def test_every_metadata_field_deleted_or_mistyped(good_kind, unet, key):
    """A table over every field x (missing, each JSON type): never a crash, and the load is correct or refused."""
    raw, _, folder = good_kind
    header, payload = _split(raw)
    base = json.loads(header["__metadata__"]["pure_fast"])
    outcomes = {}
    for label, value in [("missing", ...), ("null", None), ("bool", True), ("int", 7), ("huge_int", 2**80),
                         ("float", 1.5), ("str", "abc"), ("list", [1, "a"]), ("dict", {"a": [1]}),
                         ("nested", {"forget": [1, None], "exact": 3})]:
        meta = dict(base)
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
        header["__metadata__"]["pure_fast"] = json.dumps(meta)
        outcomes[label] = _outcome(_join(header, payload), unet, folder)
    if key in ("format", "format_version", "kind", "method", "family", "concepts", "options", "weights"):
        assert outcomes["missing"] == "rejected"
    assert outcomes["list"] == "rejected" or key in ("stats",), outcomes


@pytest.mark.parametrize("dtype", ["I32", "U32", "I16", "U8", "BOOL", "F16", "BF16"])
def test_same_size_dtype_swaps(good, unet, dtype):
    """A tensor relabelled to another dtype whose total byte size still matches: refused by dtype, or loaded
    as a valid float tensor (F16/BF16 with twice the elements fail the shape check instead)."""
    raw, _, folder = good
    header, payload = _split(raw)
    name = sorted(k for k in header if k != "__metadata__")[0]
    info = header[name]
    size = {"I32": 4, "U32": 4, "I16": 2, "U8": 1, "BOOL": 1, "F16": 2, "BF16": 2}[dtype]
    info["dtype"] = dtype
    info["shape"] = [info["shape"][0], info["shape"][1] * 4 // size]
    assert _outcome(_join(header, payload), unet, folder) == "rejected"


def test_huge_declared_weight_refused_before_decoding(good_kind, unet):
    """A CSR (or any) weight declared 2^19 x 2^19 would decode to 1 TiB: refused from the header alone."""
    raw, _, folder = good_kind
    header, payload = _split(raw)
    meta = json.loads(header["__metadata__"]["pure_fast"])
    name = sorted(meta["weights"])[0]
    meta["weights"][name] = [2**19, 2**19]
    header["__metadata__"]["pure_fast"] = json.dumps(meta)
    from pure_fast.edits.io import load_edit

    fd, path = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(_join(header, payload))
    try:
        with pytest.raises(EditFileError, match="larger than any supported"):
            load_edit(path)
    finally:
        os.unlink(path)
