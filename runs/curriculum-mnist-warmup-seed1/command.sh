#!/usr/bin/env bash
# warmup, seed 1, of the MNIST curriculum verdict (runs/curriculum-mnist-common/README.md). Continue it to step N with
#   OMP_NUM_THREADS=1 nice -n 19 nohup bash runs/curriculum-mnist-warmup-seed1/command.sh N > /dev/null 2>&1 &
# (it resumes from the newest checkpoint in /work/ckpt/curriculum-mnist-warmup-seed1 and scores the model every 2000 steps).
exec bash runs/curriculum-mnist-common/train_and_score.sh warmup 1 "${1:-20000}"
