"""The compile cache (engine/compile_cache.py): entries keyed by what changes the compiled graphs, written atomically,
checked before torch sees them (a damaged or foreign entry is one warning, never a failure), pruned to their bound,
wired into training and sampling, and shown and cleared by `ddpm cache`. torch's portable artifacts are faked here
(their bytes are whatever torch makes); one slow test runs the real ones across two processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, cli, ok, perturbed_unet, tiny_config
from ddpm_cli.engine import compile_cache as cc
from ddpm_cli.engine.compile_cache import CompileCache, read_entry, write_entry
from ddpm_cli.errors import DdpmWarning

CPU = torch.device("cpu")


class FakeInfo:
    def __init__(self, keys):
        self.artifacts = {"inductor": list(keys)}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    d = tmp_path / "compile-cache"
    monkeypatch.setenv("DDPM_COMPILE_CACHE_DIR", str(d))
    monkeypatch.delenv("DDPM_COMPILE_CACHE", raising=False)
    return d


@pytest.fixture
def fake_torch(monkeypatch):
    """torch.compiler's save/load, faked: `compiled` are the artifact keys this process made; the bytes are them."""
    state = SimpleNamespace(compiled=["graph-1"], loaded=[], saves=0)

    def save():
        state.saves += 1
        return (json.dumps(state.compiled).encode(), FakeInfo(state.compiled)) if state.compiled else None

    def load(data):
        state.loaded.append(json.loads(data))
        return FakeInfo(state.loaded[-1])

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", load)
    return state


def sampler(model=None, mode="default", x_shape=(2, 3, 8, 8), autocast=False):
    """A sampling cache around an identity 'compiled' network, called once; returns it (its key is set)."""
    cc._IN_PROCESS.clear()  # each call stands for a fresh process, which has loaded nothing yet
    seen = []
    c = cc.for_sampling(lambda x, t, y: x, model if model is not None else perturbed_unet(), mode, {}, CPU, False)
    c.on_warning = seen.append
    x, t = torch.zeros(x_shape), torch.zeros(x_shape[0], dtype=torch.long)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert c(x, t, None) is x  # the network's own result, whatever the cache did
    c.warnings = seen
    return c


def test_one_network_and_shape_is_one_entry_and_any_change_is_another(folder, fake_torch, monkeypatch):
    from ddpm_cli.nn.unet import UNet, fold_upsampling

    name = lambda c: cc.entry_name(c.key)  # noqa: E731
    first = sampler(perturbed_unet(seed=0))
    assert name(sampler(perturbed_unet(seed=1))) == name(first)  # other weights, same graphs
    other = UNet(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 norm_groups=4)
    variants = [sampler(other), sampler(x_shape=(4, 3, 8, 8)), sampler(autocast=True), sampler(mode="max-autotune"),
                sampler(fold_upsampling(perturbed_unet())), sampler(perturbed_unet().eval())]
    names = {name(c) for c in variants}
    assert len(names) == len(variants) and name(first) not in names
    assert all(n.startswith("sample-") for n in names)
    # the machine: another torch, another GPU generation
    env = cc.environment(CPU)
    assert {"torch", "python", "device", "ddpm"} <= set(env) and env["torch"] == torch.__version__
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = cc.environment(torch.device("cuda"))
    assert cuda["device"] == "cuda" and cuda["capability"] == "sm90"
    for changed in ({**env, "torch": "2.11.0"}, cuda, {**cuda, "capability": "sm100"}):
        assert cc.entry_name({**first.key, "env": changed}) != name(first)


def test_training_saves_after_the_first_step_and_the_next_run_loads(tmp_path, folder, fake_torch, monkeypatch):
    """The step compiles at its first forward and backward: the entry is saved once, after the first step; a second
    run of the same config loads it and says so; another batch size or network is another entry."""
    from ddpm_cli.engine.train import TrainCallbacks, Trainer

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # compiling itself is not what is tested here

    class Notes(TrainCallbacks):
        def __init__(self):
            self.messages, self.warnings = [], []

        def on_message(self, text):
            self.messages.append(text)

        def on_warning(self, text):
            self.warnings.append(text)

    def run(name, **extra):
        cc._IN_PROCESS.clear()  # each run stands for a fresh process
        notes = Notes()
        trainer = Trainer(tiny_config(tmp_path / name, train__compile="on", train__steps=2, **extra), callbacks=notes)
        trainer.run()
        assert not notes.warnings
        return trainer.loss_fn, notes.messages

    first, messages = run("a")
    assert first.state == "saved" and fake_torch.saves == 1 and first.key["kind"] == "train"
    assert first.key["inputs"]["args"][0]["shape"] == [16, 3, 16, 16]
    assert any(m.startswith("compile cache: saved") for m in messages)
    again, messages = run("b")
    assert again.state == "hit" and fake_torch.loaded == [["graph-1"]] and fake_torch.saves == 2
    assert any(m.startswith("compile cache: loaded") for m in messages)
    assert [e.meta["hits"] for e in cc.list_entries(folder)] == [1]
    run("c", train__batch_size=8)
    run("d", model__base_channels=8)
    assert len(cc.list_entries(folder)) == 3


def test_compile_ahead_auto_starts_a_helper_only_where_the_cache_has_no_entry_for_the_step(tmp_path, folder,
                                                                                          fake_torch, monkeypatch):
    """train.compile_ahead auto (the default): a run whose step has no entry trains beside a helper; a run of the
    same network and batch once the entry is there compiles in the run, from its first step; another batch size is
    another entry, so a helper again; `true` starts one whatever the cache holds."""
    from ddpm_cli.engine import compile_ahead
    from ddpm_cli.engine.train import TrainCallbacks, Trainer

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    helpers = []

    class Compiled:  # a helper that has compiled the step by the time the run first looks
        held_s, holds, answering, failure_said = 0.0, 0, False, False

        def done(self):
            return True

        def stop(self):
            pass

    def start(cfg_dict, device, inputs, classes):
        helpers.append(tuple(inputs[0].shape))
        return Compiled()

    monkeypatch.setattr(compile_ahead.CompileAhead, "start", staticmethod(start))

    def run(name, ahead="auto", **extra):
        cc._IN_PROCESS.clear()  # each run stands for a fresh process
        said = []

        class Notes(TrainCallbacks):
            def on_message(self, text):
                said.append(text)

        cfg = tiny_config(tmp_path / name, train__compile="on", train__compile_ahead=ahead, train__steps=3, **extra)
        trainer = Trainer(cfg, callbacks=Notes())
        trainer.run()
        return trainer, said

    assert tiny_config(tmp_path, train__compile_ahead="auto").train.compile_ahead == "auto"
    cold, said = run("a")
    assert helpers == [(16, 3, 16, 16)] and any("compiled steps from step 1" in m for m in said), said
    assert cold.step_cache.state == "saved"  # (here the run saves what the helper would have: the entry)
    warm, said = run("b")
    assert helpers == [(16, 3, 16, 16)], helpers  # no helper
    assert warm.step_cache.state == "hit" and any("the compile cache holds it" in m for m in said), said
    run("c", train__batch_size=8)
    assert helpers == [(16, 3, 16, 16), (8, 3, 16, 16)]
    run("d", ahead=True)
    assert len(helpers) == 3


def test_a_compiled_sampler_saves_its_first_call_and_the_summary_says_when_it_loaded(trained_run, tmp_path, folder,
                                                                                    fake_torch, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    cc._IN_PROCESS.clear()
    args = ("sample", trained_run, "-n", 3, "--steps", 2, "--batch-size", 2, "--compile", "on", "--device", "cpu",
            "--format", "npz")
    first = ok(*args, "--out", tmp_path / "a.npz")
    assert "first batch took" in first.output and "compile cache" not in first.output
    assert fake_torch.saves == 1 and [e.name[:7] for e in cc.list_entries(folder)] == ["sample-"]
    cc._IN_PROCESS.clear()  # as a second process
    second = ok(*args, "--out", tmp_path / "b.npz")
    assert "(loaded from the compile cache)" in second.output and fake_torch.loaded == [["graph-1"]]
    assert ok("sample", trained_run, "-n", 3, "--steps", 2, "--device", "cpu", "--out", tmp_path / "c").output
    assert fake_torch.saves == 2 and len(cc.list_entries(folder)) == 1  # eager: nothing compiled, nothing cached


def test_a_second_network_of_the_same_key_in_one_process_loads_nothing_again(folder, fake_torch):
    """Autoguidance's guide has the model's architecture: its graphs are in torch's caches once the model's are."""
    assert sampler().state == "saved"
    again = cc.for_sampling(lambda x, t, y: x, perturbed_unet(seed=3), "default", {}, CPU, False)
    with torch.no_grad():
        again(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), None)
    assert again.state == "hit" and fake_torch.loaded == [] and fake_torch.saves == 2  # checked, nothing new
    assert [e.meta["hits"] for e in cc.list_entries(folder)] == [0]


def test_a_damaged_or_foreign_entry_is_ignored_with_one_warning_and_replaced(folder, fake_torch):
    key = sampler().key
    blob, desc = folder / f"{cc.entry_name(key)}.bin", folder / f"{cc.entry_name(key)}.json"

    def spoil(how):
        how()
        c = sampler()
        assert len(c.warnings) == 1 and c.state == "saved", c.warnings  # compiled afresh, and the entry rewritten
        assert read_entry(folder, key)[0] is not None
        return c.warnings[0]

    assert "damaged" in spoil(lambda: blob.write_bytes(blob.read_bytes()[:-3]))
    assert "damaged" in spoil(lambda: blob.write_bytes(b"x" + blob.read_bytes()[1:]))
    meta = json.loads(desc.read_text())
    meta["key"]["env"]["torch"] = "2.10.0"
    assert "made by torch 2.10.0" in spoil(lambda: desc.write_text(json.dumps(meta)))
    assert "cannot be read" in spoil(lambda: desc.write_text("{not json"))
    assert "missing" in spoil(blob.unlink)
    assert len(fake_torch.loaded) == 0  # none of them reached torch


def test_asking_whether_an_entry_is_there_reads_its_description_not_its_bytes(folder, fake_torch, monkeypatch):
    """has_entry (train.compile_ahead auto's question at the first step) reads the description and the bytes' size;
    the load that follows reads and checks the bytes once. A blob of the wrong size is no entry."""
    from pathlib import Path

    key = sampler().key
    x, t = torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    read, real_read = [], Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.suffix) or real_read(self))
    cc._IN_PROCESS.clear()
    probe = cc.for_sampling(lambda x, t, y: x, perturbed_unet(), "default", {}, CPU, False)
    with torch.no_grad():
        assert probe.has_entry((x, t, None)) and read == []
    blob = folder / f"{cc.entry_name(key)}.bin"
    blob.write_bytes(real_read(blob) + b"!")
    with torch.no_grad():
        assert not probe.has_entry((x, t, None)) and read == []


def test_under_torchrun_only_rank_0_saves_and_warns_for_the_sampler(folder, fake_torch, monkeypatch, recwarn):
    key = sampler().key
    (folder / f"{cc.entry_name(key)}.bin").write_bytes(b"damaged")
    monkeypatch.setenv("RANK", "1")
    cc._IN_PROCESS.clear()
    c = cc.for_sampling(lambda x, t, y: x, perturbed_unet(), "default", {}, CPU, False)
    with torch.no_grad():
        c(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), None)
    assert c.state == "miss" and not recwarn.list  # rank 0 says it, once for all ranks
    assert fake_torch.saves == 1  # rank 0's first run's; none by this rank
    monkeypatch.setenv("RANK", "0")
    assert len(sampler().warnings) == 1


def test_bytes_torch_cannot_load_are_one_warning_without_a_traceback(folder, capfd):
    """The real torch.compiler.load_cache_artifacts, given bytes that pass our checksum but are not its format."""
    c = CompileCache(lambda x: x + 1, {"kind": "sample"}, CPU, save=False, directory=folder)
    c(torch.zeros(1))
    write_entry(folder, c.key, b"not torch's format", {})
    cc._IN_PROCESS.clear()
    seen = []
    again = CompileCache(lambda x: x + 1, {"kind": "sample"}, CPU, save=False, on_warning=seen.append,
                         directory=folder)
    assert again(torch.zeros(1)).item() == 1 and again.state == "miss"
    assert len(seen) == 1 and "torch could not load" in seen[0]
    assert "Traceback" not in capfd.readouterr().err


def test_a_failed_save_only_warns(tmp_path, fake_torch):
    (tmp_path / "not-a-folder").write_text("a file where the cache folder should be")
    seen = []
    c = CompileCache(lambda x: x * 2, {"kind": "sample"}, CPU, save_after_first_call=True, on_warning=seen.append,
                     directory=tmp_path / "not-a-folder")
    assert c(torch.ones(1)).item() == 2 and c.state == "miss"
    assert len(seen) == 1 and "could not save" in seen[0]


def test_entries_are_written_atomically_and_unvouched_bytes_are_never_loaded(folder, fake_torch, monkeypatch):
    key = sampler().key
    good = read_entry(folder, key)[0]
    import ddpm_cli.engine.files as files

    real_replace = os.replace

    def fail_on(suffix):
        def replace(src, dst):
            if str(dst).endswith(suffix):
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)
        return replace

    monkeypatch.setattr(files.os, "replace", fail_on(".bin"))  # the bytes fail: the old entry stands as it was
    with pytest.raises(OSError):
        write_entry(folder, key, b"new bytes", {})
    assert read_entry(folder, key)[0] == good
    monkeypatch.setattr(files.os, "replace", fail_on(".json"))  # the bytes land, their description does not
    with pytest.raises(OSError):
        write_entry(folder, key, b"new bytes", {})
    data, _, problem = read_entry(folder, key)
    assert data is None and "damaged" in problem  # the old description does not vouch for the new bytes
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


def test_pruning_keeps_the_most_recently_used_entries_within_the_bounds(folder):
    now = time.time()
    for i in range(5):
        write_entry(folder, {"kind": "sample", "i": i}, bytes(100 * (i + 1)), {})
        os.utime(folder / f"{cc.entry_name({'kind': 'sample', 'i': i})}.json", (now - 100 + i, now - 100 + i))
    stale, fresh = folder / f".sample-{'a' * 24}.bin.tmp-1", folder / f".sample-{'b' * 24}.bin.tmp-2"
    orphan = folder / f"sample-{'c' * 24}.bin"
    for p in (stale, fresh, orphan):
        p.write_bytes(b"?")
    for p in (stale, orphan):
        os.utime(p, (now - 2 * 3600, now - 2 * 3600))
    (folder / "notes.txt").write_text("not ours")

    assert cc.prune(folder, max_entries=3) == 2
    kept = lambda: [e.meta["key"]["i"] for e in cc.list_entries(folder)]  # noqa: E731
    assert kept() == [4, 3, 2]
    assert cc.prune(folder, max_bytes=500 + 400) == 1 and kept() == [4, 3]
    assert not stale.exists() and not orphan.exists() and fresh.exists() and (folder / "notes.txt").exists()
    assert sorted(p.suffix for p in folder.glob("sample-*")) == [".bin", ".bin", ".json", ".json"]


def test_caches_sharing_one_folder_list_and_prune_only_their_own_entries(folder, monkeypatch):
    """Every cache matched every `<kind>-<hash>` name: pointed at one folder (one DDPM_*_CACHE_DIR for all), eval's
    bound of 16 entries removed compile entries, and `ddpm cache info` listed each entry three times."""
    from ddpm_cli.engine import data_cache
    from ddpm_cli.engine.evaluation import stats_cache

    for i in range(20):
        write_entry(folder, {"kind": "train", "i": i}, bytes(8), {})
    monkeypatch.setenv("DDPM_CACHE_DIR", str(folder))
    monkeypatch.setenv("DDPM_DATA_CACHE_DIR", str(folder))
    assert stats_cache.prune(folder) == 0 and len(cc.list_entries(folder)) == 20
    assert data_cache.list_entries() == [] and stats_cache.list_entries() == []
    assert data_cache.clear() == (0, 0) and len(cc.list_entries(folder)) == 20
    assert ok("cache", "info").output.count("train-") == 20


def test_a_description_that_breaks_the_json_reader_is_ignored_not_a_traceback(folder, fake_torch):
    """A description nested deeper than Python's recursion limit raised RecursionError through listing, pruning
    (after any compiled save) and reading; a hit count that is not a number crashed the load's bookkeeping."""
    key = sampler().key
    deep = folder / f"train-{'0' * 24}.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    deep.with_suffix(".bin").write_bytes(b"x")
    assert any(e.name == deep.stem and e.meta == {} for e in cc.list_entries(folder))
    cc.prune(folder)
    assert "train-" in ok("cache", "info").output
    desc = folder / f"{cc.entry_name(key)}.json"
    for hits in ('"n/a"', "null"):
        meta = json.loads(desc.read_text())
        desc.write_text(json.dumps(meta).replace(f'"hits": {meta["hits"]}', f'"hits": {hits}'))
        assert sampler().state == "hit"
    desc.write_text("[" * 100_000 + "]" * 100_000)
    c = sampler()
    assert c.state == "saved" and "cannot be read" in c.warnings[0], c.warnings


def test_the_cache_is_off_when_asked(folder, fake_torch, monkeypatch):
    monkeypatch.setenv("DDPM_COMPILE_CACHE", "off")
    c = sampler()
    assert c.state == "off" and fake_torch.saves == 0 and not folder.exists()


def test_the_default_folder_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DDPM_COMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cc.cache_dir() == tmp_path / "ddpm" / "compile"


def test_ddpm_cache_info_and_clear(folder, monkeypatch):
    for i in range(2):
        write_entry(folder, {"kind": "train", "i": i, "env": {"torch": "2.11.0", "device": "cuda",
                                                              "capability": "sm90"}}, bytes(2048), {})
    (folder / "notes.txt").write_text("not ours")
    # the user's files with the suffixes the cache writes (a cache folder pointed at a folder in use), one old
    for name in ("settings.json", "pytorch_model.bin", ".model.bin.tmp-12"):
        (folder / name).write_text("the user's")
        os.utime(folder / name, (time.time() - 7200, time.time() - 7200))
    cc.prune(folder)
    r = ok("cache", "info")
    assert str(folder) in r.output and "|  on  |" in r.output and "2 entries, 4.0 KB" in r.output
    assert r.output.count("train-") == 2 and "torch 2.11.0  cuda sm90" in r.output
    info = json.loads(ok("cache", "info", "--json").output)
    assert info["bytes"] == 4096 and [e["kind"] for e in info["entries"]] == ["train", "train"]
    r = ok("cache", "clear")
    assert r.output.startswith("removed 2 entries (") and str(folder) in r.output
    assert sorted(p.name for p in folder.iterdir()) == [".model.bin.tmp-12", "notes.txt", "pytorch_model.bin",
                                                         "settings.json"]
    assert "0 entries, 0 B" in ok("cache", "info").output
    monkeypatch.setenv("DDPM_COMPILE_CACHE", "off")
    assert "off (DDPM_COMPILE_CACHE=off)" in ok("cache", "info").output
    assert cli("cache").exit_code in (0, 2)  # no subcommand: the help


def test_ddpm_cache_does_not_import_torch(folder):
    code = ("import sys; from ddpm_cli.cli.app import app; from typer.testing import CliRunner; "
            "r = [CliRunner().invoke(app, ['cache', c]) for c in ('info', 'clear')]; "
            "assert all(x.exit_code == 0 for x in r), [x.output for x in r]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_engine_warnings_print_as_warning_lines(capsys):
    from ddpm_cli.cli.ui import friendly

    @friendly
    def command():
        warnings.warn("compile cache: ignored something", DdpmWarning)
        warnings.warn("compile cache: ignored something", DdpmWarning)  # each time, not once per place

    command()
    assert capsys.readouterr().err.count("warning: compile cache: ignored something") == 2


E2E = """
import sys, torch
from ddpm_cli.engine.compile_cache import CompileCache
f = CompileCache(torch.compile(lambda x: torch.sin(x) * 2 + 1, dynamic=False), {"kind": "sample", "test": 1},
                 torch.device("cpu"), save_after_first_call=True)
y = f(torch.ones(4, 8))
assert torch.allclose(y, torch.sin(torch.ones(4, 8)) * 2 + 1)
print("STATE", f.state)
"""


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """The real torch.compile and portable artifacts: a fresh inductor cache each time, so only ours carries over."""
    env = {**os.environ, "DDPM_COMPILE_CACHE_DIR": str(tmp_path / "cc"), "PYTHONPATH": str(ROOT)}
    states = []
    for i in range(2):
        r = subprocess.run([sys.executable, "-c", E2E], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor{i}")})
        assert r.returncode == 0, r.stderr[-3000:]
        states.append(r.stdout.split("STATE ")[1].strip())
    assert states == ["saved", "hit"]
    assert [e.meta["hits"] for e in cc.list_entries(tmp_path / "cc")] == [1]


def test_the_training_graph_is_one_aotautograds_cache_can_keep(tmp_path):
    """torch's portable artifacts hold AOTAutograd's entries only for graphs its cache accepts; it bypasses any
    graph with an autograd.Function in it (seen as `autograd_function_apply`), and a warm start then traces and
    partitions the forward and backward again. Dynamo's graph of a training forward (the UNet with its up path's
    skip concatenations) must have none."""
    from ddpm_cli.engine.build import build_unet

    cfg = tiny_config(tmp_path)
    model = build_unet(cfg.model).train()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, t = torch.randn(2, 3, *cfg.model.image_shape()[1:]), torch.randint(0, 10, (2,))
    torch.compile(lambda x, t: model(x, t).square().mean(), backend=keep, dynamic=False)(x, t).backward()
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert graphs and not [t for t in targets if "autograd_function" in t], sorted(targets)
