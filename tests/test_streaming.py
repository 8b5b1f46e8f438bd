"""Folders larger than memory (data.streaming): decoded batch by batch, they give the batches, the training and
the resume of the in-memory path."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from ddpm_cli.config import validate_config
from ddpm_cli.engine import streaming
from ddpm_cli.engine.data import Batcher, load_dataset, split_holdout
from ddpm_cli.engine.streaming import StreamedImages

CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 images over three class folders at mixed sizes (resized and cropped on reading), a corrupt .png, a
    text file, and the same tree as a .zip."""
    root = tmp_path_factory.mktemp("stream") / "tree"
    rng = np.random.default_rng(0)
    for i in range(40):
        w, h = (16, 16) if i % 3 else (24, 20)
        path = root / CLASSES[i % 3] / f"{i:03d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "b" / "broken.png").write_bytes(b"not really a png")
    (root / "c" / "notes.txt").write_text("not an image")
    zpath = root.parent / "tree.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return root, zpath


def _data(root, streaming_mode: str, workers: int | None = None):
    cfg = validate_config({"model": {"image_size": 16, "conditional": True, "num_classes": 3,
                                     "attention_resolutions": [], "channel_mults": [1, 2]},
                           "data": {"dataset": "folder", "root": str(root), "streaming": streaming_mode,
                                    "stream_workers": workers}})
    return load_dataset(cfg.data, cfg.model)


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "processes"])
@pytest.mark.parametrize("which", ["folder", "zip"])
def test_streamed_batches_equal_the_in_memory_ones_across_epochs_and_a_resume(folder, which, workers):
    root = folder[0] if which == "folder" else folder[1]
    mem, lazy = _data(root, "off"), _data(root, "on", workers)
    assert isinstance(lazy.images, StreamedImages) and isinstance(mem.images, torch.Tensor)
    assert lazy.images.shape == mem.images.shape == (40, 3, 16, 16)  # the corrupt file skipped by both
    assert torch.equal(lazy.labels, mem.labels) and lazy.classes == mem.classes == list(CLASSES)
    assert any("not readable images" in w for w in lazy.warnings)
    cpu = torch.device("cpu")
    a = Batcher(mem, 12, seed=5, device=cpu, on_device=False, flip=True)
    b = Batcher(lazy, 12, seed=5, device=cpu, on_device=True, flip=True)  # on_device is ignored when streaming
    for step in range(8):  # three steps an epoch: crosses two epoch boundaries
        torch.manual_seed(step)
        xa, ya = a.next()
        torch.manual_seed(step)
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb), step
        assert xa.stride() == xb.stride(), step  # the same layout too, so the losses are the same bit for bit
    state = b.state_dict()
    want = a.next()[0]
    b.close()
    resumed = Batcher(_data(root, "on", workers), 12, seed=5, device=cpu, on_device=False, flip=False)
    resumed.load_state_dict(state)
    a2 = Batcher(mem, 12, seed=5, device=cpu, on_device=False, flip=False)
    a2.load_state_dict(state)
    assert torch.equal(resumed.next()[0], a2.next()[0])
    assert want.shape == (12, 3, 16, 16)
    resumed.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "processes"])
def test_each_batch_is_decoded_once_ahead_of_its_step(folder, monkeypatch, workers):
    """Batcher asks for the next batches while a step trains (one per worker); each is decoded once, and the
    step that needs it takes the decoded one instead of decoding it again."""
    from ddpm_cli.engine.streaming import _Decoder

    decoded = []
    submit = _Decoder._submit

    def spy(self, entries, size, channels):
        decoded.append(tuple(entries))
        return submit(self, entries, size, channels)

    monkeypatch.setattr(_Decoder, "_submit", spy)
    batcher = Batcher(_data(folder[1], "on", workers), 4, seed=5, device=torch.device("cpu"), on_device=False,
                      flip=False)
    for _ in range(12):  # 10 batches an epoch: crosses into the next
        batcher.next()
    batcher.close()
    assert len(decoded) == len(set(decoded)) == 12 + max(1, workers), decoded


def test_a_holdout_split_keeps_the_training_part_streamed(folder):
    lazy, mem = _data(folder[0], "on"), _data(folder[0], "off")
    train_l, val_l = split_holdout(lazy, 8, seed=1)
    train_m, val_m = split_holdout(mem, 8, seed=1)
    assert isinstance(train_l.images, StreamedImages) and len(train_l.images) == 32
    assert torch.equal(val_l.images, val_m.images) and torch.equal(train_l.images[:], train_m.images)


def test_auto_streams_only_when_the_decoded_set_would_not_fit(monkeypatch, folder):
    monkeypatch.setattr(streaming, "available_memory", lambda: 10**9)
    assert not isinstance(_data(folder[0], "auto").images, StreamedImages)
    monkeypatch.setattr(streaming, "available_memory", lambda: 2 * 40 * 3 * 16 * 16 - 1)  # half is too little
    assert isinstance(_data(folder[0], "auto").images, StreamedImages)
    # under torchrun each rank of the machine would hold its own copy: the ranks share the memory
    monkeypatch.setattr(streaming, "available_memory", lambda: 4 * 40 * 3 * 16 * 16)  # enough for one copy
    assert not isinstance(_data(folder[0], "auto").images, StreamedImages)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # not for four
    assert isinstance(_data(folder[0], "auto").images, StreamedImages)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
@pytest.mark.parametrize("workers", [0, 1], ids=["threads", "processes"])
def test_a_file_that_fails_to_decode_while_streaming_is_one_clear_error(tmp_path, workers, damage):
    from ddpm_cli.errors import DataError

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
    ds = _data_flat(root, workers)
    if damage == "truncated":  # after the check of its header
        (root / "2.png").write_bytes((root / "2.png").read_bytes()[:40])
    else:
        (root / "2.png").unlink()
    with pytest.raises(DataError, match="2.png is not a readable image"):
        ds.images[torch.arange(4)]
    ds.images.close()


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "processes"])
def test_grayscale_batches_keep_the_in_memory_layout(tmp_path, workers):
    """One channel: a worker's batch comes back with the in-memory path's strides too (a size-1 axis would
    otherwise take other strides, which can make the same convolution run another kernel)."""
    root = tmp_path / "gray"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / f"{i}.png")

    def data(mode: str):
        cfg = validate_config({"model": {"image_size": 16, "in_channels": 1, "attention_resolutions": [],
                                         "channel_mults": [1, 2]},
                               "data": {"dataset": "folder", "root": str(root), "streaming": mode,
                                        "stream_workers": workers}})
        return load_dataset(cfg.data, cfg.model)

    mem, lazy = data("off"), data("on")
    idx = torch.tensor([3, 0, 7, 11, 5])
    got, want = lazy.images[idx], mem.images[idx]
    assert got.shape == (5, 1, 16, 16) and torch.equal(got, want) and got.stride() == want.stride()
    lazy.images.close()


def test_a_decoding_worker_that_dies_is_one_clear_error(tmp_path):
    """A worker killed mid-run (the out-of-memory killer, say) ends the run with a line that says what to change,
    not with concurrent.futures' traceback."""
    import os
    import signal

    from ddpm_cli.errors import DataError

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(root / f"{i}.png")
    images = _data_flat(root, 1).images
    assert images[torch.arange(2)].shape == (2, 3, 16, 16)  # the worker is up
    for process in images._decoder._pool._processes.values():
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(DataError, match="decoding worker process died.*data.stream_workers"):
        for _ in range(50):  # the pool notices the death within a moment
            images[torch.arange(2, 4)]
    images.close()


def _data_flat(root, workers: int | None = None):
    cfg = validate_config({"model": {"image_size": 16, "attention_resolutions": [], "channel_mults": [1, 2]},
                           "data": {"dataset": "folder", "root": str(root), "streaming": "on",
                                    "stream_workers": workers}})
    return load_dataset(cfg.data, cfg.model)


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "processes"])
def test_training_streamed_equals_training_in_memory_and_resumes_exactly(folder, tmp_path, workers):
    """On the CPU the whole run is bit-exact: the same losses whether the folder is streamed or decoded whole,
    and a streamed run stopped at step 10 and resumed ends with the same weights."""
    from ddpm_cli.engine.checkpoint import load_checkpoint
    from ddpm_cli.engine.train import train

    def run(name: str, mode: str, steps: int = 20, resume=None):
        cfg = tiny_config(tmp_path, model__conditional=True, model__num_classes=3, model__attention_resolutions=[],
                          data__dataset="folder", data__root=str(folder[1]), data__streaming=mode,
                          data__stream_workers=workers,
                          train__batch_size=8, train__steps=steps, logging__run_name=name, logging__sample_every=10**6)
        return train(cfg, resume=resume) if resume else train(cfg)

    def losses(run_dir):
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}

    mem, lazy = run("mem", "off"), run("lazy", "on")
    assert losses(lazy.run_dir) == losses(mem.run_dir)
    half = run("half", "on", steps=10)
    from ddpm_cli.engine.runs import latest_checkpoint

    resumed = run("half", "on", steps=20, resume=latest_checkpoint(half.run_dir))
    a = load_checkpoint(latest_checkpoint(resumed.run_dir)).model_state
    b = load_checkpoint(latest_checkpoint(lazy.run_dir)).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("streaming_mode", ["on", "off"])
def test_batches_reach_the_gpu_from_page_locked_memory_and_equal_the_cpu_ones(folder, monkeypatch, streaming_mode):
    """From the host (streamed, or data.on_device off), each batch is copied from page-locked memory, so the copy
    overlaps the step queued before it instead of waiting for it; the batches are the CPU's."""
    copied = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        to_gpu = isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda"
        if self.device.type == "cpu" and to_gpu:
            copied.append(self.is_pinned())
        return to(self, *args, **kwargs)

    data = _data(folder[0], streaming_mode)
    gpu = Batcher(data, 12, seed=5, device=torch.device("cuda"), on_device=False, flip=False)
    cpu = Batcher(data, 12, seed=5, device=torch.device("cpu"), on_device=False, flip=False)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    for _ in range(4):
        (xg, yg), (xc, yc) = gpu.next(), cpu.next()
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)  # [-1, 1] in steps of 1/127.5; the GPU's
        assert torch.equal(yg.cpu(), yc)                              # division may differ in the last bit
    assert copied and all(copied), copied


def test_a_streamed_image_that_fails_mid_run_saves_the_run_before_it_stops(tmp_path):
    """A streamed file that no longer decodes stopped the run with "remove it ... and resume", and no checkpoint:
    every step since the last one was lost, and there was nothing to resume. The steps so far are saved first,
    the failed batch's place in the epoch with them, and the run resumes once the file is fixed."""
    from ddpm_cli.engine.runs import latest_checkpoint
    from ddpm_cli.engine.train import TrainCallbacks, Trainer
    from ddpm_cli.errors import TrainingAborted

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(16):
        Image.fromarray(np.full((16, 16, 3), 15 * i, dtype=np.uint8)).save(root / f"{i:02d}.png")
    kept = {p: p.read_bytes() for p in root.iterdir()}

    class DamageAfterStep2(TrainCallbacks):
        def on_step(self, step):
            if step == 2:  # the batches after the one decoded ahead find every file cut short
                for p, data in kept.items():
                    p.write_bytes(data[:40])

    def cfg(steps):
        return tiny_config(tmp_path, data__dataset="folder", data__root=str(root), data__streaming="on",
                           data__stream_workers=0, train__batch_size=4, train__steps=steps,
                           logging__checkpoint_every=10**6, logging__sample_every=10**6)

    trainer = Trainer(cfg(12), callbacks=DamageAfterStep2())
    try:
        with pytest.raises(TrainingAborted, match="is not a readable image") as e:
            trainer.run()
    finally:
        trainer.close()
    saved = latest_checkpoint(trainer.run_dir)
    assert saved is not None and str(saved) in str(e.value) and "--resume" in str(e.value)
    for p, data in kept.items():
        p.write_bytes(data)
    assert Trainer(cfg(12), resume=saved).run().step == 12
