"""What the decoded-data cache (engine/data_cache.py) saves: `load_dataset` of a folder or .zip with the cache empty
(decoding every image, then keeping the set) and again with it filled, each in a fresh process, in a cache folder of
its own (deleted after).

    PYTHONPATH=. python benchmarks/bench_data_cache.py --data ../shared/data/cifar10-jpeg/train.zip [--size 32]

Prints one BENCH JSON line per run: seconds, images, and whether the set came from the cache."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_RUN = """
import json, sys, time
from ddpm_cli.config import DataConfig, ModelConfig
from ddpm_cli.engine import data_cache
from ddpm_cli.engine.data import load_dataset
t = time.perf_counter()
ds = load_dataset(DataConfig(dataset="folder", root=sys.argv[1]), ModelConfig(image_size=int(sys.argv[2])))
print(json.dumps({"seconds": round(time.perf_counter() - t, 3), "images": len(ds.images),
                  "entries": len(data_cache.list_entries())}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder or .zip of images")
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_DATA_CACHE": "on", "DDPM_DATA_CACHE_DIR": cache}
        for run in ("empty", "filled"):
            out = subprocess.run([sys.executable, "-c", ONE_RUN, a.data, str(a.size)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            print("BENCH " + json.dumps({"cache": run, **json.loads(out.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
