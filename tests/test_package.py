"""Package hygiene: lean import, native extension present and compared to its reference."""
import subprocess
import sys

import pytest
import torch


def test_import_is_lean():
    code = ("import sys, pure_fast; heavy = [m for m in ('diffusers', 'transformers', 'triton', 'pure_fast._C') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_missing_native_gives_rebuild_message():
    code = ("import sys; sys.modules['pure_fast._C'] = None\n"
            "import torch, pure_fast._native as n\n"
            "try:\n    n.finite_stats(torch.ones(3))\nexcept n.NativeUnavailable as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERR" in out.stdout and "pip install --no-build-isolation -e ." in out.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 67 * 40, 100_003])
def test_native_finite_stats_matches_reference(dtype, n):
    from pure_fast import _native
    from pure_fast.ops.finite import finite_stats_reference

    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    if n > 2:
        x[1] = float("nan")
        x[n // 2] = float("-inf")
    assert _native.finite_stats(x) == finite_stats_reference(x)


def test_native_rejects_bad_buffers():
    from pure_fast import _native

    with pytest.raises(ValueError, match="contiguous"):
        _native.check_buffer(torch.ones(4, 4).T, "w")
    with pytest.raises(TypeError, match="dtype"):
        _native.finite_stats(torch.ones(3, dtype=torch.int32))
