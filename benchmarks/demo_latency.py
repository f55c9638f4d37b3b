"""How fast ``mmf-demo`` answers: the time from starting the command to the first image a client gets, and the time per
request after that, both through the real `gradio_client` against the server on 127.0.0.1.

    OMP_NUM_THREADS=1 python benchmarks/demo_latency.py --pipeline pipelines/mmf-mnist --requests 20

Each request is the page's default: 16 images, one step, each class in turn (class-conditional models), seed 0.
Prints one JSON object (and writes it to ``--json`` if given) with the exact command and the machine's 1-minute load
average before and after (the times grow with whatever else runs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="pipelines/mmf-mnist", help="pipeline folder (default pipelines/mmf-mnist)")
    parser.add_argument("--requests", type=int, default=20, help="requests timed after the first (default 20)")
    parser.add_argument("--num-images", type=int, default=16, help="images per request (default 16)")
    parser.add_argument("--steps", type=int, default=1, help="steps per request (default 1)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()

    from gradio_client import Client

    load_before = os.getloadavg()[0]  # a shared machine: other jobs slow everything down
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "mmf_diffusers.demo", "--pipeline", args.pipeline, "--server-port", str(port)]
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = None
        while client is None:
            if server.poll() is not None:
                raise SystemExit(f"mmf-demo exited with {server.returncode}: {server.stderr.read()}")
            try:
                client = Client(url, verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.1)
        up = time.perf_counter() - start
        conditional = "each class in turn" in json.dumps(client.view_api(return_format="dict", print_info=False))
        label = "each class in turn" if conditional else "none"
        request = (label, args.num_images, args.steps, 0)
        client.predict(*request, api_name="/generate")
        first = time.perf_counter() - start
        times = []
        for _ in range(args.requests):
            t = time.perf_counter()
            client.predict(*request, api_name="/generate")
            times.append(time.perf_counter() - t)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "command": " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "(unset)"), "python",
                             *sys.argv]),
        "server_command": " ".join(command[1:]),
        "request": {"class_label": label, "num_images": args.num_images, "steps": args.steps, "seed": 0},
        "seconds_to_server_up": round(up, 2),
        "seconds_to_first_image": round(first, 2),
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpu_count": os.cpu_count(),
        "request_seconds": {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                            "max": round(max(times), 3), "n": len(times)},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
