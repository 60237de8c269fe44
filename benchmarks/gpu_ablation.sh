#!/usr/bin/env bash
# Issue 15 on one GPU, one prepared script: gpt2-124m tokens/s and MFU, then the proof ablation with the 124M model.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_ablation.sh              # on the GPU machine (defaults below)
#   PRESET=tiny MFU_STEPS=4 ABL_TOKENS=20000 SEEDS=[0] EVAL_ITEMS=4 OUT=/tmp/g bash benchmarks/gpu_ablation.sh  # CPU dry run
#
# Inputs (built on the CPU machine and carried): shards/proof-web and shards/proof-web-top30 (the web arms, see
# configs/pretrain/ablations/proof-web.yaml), $TEXTBOOK_SHARED_DATA with the labelled pages (control arms, held-out
# edu eval) and the benchmark files. Python packages missing on the GPU image travel as wheels in .whl/.
# Writes to $OUT: env.txt, mfu.json, ablation results.md/results.json/ablation.png, log.txt.
set -uo pipefail
OUT=${OUT:?set OUT}
PRESET=${PRESET:-gpt2-124m}
MFU_STEPS=${MFU_STEPS:-80}
ABL_TOKENS=${ABL_TOKENS:-1638400}   # 200 steps x 8 x 1024 tokens per run
SEEDS=${SEEDS:-[0,1]}
EVAL_ITEMS=${EVAL_ITEMS:-300}        # multiple-choice items per set
PY=${PY:-python3}
WORK=${WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1

if ! $PY -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
# carried copies (the device gets the checkout only): .gpu/shards/* -> shards/, .gpu/data -> the shared data
if [ -d .gpu/shards ]; then cp -r .gpu/shards/* shards/; fi
if [ -d .gpu/data ]; then export TEXTBOOK_SHARED_DATA=$PWD/.gpu/data; fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$OUT/env.txt"
cat "$OUT/env.txt"

echo "== 1. $PRESET throughput and MFU ($MFU_STEPS steps, compiled, bf16 autocast)"
t0=$(date +%s)
$PY -m pipeline.cli pretrain "$PRESET" --shards shards/proof-web --out "$WORK/mfu" --force \
  --set train.max_steps="$MFU_STEPS" --set train.grad_accum=1 --set train.log_every=10 \
  --set train.checkpoint_every=100000 --set eval.every=100000 --set eval.tokens=65536 \
  && cp "$WORK/mfu/summary.json" "$OUT/mfu.json"
echo "mfu run: $(( $(date +%s) - t0 )) s"

echo "== 2. proof ablation with $PRESET: $ABL_TOKENS tokens per run, seeds $SEEDS (seed-major, then --gather)"
ABL=(configs/pretrain/ablations/proof.yaml --set out="$WORK/abl" --set pretrain.preset="$PRESET"
     --set tokens="$ABL_TOKENS" --set seeds="$SEEDS" --set pretrain.train.batch_size=8
     --set pretrain.train.grad_accum=1 --set pretrain.train.compile=false --set pretrain.eval.every=100
     --set pretrain.eval.tokens=262144 --set pretrain.eval.items="$EVAL_ITEMS")
t0=$(date +%s)
for seed in $(echo "$SEEDS" | tr -d '[] ' | tr ',' ' '); do   # every arm's seed 0 first: a cut run still pairs
  left=$(( ${ABL_LIMIT:-420} - ($(date +%s) - t0) ))
  if [ "$left" -lt 30 ]; then echo "seed $seed: no time left"; continue; fi
  timeout "$left" $PY -m pipeline.cli ablate "${ABL[@]}" --seed "$seed" --no-gather || echo "seed $seed: stopped (exit $?)"
done
$PY -m pipeline.cli ablate "${ABL[@]}" --gather
echo "ablation: $(( $(date +%s) - t0 )) s"
for f in results.md results.json ablation.png; do cp "$WORK/abl/$f" "$OUT/" 2>/dev/null; done
ls -la "$OUT"
