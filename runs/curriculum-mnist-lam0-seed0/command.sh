#!/usr/bin/env bash
# lam0, seed 0, of the MNIST curriculum verdict (runs/curriculum-mnist-common/README.md). Continue it to step N with
#   OMP_NUM_THREADS=1 nice -n 19 nohup bash runs/curriculum-mnist-lam0-seed0/command.sh N > /dev/null 2>&1 &
# (it resumes from the newest checkpoint in /work/ckpt/curriculum-mnist-lam0-seed0 and scores the model every 2000 steps).
exec bash runs/curriculum-mnist-common/train_and_score.sh lam0 0 "${1:-20000}"
