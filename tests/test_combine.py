"""combine(): one edit equal to applying a chain of edits in order, per kind; refusals with their reasons."""
import copy

import pytest
import torch

from pure_fast.api import stamp_fingerprints
from pure_fast.cli import main
from pure_fast.edits.combine import combine
from pure_fast.edits.edit import LowRankEdit, kv_weights, revert_all
from pure_fast.errors import UsageError


def _state(unet):
    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def _max_err(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def make_lowrank(unet, seed, ranks=(2, 1, 3), offset=0):
    kv = kv_weights(unet)
    names = sorted(kv)[offset::2][: len(ranks)]
    g = torch.Generator().manual_seed(seed)
    f = {n: (0.05 * torch.randn(kv[n].shape[0], r, generator=g), 0.05 * torch.randn(r, kv[n].shape[1], generator=g))
         for n, r in zip(names, ranks)}
    e = LowRankEdit(method="pure", family="sd1", concepts={"forget": [f"c{seed}"]}, options={}, factors=f,
                    shapes={n: tuple(kv[n].shape) for n in names})
    stamp_fingerprints(e, unet)
    return e


def make_shared(unet, seed, r=2, dense=False):
    from pure_fast.edits.shared import SharedRightEdit

    kv = kv_weights(unet)
    d_in = next(iter(kv.values())).shape[1]
    g = torch.Generator().manual_seed(seed)
    U, V = 0.1 * torch.randn(d_in, r, generator=g), 0.1 * torch.randn(d_in, r, generator=g)
    packed = SharedRightEdit.pack(U, V)
    if dense:
        packed = {"A": (torch.eye(d_in) + U @ V.T).contiguous(), "U": None, "V": None}
    e = SharedRightEdit(method="uce", family="sd1", concepts={"forget": [f"c{seed}"]}, options={},
                        shapes={n: tuple(w.shape) for n, w in kv.items()}, **packed)
    stamp_fingerprints(e, unet)
    return e


def make_sparse(unet, seed, every=2):
    from pure_fast.edits.sparse import SparseWeightsEdit

    kv = kv_weights(unet)
    g = torch.Generator().manual_seed(seed)
    new = {}
    for n in sorted(kv)[seed % 2::every]:
        w = kv[n].detach().clone()
        w[torch.rand(w.shape, generator=g) < 0.7] = 0.0
        new[n] = w
    e = SparseWeightsEdit.from_dense(new, storage_dtype=torch.float32, method="space", family="sd1",
                                     concepts={"forget": [f"c{seed}"]}, options={})
    stamp_fingerprints(e, unet)
    return e


def chain(unet, makers):
    """Edits made one on the result of the previous (as a user stacking erasures would), then reverted."""
    edits = []
    for m in makers:
        e = m(unet)
        e.apply(unet)
        edits.append(e)
    revert_all(unet)
    return edits


def sequential(unet, edits):
    u = copy.deepcopy(unet)
    for e in edits:
        e.apply(u)
    return _state(u)


def combined_state(unet, edits, **kw):
    c = combine(edits, **kw)
    u = copy.deepcopy(unet)
    c.apply(u)  # fingerprint-checked against the original model
    return c, _state(u)


@pytest.fixture
def unet(tiny_sd1):
    return copy.deepcopy(tiny_sd1.unet)


def test_lowrank_chain_concatenates_factors(unet):
    edits = chain(unet, [lambda u: make_lowrank(u, 1), lambda u: make_lowrank(u, 2, offset=1), lambda u: make_lowrank(u, 3)])
    c, got = combined_state(unet, edits)
    want = sequential(unet, edits)
    assert _max_err(got, want) <= 1e-6
    for n in c.factors:  # exact algebra: ranks add, factors are the parts side by side
        parts = [e.factors[n] for e in edits if n in e.factors]
        assert c.factors[n][0].shape[1] == sum(p[0].shape[1] for p in parts)
        assert torch.equal(c.factors[n][0], torch.cat([p[0] for p in parts], 1))
    assert c.base_fingerprint == edits[0].base_fingerprint and c.result_fingerprint == edits[-1].result_fingerprint
    assert [p["edit_id"] for p in c.stats["combined_from"]] == [e.edit_id for e in edits]
    assert c.concepts["forget"] == ["c1", "c2", "c3"]


def test_shared_chain_multiplies_right_matrices(unet):
    edits = chain(unet, [lambda u: make_shared(u, 1), lambda u: make_shared(u, 2, r=3)])
    c, got = combined_state(unet, edits)
    assert c.U is not None and c.U.shape[1] == 5  # still I + U Vᵀ, ranks add
    want = sequential(unet, edits)
    assert _max_err(got, want) <= 1e-6
    # the product, independently: A_A · A_B
    prod = edits[0].right_matrix() @ edits[1].right_matrix()
    assert torch.allclose(c.right_matrix(), prod, atol=1e-6, rtol=0)


def test_shared_chain_with_dense_matrix(unet):
    edits = chain(unet, [lambda u: make_shared(u, 4, dense=True), lambda u: make_shared(u, 5)])
    c, got = combined_state(unet, edits)
    assert c.A is not None
    assert _max_err(got, sequential(unet, edits)) <= 1e-6


def test_sparse_chain_keeps_last_weights_bit_exact(unet):
    edits = chain(unet, [lambda u: make_sparse(u, 0), lambda u: make_sparse(u, 1, every=3)])
    c, got = combined_state(unet, edits)
    assert set(c.target_weights()) == set(edits[0].target_weights()) | set(edits[1].target_weights())
    want = sequential(unet, edits)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _make_patch(unet, seed, layers, gate="off"):
    from pure_fast.adapters.layers import find_cross_attention_layers
    from pure_fast.edits.patch import ConceptPatch, PatchEdit

    found = {l.name: l for l in find_cross_attention_layers(unet)}
    g = torch.Generator().manual_seed(seed)
    patches, shapes = {}, {}
    for name in layers:
        l = found[name]
        V = torch.linalg.qr(torch.randn(l.d_out, 2, generator=g))[0]
        patches[name] = [ConceptPatch(V.contiguous(), torch.randn(2, generator=g), torch.randn(2, generator=g))]
        shapes[name] = (l.d_out, l.d_in)
    e = PatchEdit(method="acterase", family="sd1", concepts={"forget": [f"p{seed}"]},
                  options={"strength": 1.0, "gate": gate, "gate_threshold": 0.0, "mode": "replace"},
                  patches=patches, shapes=shapes)
    stamp_fingerprints(e, unet)
    return e


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20]), encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("overlap", ["same_layers", "disjoint_layers"])
def test_patch_combination_equals_both_hooks(unet, overlap, tmp_path):
    from pure_fast.adapters.layers import find_cross_attention_layers

    names = [l.name for l in find_cross_attention_layers(unet)]
    la, lb = (names[:3], names[:3]) if overlap == "same_layers" else (names[:2], names[2:5])
    a, b = _make_patch(unet, 1, la), _make_patch(unet, 2, lb)
    ref = _unet_out(unet)
    u = copy.deepcopy(unet)
    a.apply(u)
    b.apply(u)
    want = _unet_out(u)
    revert_all(u)
    assert torch.equal(_unet_out(u), ref)
    c = combine([a, b])
    assert set(c.shapes) == set(la) | set(lb)
    from pure_fast.edits.io import load_edit

    c.save(str(tmp_path / "ab.safetensors"))  # rank-0 placeholders survive the file round trip
    c = load_edit(str(tmp_path / "ab.safetensors"))
    c.apply(u)
    got = _unet_out(u)
    assert not torch.equal(got, ref) and torch.equal(got, want)
    revert_all(u)


def test_refusals_name_the_reason(unet, tiny_sdxl):
    a = make_lowrank(unet, 1)
    b = make_lowrank(unet, 2)  # made on the same base, not on a's result
    with pytest.raises(UsageError, match="do not form a chain"):
        combine([a, b])
    with pytest.raises(UsageError, match="different kinds"):
        combine([a, make_shared(unet, 3)])
    with pytest.raises(UsageError, match="at least two"):
        combine([a])
    x = make_lowrank(copy.deepcopy(tiny_sdxl.unet), 4)
    x.family = "sdxl"
    with pytest.raises(UsageError, match="different model families"):
        combine([a, x])
    nofp = copy.copy(b)
    nofp.base_fingerprint = {}
    with pytest.raises(UsageError, match="no fingerprints"):
        combine([a, nofp])
    forced = combine([a, b], force=True)  # the user's call: W + ΔA + ΔB
    assert forced.factors.keys() == a.factors.keys() | b.factors.keys()
    s1 = make_shared(unet, 5)
    s1.apply(unet)
    s2 = make_shared(unet, 6)
    revert_all(unet)
    s2.shapes = dict(list(s2.shapes.items())[:4])
    with pytest.raises(UsageError, match="different sets of weights"):
        combine([s1, s2])
    p1 = _make_patch(unet, 7, ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"])
    p2 = _make_patch(unet, 8, ["down_blocks.0.attentions.0.transformer_blocks.0.attn2"], gate="soft")
    with pytest.raises(UsageError, match="runtime settings"):
        combine([p1, p2])


def test_cli_combine(unet, tmp_path, capsys):
    from pure_fast.edits.io import load_edit

    edits = chain(unet, [lambda u: make_lowrank(u, 11), lambda u: make_lowrank(u, 12, offset=1)])
    paths = []
    for i, e in enumerate(edits):
        paths.append(str(tmp_path / f"e{i}.safetensors"))
        e.save(paths[-1])
    out = str(tmp_path / "ab.safetensors")
    assert main(["combine", "--edit", paths[0], "--edit", paths[1], "--out", out, "--quiet"]) == 0
    u = copy.deepcopy(unet)
    load_edit(out).apply(u)
    assert _max_err(_state(u), sequential(unet, edits)) <= 1e-6
    bad = str(tmp_path / "ba.safetensors")
    capsys.readouterr()
    assert main(["combine", "--edit", paths[1], "--edit", paths[0], "--out", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "do not form a chain" in err and len(err.splitlines()) == 1 and not (tmp_path / "ba.safetensors").exists()
