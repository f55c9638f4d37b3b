"""Write the git copy of a curriculum run's training log: every 10th step of `logs/train_log.jsonl` (and step 1), plus
its events (resumes), gzipped. A step logged twice, after a resume from an earlier checkpoint, keeps its last record:
the one on the run's final path. The full log stays beside the checkpoint, outside git.

    usage: python runs/curriculum-mnist-common/thin_log.py OUT/logs/train_log.jsonl runs/NAME/train_log.jsonl.gz
"""
import gzip
import json
import os
import sys

EVERY = 10


def main(source: str, target: str) -> None:
    steps, events = {}, []
    with open(source) as f:
        for record in map(json.loads, filter(str.strip, f)):
            step = record.get("step")
            if step is None:
                events.append(record)
            elif step == 1 or step % EVERY == 0:
                steps[step] = record
    partial = target + ".partial"  # renamed into place once complete: a kill never leaves half a copy in git
    with gzip.open(partial, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in events + [steps[k] for k in sorted(steps)])
    os.replace(partial, target)


if __name__ == "__main__":
    main(*sys.argv[1:])
