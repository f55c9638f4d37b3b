#!/usr/bin/env bash
# GPU check of the training path as users run it (training/train_mmf.py): no downloads, at most 10 minutes on one GPU
# (the per-run timeouts add up to that).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR]         (default: runs/gpu_check, removed first)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    the same path on a CPU, tiny UNet at 16x16, 2 steps per run;
#                                                        output in a new temporary folder unless OUTPUT_DIR is given
#                                                        (tests/test_gpu_check.py runs it in the test suite)
#
# 1. writes random-blob 64x64 RGB PNGs (no data set is downloaded);
# 2. trains, with the same seed (so step 1 sees the same images, times and noise in every run):
#    - fm_bf16, fd_bf16, jvp_bf16: --mixed_precision bf16 --use_ema, lam = 1, STEPS steps each: flow matching
#      (--r_neq_t_fraction 0), finite differences, jvp; GPU: the README's CIFAR-10 UNet (59.0M parameters), batch 64;
#    - fd_no, jvp_no, fd_fp16, jvp_fp16: one step each in float32 and fp16, for the parity of step 1 (the dry run
#      leaves out fp16: accelerate runs it in float32 on a CPU; tests/test_script_precision.py covers it there);
#    - latent_bf16: latent training through a tiny random AutoencoderKL written here (--vae_name_or_path);
#    - compile_bf16: --torch_compile (dry run: --torch_compile_backend aot_eager, which captures the same graphs
#      without generating code);
#    - fd_bf16 is then resumed from its last checkpoint for 2 more steps (--resume_from_checkpoint latest);
#    - dit_fm_bf16, dit_fd_bf16: --backbone dit, STEPS steps of flow matching and of finite differences (lam = 1);
#      dit_fd_bf16_gc: dit_fd_bf16 with --gradient_checkpointing (its memory and time; step 1 within 1% of it);
#      GPU: DiT-S with patch 4 on the 64x64 images (256 tokens, 33M parameters), batch 64; dry run: a 2-layer DiT;
# 3. checks and prints: step-1 loss, mean |du/dt| and gradient norm of bf16 and fp16 against float32 (within 5%, both
#    estimators), the median step time
#    after warm-up of each timed run and its ratio to flow matching, peak GPU memory (peak_gpu_mem_mib in
#    logs/train_log.jsonl), that the resumed run continued from its checkpoint, that every saved pipeline generates
#    (MMFPipeline.from_pretrained(run).to(device)), and writes OUTPUT_DIR/gpu_check.json;
# 4. GPU only: benchmarks/derivative_precision.py --device cuda (du/dt of each estimator and precision, library level).
# Exit status: 0 when everything holds, 1 otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [ "$DRY" = "1" ]; then
  OUT="${1:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
else
  OUT="${1:-runs/gpu_check}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$OUT/hf_datasets" PYTHONUNBUFFERED=1
START=$SECONDS

if [ "$DRY" = "1" ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  DEVICE=cpu; STEPS=2; WARMUP=1; IMAGES=16; RESOLUTION=16
  # generous: a CPU shared with other jobs can be many times slower than alone (the caps only catch hangs)
  RUN_TIMEOUT=1200; ONE_STEP_TIMEOUT=1200; LATENT_TIMEOUT=1200; COMPILE_TIMEOUT=1200; RESUME_TIMEOUT=1200
  MODEL=(--block_out_channels 8 16 --layers_per_block 1 --attention_levels 0 1 --train_batch_size 8)
  DIT_MODEL=(--backbone dit --dit_layers 2 --dit_heads 2 --dit_head_dim 8 --patch_size 4 --train_batch_size 8)
  DIT_TIMEOUT=1200
  COMPILE=(--torch_compile --torch_compile_backend aot_eager)
else
  # Caps: 3 timed runs x 60 s + 4 one-step runs x 25 s + latent 35 s + compile 100 s + resume 25 s + 3 DiT runs x
  # 35 s + the library precision check 45 s = 590 s, plus data and checks: under 10 minutes at worst (each run is
  # mostly start-up).
  DEVICE=cuda; STEPS=30; WARMUP=10; IMAGES=512; RESOLUTION=64
  RUN_TIMEOUT=60; ONE_STEP_TIMEOUT=25; LATENT_TIMEOUT=35; COMPILE_TIMEOUT=100; RESUME_TIMEOUT=25
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device (GPU_CHECK_DRY_RUN=1 runs on the CPU)')"
  # The README's CIFAR-10 recipe: 4 levels, attention at the 16x16 level (here the third, at 64x64 input).
  MODEL=(--block_out_channels 128 256 256 256 --layers_per_block 4 --attention_levels 0 0 1 0
         --norm_num_groups 32 --attention_head_dim 64 --train_batch_size 64)
  COMPILE=(--torch_compile)
  # DiT-S (12 layers, 6 heads x 64) with 4x4 patches: 256 tokens at 64x64, as DiT-S/2 on 32x32 latents.
  DIT_MODEL=(--backbone dit --dit_size S --patch_size 4 --train_batch_size 64)
  DIT_TIMEOUT=35
fi
rm -rf "$OUT"
mkdir -p "$OUT"
echo "Output: $OUT (dry run: $DRY)"

# 1. data: random soft blobs, 64x64 RGB; a tiny random VAE for the latent run
python - "$OUT" "$IMAGES" <<'PY'
import os, sys
import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

out, count = sys.argv[1], int(sys.argv[2])
os.makedirs(os.path.join(out, "blobs"))
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:64, 0:64] / 63.0
for i in range(count):
    img = np.zeros((64, 64, 3))
    for _ in range(rng.integers(1, 4)):
        cy, cx, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None] * rng.uniform(0, 1, 3)
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(out, "blobs", f"{i:04d}.png"))
torch.manual_seed(0)
AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
              sample_size=64).save_pretrained(os.path.join(out, "tiny_vae"))
print(f"Wrote {count} 64x64 RGB blob images and a tiny random AutoencoderKL to {out}")
PY

# 2. training runs: "name timeout --flag value ..." (each gets COMMON)
COMMON=(--train_data_dir "$OUT/blobs" --resolution "$RESOLUTION" --lam_schedule constant --lam_end 1
        --learning_rate 1e-4 --lr_warmup_steps 0 --save_images_steps 100000 --num_sample_images 4 --logger none
        --seed 0)
RUNS=("fm_bf16 $RUN_TIMEOUT --mixed_precision bf16 --use_ema --max_train_steps $STEPS --r_neq_t_fraction 0"
      "fd_bf16 $RUN_TIMEOUT --mixed_precision bf16 --use_ema --max_train_steps $STEPS --derivative finite_difference --checkpointing_steps $STEPS"
      "jvp_bf16 $RUN_TIMEOUT --mixed_precision bf16 --use_ema --max_train_steps $STEPS --derivative jvp"
      "fd_no $ONE_STEP_TIMEOUT --mixed_precision no --max_train_steps 1 --derivative finite_difference"
      "jvp_no $ONE_STEP_TIMEOUT --mixed_precision no --max_train_steps 1 --derivative jvp"
      "latent_bf16 $LATENT_TIMEOUT --mixed_precision bf16 --max_train_steps 2 --vae_name_or_path $OUT/tiny_vae --center_crop"
      "compile_bf16 $COMPILE_TIMEOUT --mixed_precision bf16 --max_train_steps $STEPS ${COMPILE[*]}"
      "dit_fm_bf16 $DIT_TIMEOUT --mixed_precision bf16 --max_train_steps $STEPS --r_neq_t_fraction 0"
      "dit_fd_bf16 $DIT_TIMEOUT --mixed_precision bf16 --max_train_steps $STEPS --derivative finite_difference"
      "dit_fd_bf16_gc $DIT_TIMEOUT --mixed_precision bf16 --max_train_steps $STEPS --derivative finite_difference --gradient_checkpointing")
train() {  # name timeout flags... (runs named dit_* train the DiT, the others the UNet)
  local name=$1 limit=$2; shift 2
  local model=("${MODEL[@]}")
  if [[ $name == dit_* ]]; then model=("${DIT_MODEL[@]}"); fi
  echo "== $name: ${model[*]} $*"
  if ! timeout "$limit" python training/train_mmf.py "${COMMON[@]}" "${model[@]}" "$@" --output_dir "$OUT/$name" \
      >>"$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (last lines of $OUT/$name.log):"; tail -20 "$OUT/$name.log"; exit 1
  fi
  tail -1 "$OUT/$name.log"
}
if [ "$DRY" != "1" ]; then  # on a CPU accelerate runs fp16 in float32: the runs would repeat fd_no and jvp_no
  RUNS+=("fd_fp16 $ONE_STEP_TIMEOUT --mixed_precision fp16 --max_train_steps 1 --derivative finite_difference"
         "jvp_fp16 $ONE_STEP_TIMEOUT --mixed_precision fp16 --max_train_steps 1 --derivative jvp")
fi
for spec in "${RUNS[@]}"; do
  # shellcheck disable=SC2086  # a spec is a list of words
  train $spec
done
# resume fd_bf16 from its last checkpoint (step STEPS) for 2 more steps
# shellcheck disable=SC2086
train fd_bf16 "$RESUME_TIMEOUT" --mixed_precision bf16 --use_ema --max_train_steps $((STEPS + 2)) \
  --derivative finite_difference --checkpointing_steps "$STEPS" --resume_from_checkpoint latest

# 3. parity, step times, memory, resume, generation
python - "$OUT" "$DEVICE" "$WARMUP" "$STEPS" "$DRY" <<'PY'
import json, os, statistics, sys
import torch
from mmf_diffusers import MMFPipeline

out, device, warmup, steps, dry = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
precisions = ("no", "bf16") if dry else ("no", "bf16", "fp16")

def log(name):
    records = [json.loads(l) for l in open(os.path.join(out, name, "logs", "train_log.jsonl")) if l.strip()]
    by_step = {}
    for r in records:
        if "step" in r:
            by_step[r["step"]] = r
    return records, by_step

failures = []
summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "parity": {}, "timing": {}, "checks": {}}
print(f"\nStep 1 against float32 (same seed: same images, times and noise); within 5% required")
print(f"{'run':10} {'loss':>10} {'mean |du/dt|':>13} {'grad norm':>10}   relative to float32")
for estimator in ("fd", "jvp"):
    ref = log(f"{estimator}_no")[1][1]
    for precision in precisions:
        row = log(f"{estimator}_{precision}")[1][1]
        rel = {k: (row[k] - ref[k]) / ref[k] for k in ("loss", "mean_abs_dudt", "grad_norm")}
        bad = [k for k, v in rel.items() if abs(v) > 0.05]
        if bad:
            failures.append(f"{estimator}_{precision}: {', '.join(bad)} off by more than 5%")
        summary["parity"][f"{estimator}_{precision}"] = {"loss": row["loss"], "mean_abs_dudt": row["mean_abs_dudt"],
                                                         "grad_norm": row["grad_norm"], "relative": rel}
        print(f"{estimator + '_' + precision:10} {row['loss']:10.5f} {row['mean_abs_dudt']:13.5f} {row['grad_norm']:10.4f}"
              f"   {' '.join(f'{k} {v:+.2%}' for k, v in rel.items())}")

print(f"\n{'run':12} {'median step s':>13} {'x flow matching':>16} {'peak GPU MiB':>12}  last loss")
timed = ("fm_bf16", "fd_bf16", "jvp_bf16", "compile_bf16")
for name in timed:
    records = [r for r in log(name)[0] if "step" in r and r["step"] <= steps]
    times = [r["step_time_s"] for r in records[warmup:]]
    peak = max((r.get("peak_gpu_mem_mib", float("nan")) for r in records), default=float("nan"))
    summary["timing"][name] = {"steps": len(records), "median_step_s": statistics.median(times),
                               "peak_gpu_mem_mib": peak, "loss_last": records[-1]["loss"]}
for name in timed:
    row = summary["timing"][name]
    row["ratio_to_flow_matching"] = row["median_step_s"] / summary["timing"]["fm_bf16"]["median_step_s"]
    print(f"{name:12} {row['median_step_s']:13.4f} {row['ratio_to_flow_matching']:16.2f} {row['peak_gpu_mem_mib']:12.0f}"
          f"  {row['loss_last']:.4f}")

for name in ("dit_fm_bf16", "dit_fd_bf16", "dit_fd_bf16_gc"):  # the DiT's cost of MMF against flow matching, same model and batch
    records = [r for r in log(name)[0] if "step" in r and r["step"] <= steps]
    times = [r["step_time_s"] for r in records[warmup:]]
    peak = max((r.get("peak_gpu_mem_mib", float("nan")) for r in records), default=float("nan"))
    summary["timing"][name] = {"steps": len(records), "median_step_s": statistics.median(times),
                               "peak_gpu_mem_mib": peak, "loss_last": records[-1]["loss"]}
    row = summary["timing"][name]
    row["ratio_to_flow_matching"] = row["median_step_s"] / summary["timing"]["dit_fm_bf16"]["median_step_s"]
    print(f"{name:12} {row['median_step_s']:13.4f} {row['ratio_to_flow_matching']:16.2f} {row['peak_gpu_mem_mib']:12.0f}"
          f"  {row['loss_last']:.4f}   (DiT; ratio to dit_fm_bf16)")
plain, checkpointed = log("dit_fd_bf16")[1][1], log("dit_fd_bf16_gc")[1][1]
gc_rel = {k: (checkpointed[k] - plain[k]) / plain[k] for k in ("loss", "mean_abs_dudt", "grad_norm")}
summary["checks"]["gradient_checkpointing_step1_relative"] = gc_rel
print(f"--gradient_checkpointing, step 1 against dit_fd_bf16 (within 1% required): "
      f"{' '.join(f'{k} {v:+.3%}' for k, v in gc_rel.items())}")
if any(abs(v) > 0.01 for v in gc_rel.values()):
    failures.append("dit_fd_bf16_gc: step 1 differs from dit_fd_bf16 by more than 1%")

records, by_step = log("fd_bf16")
resumed = [r for r in records if r.get("event") == "resume"]
ok = bool(resumed) and resumed[-1]["from_step"] == steps and sorted(by_step)[-1] == steps + 2
summary["checks"]["resume"] = ok
print(f"\nResume: fd_bf16 continued from checkpoint-{steps} to step {sorted(by_step)[-1]}: {'ok' if ok else 'FAILED'}")
if not ok:
    failures.append("resume did not continue from the checkpoint")
compiled = [r for r in log("compile_bf16")[0] if "step" in r]
summary["checks"]["compile_loss_finite"] = all(r["loss"] == r["loss"] for r in compiled)

for name in ("fm_bf16", "fd_bf16", "jvp_bf16", "latent_bf16", "compile_bf16", "dit_fd_bf16"):
    pipe = MMFPipeline.from_pretrained(os.path.join(out, name)).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    if not (images.shape[0] == 4 and images.shape[3] == 3 and bool((images >= 0).all() and (images <= 1).all())):
        failures.append(f"the pipeline of {name} did not generate 4 RGB images in [0, 1]: {images.shape}")
    summary["checks"][f"{name}_generates"] = True
print(f"Every saved pipeline generated 4 images on {device} (latent_bf16 through its VAE).")
summary["failures"] = failures
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"Summary: {os.path.join(out, 'gpu_check.json')}")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
PY

# 4. du/dt of each estimator and precision against the fp32 jvp, at the library level (GPU only: slow on a CPU)
if [ "$DRY" != "1" ] && [ -f benchmarks/derivative_precision.py ]; then
  timeout 45 python benchmarks/derivative_precision.py --device "$DEVICE"
fi
echo "gpu_check done in $((SECONDS - START)) s (dry run: $DRY)"
