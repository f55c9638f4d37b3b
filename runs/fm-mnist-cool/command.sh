#!/usr/bin/env bash
# Learning-rate cool-down of the flow-matching baseline runs/fm-mnist-cond, the same treatment the shipped MMF model
# got (runs/mmf-mnist-cool): its exact command, resumed from its step-8750 checkpoint (model, optimiser, EMA, data
# position: all restored) with the learning rate cut from 5e-4 to 1e-4, written to this folder. The first call runs
# 1750 steps (to 10500: the MMF cool-down's 1750 steps at 1e-4); to continue, run this again with
# `--resume_from_checkpoint latest --max_train_steps N` (the last flag wins; see RESUME.md).
# Run from the repository root with the venv active.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} bash runs/fm-mnist-cond/command.sh \
    --resume_from_checkpoint runs/fm-mnist-cond/checkpoint-8750 --learning_rate 1e-4 --max_train_steps 10500 \
    --output_dir runs/fm-mnist-cool "$@"
