"""What a training worker's data costs, and how fast the FID network extracts features.

    python experiments/benchmarks/data_and_fid.py                 # CPU
    python experiments/benchmarks/data_and_fid.py --device cuda   # FID features on a GPU as well

1. Peak RSS of a process that draws 50 batches of 256 from a dataset of 20,000 and of 200,000 images
   of 3 x 32 x 32 (CIFAR-sized), for the part decoded to float32 in memory (how workers read data
   before streaming), held as stored (uint8) and streamed through a shuffle buffer of 4096 rows; each
   in its own process, side by side in one run.
2. Median seconds per batch of 256 drawn, held as stored against streamed (the ratio).
3. FID Inception features per second on CPU (and on `--device`), batches of 64 CIFAR-sized images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PROBE = """
import statistics, sys, time
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
from fmm.experiment.data import DataSource, read_part
uri, mode = sys.argv[1], sys.argv[2]
if mode == "float32":
    x = read_part(uri)[0]
    times = [0.0]
else:
    source = DataSource(None, uri, 0, 1, seed=0, buffer_rows=10**8 if mode == "uint8" else 4096)
    times = []
    for _ in range(50):
        start = time.perf_counter()
        source.batch(256)
        times.append(time.perf_counter() - start)
print(peak_mb(), statistics.median(times))
"""


def probe(uri: str, mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, uri, mode], capture_output=True, text=True, check=True)
    rss, seconds = out.stdout.split()[-2:]
    return int(rss), float(seconds)


def memory(folder: str) -> None:
    from fmm.experiment.data import Samples, write_shards

    for rows in (20_000, 200_000):
        x = np.random.default_rng(rows).integers(0, 256, size=(rows, 3, 32, 32), dtype=np.uint8)
        write_shards(Samples(x, None, (3, 32, 32), "uint8_image"), os.path.join(folder, str(rows)), 8, "random")
    print(f"{'rows':>8s} {'float32 MB':>11s} {'uint8 MB':>9s} {'stream MB':>10s} {'uint8 s/batch':>14s} "
          f"{'stream s/batch':>15s} {'ratio':>6s}")
    for rows in (20_000, 200_000):
        uri = os.path.join(folder, str(rows))
        decoded, _ = probe(uri, "float32")
        held, held_s = probe(uri, "uint8")
        streamed, stream_s = probe(uri, "stream")
        print(f"{rows:8d} {decoded:11d} {held:9d} {streamed:10d} {held_s:14.5f} {stream_s:15.5f} "
              f"{stream_s / held_s:6.2f}")


def fid_throughput(device: str, batches: int = 4) -> None:
    import torch

    from fmm.evaluation import fid

    extractor = fid.InceptionFeatures(device=device)
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    extractor.batch(images[:8])  # warm-up
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        extractor.batch(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(f"FID features on {device}: {64 / statistics.median(times):.1f} images/s (median of {batches} batches of "
          f"64, {extractor.interface} interface, weights {extractor.sha256[:12]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="also measure FID features on this device (e.g. cuda)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        memory(folder)
    fid_throughput("cpu")
    if args.device:
        fid_throughput(args.device, batches=20)


if __name__ == "__main__":
    main()
