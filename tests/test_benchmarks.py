"""The benchmark scripts still run (a CPU smoke run of a tiny model); they time nothing here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, perturbed_unet


def test_bench_speed_runs_the_trainer_and_the_sampler(tmp_path):
    """--set reaches the trainer's config (20 steps instead of --steps 30: four logged intervals, not six)."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_speed.py", "--tiny", "--train", "fp32", "--batch", "16", "--steps", "30",
                        "--set", "train.steps=20", "--set", "train.ema_extra=[0.99]",
                        "--log-every", "5", "--profile", "--sample", "fp32", "--sample-batch", "2",
                        "--sample-steps", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(x["kind"], x["variant"]) for x in results] == [("train", "fp32"), ("sample", "fp32")]
    assert results[0]["img_per_s"] > 0 and len(results[0]["loss_curve"]) == 4 and results[1]["nfe_per_s"] > 0
    low, high = results[0]["img_per_s_p10_p90"]
    assert low <= results[0]["img_per_s"] <= high
    assert "| train | fp32 | 16 |" in r.stdout  # the table
    copies = json.loads(r.stdout.split("BENCH copies ", 1)[1].splitlines()[0])  # the profile's copies by shape
    assert copies and all({"op", "calls", "ms", "shapes"} <= set(c) for c in copies)


def test_bench_sample_cli_times_the_command_and_counts_its_files():
    r = subprocess.run([sys.executable, "benchmarks/bench_sample_cli.py", "--tiny", "-n", "5", "--steps", "2",
                        "--runs", "1", "--phases", "--args", "--batch-size", "2"], cwd=ROOT, capture_output=True,
                       text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("BENCH ", 1)[1].splitlines()[0])
    assert res["pngs"] == 5 and res["wall_s"] >= res["sampling_s"] > 0 and res["summary"].startswith("5 images in")
    phases = json.loads(r.stdout.split("BENCH ")[2].splitlines()[0])["seconds"]
    assert list(phases) == ["torch and the device", "checkpoint", "sampling_net", "first batch", "each later batch"]
    assert len(phases["each later batch"]) == 0 and all(phases[k] >= 0 for k in list(phases)[:4])  # 5 at 256: one


def test_bench_streaming_measures_both_paths_at_each_size():
    r = subprocess.run([sys.executable, "benchmarks/bench_streaming.py", "--tiny", "--workers", "0", "1"], cwd=ROOT,
                       capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["size"] for x in rows] == [16, 32] and all(x["images"] == 64 for x in rows)
    assert all(x["img_per_s_memory"] > 0 and x["img_per_s_streamed_w0"] > 0 and x["img_per_s_streamed_w1"] > 0
               for x in rows)


def test_fid_summary_tables_each_run_and_its_scores(tmp_path):
    (tmp_path / "a.log").write_text(
        "step 16500/1000000 (2%)  loss 0.0144  lr 6.00e-04  5,276 img/s  grad-norm 0.039\n"
        "done: step 16949, 2,169,472 images seen in 506.3 s (reached train.max_time, 65.8 s of it compiling); x\n"
        "FID-DONE\n")
    (tmp_path / "a.jsonl").write_text('MAIN --sampler ddim --steps 100\n{"fid": 14.7725, "kid_mean": 0.00926}\n'
                                      'SWEEP dpm++2m 20  \n{"fid": 14.75, "kid_mean": null}\n'
                                      'SWEEP ddim 10 1\n{"fid": null, "failed": true}\n')
    (tmp_path / "b.log").write_text("compiling the training step\n")
    (tmp_path / "c.log").write_text("done: step 300, 38,400 images seen in 120.5 s (reached train.steps); x\n")
    r = subprocess.run([sys.executable, "benchmarks/fid_summary.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()[2:]
    assert rows[0] == ("| a | done | 2,169,472 | 16949 | 65.8 | 5,276 | --sampler ddim --steps 100 | 14.77 | 9.3 |")
    assert rows[1] == "|  |  |  |  |  |  | dpm++2m 20 | 14.75 |  |"
    assert rows[2] == "|  |  |  |  |  |  | ddim 10 1 | failed |  |"  # fid_run.sh records a failed score so
    assert rows[3].startswith("| b | running |")
    assert rows[4].startswith("| c | running | 38,400 | 300 |  |")  # no compilation: no compile column


def _bench_module(name: str = "bench_speed"):
    """benchmarks/<name>.py as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_slow_kernels_sources_are_printed(tmp_path, capsys):
    """--kernels prints the generated source of a kernel that costs a step real time at a fraction of the memory
    bandwidth (so a GPU call brings back which input it reads across the grain), not of the fast ones."""
    bench = _bench_module()
    slow, fast = tmp_path / "slow.py", tmp_path / "fast.py"
    slow.write_text("import triton\n\n@triton.jit\n"
                    "def triton_poi_other(in_ptr0):\n    y = tl.load(in_ptr0 + 7 * x0)\n\n"  # a wrapper's first kernel
                    "@triton_heuristics.pointwise(\n    size_hints={'x': 4096},\n)\n@triton.jit\n"
                    "def triton_poi_slow(in_ptr0):\n    x = tl.load(in_ptr0 + 384 * x1)\n")
    fast.write_text("@triton.jit\ndef triton_poi_fast(in_ptr0):\n    pass\n")
    rows = [{"name": "triton_poi_slow", "us": 1010.0, "us_per_call": 1010.0, "gb": 0.604, "file": str(slow)},
            {"name": "triton_poi_fast", "us": 400.0, "us_per_call": 130.0, "gb": 0.403, "file": str(fast)},
            {"name": "triton_red_tiny", "us": 60.0, "us_per_call": 12.0, "gb": 0.0003, "file": str(fast)}]
    bench.print_slow_kernel_sources(rows, "train-step", longest=0)
    out = capsys.readouterr().out
    assert "BENCH kernel-source train-step triton_poi_slow (1010 us a step):" in out
    assert "BENCH src @triton.jit\nBENCH src def triton_poi_slow" in out and "384 * x1" in out
    assert "import triton" not in out
    assert "size_hints={'x': 4096}" in out and "triton_poi_other" not in out and "7 * x0" not in out  # its own
    assert "triton_poi_fast" not in out and "triton_red_tiny" not in out  # 3.1 TB/s; 60 us a step
    bench.print_slow_kernel_sources(rows, "train-step", longest=2)  # and the longest two, at the roof or not
    out = capsys.readouterr().out
    assert out.count("kernel-source train-step triton_poi_slow") == 1 and "def triton_poi_fast" in out
    assert "triton_red_tiny" not in out


def test_each_live_triton_kernel_s_bytes_and_source_file_are_found(tmp_path):
    """--kernels reads the GB a kernel moves from inductor's autotuner objects, wherever they are held (torch 2.11's
    PyCodeCache no longer lists its modules: a 256 px profile came back without one byte count)."""
    from types import SimpleNamespace

    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    bench = _bench_module()
    source = tmp_path / "kernel.py"
    source.write_text("def triton_poi_fused_silu_7(in_ptr0):\n    pass\n")
    scope: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), scope)
    held = []
    for name, meta in (("triton_poi_fused_silu_7", {"kernel_num_gb": 0.75}), ("triton_red_fused_3", {})):
        k = CachingAutotuner.__new__(CachingAutotuner)  # (its __init__ needs a compiled kernel)
        k.inductor_meta = {"kernel_name": name, **meta}
        k.fn = SimpleNamespace(fn=scope["triton_poi_fused_silu_7"])
        held.append(k)
    held[0].triton_meta = {"signature": {"in_ptr0": "*bf16", "in_ptr1": "*fp32", "in_out_ptr0": "*bf16",
                                         "out_ptr0": "*fp32", "out_ptr1": "*fp32", "xnumel": "i32"}}
    cached = CachingAutotuner.__new__(CachingAutotuner)  # one loaded from inductor's cache: no function, a file
    cached.inductor_meta, cached.fn, cached.filename = {"kernel_name": "triton_red_fused_9"}, None, str(source)
    held.append(cached)
    found = bench.kernel_meta()
    assert found["triton_poi_fused_silu_7"] == (0.75, str(source), "in bf16 fp32, in-out bf16, out 2 fp32")
    assert found["triton_red_fused_9"][1] == str(source)  # (all three 256 px sources were "unreadable" without)
    assert found["triton_red_fused_3"][::2] == (None, None)  # compiled without benchmark_kernel: no count, no guess


def test_kernel_breakdown_tells_fused_kernels_from_convolutions():
    """inductor names a fused kernel after the ops it fuses, a convolution's bias add among them, and cuDNN names
    its attention kernels 'cudnn_...': counted by the first word that matches, both went into the convolutions'
    share (until 2026-11-27), which hid where a sampler forward's time goes."""
    from types import SimpleNamespace

    bench = _bench_module()

    def ev(key, us, device="DeviceType.CUDA"):
        return SimpleNamespace(key=key, self_device_time_total=us, device_type=device, is_user_annotation=False)

    prof = SimpleNamespace(key_averages=lambda: [
        ev("triton_poi_fused__to_copy_add_convolution_mean_mul_rsqrt_silu_sub_16", 3000),
        ev("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", 5000),
        ev("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", 1000),
        ev("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 700),
        ev("Torch-Compiled Region: 0/0", 9000),  # a range around kernels, not a kernel
        ev("aten::cudnn_convolution", 4000, device="DeviceType.CPU"),
    ])
    assert bench.kernel_breakdown(prof) == {"convolution": 5.0, "fused triton": 3.0, "attention": 1.0, "gemm": 0.7}


def test_the_benchmarks_rebuild_the_switches_the_package_does_not_ship():
    """bench_speed's variants take back what the package always does (stacked embedding projections, the
    upsampling fold, per-channel GroupNorm statistics, PDL) by patching, and compute the same function."""
    import copy

    import torch

    from ddpm_cli.engine import build, generate
    from ddpm_cli.nn.unet import GroupNorm, Upsample, stacked_embeddings

    bench = _bench_module()
    model = perturbed_unet()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999])
    emb = torch.randn(3, 32)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x, t)
        stacked = stacked_embeddings(model.res_blocks, emb)
        per_block = bench.per_block_embeddings(model.res_blocks, emb)
        assert len(stacked) == len(per_block) == len(model.res_blocks)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(stacked, per_block))
        net = bench.inference_net_variant(model, channels_last=False, compile=None, norm_stats=True, fold=False,
                                          pdl=False)
        assert not any(m.folded for m in model.modules() if isinstance(m, Upsample))
        assert all(m.channel_stats for m in model.modules() if isinstance(m, GroupNorm))
        assert generate.sampler_compile_options is build.sampler_compile_options  # the patch is undone
        assert torch.allclose(net(x, t, None), ref, atol=1e-5)


def test_bench_quickstart_trains_times_and_scores_the_grid(tmp_path):
    tiny = ["model.base_channels=16", "model.norm_groups=4", "data.shapes_count=200", "train.steps=3",
            "train.batch_size=8", "logging.sample_every=3", "logging.checkpoint_every=3", "logging.log_every=1",
            "logging.sample_count=20", "logging.sample_steps=5", "diffusion.num_timesteps=50"]
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_quickstart.py", "--scorer-count", "300", "--extra", "10",
                        "--json", str(out), *[a for s in tiny for a in ("--set", s)]], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["steps"] == 3 and res["wall_s"] >= res["train_s"] > 0 and res["img_per_s"] > 0
    assert res["conditional"] and res["grid"] == "step_00000003.png"
    assert res["grid_score"]["n"] == 20 and 0 <= res["grid_score"]["accuracy"] <= 1
    assert res["extra_score"]["n"] == 10


def test_bench_startup_times_the_phases_of_fresh_train_and_sample_processes():
    r = subprocess.run([sys.executable, "benchmarks/bench_startup.py", "--tiny", "--compile", "off", "--scenarios",
                        "cold,warm"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(line[len("BENCH "):]) for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    assert [(x["command"], x["scenario"]) for x in runs] == [("train", "cold"), ("train", "warm"),
                                                             ("sample", "cold"), ("sample", "warm")]
    rows = [line for line in r.stdout.splitlines() if line.startswith("ROW ")]  # each run again, in one line
    assert [row.split(":")[0] for row in rows] == ["ROW train cold", "ROW train warm", "ROW sample cold",
                                                   "ROW sample warm"], rows
    assert f"first at {runs[0]['to_first_step_s']} s (import" in rows[0] and rows[2].endswith("--batch-size 2"), rows
    for x in runs:
        phases = x["phases"]
        assert list(phases) == ["import", "checkpoint", "network set-up", "compile", "first batch", "rest"]
        assert (phases["checkpoint"] is None) == (x["command"] == "train") and phases["compile"] == 0
        timed = [v for v in phases.values() if v is not None]
        assert all(v >= 0 for v in timed) and 0 < sum(timed) <= x["wall_s"] + 0.05
        # an eager sampling job never imports torch's compiler (seconds on a GPU host); training does, in torch's
        # own optimizer constructor
        assert x["compiler_imported"] is (x["command"] == "train")
        parts = x["set_up_parts"]
        if x["command"] == "train":  # the set-up's parts, none counted twice, fit in it
            assert {"before the trainer", "data", "network", "EMA copies", "optimizer (imports torch's compiler)"} \
                <= set(parts) and all(v >= 0 for v in parts.values())
            assert sum(parts.values()) <= phases["network set-up"] + 0.05
        else:
            assert parts is None
    assert runs[0]["summary"][0].startswith("done: step 3") and runs[2]["summary"][0].startswith("4 images in")


def test_bench_startup_puts_a_compile_ahead_runs_compile_after_its_eager_first_step():
    """A train.compile_ahead run's first steps are eager: the helper's step, loaded at the switch, is not part of
    the time to the first step (on an H100 it was subtracted from it, and the first step read -4.6 s); a plain
    run's compile is."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_startup import phases_of

    marks = {"start": 0.0, "import": 2.9, "network set-up": 6.8, "end": 80.5}
    ends = [8.7, 8.8, 45.5]  # the first step eager; the compiled step loaded in 6.4 s at the switch, later
    ahead = phases_of(marks, ends, compile_s=6.4, eager_first=True)
    assert ahead["compile"] == 0 and abs(ahead["first batch"] - 1.9) < 1e-9, ahead
    timed = [v for v in ahead.values() if v is not None]
    assert all(v >= 0 for v in timed) and abs(sum(timed) - marks["end"]) < 1e-9, ahead
    plain = phases_of(marks, [15.0, 15.1], compile_s=6.4, eager_first=False)  # compiled from the first step
    assert plain["compile"] == 6.4 and abs(plain["first batch"] - 1.8) < 1e-9 and plain["checkpoint"] is None


def test_bench_precompile_saves_the_step_and_a_fresh_process_loads_it(tmp_path):
    """The ahead-of-time compiled step (aot_eager here: inductor's CPU compile takes minutes) is saved by one process
    and loaded by another, which computes the same loss without compiling."""
    r = subprocess.run([sys.executable, "benchmarks/bench_precompile.py", "--work", str(tmp_path), "--tiny",
                        "--device", "cpu", "--backend", "aot_eager", "--phases", "save,load", "--steps", "1",
                        "--images", "16"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    save, load = [json.loads(line[len("BENCH "):]) for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    assert "error" not in save and "save_error" not in save and save["bytes"] > 0, save
    assert "error" not in load and load["load_s"] >= 0 and "compile_s" not in load, load
    assert load["loss"] == save["loss"] and load["step_ms"] > 0
    r = subprocess.run([sys.executable, "benchmarks/bench_precompile.py", "--work", str(tmp_path), "--tiny",
                        "--device", "cpu", "--backend", "aot_eager", "--phases", "save,load", "--steps", "1",
                        "--what", "sample", "--batch", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    save, load = [json.loads(line[len("BENCH "):]) for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    assert "error" not in load and load["what"] == "sample" and load["checksum"] == save["checksum"], (save, load)


def test_bench_bigimg_measures_ours_the_peer_and_a_streamed_folder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    said = []

    def bench(*args) -> dict:
        r = subprocess.run([sys.executable, "benchmarks/bench_bigimg.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        said.append(r.stdout)
        return json.loads([x for x in r.stdout.splitlines() if x.startswith("BENCH {")][-1][len("BENCH "):])

    ours = bench("train", "--tiny", "--profile", "--kernels", "--inductor", "coordinate_descent_tuning=True",
                 "functorch.activation_memory_budget=0.5", "no_such_option=1")
    assert "BENCH inductor coordinate_descent_tuning=True" in said[-1]  # set, and said
    assert "BENCH inductor functorch.activation_memory_budget=0.5" in said[-1]  # AOTAutograd's, a number
    assert "BENCH inductor has no option no_such_option" in said[-1]  # skipped, and said
    peer = bench("peer", "--tiny", "--profile")
    assert ours["image_size"] == peer["image_size"] == [16, 24]  # non-square, both
    for r in ours, peer:  # (the kernels are GPU time: none on the CPU, but the profiled steps ran and were read)
        assert r["profile_ms_per_step"] == {} and r["step_ms"] > 0 and r["gpu_busy"] == 0
    assert ours["params_m"] == peer["params_m"] and ours["train_gflop_per_image"] > 2 * ours["fwd_gflop_per_image"]
    # the GroupNorms' least traffic: 5 bf16 passes over the inputs of the tiny network's 21 norms (the residual
    # blocks', the attention's, the output's), their channels by resolution: 7 at 16x24, 14 at 8x12
    normed = 16 * 24 * (16 + 16 + 48 + 16 + 32 + 16 + 16) + 8 * 12 * (16 + 32 * 11 + 64 + 48)
    assert ours["norm_min_mb_per_image"] == round(5 * 2 * normed / 1e6, 2)
    assert "bound" not in ours  # a GPU's figure: nothing on the CPU
    assert ours["img_per_s"] > 0 and peer["img_per_s"] > 0
    folder = bench("folder", str(tmp_path / "imgs"), "--size", "24", "--count", "20")
    assert len(list((tmp_path / "imgs").rglob("*.jpg"))) == folder["count"] == 20
    streamed = bench("train", "--tiny", "--data", str(tmp_path / "imgs"), "--set", "data.streaming=on")
    assert streamed["data"] == "folder, streaming on" and streamed["img_per_s"] > 0
    assert bench("sample", "--tiny")["nfe_per_s"] > 0 and bench("sample", "--tiny", "--peer")["nfe_per_s"] > 0


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_bench_bigimg_tiny_overrides_fit_every_shipped_config(config):
    """`bench_bigimg.py --tiny -c examples/X.yaml` (a smoke run of a shipped config's settings) loads: the tiny
    network's overrides leave no setting of the config contradicting them (iddpm-64's 64 head channels did)."""
    bench = _bench_module("bench_bigimg")
    from ddpm_cli.config import load_config

    cfg = load_config(ROOT / "examples" / config, bench.TINY)
    assert tuple(cfg.model.image_size) == (16, 24) and cfg.model.base_channels == 16


def test_bench_bigimg_floor_counts_every_norm_residual_sum_and_concatenation():
    """The elementwise floor of the tiny network (16x24, channels 16 and 32; the norms as in the test above),
    counted by hand, per pixel of each level: 8 passes over each norm's input; each residual sum (ResBlock or
    Attention) its output twice and its input once; each up block's concatenation written whole and its down half
    once more. The counting leaves the network's code as it was."""
    bench = _bench_module("bench_bigimg")
    from ddpm_cli.config import load_config
    from ddpm_cli.nn import unet

    run_group = unet._run_group
    _, _, normed, floor = bench.flops_per_image(load_config(ROOT / "examples" / "ddpm-256.yaml", bench.TINY))
    assert unet._run_group is run_group
    at_16x24 = (2 * 16 + 16) + (2 * 16 + 48) + (2 * 16 + 32)  # down 16->16; up 48->16, 32->16
    at_16x24 += (32 + 16 + 16) + (16 + 16 + 16)  # the two up blocks' concatenations: 32+16 and 16+16 channels
    at_8x12 = (2 * 32 + 16) + 2 * (3 * 32) + (2 * 32 + 64) + (2 * 32 + 48)  # down 16->32, the middle's two
    # blocks, up 64->32 and 48->32
    at_8x12 += 4 * (3 * 32)  # four attentions: the down block's, the middle's, the two up blocks'
    at_8x12 += (32 + 32 + 32) + (32 + 16 + 16)  # the concatenations: 32+32 and 32+16 channels
    assert floor == 8 * normed + 16 * 24 * at_16x24 + 8 * 12 * at_8x12


def test_bench_bigimg_bound_keeps_the_convolutions_and_adds_the_norms_least_traffic():
    """bench_bigimg.bound: the profiled convolutions, attention, GEMMs and optimizer as they ran (a step's share of
    the window), plus the GroupNorms' least bytes at the copy bandwidth; the fused kernels, copies and the rest are
    left out. Nothing without a bandwidth measured in the GPU turn."""
    bench = _bench_module("bench_bigimg")
    window = {"convolution": 400.0, "fused triton": 350.0, "gemm": 40.0, "optimizer / EMA": 20.0, "attention": 20.0,
              "copies": 2.0, "other": 1.0}  # ms over 10 steps
    got = bench.bound(window, 10, norm_gb=24.0, tbps=3.0, floor_gb=45.0)["bound"]
    assert got == {"kept_ms": 48.0, "norm_min_gb": 24.0, "copy_tbps": 3.0, "step_ms": 56.0, "floor_gb": 45.0,
                   "floor_step_ms": 63.0}
    assert bench.bound(window, 10, 24.0, None) == {} and bench.bound(None, 10, 24.0, 3.0) == {}


def _fid_run_workspace(tmp_path, cases: str):
    """A checkout and a home for benchmarks/fid_run.sh on the CPU, with a stand-in for `ddpm` that appends its
    arguments to calls.txt and then runs `cases` (the body of a `case $1 in ... esac`). -> (work, env, calls)."""
    work, home = tmp_path / "work", tmp_path / "home"
    (work / ".carry_data").mkdir(parents=True)
    (work / ".carry_data" / "train.zip").write_bytes(b"zip")
    for name in ("ddpm_cli", "benchmarks", "examples"):
        (work / name).symlink_to(ROOT / name)
    home.mkdir()
    (home / "inception.pth").write_bytes(b"weights")
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "ddpm"
    stub.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\ncase $1 in\n{cases}\nesac\n")
    stub.chmod(0o755)
    return work, {**os.environ, "HOME": str(home), "DDPM": str(stub), "FID_N": "50"}, calls


def test_fid_run_turns_each_sweep_entry_into_its_flags_and_runs_the_lanes(tmp_path):
    """benchmarks/fid_run.sh's control flow, with a stand-in for `ddpm` that records its arguments: the run, the
    main score, the real-image floor, and each sweep entry (sampler:steps:guidance:eta:ema_decay:guide_step:n,
    lanes split by " | "; an ema_decay of L0.08 a post-hoc EMA length) as the flags of its `ddpm sample`, every
    score recorded with its label."""
    import time

    work, env, calls = _fid_run_workspace(tmp_path, """  eval) echo '{"fid": 1.5, "kid_mean": 0.001}' ;;
  ema) case "$*" in *"--length 0.5 "*) exit 1 ;; esac ;;""")
    home = Path(env["HOME"])
    env["FLOOR"] = str(home / "test.zip")
    sweep = "ddim:5:1::::20 dpm++2m:10:::0.9998::30 | dpm++2m:20::::15:40 dpm++2m:30:::L0.08::10 ddim:9:::L0.5"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "fid_run.sh"), "q", "examples/cifar10-15min.yaml", "",
                        "", sweep], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    log = home / "fid" / "q.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and "FID-DONE" in log.read_text()):
        time.sleep(0.2)
    assert "FID-DONE" in log.read_text(), log.read_text()[-2000:]
    lines = calls.read_text().splitlines()
    run = str(home / "runs" / "q")
    assert lines[0].startswith(f"train -c {home}/src-q/config.yaml --set data.root={home}/data/train.zip")
    assert lines[1].startswith(f"eval {run} -n 50 ")
    assert lines[2].startswith(f"eval {home}/test.zip ")
    samples = sorted(x for x in lines if x.startswith("sample"))
    assert len(samples) == 4 and len([x for x in lines if x.startswith("eval")]) == 2 + 4
    flags = {x.split("--sampler ")[1].split(" --steps ")[0] + x.split(" --steps ")[1].split()[0]: x for x in samples}
    assert " -n 20 " in flags["ddim5"] and "--guidance 1" in flags["ddim5"]
    assert " -n 30 " in flags["dpm++2m10"] and "--ema-decay 0.9998" in flags["dpm++2m10"]
    assert " -n 40 " in flags["dpm++2m20"] and f"--guide-model {run}/checkpoints/ckpt-00000015.safetensors" in \
        flags["dpm++2m20"]
    posthoc = f"{home}/fid/q-dpm++2m:30:::L0.08::10-by-q.safetensors"
    assert f"ema {run} --length 0.08 --out {posthoc}" in lines
    assert flags["dpm++2m30"].startswith(f"sample {posthoc} -n 10 ") and "--ema-decay" not in flags["dpm++2m30"]
    records = (home / "fid" / "q.jsonl").read_text().splitlines()
    labels = records[0::2]
    failed = [i for i, x in enumerate(labels) if "ddim:9:::L0.5: ddpm ema failed" in x]
    assert len(failed) == 1 and json.loads(records[2 * failed[0] + 1]) == {"fid": None, "failed": True}
    assert not any(" --steps 9 " in x for x in samples)  # a failed reconstruction samples nothing
    assert len(records) == 2 * 7 and all(json.loads(x)["fid"] == 1.5 for i, x in enumerate(records[1::2])
                                          if i != failed[0])
    assert labels[0].startswith("MAIN ddpm eval RUN -n 50") and labels[1].startswith("FLOOR ddpm eval test.zip")
    assert all(x.rstrip().endswith(" s)") and "(wall " in x for x in labels)


def test_fid_run_guides_by_another_run_and_takes_the_gpu_after_it(tmp_path):
    """A sweep entry's guide field may name another run of the machine (a smaller guide): its run directory is the
    --guide-model. AFTER=RUN holds a run's training until RUN has ended, so one call can train the guide and then
    the model on one GPU in turn. A guide step written with a leading zero is a step, not octal."""
    import time

    work, env, calls = _fid_run_workspace(tmp_path, """  train) sleep 1 ;;
  eval) echo '{"fid": 1.5, "kid_mean": 0.001}' ;;""")
    home = Path(env["HOME"])
    script = str(ROOT / "benchmarks" / "fid_run.sh")
    # (output to files: the launching subshell keeps a pipe open until its run ends, and p's waits for xs)
    with open(tmp_path / "p.out", "w") as out:
        r = subprocess.run(["bash", script, "p", "examples/cifar10-fast.yaml", "", "",
                            "dpm++2m:20:2:::xs:10 ddim:5:2:::0800:10"], cwd=work, env={**env, "AFTER": "xs"},
                           stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, (tmp_path / "p.out").read_text()
    time.sleep(2)
    assert not calls.exists()  # p waits for xs, which has not started
    r = subprocess.run(["bash", script, "xs", "examples/cifar10-fast.yaml", "--set model.base_channels=64", "", ""],
                       cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 60
    log = home / "fid" / "p.log"
    while time.monotonic() < deadline and not (log.exists() and "FID-DONE" in log.read_text()):
        time.sleep(0.2)
    assert "FID-DONE" in log.read_text(), log.read_text()[-2000:]
    lines = calls.read_text().splitlines()
    trains = [i for i, x in enumerate(lines) if x.startswith("train ")]
    assert len(trains) == 2 and "run_name=xs" in lines[trains[0]] and "run_name=p" in lines[trains[1]]
    assert any(x.startswith(f"eval {home}/runs/xs ") for x in lines[trains[0]:trains[1]])  # xs scored first
    samples = [x for x in lines if x.startswith("sample")]
    assert any(f"--guide-model {home}/runs/xs" in x for x in samples)
    assert any(f"--guide-model {home}/runs/p/checkpoints/ckpt-00000800.safetensors" in x for x in samples)


def test_bench_host_times_each_piece_of_the_loop_outside_the_graph():
    """The recipe's three EMAs and a post-hoc pair each get a line, and the sum is theirs."""
    r = subprocess.run([sys.executable, "benchmarks/bench_host.py", "--repeats", "3",
                        "--set", "train.posthoc_ema=[0.05,0.1]"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.split("BENCH ")[2:]]
    pieces = {x["piece"]: x["host_us"] for x in lines}
    assert list(pieces) == ["clip_grad_norm_ (foreach)", "fused Adam", "3 EMA update(s)",
                            "post-hoc update (2 averages)", "sum"]
    assert abs(sum(list(pieces.values())[:-1]) - pieces["sum"]) <= 4 and all(v > 0 for v in pieces.values())


def test_bench_data_cache_decodes_once_then_loads(tmp_path):
    from PIL import Image

    for i in range(6):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (10, 12), (i * 40, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    r = subprocess.run([sys.executable, "benchmarks/bench_data_cache.py", "--data", str(tmp_path / "imgs"), "--size",
                        "8"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(x) for x in r.stdout.split("BENCH ")[1:]]
    assert [x["cache"] for x in runs] == ["empty", "filled"] and all(x["images"] == 6 for x in runs)
    assert [x["entries"] for x in runs] == [1, 1] and all(x["seconds"] > 0 for x in runs)


def test_sampler_accuracy_prints_each_sampler_s_error_by_calls():
    r = subprocess.run([sys.executable, "benchmarks/sampler_accuracy.py", "--steps", "4", "8", "--images", "16",
                        "--samplers", "dpm++2m", "unipc"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| dpm") or line.startswith("| unipc")]
    assert [row.split(" | ")[0] for row in rows] == ["| dpm++2m", "| unipc"]
    assert all(len(row.strip("| ").split(" | ")) == 3 for row in rows)  # the name and two step counts


def test_bench_decode_times_ddpm_the_full_decode_and_the_peer():
    r = subprocess.run([sys.executable, "benchmarks/bench_decode.py", "--source", "320", "240", "--sizes", "32",
                        "--count", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.split("BENCH ", 1)[1].splitlines()[0])
    assert row["size"] == 32 and row["count"] == 4
    assert min(row["ddpm_img_per_s"], row["full_decode_img_per_s"], row["peer_img_per_s"]) > 0
    assert row["mean_abs_diff_to_full"] < 3  # libjpeg's reduced scale stays close to decoding every pixel


def test_bench_aoti_draws_with_one_package_for_the_model_and_its_guide_what_ddpm_sample_draws(tmp_path):
    """The ahead-of-time compiled package holds no weights: loaded twice with the model's and the stored guide's,
    it draws (autoguided, a short last batch padded) the images `ddpm sample` draws from the checkpoint; so does
    that package beside a guide's own package of any batch size with its weights inside. (Two builds, each a C++
    compile of ~30 s on CI's cores: a model's package with its weights inside takes the guide's path, and a
    weightless package of any batch size the two builds' paths.)"""
    import numpy as np

    from conftest import tiny_overrides, write_yaml

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cfg = tiny_overrides(tmp_path / "runs", train__guide_step=10)
    ddpm = [sys.executable, "-m", "ddpm_cli"]
    subprocess.run([*ddpm, "train", "-c", str(write_yaml(tmp_path / "tiny.yaml", cfg))], check=True,
                   capture_output=True, env=env)
    run = tmp_path / "runs" / "tiny"

    def bench(*args) -> dict:
        r = subprocess.run([sys.executable, "benchmarks/bench_aoti.py", *args], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads([x for x in r.stdout.splitlines() if x.startswith("BENCH {")][-1][len("BENCH "):])

    built = bench("build", str(run), "-n", "6", "--batch", "4", "--out", str(tmp_path / "net.pt2"))
    assert built["batch"] == 3 and built["bytes"] > 0 and built["weights"] is None
    drawn = bench("sample", str(run), "-n", "5", "--batch", "4", "--package", str(tmp_path / "net.pt2"),
                  "--save", str(tmp_path / "aoti.npz"))
    assert drawn["guided"] and drawn["wall_s"] > 0 and set(drawn["phases_s"]) == {
        "import", "checkpoint", "package", "first_batch", "end"}
    subprocess.run([*ddpm, "sample", str(run), "-n", "5", "-b", "4", "--format", "npz", "--out",
                    str(tmp_path / "ref.npz")], check=True, capture_output=True, env=env)
    built = bench("build", str(run), "--out", str(tmp_path / "guide.pt2"), "--dynamic", "--weights", "--guide")
    assert built["batch"] == "any" and built["weights"] == "guide's"
    bench("sample", str(run), "-n", "5", "--batch", "4", "--package", str(tmp_path / "net.pt2"), "--guide-package",
          str(tmp_path / "guide.pt2"), "--save", str(tmp_path / "any.npz"))  # (the guide's takes the padded 3)
    ref = np.load(tmp_path / "ref.npz")["arr_0"].astype(int)
    for f in ("aoti.npz", "any.npz"):
        ours = np.load(tmp_path / f)["arr_0"].astype(int)
        assert ours.shape == ref.shape == (5, 16, 16, 3)
        assert np.abs(ours - ref).mean() < 0.5 and np.abs(ours - ref).max() <= 8, f  # float noise, not other weights


def test_checkpointing_cuts_what_the_compiled_step_keeps_for_its_backward():
    """model.checkpointing under torch.compile: the partitioned forward keeps each group's input, not its
    activations (bench_saved.py measures it on the shipped networks). A compiled 256 px run's peak memory did not
    drop with checkpointing on the GPU; this rules the partition out as the cause."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_saved import saved_for_backward
    from conftest import tiny_config
    from ddpm_cli.engine.build import build_unet
    from ddpm_cli.nn.unet import activation_checkpointing

    model = build_unet(tiny_config(ROOT).model).train()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 70])
    plain, _, by_dtype = saved_for_backward(model, x, t)
    recomputed, _, _ = saved_for_backward(activation_checkpointing(model, True), x, t)
    assert 0 < recomputed < plain / 2, (recomputed, plain)
    assert set(by_dtype) <= {"float32", "int64"} and sum(by_dtype.values()) == plain
    # as the CUDA defaults train (bf16 autocast): the convolutions' outputs are kept in bf16
    _, _, amp = saved_for_backward(activation_checkpointing(model, False), x, t, amp=True)
    assert amp.get("bfloat16", 0) > 0, amp


def test_bench_norm_s_formulations_are_groupnorm_and_its_buffers_are_counted_by_dtype():
    """bench_norm times four formulations of the per-channel GroupNorm: each is torch's GroupNorm (fp32 input),
    the bf16 ones within bf16's rounding; the centred one keeps that when the mean is 10x the spread, where the
    one with a bf16 shift does not (why the centred one is the candidate). The buffer count reads inductor's code."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_norm

    from ddpm_cli.nn.unet import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(4, 32)
    norm.channel_stats = True
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    errors = {}
    for offset in (0.0, 10.0):
        x = (torch.randn(2, 32, 8, 8) + offset).bfloat16().float()  # what is left to lose is the formulation's
        ref = torch.nn.functional.group_norm(x.double(), 4, norm.weight.double(), norm.bias.double(), norm.eps)
        for name, forward in bench_norm.VARIANTS.items():
            assert torch.allclose(forward(norm, x).double(), ref, atol=1e-4), name
            errors[name, offset] = (forward(norm, x.bfloat16()).double() - ref).abs().max().item()
    assert all(errors[name, 0.0] < 0.06 for name in bench_norm.VARIANTS), errors
    assert errors["centred", 10.0] < 0.08 < errors["shift", 10.0], errors
    code = ("buf1 = empty_strided_cuda((2, 4, 8, 8), (256, 1, 32, 4), torch.float32)\n"
            "buf2 = empty_strided_cuda((2, 4, 8, 8), (256, 1, 32, 4), torch.bfloat16)\n"
            "buf3 = empty_strided_cuda((2, 4, 1, 1), (4, 1, 4, 4), torch.float32)\n")
    assert bench_norm.activation_buffers(code, 2 * 4 * 8 * 8) == {"float32": 1, "bfloat16": 1}


def test_bench_grid_times_the_load_and_each_sampler_step_of_two_batches(trained_run):
    from ddpm_cli.engine.runs import list_checkpoints

    ckpt = list_checkpoints(trained_run)[-1]
    r = subprocess.run([sys.executable, "benchmarks/bench_grid.py", str(ckpt), "-n", "3", "--device", "cpu",
                        "--per-step"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (x,) = [json.loads(line[len("BENCH "):]) for line in r.stdout.splitlines() if line.startswith("BENCH ")]
    assert x["device"] == "cpu" and x["evaluations_per_step"] == 1 and x["steps"] >= 2 and x["per_step"]
    assert 0 < x["import_torch"] <= x["import_ddpm"] < x["total_s"] and x["load_s"] > 0
    assert abs(x["once_only_s"] - (x["first_batch_s"] - x["second_batch_s"])) < 1e-3
    assert len(x["first_steps_s"]) == min(4, x["steps"]) and sum(x["first_steps_s"]) <= x["first_batch_s"] + 1e-3
