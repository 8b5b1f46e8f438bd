"""Where a run's numbers go: metrics.jsonl, optional wandb, and the loss-curve PNG drawn at the end."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from ddpm_cli.errors import DdpmError


class MetricsLog:
    """Append-only JSON lines, flushed per line so a crash loses nothing already logged."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records after `step` (and any line cut by a crash) from a run's metrics.jsonl: a run resumed
    from its step-`step` checkpoint trains the later steps again, and logs them again, so that the file stays one
    history, step by step. The file is replaced atomically: a crash here leaves the old one or the new one."""
    import os
    import tempfile

    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()  # a line that is not UTF-8: dropped
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            kept.append(line)
    if kept == lines:
        return
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash, or not UTF-8
    return out


@contextlib.contextmanager
def _wandb_errors():
    """wandb's own errors (no login, no network, its service gone) as a DdpmError with its reason and the fix, so
    that every caller of the engine, not only the CLI, gets the line; any other exception is left as it is."""
    try:
        yield
    except Exception as e:
        if type(e).__module__.split(".")[0] != "wandb":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DdpmError(f"wandb: {first}; run `wandb login`, or set logging.wandb=offline (or "
                        f"logging.wandb=off)") from e


class WandbSink:
    """wandb, imported only when enabled; offline mode writes the run under the run directory."""

    def __init__(self, mode: str, project: str, entity: str | None, name: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise DdpmError("logging.wandb is on but wandb is not installed; `pip install wandb` or set "
                            "logging.wandb=off") from None
        self._wandb = wandb
        with _wandb_errors():
            self.run = wandb.init(mode=mode, project=project, entity=entity, name=name, config=config,
                                  dir=str(run_dir), reinit="finish_previous")

    def log(self, record: dict, step: int) -> None:
        with _wandb_errors():
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        with _wandb_errors():
            self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        with _wandb_errors():
            self.run.finish()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot_loss_curve(records: list[dict], path: Path, size: tuple[int, int] = (800, 480)) -> bool:
    """Training loss (and held-out loss when present) against step, log-scaled loss axis, as a PNG."""
    from PIL import Image, ImageDraw

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] and r["loss"] > 0]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss")]
    if len(train) < 2:
        return False
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = train + val
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = (math.log10(min(p[1] for p in pts)), math.log10(max(p[1] for p in pts)))
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda x: left + (x - x0) / max(x1 - x0, 1) * (W - left - right)  # noqa: E731
    sy = lambda y: H - bottom - (math.log10(y) - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _nice_ticks(x0, x1):
        d.line([sx(t), H - bottom, sx(t), H - bottom + 5], fill="black")
        d.text((sx(t) - 15, H - bottom + 8), f"{t:g}", fill="black")
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10**e
            if y0 <= math.log10(v) <= y1:
                d.line([left - 5, sy(v), left, sy(v)], fill="black")
                d.text((5, sy(v) - 6), f"{v:.3g}", fill="black")
    d.line([(sx(x), sy(y)) for x, y in train], fill=(31, 119, 180), width=2)
    if len(val) >= 2:
        d.line([(sx(x), sy(y)) for x, y in val], fill=(214, 39, 40), width=2)
    d.text((left, 8), "loss (blue: train" + (", red: held-out)" if val else ")"), fill="black")
    d.text((W // 2 - 10, H - 20), "step", fill="black")
    img.save(path)
    return True
