#!/usr/bin/env bash
# GPU check of the training path: no downloads, at most 8 minutes on one H200 (the timeouts add up to
# that).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]              (default: runs/gpu_check; removed first)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh        the same path on a CPU: tiny UNet, 2 steps per run
#
# 1. writes 512 random-blob 64x64 RGB PNGs (no data set is downloaded);
# 2. trains training/train_mmf.py at 64x64 with --use_ema, --mixed_precision bf16, lam = 1 (the cost after the
#    default warm-up), ~30 steps per run: flow matching (--r_neq_t_fraction 0), --derivative finite_difference and
#    --derivative jvp (in fp32 if the script refuses jvp under bf16; flow matching is then also run in fp32, so each
#    ratio compares runs of one precision). UNet: the README's CIFAR-10 recipe (59.0M parameters), batch 64;
# 3. prints the median step time after warm-up (step_time_s of logs/train_log.jsonl) of each run, its ratio to the
#    flow-matching run of the same precision, and the peak GPU memory (peak_gpu_mem_mib), and writes them to
#    OUTPUT_DIR/gpu_check.json;
# 4. checks that every saved pipeline generates: MMFPipeline.from_pretrained(run).to(device)(num_images=4);
# 5. runs benchmarks/derivative_precision.py --device cuda (bf16/fp16 vs fp32 du/dt) if that script exists.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-runs/gpu_check}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$OUT/hf_datasets" PYTHONUNBUFFERED=1
START=$SECONDS

if [ "$DRY" = "1" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  DEVICE=cpu; STEPS=2; WARMUP=1; IMAGES=32; RUN_TIMEOUT=600
  MODEL=(--block_out_channels 16 32 --layers_per_block 1 --attention_levels 0 1 --train_batch_size 8)
else
  # At most 4 runs x 100 s + 60 s for the precision check + data and summary: within 8 minutes.
  DEVICE=cuda; STEPS=30; WARMUP=10; IMAGES=512; RUN_TIMEOUT=100
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (GPU_CHECK_DRY_RUN=1 runs on the CPU)')"
  # The README's CIFAR-10 recipe: 4 levels, attention at the 16x16 level (here the third, at 64x64 input).
  MODEL=(--block_out_channels 128 256 256 256 --layers_per_block 4 --attention_levels 0 0 1 0
         --norm_num_groups 32 --attention_head_dim 64 --train_batch_size 64)
fi
rm -rf "$OUT"
mkdir -p "$OUT"

# 1. data: random soft blobs, 64x64 RGB
python - "$OUT/blobs" "$IMAGES" <<'PY'
import os, sys
import numpy as np
from PIL import Image

folder, count = sys.argv[1], int(sys.argv[2])
os.makedirs(folder)
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:64, 0:64] / 63.0
for i in range(count):
    img = np.zeros((64, 64, 3))
    for _ in range(rng.integers(1, 4)):
        cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None] * rng.uniform(0, 1, 3)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
print(f"Wrote {count} 64x64 RGB blob images to {folder}")
PY

# 2. training runs
# jvp under bf16: run it in bf16 where the script accepts it, else in fp32 (exit status 2 of the argument check).
JVP_PRECISION=bf16
if ! python -c "import sys; sys.path.insert(0, 'training'); import train_mmf; \
train_mmf.parse_args(['--train_data_dir', '$OUT/blobs', '--derivative', 'jvp', '--mixed_precision', 'bf16'])" \
    >/dev/null 2>"$OUT/jvp_bf16_refusal.txt"; then
  echo "jvp is refused under bf16 ($(tail -1 "$OUT/jvp_bf16_refusal.txt")); running it in fp32"
  JVP_PRECISION=no
fi
COMMON=(--train_data_dir "$OUT/blobs" --resolution 64 "${MODEL[@]}" --use_ema --max_train_steps "$STEPS"
        --lam_schedule constant --lam_end 1 --learning_rate 1e-4 --lr_warmup_steps 0 --checkpointing_steps 100000
        --save_images_steps 100000 --num_sample_images 4 --logger none --seed 0)
RUNS=("fm_bf16 bf16 --r_neq_t_fraction 0 --derivative finite_difference"
      "fd_bf16 bf16 --derivative finite_difference")
if [ "$JVP_PRECISION" = "bf16" ]; then
  RUNS+=("jvp_bf16 bf16 --derivative jvp")
else
  RUNS+=("fm_fp32 no --r_neq_t_fraction 0 --derivative finite_difference" "jvp_fp32 no --derivative jvp")
fi
for spec in "${RUNS[@]}"; do
  read -r name precision flags <<<"$spec"
  echo "== $name: --mixed_precision $precision $flags"
  # shellcheck disable=SC2086  # $flags is a list of flags
  if ! timeout "$RUN_TIMEOUT" python training/train_mmf.py "${COMMON[@]}" --mixed_precision "$precision" $flags \
      --output_dir "$OUT/$name" >"$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (last lines of $OUT/$name.log):"; tail -20 "$OUT/$name.log"; exit 1
  fi
  tail -1 "$OUT/$name.log"
done

# 3. step times, ratios, memory; 4. the saved pipelines generate
python - "$OUT" "$DEVICE" "$WARMUP" "${RUNS[@]}" <<'PY'
import json, math, os, statistics, sys
import torch
from mmf_diffusers import MMFPipeline

out, device, warmup, specs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
rows = {}
for spec in specs:
    name, precision = spec.split()[:2]
    records = [json.loads(l) for l in open(os.path.join(out, name, "logs", "train_log.jsonl")) if '"step"' in l]
    times = [r["step_time_s"] for r in records[warmup:]]
    rows[name] = {"precision": precision, "flags": " ".join(spec.split()[2:]), "steps": len(records),
                  "median_step_s": statistics.median(times), "loss_last": records[-1]["loss"],
                  "peak_gpu_mem_mib": max((r.get("peak_gpu_mem_mib", float("nan")) for r in records), default=None)}
for name, row in rows.items():
    reference = "fm_bf16" if row["precision"] == "bf16" else "fm_fp32"
    row["ratio_to_flow_matching"] = row["median_step_s"] / rows[reference]["median_step_s"]
    row["ratio_reference"] = reference
    pipe = MMFPipeline.from_pretrained(os.path.join(out, name)).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 64, 64, 3) and bool((images >= 0).all() and (images <= 1).all()), images.shape
    row["pipeline_generates"] = True
print(f"\n{'run':10} {'precision':9} {'median step s':>13} {'x flow matching':>16} {'peak GPU MiB':>12}  last loss")
for name, row in rows.items():
    print(f"{name:10} {row['precision']:9} {row['median_step_s']:13.4f} {row['ratio_to_flow_matching']:16.2f} "
          f"{row['peak_gpu_mem_mib'] if row['peak_gpu_mem_mib'] is not None else float('nan'):12.0f}  "
          f"{row['loss_last']:.4f}")
summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "warmup_steps_skipped": warmup, "runs": rows}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"Every saved pipeline generated 4 images on {device}. Summary: {os.path.join(out, 'gpu_check.json')}")
PY

# 5. du/dt of each estimator and precision against the fp32 jvp (written by the coordinator)
if [ -f benchmarks/derivative_precision.py ]; then
  timeout 60 python benchmarks/derivative_precision.py --device "$DEVICE"
else
  echo "benchmarks/derivative_precision.py not found: skipping the du/dt precision check"
fi
echo "gpu_check done in $((SECONDS - START)) s (dry run: $DRY)"
