"""The residual diagnostic (evaluate/residual.py): its measures, seed guard, recording through activation
patches, and the ``inspect --residual`` error paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pure_fast.errors import UsageError
from pure_fast.evaluate import residual as rd


def test_decided_at_is_the_first_step_the_verdict_stops_changing():
    hits = np.array([[0, 1, 1, 0],
                     [1, 1, 0, 0],
                     [1, 1, 1, 0],
                     [1, 1, 1, 1]], dtype=bool)  # steps x images
    assert rd.decided_at(hits).tolist() == [1, 0, 2, 3]


def test_measuring_bases_are_orthogonal_to_retain_and_ignore_retain_signal():
    g = torch.Generator().manual_seed(0)
    d = 24
    R = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, d, generator=g, dtype=torch.float64)
    F = torch.randn(20, d, generator=g, dtype=torch.float64)
    Q, V_R = rd.measuring_bases(F, R, 0.99, 0.999999)
    assert float((Q.T @ V_R).abs().max()) < 1e-10
    assert float(rd.specific_energy(R, Q, V_R).max()) < 1e-12 * float(R.pow(2).sum())  # retain rows carry none
    e = rd.specific_energy(F, Q, V_R).sum()
    X = F - (F @ V_R) @ V_R.T
    assert 0.99 * float(X.pow(2).sum()) <= float(e) <= float(X.pow(2).sum()) * (1 + 1e-12)


def test_fresh_seed_guard():
    class E:
        options = {"collect": {"seeds": [0, 1]}}

    rd.check_fresh_seeds(E(), [7001, 7002])
    with pytest.raises(UsageError, match=r"\[1\] were used to build the edit"):
        rd.check_fresh_seeds(E(), [1, 5])
    rd.check_fresh_seeds(None, [0])


def test_recording_sees_patches_and_an_erased_value_path_reads_zero(tiny_sd1, one_thread):
    """Recording hooks run after any activation patch on to_out[0]; an edit that zeroes every to_v makes the
    attention output 0, so the measured forget residual is 0, and an unchanged model measures 1 and 0."""
    from pure_fast.adapters import wrap_pipeline
    from pure_fast.edits.edit import LowRankEdit

    ad = wrap_pipeline(tiny_sd1)
    layers = ad.cross_attention_layers()
    s = rd.ResidualSettings(seeds=(11,), steps=3)
    rec = lambda ps: rd.record_trajectories(ad, ps, s.seeds, steps=s.steps, x0=False)  # noqa: E731
    sets = {"forget": ["a painting by Van Gogh", "starry night by Van Gogh", "Van Gogh sunflowers"],
            "retain": ["a painting by Claude Monet", "water lilies by Monet", "Monet haystacks"],
            "neighbour": ["a painting by Picasso"]}
    before = {g: rec(p) for g, p in sets.items()}
    assert before["forget"][0][0].shape == (3, 3, layers[0].d_out) and before["forget"][1] is None
    same = rd.residual_for_concept(before, before, layers, s)
    assert same["residual_total"] == pytest.approx(1.0) and same["retain_move_total"] == 0.0
    factors = {l.value_weight: (-torch.eye(l.d_out), l.module.to_v.weight.detach().clone()) for l in layers}
    zero_v = LowRankEdit(method="pure", family=ad.family, concepts={}, options={}, factors=factors,
                         shapes={n: (u.shape[0], d.shape[1]) for n, (u, d) in factors.items()})
    zero_v.apply(ad, check=False)
    try:
        after = {g: rec(p) for g, p in sets.items()}
    finally:
        zero_v.revert(ad)
    gone = rd.residual_for_concept(before, after, layers, s)
    assert gone["residual_total"] < 1e-20 and gone["retain_move_total"] == pytest.approx(1.0)
    # a pre-hook registered before recording (as an activation patch is) is seen by the recording
    h = layers[0].module.to_out[0].register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    try:
        patched = rec(sets["forget"])
    finally:
        h.remove()
    assert float(patched[0][0].abs().max()) == 0.0 and float(patched[0][1].abs().max()) > 0


def test_inspect_residual_errors_are_one_line(tiny_sd1, one_thread, tmp_path, capsys):
    import pure_fast
    from pure_fast.cli import main

    e = pure_fast.erase(tiny_sd1, ["Van Gogh"], ["Claude Monet"], category="style", progress=False, size=32,
                        seeds=(0,), steps=2, record_steps=1)
    path = e.save(str(tmp_path / "e.safetensors"))
    for argv, msg in ((["inspect", path, "--residual"], "needs an edit of the toy model"),
                      (["inspect", path, "--seed", "3"], "belong to --residual")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err
