"""Decoding photos larger than the model, one thread: ddpm's decoder (engine/decode.py: libjpeg's reduced-scale
decode, then the crop and resize), the same crop and resize after decoding every pixel (ddpm before the reduced
scale), and the peer's: the loader of torchvision's ImageFolder with the resize and center crop of diffusers'
training example. The photos are drawn here: smooth random content saved as JPEGs of --source size.

    PYTHONPATH=. python benchmarks/bench_decode.py [--source 1024 768] [--sizes 256 64] [--count 40]

Prints one BENCH JSON line per target size: images/s of each, and the mean absolute difference between ddpm's
decode and the full one, in 0-255 levels."""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np


def photos(count: int, width: int, height: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def full_decode(blob: bytes, size: int) -> np.ndarray:
    """Every pixel decoded, then decode_image's crop and resize."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(blob)) as im:
        im = ImageOps.fit(im.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    return np.asarray(im).transpose(2, 0, 1)


def peer_decode(blob: bytes, size: int) -> np.ndarray:
    """ImageFolder's pil_loader, then Resize(size) and CenterCrop(size) as diffusers' train_unconditional does."""
    from PIL import Image
    from torchvision import transforms

    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert("RGB")
    im = transforms.CenterCrop(size)(transforms.Resize(size)(im))
    return np.asarray(im).transpose(2, 0, 1)


def rate(fn, blobs: list[bytes]) -> tuple[float, list[np.ndarray]]:
    t = time.perf_counter()
    out = [fn(b) for b in blobs]
    return len(blobs) / (time.perf_counter() - t), out


def main() -> None:
    from torchvision import transforms  # noqa: F401 - imported before the timing, not in its first call

    from ddpm_cli.engine.decode import decode_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=int, nargs=2, default=[1024, 768], metavar=("WIDTH", "HEIGHT"))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 64])
    p.add_argument("--count", type=int, default=40)
    args = p.parse_args()
    blobs = photos(args.count, *args.source)
    for size in args.sizes:
        peer_decode(blobs[0], size)  # the transforms' own first-call costs out of the timing
        ours, a = rate(lambda b: decode_image(b, (size, size), 3)[0], blobs)
        full, b = rate(lambda blob: full_decode(blob, size), blobs)
        peer, _ = rate(lambda blob: peer_decode(blob, size), blobs)
        diff = float(np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)]))
        print("BENCH " + json.dumps({"kind": "decode", "source": args.source, "size": size, "count": args.count,
                                     "ddpm_img_per_s": round(ours, 1), "full_decode_img_per_s": round(full, 1),
                                     "peer_img_per_s": round(peer, 1), "ratio_to_peer": round(ours / peer, 2),
                                     "mean_abs_diff_to_full": round(diff, 2)}), flush=True)


if __name__ == "__main__":
    main()
