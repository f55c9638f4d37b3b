#!/usr/bin/env bash
# The curriculum verdict on MNIST at a longer budget: lam rising linearly 0 -> 1 over the first 2000 steps, then 1
# ("warmup"), against lam = 0 throughout ("lam0"); everything else equal and fixed: class-conditional MNIST, UNet
# (16, 32, 32), batch 32, lr 1e-3 constant after 50 warm-up steps, EMA 0.999, finite-difference du/dt, model tangent,
# paired rows, 25% rows r != t, adaptive weight p = 0.5 on the per-element mean (the training script's defaults, so
# the verdict answers "should a user add the curriculum to the defaults?"). The run trains in chunks of CHUNK steps (resuming its own checkpoint) and
# after each chunk scores the EMA pipeline with mmf-evaluate (FD-MNISTCNN of 1000 samples, digits in turn, 1 and 2
# steps, against the 10k MNIST test images) and appends the scores to runs/curriculum-mnist-ARM-seedS/curve.jsonl.
#
#   usage: bash runs/curriculum-mnist-common/train_and_score.sh ARM SEED UNTIL [CHUNK]
#
# Checkpoints and pipelines go to /work/ckpt/curriculum-mnist-ARM-seedS (outside git); git keeps the command, the
# curve and every 10th step of the training log (thin_log.py). Run from the repository root with the venv active and
# MMF_MNIST_PATH set; at low priority: OMP_NUM_THREADS=1 nice -n 19 nohup bash ... &
set -euo pipefail
ARM=$1 SEED=$2 UNTIL=$3 CHUNK=${4:-2000}
case $ARM in
  warmup) LAM=(--lam_schedule linear --lam_start 0 --lam_end 1 --lam_warmup_steps 2000) ;;
  lam0) LAM=(--lam_schedule constant --lam_end 0) ;;
  *) echo "ARM must be warmup or lam0, got $ARM" >&2; exit 2 ;;
esac
NAME=curriculum-mnist-$ARM-seed$SEED
OUT=${CKPT_ROOT:-/work/ckpt}/$NAME
HERE=runs/$NAME
mkdir -p "$OUT" "$HERE"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
done_steps() {  # the step of the newest checkpoint in $OUT, 0 if none
  ls -d "$OUT"/checkpoint-* 2>/dev/null | sed 's/.*checkpoint-//' | sort -n | tail -1 || true
}
STEP=$(done_steps); STEP=${STEP:-0}
while [ "$STEP" -lt "$UNTIL" ]; do
  NEXT=$(( STEP + CHUNK < UNTIL ? STEP + CHUNK : UNTIL ))
  python training/train_mmf.py --dataset_name mnist-offline --resolution 28 --class_conditional \
      --label_dropout 0.1 --block_out_channels 16 32 32 --train_batch_size 32 --learning_rate 1e-3 \
      --lr_scheduler constant_with_warmup --lr_warmup_steps 50 --use_ema --ema_max_decay 0.999 \
      --derivative finite_difference --tangent model --pair_rows 1 --r_neq_t_fraction 0.25 \
      --adaptive_p 0.5 --adaptive_reduction mean "${LAM[@]}" \
      --checkpointing_steps "$CHUNK" --checkpoints_total_limit 1 --save_images_steps "$CHUNK" \
      --num_sample_images 10 --logger none --seed "$SEED" --max_train_steps "$NEXT" \
      --resume_from_checkpoint latest --output_dir "$OUT" >> "$OUT/train.log" 2>&1
  python -m mmf_diffusers.evaluation --pipeline "$OUT" --metric fd-mnistcnn class-accuracy --num-images 1000 \
      --steps 1 2 --class-labels cycle --reference mnist-test --output "$OUT/evaluation-$NEXT.json" \
      >> "$OUT/evaluate.log" 2>&1
  python - "$OUT/evaluation-$NEXT.json" "$NEXT" "$HERE/curve.jsonl" <<'PY'
import json, sys, time
rows = {r["steps"]: r for r in json.load(open(sys.argv[1]))["rows"]}
line = {"step": int(sys.argv[2]), "fd_1step": rows[1]["fd-mnistcnn"], "fd_2step": rows[2]["fd-mnistcnn"],
        "accuracy_1step": rows[1]["class-accuracy"], "scored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
open(sys.argv[3], "a").write(json.dumps(line) + "\n")
print(line)
PY
  python runs/curriculum-mnist-common/thin_log.py "$OUT/logs/train_log.jsonl" "$HERE/train_log.jsonl.gz"
  STEP=$NEXT
done
