#!/bin/sh
# Run HERE (a machine with PyPI access) before a GPU session: fills .gpu_carry/ with the wheels the lent GPU
# machine lacks. That machine (see /work/.library/device/KINDS.md) has python3 with torch 2.11 (CUDA 13), triton,
# transformers 5.17, tokenizers, safetensors, peft, numpy, pillow, rich, scipy, matplotlib, pytest, hypothesis,
# pybind11, scikit-build-core, cmake, ninja and nvcc, but no diffusers, no open_clip (the CLIP BPE vocabulary
# the test/benchmark pipelines tokenize with) and an older transformers than the one pinned here; it cannot
# reach any registry. .gpu_carry/ is git-ignored and travels with `carry` (~20 MB of the 64 MiB a call takes).
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu_carry && mkdir -p .gpu_carry
pins=$(grep -E '^(diffusers|transformers|open-clip-torch)==' requirements-dev.txt requirements-nodeps.txt | cut -d: -f2)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry $pins
ls -l .gpu_carry
du -sh .gpu_carry
