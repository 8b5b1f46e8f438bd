"""Folders and zips larger than memory: images decoded from their files batch by batch while the GPU trains.

`StreamedImages` stands where the in-memory path holds its uint8 tensor: indexing it with an index tensor or a
slice decodes those files (in threads: PIL releases the GIL while it decodes), with the same decoder and size
as the in-memory path, so `Batcher` draws the very same batches in the same seeded epoch order and resumes at
the same point. `Batcher` asks for the next batch ahead (`prefetch`), so decoding overlaps the training step."""
from __future__ import annotations

import os
import threading
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ddpm_cli.errors import DataError


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; elsewhere the physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: never stream by default


def should_stream(mode: str, count: int, shape: tuple[int, int, int]) -> bool:
    """data.streaming: on, off, or auto = when the decoded images would take over half the available memory."""
    if mode != "auto":
        return mode == "on"
    return count * int(np.prod(shape)) > available_memory() // 2


class _Opener:
    """Opens entry i of an `ImageFiles` for reading, from any thread: a zip handle per thread, since reads
    through one shared handle would serialise."""

    def __init__(self, files):
        self.files, self._local = files, threading.local()

    def __call__(self, i: int):
        if not self.files.is_zip:
            return open(self.files.entries[i], "rb")
        zf = getattr(self._local, "zip", None)
        if zf is None:
            zf = self._local.zip = zipfile.ZipFile(self.files.root)
        return zf.open(self.files.entries[i])


def readable_entries(files) -> tuple[list[int], list[str]]:
    """The entries of an `ImageFiles` whose header PIL can read (reading a header, not decoding: a streamed set
    is checked in seconds), and the names of the others, which the in-memory path would skip too."""
    from PIL import Image

    opener = _Opener(files)

    def ok(i: int) -> bool:
        try:
            with opener(i) as f, Image.open(f):
                return True
        except Exception:  # PIL raises many types for what is not an image
            return False

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        good = list(pool.map(ok, range(len(files)), chunksize=256))
    return ([i for i, g in enumerate(good) if g], [str(files.rel[i]) for i, g in enumerate(good) if not g])


class StreamedImages:
    """uint8 (N, C, H, W) images of an `ImageFiles` (entries `index` of it), decoded when indexed."""

    def __init__(self, files, index: list[int] | torch.Tensor, size: tuple[int, int], channels: int,
                 pool: "_Decoder | None" = None):
        self.files, self.size, self.channels = files, tuple(size), channels  # size: (W, H), as decode_image
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.shape = torch.Size((len(self.index), channels, size[1], size[0]))
        self.device = torch.device("cpu")  # where Batcher keeps the epoch order
        self._decoder = pool or _Decoder(files)

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def subset(self, idx: torch.Tensor) -> "StreamedImages":
        """The images `idx` of this set, still undecoded."""
        return StreamedImages(self.files, self.index[idx], self.size, self.channels, self._decoder)

    def _entries(self, idx) -> list[int]:
        if isinstance(idx, slice):
            return self.index[idx].tolist()
        return self.index[torch.as_tensor(idx, device="cpu")].tolist()

    def prefetch(self, idx: torch.Tensor) -> None:
        """Start decoding the images `idx` now; the `__getitem__` that asks for them waits for the result."""
        self._decoder.start(self._entries(idx), self.size, self.channels)

    def __getitem__(self, idx) -> torch.Tensor:
        return self._decoder.take(self._entries(idx), self.size, self.channels)

    def pin_memory(self) -> "StreamedImages":
        """Decode each batch into page-locked memory from now on (Batcher asks for it on CUDA): a copy to the GPU
        from pageable memory waits for the work already queued there, so it would not overlap the step."""
        self._decoder.pin = True
        return self


class _Decoder:
    """Reads and decodes files in a thread pool; one batch may be decoded ahead (`start`, then `take`)."""

    def __init__(self, files):
        self.files = files
        self._pool: ThreadPoolExecutor | None = None    # decodes the files of a batch in parallel
        self._runner: ThreadPoolExecutor | None = None  # assembles the batch ahead while the caller trains
        self._ahead: tuple[tuple[int, ...], Future] | None = None
        self._open = _Opener(files)
        self.pin = False  # decode into page-locked memory (StreamedImages.pin_memory)

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="ddpm-decode")
            self._runner = ThreadPoolExecutor(1, thread_name_prefix="ddpm-prefetch")
        return self._pool

    def _read(self, i: int) -> bytes:
        with self._open(i) as f:
            return f.read()

    def _decode(self, entries: list[int], size, channels: int) -> torch.Tensor:
        from ddpm_cli.engine.data import decode_image

        def one(i: int) -> np.ndarray:
            array, _ = decode_image(self._read(i), size, channels)
            if array is None:
                raise DataError(f"{self.files.root}: {self.files.rel[i]} is not a readable image; remove it "
                                f"(or set data.streaming=off, which skips such files) and resume")
            return array

        # np.stack keeps the decoded arrays' layout (channels last), as the in-memory path's does: the batches
        # and so the losses are the same, bit for bit
        batch = torch.from_numpy(np.stack(list(self._threads().map(one, entries))))
        return torch.empty_like(batch, pin_memory=True).copy_(batch) if self.pin else batch

    def start(self, entries: list[int], size, channels: int) -> None:
        key = tuple(entries)
        if self._ahead is None or self._ahead[0] != key:
            self._threads()
            self._ahead = (key, self._runner.submit(self._decode, entries, size, channels))

    def take(self, entries: list[int], size, channels: int) -> torch.Tensor:
        if self._ahead is not None and self._ahead[0] == tuple(entries):
            future, self._ahead = self._ahead[1], None
            return future.result()
        return self._decode(entries, size, channels)
