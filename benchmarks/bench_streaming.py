"""How fast the streamed data path (data.streaming: on) supplies training batches, against the in-memory path.

For each image size: the time to load the set each way, then the rate of `Batcher.next()` (images/s) in memory
(on the GPU when there is one) and streamed with each `--workers` setting (data.stream_workers: 0 decodes in
threads of this process, N in N worker processes), with `--work-ms` of simulated training between batches, which
is what the ahead-decoding overlaps. Streaming keeps up when its
rate is at or above the training rate at that size (BENCHMARKS.md has both). One JSON line per size.

    PYTHONPATH=. python benchmarks/bench_streaming.py --data ../shared/data/cifar10-jpeg/train.zip --size 32 64 256 \
        --workers 0 4 8
    PYTHONPATH=. python benchmarks/bench_streaming.py --tiny      # a CPU smoke run on generated PNGs
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def make_folder(root: Path, count: int, size: int, ext: str = "png") -> Path:
    """`count` shapes as image files in class folders (when no real data is given): PNG, or JPEG at quality 90."""
    from PIL import Image

    from ddpm_cli.engine.data import SHAPE_CLASSES, make_shapes

    shapes = make_shapes(count, size)
    for i, (image, label) in enumerate(zip(shapes.images, shapes.labels)):
        path = root / SHAPE_CLASSES[label] / f"{i:06d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, **({"quality": 90} if ext == "jpg" else {}))
    return root


def measure(data: str, size: int, batch: int, steps: int, work_ms: float, device: torch.device,
            workers: list[int]) -> dict:
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.data import Batcher, load_dataset

    out: dict = {"size": size, "batch": batch, "threads": min(16, os.cpu_count() or 1), "device": str(device)}
    for mode, n in [("off", None), *[("on", w) for w in workers]]:
        cfg = validate_config({"model": {"image_size": size}, "data": {"dataset": "folder", "root": data,
                                                                        "streaming": mode, "stream_workers": n}})
        name = "memory" if mode == "off" else f"streamed_w{n}"
        t0 = time.perf_counter()
        ds = load_dataset(cfg.data, cfg.model)
        out[f"load_s_{name}"] = round(time.perf_counter() - t0, 2)
        b = Batcher(ds, batch, seed=0, device=device, on_device=device.type == "cuda", flip=True)
        b.next()  # the first batch: nothing decoded ahead yet (and the workers start)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, _ = b.next()
            if device.type == "cuda":
                torch.cuda.synchronize()
            time.sleep(work_ms / 1000)  # the training step the ahead-decoding overlaps
        rate = steps * batch / (time.perf_counter() - t0 - steps * work_ms / 1000)
        out[f"img_per_s_{name}"] = round(rate)
        b.close()
        del ds, b
    out["images"] = len(load_dataset(cfg.data, cfg.model))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a folder or .zip of images (default: generated shapes PNGs)")
    ap.add_argument("--count", type=int, default=5000, help="generated images when --data is not given")
    ap.add_argument("--size", type=int, nargs="+", default=[32, 64, 256])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--work-ms", type=float, default=0.0, help="simulated training time per step")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4], help="data.stream_workers settings to time")
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: 64 generated images at 16 and 32 px")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.count, args.size, args.batch, args.steps = 64, [16, 32], 16, 4
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or str(make_folder(Path(tmp) / "imgs", args.count, max(args.size)))
        for size in args.size:
            print(json.dumps(measure(data, size, args.batch, args.steps, args.work_ms, device, args.workers)),
                  flush=True)


if __name__ == "__main__":
    main()
