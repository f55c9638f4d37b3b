#!/usr/bin/env bash
# Unconditional MNIST, 2000 steps: the warm start of runs/mmf-mnist-cond (the class-conditional run behind
# pipelines/mmf-mnist). The loss flags spell out the script's defaults when this run was trained (lam rising linearly
# to 1 over 6666 steps, jvp, plain MSE, unpaired rows). The run itself was launched with --max_train_steps 20000 and
# stopped by hand after step 2000; with a constant learning rate after the warm-up and --lam_warmup_steps given, this
# command follows the same schedule and stops there. Run from the repository root with the venv active.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python training/train_mmf.py --dataset_name mnist-offline --resolution 28 \
    --block_out_channels 32 64 64 --train_batch_size 64 --max_train_steps 2000 --learning_rate 5e-4 \
    --lr_scheduler constant_with_warmup --lr_warmup_steps 300 --checkpointing_steps 250 \
    --checkpoints_total_limit 1 --save_images_steps 500 --use_ema --seed 0 --logger none \
    --lam_schedule linear --lam_start 0 --lam_end 1 --lam_warmup_steps 6666 --adaptive_p 0 --derivative jvp \
    --pair_rows 0 --output_dir runs/mmf-mnist "$@"
