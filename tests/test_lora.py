"""LoRA / UNet-tensor exports of edits, loaded back through diffusers (PEFT) and compared with edit.apply."""
import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pure_fast.edits.edit import Edit, LowRankEdit, kv_weights  # noqa: E402
from pure_fast.errors import UsageError  # noqa: E402
from pure_fast.export.lora import export_lora, export_unet_state_dict  # noqa: E402


@dataclass
class DenseEdit(Edit):
    """A full-rank change ``W <- W + D`` (stands in for edits that are not low rank by construction)."""

    kind: ClassVar[str] = "test_dense"
    deltas: dict = field(default_factory=dict)

    def target_weights(self):
        return list(self.deltas)

    def expected_shapes(self):
        return {n: tuple(d.shape) for n, d in self.deltas.items()}

    def new_weight(self, name, current):
        return current + self.deltas[name].to(current)

    def tensors(self):
        return dict(self.deltas)


@pytest.fixture(scope="module")
def pipes():
    from pure_fast.testing import build_tiny_pipeline

    return {"sd1": build_tiny_pipeline("sd1"), "sdxl": build_tiny_pipeline("sdxl")}


def _lowrank_edit(pipe, family, ranks=(1, 3, 2, 1, 4, 2), seed=0):
    kv = kv_weights(pipe.unet)
    names = sorted(kv)[:: max(1, len(kv) // len(ranks))][: len(ranks)]
    g = torch.Generator().manual_seed(seed)
    factors = {
        n: (0.1 * torch.randn(kv[n].shape[0], r, generator=g), 0.1 * torch.randn(r, kv[n].shape[1], generator=g))
        for n, r in zip(names, ranks)
    }
    shapes = {n: tuple(kv[n].shape) for n in names}
    return LowRankEdit(method="test", family=family, concepts={}, options={}, factors=factors, shapes=shapes)


def _with_unet_copy(pipe):
    """The same pipeline class and components around a copy of the UNet (copying tokenizers is slow)."""
    return type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})


def _load_lora(pipe, path):
    p = _with_unet_copy(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when alpha/rank patterns match nothing
        p.load_lora_weights(path)
    p.fuse_lora()
    return {k: v.detach().clone() for k, v in kv_weights(p.unet).items()}


def _applied(pipe, edit):
    unet = copy.deepcopy(pipe.unet)
    edit.apply(unet, check=False)
    return {k: v.detach().clone() for k, v in kv_weights(unet).items()}


def _max_err(a, b):
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("family,fmt,names", [
    ("sd1", "diffusers", "diffusers"), ("sd1", "kohya", "diffusers"),
    ("sdxl", "diffusers", "diffusers"), ("sdxl", "kohya", "diffusers"), ("sdxl", "kohya", "ldm"),
])
def test_lowrank_edit_loads_exactly_in_diffusers(tmp_path, pipes, family, fmt, names):
    pipe = pipes[family]
    edit = _lowrank_edit(pipe, family)
    path = str(tmp_path / f"{fmt}.safetensors")
    rep = export_lora(edit, pipe, path, format=fmt, kohya_names=names)
    assert rep["exact"] and rep["rel_error"] == 0.0 and rep["modules"] == 6
    assert rep["ranks"] == {n[: -len(".weight")]: int(u.shape[1]) for n, (u, _) in edit.factors.items()}
    sd = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    if fmt == "diffusers":
        assert not [k for k in sd if k.endswith(".alpha")]
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd)
        for n, (up, down) in edit.factors.items():
            m = n[: -len(".weight")]
            assert torch.equal(sd[f"unet.{m}.lora_A.weight"], down) and torch.equal(sd[f"unet.{m}.lora_B.weight"], up)
        cfg = json.loads(meta["lora_adapter_metadata"])
        assert cfg["unet.r"] == cfg["unet.lora_alpha"] and cfg["unet.rank_pattern"] == cfg["unet.alpha_pattern"]
        assert sorted(cfg["unet.target_modules"]) == sorted(rep["ranks"])
    else:
        assert all(k.startswith("lora_unet_") for k in sd)
        alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
        assert alphas == {float(rep["alpha"])} and all(v.dim() == 0 for k, v in sd.items() if k.endswith(".alpha"))
        from pure_fast.export.single_file import ldm_unet_key

        for n, (up, down) in edit.factors.items():
            m = (ldm_unet_key(n, pipe.unet.config) if names == "ldm" else n)[: -len(".weight")]
            base = "lora_unet_" + m.replace(".", "_")
            assert ("_input_blocks_" in base or "_output_blocks_" in base or "_middle_block_" in base) == (names == "ldm")
            # what A1111 / ComfyUI compute: W + (alpha / rank) * up @ down
            scaled = sd[base + ".alpha"] / up.shape[1] * sd[base + ".lora_up.weight"].double() @ sd[base + ".lora_down.weight"].double()
            assert torch.allclose(scaled, up.double() @ down.double(), rtol=0, atol=1e-7)
    assert _max_err(_load_lora(pipe, path), _applied(pipe, edit)) <= 1e-5


def test_truncated_svd_reports_dropped_energy_and_loads(tmp_path, pipes):
    pipe = pipes["sd1"]
    kv = kv_weights(pipe.unet)
    names = sorted(kv)[:3]
    g = torch.Generator().manual_seed(1)
    deltas = {n: 0.05 * torch.randn(kv[n].shape, generator=g, dtype=torch.float64) for n in names}
    edit = DenseEdit(method="dense", family="sd1", concepts={}, options={}, deltas=deltas)
    with pytest.raises(UsageError):
        export_lora(edit, pipe, str(tmp_path / "x.safetensors"))
    k = 5
    path = str(tmp_path / "trunc.safetensors")
    rep = export_lora(edit, pipe, path, format="diffusers", rank=k)
    dropped_all = total_all = 0.0
    want = {n: v.detach().double().clone() for n, v in kv.items()}
    for n, d in deltas.items():
        s = torch.linalg.svdvals(d)
        dropped, total = float(s[k:].pow(2).sum()), float(d.pow(2).sum())
        dropped_all, total_all = dropped_all + dropped, total_all + total
        assert rep["weights"][n]["rank"] == k
        assert rep["weights"][n]["rel_error"] == pytest.approx((dropped / total) ** 0.5, rel=1e-9)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        want[n] += (U[:, :k] * S[:k]) @ Vh[:k]
    assert rep["rel_error"] == pytest.approx((dropped_all / total_all) ** 0.5, rel=1e-9) and not rep["exact"]
    assert _max_err(_load_lora(pipe, path), {n: w.float() for n, w in want.items()}) <= 1e-5


def test_lowrank_factors_truncated_without_dense_matrix(tmp_path, pipes):
    pipe = pipes["sd1"]
    edit = _lowrank_edit(pipe, "sd1", ranks=(4, 4, 1))
    rep = export_lora(edit, pipe, str(tmp_path / "t.safetensors"), format="kohya", rank=2)
    for n, (up, down) in edit.factors.items():
        s = torch.linalg.svdvals(up.double() @ down.double())
        want = (float(s[2:].pow(2).sum()) / float(s.pow(2).sum())) ** 0.5
        assert rep["weights"][n]["rank"] == min(2, up.shape[1])
        assert rep["weights"][n]["rel_error"] == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_float16_storage_and_bad_options(tmp_path, pipes):
    pipe = pipes["sd1"]
    edit = _lowrank_edit(pipe, "sd1", ranks=(2, 2))
    path = str(tmp_path / "h.safetensors")
    rep = export_lora(edit, pipe, path, format="kohya", dtype="float16")
    assert rep["dtype"] == "float16" and rep["alpha"] == 2
    assert all(v.dtype == torch.float16 for v in load_file(path).values())
    with pytest.raises(UsageError):
        export_lora(edit, pipe, path, format="comfy")
    with pytest.raises(UsageError):
        export_lora(edit, pipe, path, dtype="int8")


def test_unet_state_dict_export_equals_apply(tmp_path, pipes):
    pipe = pipes["sdxl"]
    edit = _lowrank_edit(pipe, "sdxl", ranks=(3, 1, 2))
    path = str(tmp_path / "unet_edit.safetensors")
    rep = export_unet_state_dict(edit, pipe, path)
    sd = load_file(path)
    assert set(sd) == set(edit.target_weights()) and rep["weights"] == 3
    fresh = copy.deepcopy(pipe.unet)
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not unexpected
    applied = _applied(pipe, edit)
    got = kv_weights(fresh)
    assert all(torch.equal(got[k], applied[k]) for k in applied)
    # exporting while the edit is applied uses its backups: the same file content
    on = copy.deepcopy(pipe.unet)
    edit.apply(on, check=False)
    path2 = str(tmp_path / "unet_edit2.safetensors")
    export_unet_state_dict(edit, on, path2)
    sd2 = load_file(path2)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    rep2 = export_lora(edit, on, str(tmp_path / "l.safetensors"))
    assert rep2["exact"]
