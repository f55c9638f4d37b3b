#!/usr/bin/env bash
# Class-conditional MNIST with the defaults chosen on MNIST (docs/benchmarks.md, "Defaults on MNIST": lam = 0 throughout,
# MeanFlow's adaptive weight p = 1, finite differences, model tangent, paired rows, 25% of rows r != t), from
# scratch, with the shipped model's UNet (32, 64, 64), batch 64 and training-time guidance (w = 1, kappa = 0.5, scale
# 2). The loss flags are spelled out so that a later change of the script's defaults does not change this run.
# Run from the repository root with the venv active; add `--resume_from_checkpoint latest` to continue it.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python training/train_mmf.py --dataset_name mnist-offline --resolution 28 \
    --block_out_channels 32 64 64 --class_conditional --label_dropout 0.1 --cfg_w 1.0 --cfg_kappa 0.5 \
    --lam_schedule constant --lam_end 0 --adaptive_p 1 --derivative finite_difference --tangent model \
    --pair_rows 1 --r_neq_t_fraction 0.25 \
    --train_batch_size 64 --max_train_steps 30000 --learning_rate 5e-4 \
    --lr_scheduler constant_with_warmup --lr_warmup_steps 300 --checkpointing_steps 250 \
    --checkpoints_total_limit 1 --save_images_steps 500 --num_sample_images 20 --use_ema --seed 0 --logger none \
    --output_dir runs/mmf-mnist-v2 "$@"
