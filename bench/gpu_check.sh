#!/usr/bin/env bash
# The CUDA paths that have never run on our CPU-only machines, in one go, with a printed summary:
#   1. NCCL DDP with nn.SyncBatchNorm (torchrun, all GPUs), bf16 autocast, cudnn.benchmark (train.py sets it),
#      the text encoder once per optimiser step with its gradient averaged outside DDP (2 accumulation steps);
#   2. fp16 autocast with GradScaler (and gradient clipping, which unscales first), same set-up;
#   3. bench/throughput.py for RN50, RN101, ViT-B at 4 images per GPU, fp32 and bf16 (images/s, peak memory);
#   4. bench/train_step.py per config: options, text once per step, fraction of the measured bf16/fp32 matmul peak,
#      and peak memory with and without --checkpoint-activations at the official crop and 4 images;
#   5. the shared prompt prefix (issue 18): bench/prefix_check.py (features and context gradients equal the plain
#      path in float64, fp32, bf16 autocast and fp16 autocast with a GradScaler-scaled backward), the text encoder's
#      forward + backward plain against shared (train_step.py --only-text) and the whole train step before issue 18
#      against now at 1, 2 and 4 images, fp32 and bf16 (train_step.py --only-steps).
# Usage (from anywhere):  bash bench/gpu_check.sh            # everything, ~10 min on one H100
#                         QUICK=1 bash bench/gpu_check.sh    # fewer iterations
#                         DEVICE=cpu bash bench/gpu_check.sh # the same commands, tiny and on CPU (gloo), to test it
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
log() { echo "$@" | tee -a "$SUMMARY"; }

if [ "$DEVICE" = cuda ]; then
    NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
    CONFIGS=${CONFIGS:-"denseclip_r50 denseclip_r101 denseclip_vitb16"}
    TRAIN_MODEL=${TRAIN_MODEL:-denseclip_r50}; CROP=${CROP:-512}; ITERS=${ITERS:-40}; BENCH_ITERS=${BENCH_ITERS:-10}
    BENCH_SIZE=""; MEM_SIZE=0; AMPS="bf16 fp16"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$SUMMARY"
else  # a CPU rehearsal: two gloo processes, tiny models and sizes; fp16 needs CUDA, so only bf16
    NPROC=2; CONFIGS=${CONFIGS:-denseclip_tiny}; TRAIN_MODEL=denseclip_tiny; CROP=64; ITERS=4; BENCH_ITERS=1
    BENCH_SIZE="--size 64"; MEM_SIZE=64; AMPS="bf16"; NO_COMPILE="--no-compile"  # compiling takes minutes on CPU
    export OMP_NUM_THREADS=1
fi
if [ -n "${QUICK:-}" ]; then ITERS=10; BENCH_ITERS=3; fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', \
torch.cuda.nccl.version() if torch.cuda.is_available() else '-')" | tee -a "$SUMMARY"

# 1-2. torchrun DDP (NCCL on GPUs, SyncBN when NPROC > 1), 4 images per process, 2 accumulation steps
for AMP in $AMPS; do
    RUN="$OUT/train_$AMP"
    rm -rf "$RUN"
    EXTRA=""
    if [ "$AMP" = fp16 ]; then EXTRA="--clip-grad 1.0"; fi
    python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py --model "$TRAIN_MODEL" \
        --device "$DEVICE" --amp "$AMP" --crop-size "$CROP" --batch-size 4 --global-batch $((8 * NPROC)) \
        --iters "$ITERS" --warmup-iters 5 --log-interval 5 --eval-interval 0 --val-size 16 --workers 2 \
        --out-dir "$RUN" $EXTRA > "$RUN.log" 2>&1 || { log "FAILED: train.py --amp $AMP (see $RUN.log)"; tail -30 "$RUN.log"; exit 1; }
    log "train.py $NPROC process(es) --amp $AMP: $(grep -m1 -o 'SyncBatchNorm\|[0-9]* process(es)[^;]*' "$RUN.log" | head -1)"
    log "  last: $(grep '^iter .*loss' "$RUN.log" | tail -1)"
    log "  $(tail -1 "$RUN.log")"
done

# 3. images/s and peak memory at 4 images per GPU, fp32 and bf16
for AMP in none bf16; do
    log "bench/throughput.py --amp $AMP, 4 images:"
    python bench/throughput.py --configs $CONFIGS --device "$DEVICE" --batch-size 4 --amp "$AMP" \
        --iters "$BENCH_ITERS" --warmup 2 $BENCH_SIZE 2>&1 | tee -a "$SUMMARY"
done

# 4. options, text once per step, fraction of the matmul peak; memory with / without activation checkpointing
for CONFIG in $CONFIGS; do
    log "bench/train_step.py --config $CONFIG, 4 images:"
    MEM=""
    if [ "$CONFIG" != "denseclip_r50" ]; then MEM="--memory-configs $CONFIG"; else MEM="--memory-configs"; fi
    SIZE=$([ "$DEVICE" = cuda ] && python -c "from denseclip.configs import CONFIGS; \
print(CONFIGS['$CONFIG']().input_resolution)" || echo 64)
    python bench/train_step.py --config "$CONFIG" --device "$DEVICE" --batch-size 4 --size "$SIZE" \
        --iters "$BENCH_ITERS" --memory-size "$MEM_SIZE" ${NO_COMPILE:-} $MEM 2>&1 | tee -a "$SUMMARY"
done
# 5. the shared prompt prefix: equality on this device, then its speed
log "bench/prefix_check.py:"
python bench/prefix_check.py --device "$DEVICE" $([ "$DEVICE" = cuda ] || echo "--layers 2") 2>&1 | tee -a "$SUMMARY" \
    || { log "FAILED: bench/prefix_check.py"; exit 1; }
log "bench/train_step.py --only-text:"
python bench/train_step.py --only-text --device "$DEVICE" --iters "$BENCH_ITERS" 2>&1 | tee -a "$SUMMARY"
log "bench/train_step.py --only-steps:"
if [ "$DEVICE" = cuda ]; then STEPS="denseclip_r50:512 denseclip_vitb16:640"; BATCHES="1 2 4"
else STEPS="denseclip_tiny:64"; BATCHES="1 2"; fi
python bench/train_step.py --only-steps --device "$DEVICE" --step-configs $STEPS --step-batches $BATCHES \
    --iters "$BENCH_ITERS" 2>&1 | tee -a "$SUMMARY"
log "summary written to $SUMMARY"
