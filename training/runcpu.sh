#!/usr/bin/env bash
# The whole training path on a CPU in about a minute (nanoGPT-style): offline digits written as a PNG folder,
# a tiny two-time UNet trained with accelerate for a few dozen steps (checkpoints, a resume from the latest one,
# EMA, sample grids), and one-step generation from the saved pipeline folder.
#
#   bash training/runcpu.sh [OUTPUT_DIR]      (default: runs/runcpu; removed first)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-runs/runcpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny models: one thread per process is fastest on 2 cores
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_CACHE="$OUT/hf_datasets"
rm -rf "$OUT"

# 1. data: 512 real 8x8 digits as PNG files
python training/prepare_data.py sklearn-digits "$OUT/digits" --limit 512

# 2. train 30 steps, checkpoint every 10, then resume from the latest checkpoint and go on to 40
ARGS=(--train_data_dir "$OUT/digits" --resolution 8 --block_out_channels 16 32 --train_batch_size 32
      --learning_rate 1e-3 --lr_warmup_steps 5 --lam_schedule linear --lam_warmup_steps 20 --derivative jvp
      --use_ema --ema_max_decay 0.99 --checkpointing_steps 10 --checkpoints_total_limit 2 --seed 0
      --output_dir "$OUT/model")
python -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
  --dynamo_backend no training/train_mmf.py "${ARGS[@]}" --max_train_steps 30
python training/train_mmf.py "${ARGS[@]}" --max_train_steps 40 --resume_from_checkpoint latest

# 3. one-step samples from the saved pipeline
python - "$OUT/model" <<'PY'
import sys, torch
from mmf_diffusers import MMFPipeline
pipe = MMFPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
images = pipe(num_images=8, generator=torch.Generator().manual_seed(0)).images
print(f"generated {len(images)} images of size {images[0].size} in one step; grids in {sys.argv[1]}/samples/")
PY
