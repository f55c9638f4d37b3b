#!/usr/bin/env bash
# A learning-rate cool-down of runs/mmf-mnist-cond (the run the shipped model came from): its exact command,
# resumed from its step-8250 checkpoint (model, optimiser, EMA, data position, curriculum: all restored) with the
# peak learning rate cut from 5e-4 to 1e-4 (a resume may change --learning_rate; the schedule stays constant) and
# everything written to this folder, for 1000 steps (to 9250). The first call starts from
# runs/mmf-mnist-cond/checkpoint-8250; to continue it, run this again with `--resume_from_checkpoint latest
# --max_train_steps N` (the last flag wins; RESUME.md lists the calls that made the shipped step 17000).
# Run from the repository root with the venv active.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} bash runs/mmf-mnist-cond/command.sh \
    --resume_from_checkpoint runs/mmf-mnist-cond/checkpoint-8250 --learning_rate 1e-4 --max_train_steps 9250 \
    --output_dir runs/mmf-mnist-cool "$@"
