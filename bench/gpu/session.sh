#!/bin/bash
# Run ON the lent GPU machine, from the repository root, with .gpu_carry carried (bench/gpu/fetch_carry.sh):
#
#   run(command="bash bench/gpu/session.sh checks", carry=[".gpu_carry"], timeout_s=600)
#   run(command="bash bench/gpu/session.sh end_to_end", carry=[".gpu_carry"], timeout_s=600)
#
# Each call installs the carried wheels into the machine's python3 (no registry there), builds pure_fast._C
# with its CUDA kernels (nvcc, sm_80/sm_90), checks that they load, then:
#   checks     : pytest -m gpu (Triton hook, FISTA/CSR CUDA kernels, batched application, fingerprints on CUDA)
#                and the microbenchmarks hook, estimate, apply, fista, csr, swap (bench/run_all.py --device cuda)
#   end_to_end : bench/run_all.py --device cuda --only end_to_end (SDXL and SD1.5 bf16: PURE 1/10/50, UCE,
#                CURE, SPACE both Y M routes, collection vs plain passes, FISTA fraction of bf16 peak)
#   compile    : bench_compile (torch.compile and CUDA graphs on the UNet pass, plain and hooked)
#   distributed: bench_distributed (PURE's collection on 1..all GPUs, one process per GPU; distributed_gpu.json)
#   all        : all three (needs more than one 10-minute call on an H100; use them one by one)
#   issue16    : issue 16's GPU check in ONE call, under an internal budget (ISSUE16_BUDGET_S, default 560 s),
#                parts in priority order, each skipped with a logged line when the budget cannot cover it:
#                pytest -m gpu of the files issue 16 touched (fused kernel, custom op under CUDA graphs,
#                fp32 shared apply, compiled collection), bench hook (kernel vs SDPA + mean at SDXL attn2
#                bf16 B16-64; writes the per-GPU decision pure_fast/ops/pooled_attention_tuned.json) and
#                apply (shared_apply: UCE/CURE's apply, float64 vs fp32 route), then compile_e2e (PURE end to
#                end, compiled collection vs eager: SDXL 1 + 50 concepts, SD1.5 50). If the budget ran out
#                before compile_e2e finished: `bash bench/gpu/session.sh issue16_compile` runs it alone.
#   train_toy_v2 : trains the v2 toy model (pure_fast/toy/v2) for TOY_MIN (6.5) minutes at batch TOY_BATCH
#                (256), bf16 autocast, then its card (CFG scale chosen on dev concepts, per-concept canonical
#                and held-out accuracy, 4 seeds). Carry .gpu_carry_toy instead (bench/gpu/fetch_carry_toy.sh:
#                the diffusers wheel + MiniLM in fp16); no native build. Brings back in $OUT/toy_v2/: the fp16
#                EMA weights split in 15 MiB parts (unet.safetensors.part0..2; `cat` them back), config.json,
#                model_card.json, MODEL_CARD.md, the trainer's state.json. The full fp32 checkpoint (model,
#                EMA, AdamW moments: 16 bytes/parameter, ~290 MB) cannot come back (64 MiB per call): a later
#                run continues from the weights with --init-from (a warm start, fresh optimizer).
#                  run(command="bash bench/gpu/session.sh train_toy_v2", carry=[".gpu_carry_toy"], timeout_s=600)
# Results come back under $OUT (at most 8 files): the GPU results JSON, bench/README.md with its tables
# regenerated, the test log and this script's log. Commit them to bench/results/ and bench/README.md.
# DEVICE=cpu (with PY=.venv/bin/python, BENCHES=hook) dry-runs the plumbing on a machine without a GPU.
set -uo pipefail
what=${1:-checks}
OUT=${OUT:-/tmp/pure_fast_gpu_out}
mkdir -p "$OUT"
log="$OUT/session_${what}.log"
exec > >(tee -a "$log") 2>&1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BENCHES=${BENCHES:-hook,estimate,apply,fista,csr,swap}
export HF_HUB_OFFLINE=1 PURE_FAST_PROGRESS=0
echo "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
if [ "$what" = train_toy_v2 ]; then
  carry=${TOY_CARRY:-.gpu_carry_toy}
  [ -d "$carry/minilm_fp16" ] || { echo "no $carry/minilm_fp16: run bench/gpu/fetch_carry_toy.sh here first"; exit 3; }
  if ls "$carry"/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps --no-index "$carry"/*.whl || exit 3; fi
  export PURE_FAST_MINILM_DIR="$PWD/$carry/minilm_fp16" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  run=${TOY_RUN:-/tmp/toy_v2_run} weights=${TOY_WEIGHTS:-/tmp/toy_v2_weights} status=0
  # shellcheck disable=SC2086
  $PY -m pure_fast.toy.v2.train --device "$DEVICE" --time-budget "${TOY_MIN:-6.5}" --batch-size "${TOY_BATCH:-256}" \
      --threads "${TOY_THREADS:-8}" --out "$run" --export "$weights" --no-progress ${TOY_TRAIN_ARGS:-} || status=1
  if [ -f "$weights/unet.safetensors" ]; then
    # shellcheck disable=SC2086
    $PY -m pure_fast.toy.v2.card --weights "$weights" --device "$DEVICE" --threads "${TOY_THREADS:-8}" \
        ${TOY_CARD_ARGS:---guidance-sweep 1.5,2,3,4 --canonical-per-concept 20 --batch-size 1024} || status=1
    mkdir -p "$OUT/toy_v2"
    split -b 15M -d -a 1 "$weights/unet.safetensors" "$OUT/toy_v2/unet.safetensors.part"
    cp "$weights/config.json" "$weights/model_card.json" "$weights/MODEL_CARD.md" "$OUT/toy_v2/"
  else
    status=1
  fi
  [ -f "$run/state.json" ] && mkdir -p "$OUT/toy_v2" && cp "$run/state.json" "$OUT/toy_v2/state.json"
  echo "== done, status $status; files in $OUT/toy_v2: $(ls "$OUT/toy_v2" 2>/dev/null | tr '\n' ' ')"
  exit $status
fi
if ls .gpu_carry/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps --no-index .gpu_carry/*.whl || exit 3
else
  echo "no .gpu_carry/*.whl: run bench/gpu/fetch_carry.sh here first and carry .gpu_carry" ; exit 3
fi
$PY -m pip install -q --no-build-isolation --no-deps -e . || exit 4
DEVICE=$DEVICE $PY - <<'PYEOF' || exit 5
import os, torch, pure_fast._C as C
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    assert C.has_cuda(), "pure_fast._C was built without CUDA"
import diffusers, transformers, triton
print("torch", torch.__version__, "triton", triton.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PYEOF
status=0
if [ "$what" = checks ] || [ "$what" = all ]; then
  $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  $PY bench/run_all.py --device "$DEVICE" --only "$BENCHES" || status=1
fi
if [ "$what" = end_to_end ] || [ "$what" = all ]; then
  $PY bench/run_all.py --device "$DEVICE" --only end_to_end || status=1
fi
if [ "$what" = compile ] || [ "$what" = all ]; then
  $PY bench/run_all.py --device "$DEVICE" --only compile || status=1
fi
if [ "$what" = issue16 ]; then
  budget=${ISSUE16_BUDGET_S:-560}
  left() { echo $(( budget - SECONDS )); }
  part() {  # part NAME MIN_SECONDS COMMAND...: run under the remaining budget, or log that it was skipped
    local name=$1 need=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "== issue16: $name skipped ($(left) s left, needs >= $need s)"; status=1; return; fi
    echo "== issue16: $name ($(left) s left)"
    timeout "$(left)" "$@" || { echo "== issue16: $name failed or ran out of time (rc $?)"; status=1; }
  }
  part tests 60 bash -c "$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_ops_pooled_attention.py \
      tests/test_apply_edit.py tests/test_collect_compiled.py 2>&1 | tee '$OUT/gpu_tests_issue16.txt' | tail -25; exit \${PIPESTATUS[0]}"
  part hook_apply 60 $PY bench/run_all.py --device "$DEVICE" --only hook,apply
  [ -f pure_fast/ops/pooled_attention_tuned.json ] && cp pure_fast/ops/pooled_attention_tuned.json "$OUT/"
  part compile_e2e 240 $PY bench/run_all.py --device "$DEVICE" --only compile_e2e
fi
if [ "$what" = issue16_compile ]; then
  $PY bench/run_all.py --device "$DEVICE" --only compile_e2e || status=1
fi
if [ "$what" = distributed ] || [ "$what" = all ]; then
  # PURE's collection over 1..(all) GPUs of the machine, one process per GPU (NCCL), SDXL bf16 at 512 px
  $PY bench/bench_distributed.py --device "$DEVICE" --concepts 10 || status=1
  cp bench/results/distributed_gpu.json "$OUT/" 2>/dev/null
fi
for f in bench/results/*.json; do
  case "$f" in *amd-epyc*|*quality*|*probe*|*storage*|*memory*) ;; *) cp "$f" "$OUT/" ;; esac
done
cp bench/README.md "$OUT/bench_README.md"
echo "== done, status $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
