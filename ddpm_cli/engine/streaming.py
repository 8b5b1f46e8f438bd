"""Folders and zips larger than memory: images decoded from their files batch by batch while the GPU trains.

`StreamedImages` stands where the in-memory path holds its uint8 tensor: indexing it with an index tensor or a
slice decodes those files, with the same decoder and size as the in-memory path, so `Batcher` draws the very
same batches in the same seeded epoch order and resumes at the same point. `Batcher` asks for the next batches
ahead (`prefetch`), so decoding overlaps the training step. The files are decoded in worker processes, a batch
each (`data.stream_workers`), or with 0 workers in threads of the training process, where the decoding holds
Python's lock against the training loop for its non-PIL parts."""
from __future__ import annotations

import multiprocessing
import os
import threading
import zipfile
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

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


def local_ranks() -> int:
    """The ranks on this machine (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def cores_per_rank() -> int:
    """The cores this process may use, shared among the ranks of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return cores // local_ranks()


def stream_workers(setting: int | None) -> int:
    """data.stream_workers: as set, or auto (None) = one process per two of this rank's cores, at most 8."""
    if setting is not None:
        return setting
    return max(1, min(8, cores_per_rank() // 2))


def decoding_processes(files, workers: int) -> ProcessPoolExecutor:
    """`workers` processes that decode `files` (an ImageFiles: a zip's entries or a folder's paths) with
    engine.decode's worker functions (decode_batch, decode_files)."""
    from ddpm_cli.engine import decode

    # forkserver: the workers start from a fresh process that imports only engine.decode, never a copy of this
    # one (its CUDA context and threads); spawn where there is no forkserver
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(["ddpm_cli.engine.decode"])
    zip_path = str(files.root) if files.is_zip else None
    return ProcessPoolExecutor(workers, mp_context=context, initializer=decode.start_worker, initargs=(zip_path,))


def should_stream(mode: str, count: int, shape: tuple[int, int, int]) -> bool:
    """data.streaming: on, off, or auto = when the decoded images would take over half the available memory, which
    every rank of the machine would fill with a copy of its own."""
    if mode != "auto":
        return mode == "on"
    return count * int(np.prod(shape)) > available_memory() // 2 // local_ranks()


class _Opener:
    """Opens entry i of an `ImageFiles` for reading, from any thread: a zip handle per thread, since reads
    through one shared handle would serialise."""

    def __init__(self, files):
        self.files, self._local = files, threading.local()

    def zip(self) -> zipfile.ZipFile:
        """This thread's handle on the zip."""
        zf = getattr(self._local, "zip", None)
        if zf is None:
            zf = self._local.zip = zipfile.ZipFile(self.files.root)
        return zf

    def __call__(self, i: int):
        if not self.files.is_zip:
            return open(self.files.entries[i], "rb")
        return self.zip().open(self.files.entries[i])


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
    """uint8 (N, C, H, W) images of an `ImageFiles` (entries `index` of it), decoded when indexed, by `workers`
    processes (0: threads of this process)."""

    def __init__(self, files, index: list[int] | torch.Tensor, size: tuple[int, int], channels: int,
                 workers: int = 0, pool: "_Decoder | None" = None):
        self.files, self.size, self.channels = files, tuple(size), channels  # size: (W, H), as decode_image
        self.index = torch.as_tensor(index, dtype=torch.long)
        self.shape = torch.Size((len(self.index), channels, size[1], size[0]))
        self.device = torch.device("cpu")  # where Batcher keeps the epoch order
        self._decoder = pool or _Decoder(files, workers)
        self.lookahead = max(1, self._decoder.workers)  # batches worth asking for ahead: one per worker

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def subset(self, idx: torch.Tensor) -> "StreamedImages":
        """The images `idx` of this set, still undecoded."""
        return StreamedImages(self.files, self.index[idx], self.size, self.channels, pool=self._decoder)

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

    def close(self) -> None:
        """Stop the decoding workers (they also stop with the process)."""
        self._decoder.close()


class _Decoder:
    """Decodes batches of files, several ahead (`start`, then `take` in the same order): each batch in one of
    `workers` processes, or with 0 workers its files in parallel threads of this process."""

    def __init__(self, files, workers: int = 0):
        self.files, self.workers = files, workers
        self._pool: ThreadPoolExecutor | ProcessPoolExecutor | None = None
        self._runner: ThreadPoolExecutor | None = None  # threads only: assembles a batch ahead while the caller trains
        self._ahead: dict[tuple[int, ...], Future] = {}  # in the order asked for
        self._open = _Opener(files)
        self.pin = False  # decode into page-locked memory (StreamedImages.pin_memory)

    def _executor(self) -> ThreadPoolExecutor | ProcessPoolExecutor:
        if self._pool is None:
            if self.workers:
                self._pool = decoding_processes(self.files, self.workers)
            else:
                self._pool = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="ddpm-decode")
                self._runner = ThreadPoolExecutor(1, thread_name_prefix="ddpm-prefetch")
        return self._pool

    def _name(self, i: int) -> str:
        return str(self.files.entries[i])

    def _unreadable(self, i: int) -> DataError:
        return DataError(f"{self.files.root}: {self.files.rel[i]} is not a readable image; remove it (or set "
                         f"data.streaming=off, which skips such files) and resume")

    @staticmethod
    def _worker_died() -> DataError:
        return DataError("a decoding worker process died (out of memory?); lower data.stream_workers, or set it to "
                         "0 to decode in threads, and resume")

    def _decode_here(self, entries: list[int], size, channels: int) -> torch.Tensor:
        from ddpm_cli.engine.decode import decode_image, read_file, stack

        def one(i: int) -> np.ndarray:
            blob = read_file(self._open.zip() if self.files.is_zip else None, self._name(i))
            array = None if blob is None else decode_image(blob, size, channels)[0]
            if array is None:
                raise self._unreadable(i)
            return array

        return self._pinned(torch.from_numpy(stack(list(self._executor().map(one, entries)))))

    def _pinned(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(batch, pin_memory=True).copy_(batch) if self.pin else batch

    def _submit(self, entries: list[int], size, channels: int) -> list[Future]:
        """Start decoding `entries`: one task, or for a set larger than two batches' worth (a held-out set) a
        task per worker, so that all of them decode it."""
        pool = self._executor()
        if not self.workers:
            return [self._runner.submit(self._decode_here, entries, size, channels)]
        from ddpm_cli.engine import decode

        parts = self.workers if len(entries) > 512 else 1
        chunk = -(-len(entries) // parts)
        try:
            return [pool.submit(decode.decode_batch, [self._name(i) for i in entries[k:k + chunk]], size, channels)
                    for k in range(0, len(entries), chunk)]
        except BrokenProcessPool:
            raise self._worker_died() from None

    def _result(self, entries: list[int], futures: list[Future]) -> torch.Tensor:
        from ddpm_cli.engine.decode import batch_view

        try:
            parts = [f.result() for f in futures]
        except BrokenProcessPool:
            raise self._worker_died() from None
        if not self.workers:
            return parts[0]
        offset = 0
        for part in parts:
            if isinstance(part, int):
                raise self._unreadable(entries[offset + part])
            offset += len(part)
        hwc = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._pinned(torch.from_numpy(batch_view(hwc)))  # the workers' (N, H, W, C), as stack's

    def start(self, entries: list[int], size, channels: int) -> None:
        key = tuple(entries)
        if key not in self._ahead:
            self._ahead[key] = self._submit(entries, size, channels)

    def take(self, entries: list[int], size, channels: int) -> torch.Tensor:
        key = tuple(entries)
        if key not in self._ahead:  # not asked for ahead (a held-out set): decode it now
            return self._result(entries, self._submit(entries, size, channels))
        while True:  # batches asked for before it and never taken are dropped
            first = next(iter(self._ahead))
            futures = self._ahead.pop(first)
            if first == key:
                return self._result(entries, futures)
            for f in futures:
                f.cancel()

    def close(self) -> None:
        """Stop the workers (after the batch each is decoding) and drop what was asked for ahead."""
        for pool in (self._runner, self._pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._runner = None
        self._ahead.clear()
