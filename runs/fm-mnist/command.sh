#!/usr/bin/env bash
# Flow-matching baseline, phase 1: the command of runs/mmf-mnist (unconditional, 2000 steps, the
# warm start of the shipped MMF model) with every row r = t (--r_neq_t_fraction 0: the MMF loss is then exactly flow
# matching on u(z_t, t, t); no derivative is computed). Same UNet, batch, optimiser, LR schedule, EMA and seed.
# Phase 2 is runs/fm-mnist-cond/command.sh. Run from the repository root with the venv active.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python training/train_mmf.py --dataset_name mnist-offline --resolution 28 \
    --block_out_channels 32 64 64 --train_batch_size 64 --max_train_steps 2000 --learning_rate 5e-4 \
    --lr_scheduler constant_with_warmup --lr_warmup_steps 300 --checkpointing_steps 250 \
    --checkpoints_total_limit 1 --save_images_steps 500 --use_ema --seed 0 --logger none \
    --r_neq_t_fraction 0 --pair_rows 0 --adaptive_p 0 \
    --output_dir runs/fm-mnist "$@"
