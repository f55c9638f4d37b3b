#!/usr/bin/env bash
# Flow-matching baseline, phase 2: the command of runs/mmf-mnist-cond (class-conditional,
# label dropout 0.1, guidance built in with w = 1, kappa = 0.5) with every row r = t (--r_neq_t_fraction 0: exactly
# flow matching; the lam flags then do nothing), warm-started from the EMA UNet of phase 1 (runs/fm-mnist, step
# 2000), as the MMF run is from runs/mmf-mnist. Same UNet, batch, optimiser, LR schedule, EMA and seed. Stops at
# step 6750 (the MMF checkpoint it is compared with); pass --max_train_steps N --resume_from_checkpoint latest to go
# on (to the same wall time, for instance).
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python training/train_mmf.py --dataset_name mnist-offline --resolution 28 \
    --pretrained_unet runs/fm-mnist --pretrained_unet_subfolder unet \
    --class_conditional --label_dropout 0.1 --cfg_w 1.0 --cfg_kappa 0.5 --label_init_std 0.3 \
    --lam_schedule linear --lam_start 0.3 --lam_end 1.0 --lam_warmup_steps 3000 \
    --train_batch_size 64 --max_train_steps 6750 --learning_rate 5e-4 \
    --lr_scheduler constant_with_warmup --lr_warmup_steps 100 --checkpointing_steps 250 \
    --checkpoints_total_limit 1 --save_images_steps 500 --num_sample_images 20 --use_ema --seed 0 --logger none \
    --r_neq_t_fraction 0 --pair_rows 0 --adaptive_p 0 \
    --output_dir runs/fm-mnist-cond "$@"
