#!/usr/bin/env bash
# Class-conditional MNIST run behind pipelines/mmf-mnist, warm-started from the EMA UNet of the
# unconditional run in runs/mmf-mnist (step 2000), label embedding drawn from N(0, 0.3^2) (a zero start learned the
# labels too slowly: 12.7% class accuracy after 500 steps). Run from the repository root with the venv active; add
# `--resume_from_checkpoint latest` to continue it. Steps 1-1500 used --derivative jvp (the default then); from step
# 1500 on finite differences, the same loss at about 0.55x the time per step, without --pair_rows (which
# the run never used: pass it as 0 so the loss stays the one it was trained with).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python training/train_mmf.py --dataset_name mnist-offline --resolution 28 \
    --pretrained_unet runs/mmf-mnist --pretrained_unet_subfolder unet \
    --class_conditional --label_dropout 0.1 --cfg_w 1.0 --cfg_kappa 0.5 --label_init_std 0.3 \
    --lam_schedule linear --lam_start 0.3 --lam_end 1.0 --lam_warmup_steps 3000 \
    --train_batch_size 64 --max_train_steps 20000 --learning_rate 5e-4 \
    --lr_scheduler constant_with_warmup --lr_warmup_steps 100 --checkpointing_steps 250 \
    --checkpoints_total_limit 1 --save_images_steps 500 --num_sample_images 20 --use_ema --seed 0 --logger none \
    --derivative finite_difference --pair_rows 0 --adaptive_p 0 \
    --output_dir runs/mmf-mnist-cond "$@"
