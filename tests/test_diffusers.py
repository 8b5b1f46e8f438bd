"""`ddpm import` and `ddpm export --format diffusers`: diffusers' UNet2DModel / DDPMPipeline folders, checked
against diffusers itself (a test extra; skipped without it). Tiny widths, the DDPM models' block layouts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import cli, ok, one_line_error
from ddpm_cli.engine.checkpoint import load_model
from ddpm_cli.engine.checkpoint import read_header
from ddpm_cli.engine.generate import noise_seed, step_noise_seed
from ddpm_cli.engine.runs import latest_checkpoint

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

# The google/ddpm-* configurations as the paper describes them (appendix B: CIFAR-10 128 x (1, 2, 2, 2); the four
# 256 px models one layout, 128 x (1, 1, 2, 2, 4, 4); attention at 16x16) with the settings of diffusers' port
# (bottom-right padding, eps 1e-6, [sin, cos] with shift 1), narrowed: widths / 8 (/ 16 at 256 px), 4 norm groups.
DDPM_UNET = {"act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
             "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 4,
             "time_embedding_type": "positional"}
LSUN_LAYOUT = {"block_out_channels": [8, 8, 16, 16, 32, 32], "sample_size": 256,
               "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
CONFIGS = {
    "ddpm-cifar10-32": {"block_out_channels": [16, 32, 32, 32], "sample_size": 32,
                        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    "ddpm-celebahq-256": LSUN_LAYOUT, "ddpm-church-256": LSUN_LAYOUT, "ddpm-bedroom-256": LSUN_LAYOUT,
    "ddpm-cat-256": LSUN_LAYOUT,
}
SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "num_train_timesteps": 1000,
             "variance_type": "fixed_small", "clip_sample": True}


def random_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel with every parameter random (none zero, norms not the identity), so nothing hides."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in unet.parameters():  # weights ~ N(0, 1/fan_in), biases and norm scales ~ N(0.5, 0.2^2)
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5 if p.dim() > 1 else 0.5 + 0.2 * torch.randn_like(p))
    return unet


def save_folder(tmp_path, name: str, unet_config: dict, scheduler: dict | None = SCHEDULER, pipeline: bool = False,
                seed: int = 0):
    unet = random_unet(unet_config, seed)
    folder = tmp_path / name
    if pipeline:
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(folder)
    else:
        unet.save_pretrained(folder)
        if scheduler is not None:
            DDPMScheduler(**scheduler).save_pretrained(folder)
    return unet, folder


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def compare(unet: UNet2DModel, ckpt, batch: int = 2, seed: int = 1) -> float:
    net, diffusion, cfg, _ = load_model(ckpt, "cpu", use_ema=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cfg.model.image_shape(), generator=g)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
    with torch.no_grad():
        want = unet(x, t).sample
        got = net(x, t)
    return relative_error(got, want)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_ddpm_model_layout_imports_and_predicts_what_diffusers_does(tmp_path, name):
    config = {**DDPM_UNET, **CONFIGS[name]}
    unet, folder = save_folder(tmp_path, name, config, seed=list(CONFIGS).index(name))  # other weights for each
    r = ok("import", folder, "--out", tmp_path / "m.safetensors")
    assert "wrote" in r.stdout
    assert compare(unet, tmp_path / "m.safetensors", batch=2 if name.endswith("32") else 1) < 1e-5
    meta = read_header(tmp_path / "m.safetensors").metadata
    assert meta["source"] == "diffusers" and meta["kind"] == "import"
    assert json.loads(meta["source_config"])["block_out_channels"] == config["block_out_channels"]
    m = json.loads(meta["config"])["model"]
    assert m["downsample_padding"] == "bottom-right" and m["norm_eps"] == 1e-6 and m["time_freq_shift"] == 1.0
    assert m["attention_resolutions"] == [16]  # 16x16 in all five (level 1 of 4 at 32 px, level 4 of 6 at 256)


def test_diffusers_defaults_and_several_heads_map_too(tmp_path):
    """The other settings the new model fields express: cos-sin embedding without frequency shift, symmetric
    padding, heads of a fixed width (more heads on wider levels), another epsilon, an explicit embedding width."""
    config = {"sample_size": 16, "block_out_channels": [8, 16, 32], "layers_per_block": 1, "norm_num_groups": 4,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 4,
              "time_embedding_dim": 24, "norm_eps": 1e-4}  # flip_sin_to_cos, freq_shift, padding: the defaults
    unet, folder = save_folder(tmp_path, "m", config, {**SCHEDULER, "num_train_timesteps": 200}, pipeline=True)
    ok("import", folder, "--out", tmp_path / "m.safetensors")
    m = json.loads(read_header(tmp_path / "m.safetensors").metadata["config"])["model"]
    assert (m["time_embedding_order"], m["time_freq_shift"], m["downsample_padding"], m["head_channels"]) == \
        ("cos-sin", 0.0, "symmetric", 4)
    assert compare(unet, tmp_path / "m.safetensors", batch=3) < 1e-5
    ok("import", folder / "unet", "--out", tmp_path / "u.safetensors")  # the pipeline's unet/: scheduler/ beside it
    configs = [json.loads(read_header(tmp_path / f).metadata["config"]) for f in ("m.safetensors", "u.safetensors")]
    assert configs[0] == configs[1] and configs[0]["diffusion"]["num_timesteps"] == 200


def test_a_model_without_attention_in_its_levels_is_said_to_have_it_in_the_middle_block(tmp_path):
    """The import's summary said "attention at none" for a model whose middle block attends (inspect: "mid only")."""
    config = {**DDPM_UNET, "sample_size": 16, "block_out_channels": [8, 16], "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    unet, folder = save_folder(tmp_path, "plain", config)
    r = ok("import", folder, "--out", tmp_path / "m.safetensors")
    assert "attention at the middle block only" in r.stdout, r.stdout
    assert compare(unet, tmp_path / "m.safetensors", batch=2) < 1e-5  # (the middle block's attention included)


def test_a_non_square_sample_size_imports_and_exports_as_height_and_width(tmp_path):
    """diffusers' sample_size may be [height, width]: the model keeps it (attention named by the shorter side),
    computes diffusers' function, and goes back out with the same pair."""
    config = {**DDPM_UNET, "sample_size": [16, 24], "block_out_channels": [8, 16], "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    unet, folder = save_folder(tmp_path, "wide", config)
    r = ok("import", folder, "--out", tmp_path / "m.safetensors")
    assert "model: 16x24x3" in r.stdout
    m = json.loads(read_header(tmp_path / "m.safetensors").metadata["config"])["model"]
    assert m["image_size"] == [16, 24] and m["attention_resolutions"] == [8]
    assert compare(unet, tmp_path / "m.safetensors", batch=2) < 1e-5
    ok("export", tmp_path / "m.safetensors", "--format", "diffusers", "--out", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "unet" / "config.json").read_text())["sample_size"] == [16, 24]
    config_file = folder / "config.json"
    for bad in ([16, 24, 8], [16, 4], "16x24"):
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": bad}))
        line = one_line_error(cli("import", folder, "--out", tmp_path / "x.safetensors"))
        assert "sample_size" in line and "[height, width]" in line


def test_files_with_pre_0_14_attention_names_import(tmp_path):
    """The Hub's DDPM files predate diffusers' attention rename (query/key/value/proj_attn for to_q/to_k/to_v/to_out.0)
    and may name a downsampling convolution by its old alias, Conv2d_0."""
    from safetensors.torch import load_file, save_file

    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    unet, folder = save_folder(tmp_path, "old", config)
    weights = folder / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn.",
               "downsamplers.0.conv.": "downsamplers.0.Conv2d_0."}
    tensors = {}
    for k, v in load_file(weights).items():
        for new, old in renames.items():
            k = k.replace(new, old)
        tensors[k] = v
    assert any(".proj_attn." in k for k in tensors) and any(".Conv2d_0." in k for k in tensors)
    save_file(tensors, weights)
    r = ok("import", folder, "--out", tmp_path / "m.safetensors")
    assert compare(unet, tmp_path / "m.safetensors") < 1e-5
    assert "DDPMScheduler's defaults were assumed" not in r.stdout
    (folder / "scheduler_config.json").unlink()
    r = ok("import", folder, "--out", tmp_path / "m.safetensors", "--overwrite")
    assert "DDPMScheduler's defaults were assumed" in r.stdout


@pytest.mark.parametrize("scheduler", [SCHEDULER, {**SCHEDULER, "num_train_timesteps": 400, "beta_end": 0.04},
                                       {**SCHEDULER, "beta_schedule": "squaredcos_cap_v2",
                                        "variance_type": "fixed_large"}])
def test_the_noise_schedule_matches_ddpmschedulers_betas(tmp_path, scheduler):
    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    _, folder = save_folder(tmp_path, "m", config, scheduler)
    ok("import", folder, "--out", tmp_path / "m.safetensors")
    _, diffusion, cfg, _ = load_model(tmp_path / "m.safetensors", "cpu")
    want = DDPMScheduler(**scheduler).betas
    assert diffusion.num_timesteps == len(want)
    assert torch.allclose(diffusion.betas, want, rtol=1e-5, atol=1e-8)
    assert cfg.diffusion.variance == {"fixed_small": "posterior", "fixed_large": "beta"}[scheduler["variance_type"]]


def test_the_imported_checkpoint_samples_inspects_and_exports_like_any_other(tmp_path):
    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"], "sample_size": 16}
    _, folder = save_folder(tmp_path, "ddpm-tiny", config, pipeline=True)
    r = ok("import", folder)  # default output: beside the folder, named for it
    ckpt = tmp_path / "ddpm-tiny.safetensors"
    assert ckpt.exists() and str(ckpt.name) in r.stdout
    info = json.loads(ok("inspect", ckpt, "--json").stdout)
    assert info["kind"] == "import" and info["source"] == "diffusers" and info["source_path"] == str(folder.resolve())
    table = ok("inspect", ckpt).stdout
    assert "imported from" in table and "diffusers:" in table
    ok("sample", ckpt, "-n", 2, "--steps", 3, "--format", "npz", "--out", tmp_path / "s.npz", "--device", "cpu")
    with np.load(tmp_path / "s.npz") as d:
        assert d["arr_0"].shape[0] == 2
    ok("export", ckpt, "--format", "onnx", "--out", tmp_path / "m.onnx")
    ok("export", ckpt, "--format", "diffusers", "--out", tmp_path / "back")
    assert "already exists" in one_line_error(cli("import", folder))


def test_a_folder_whose_name_is_not_utf8_imports(tmp_path):
    """Its path went into the checkpoint's metadata as it was: a UnicodeEncodeError traceback."""
    import os

    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"], "sample_size": 16}
    _, folder = save_folder(tmp_path, "m", config, pipeline=True)
    odd = folder.rename(tmp_path / os.fsdecode(b"caf\xe9-model"))
    ok("import", odd, "--out", tmp_path / "m.safetensors")
    info = json.loads(ok("inspect", tmp_path / "m.safetensors", "--json").stdout)
    assert info["source_path"].endswith("caf\ufffd-model")


def test_export_round_trips_through_from_pretrained(trained_run, tmp_path):
    src = latest_checkpoint(trained_run)
    r = ok("export", src, "--format", "diffusers", "--out", tmp_path / "pipe")
    assert "relative error" in r.stdout
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    assert compare(unet, _ema_only(src, tmp_path)) < 1e-5
    # and back into ddpm: the same network again
    ok("import", tmp_path / "pipe", "--out", tmp_path / "back.safetensors")
    assert compare(unet, tmp_path / "back.safetensors") < 1e-6
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    _, diffusion, _, _ = load_model(src, "cpu")
    assert torch.allclose(scheduler.betas, diffusion.betas, rtol=1e-5)


def _ema_only(src, tmp_path):
    """The EMA weights as a checkpoint of their own (what the export holds by default)."""
    out = tmp_path / "ema.safetensors"
    ok("export", src, "--out", out)
    return out


class _DdpmNoise(DDPMScheduler):
    """DDPMScheduler drawing each step's noise from one generator for the batch, seeded as `ddpm sample` seeds
    it, so both sample from the same noise (the initial noise is the pipeline's per-image generators')."""

    noise: torch.Generator | None = None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(model_output, timestep, sample, generator=self.noise, return_dict=return_dict)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpmpipeline_samples_the_images_ddpm_samples(trained_run, tmp_path, variance):
    _pipeline_samples_what_ddpm_samples(latest_checkpoint(trained_run), tmp_path, variance)


@pytest.fixture(scope="module")
def trained_v_run(tmp_path_factory):
    from conftest import tiny_config
    from ddpm_cli.engine.train import train

    return train(tiny_config(tmp_path_factory.mktemp("runs"), diffusion__prediction="v")).run_dir


def test_a_v_prediction_model_exports_samples_in_ddpmpipeline_and_imports_back(trained_v_run, tmp_path):
    """diffusion.prediction v is diffusers' prediction_type v_prediction, both ways; DDPMPipeline then draws
    the images `ddpm sample` draws."""
    src = latest_checkpoint(trained_v_run)
    _pipeline_samples_what_ddpm_samples(src, tmp_path, "posterior")
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    ok("import", tmp_path / "pipe", "--out", tmp_path / "back.safetensors")
    assert json.loads(read_header(tmp_path / "back.safetensors").metadata["config"])["diffusion"]["prediction"] == "v"
    assert "the velocity (v)" in ok("inspect", tmp_path / "back.safetensors").stdout


def _pipeline_samples_what_ddpm_samples(src, tmp_path, variance: str) -> None:
    ok("export", src, "--format", "diffusers", "--out", tmp_path / "pipe")
    seed, n = 5, 3
    ok("sample", src, "-n", n, "--batch-size", n, "--seed", seed, "--sampler", "ddpm", "--variance", variance,
       "--format", "npz", "--out", tmp_path / "ddpm.npz", "--device", "cpu")
    with np.load(tmp_path / "ddpm.npz") as d:
        ours = d["arr_0"].astype(int)

    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    scheduler = _DdpmNoise.from_config({**pipe.scheduler.config,
                                        "variance_type": {"beta": "fixed_large", "posterior": "fixed_small"}[variance]})
    scheduler.noise = torch.Generator().manual_seed(step_noise_seed(seed, 0))  # generate.generate's, first batch
    pipe = DDPMPipeline(unet=pipe.unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(noise_seed("image", seed, i)) for i in range(n)]  # initial_noise's
    images = pipe(batch_size=n, generator=generators, num_inference_steps=scheduler.config.num_train_timesteps,
                  output_type="np").images
    theirs = np.round(images * 255).astype(int)
    if ours.shape != theirs.shape:
        ours = ours.transpose(0, 2, 3, 1)
    diff = np.abs(ours - theirs)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.mean(), diff.max())  # float rounding, nothing more
    assert np.abs(ours - ours[::-1]).mean() > 5  # the images differ from each other: the test can fail


@pytest.mark.parametrize("change,message", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "down_block_types[1] = 'CrossAttnDownBlock2D'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift = 'scale_shift'"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type = 'fourier'"),
    ({"block_out_channels": [16, 24, 32, 32]}, "block_out_channels"),
    ({"some_new_field": 3}, "some_new_field"),
    ({"num_class_embeds": 10}, "num_class_embeds = 10: ddpm imports unconditional models only"),
])
def test_an_unsupported_configuration_is_refused_in_one_line(tmp_path, change, message):
    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    folder = tmp_path / "m"
    random_unet(config).save_pretrained(folder)
    stored = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**stored, **change}))
    line = one_line_error(cli("import", folder, "--out", tmp_path / "x.safetensors"))
    assert message in line, line
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".x*"))


def test_an_out_named_with_a_trailing_separator_is_refused_before_the_import(tmp_path):
    """-o out/ for a folder not made yet wrote a FILE named out: Typer handed the option over as a Path, and
    Path("out/") is Path("out")."""
    _, folder = save_folder(tmp_path, "m", {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]})
    for bad in (f"{tmp_path / 'out'}/", f"{tmp_path / 'out'}/."):
        line = one_line_error(cli("import", folder, "-o", bad), code=(2,))
        assert f"--out {bad} names a folder" in line, line
        assert f"such as {os.path.join(bad, 'model.safetensors')}" in line, line
        assert not (tmp_path / "out").exists()


def test_bad_folders_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    out = tmp_path / "x.safetensors"
    assert "not found" in one_line_error(cli("import", tmp_path / "nope", "--out", out))
    (tmp_path / "file").write_text("hi")
    assert "is not a folder" in one_line_error(cli("import", tmp_path / "file", "--out", out))
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in one_line_error(cli("import", tmp_path / "empty", "--out", out))
    # mismatched tensor shapes: weights of a narrower model than config.json says
    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    _, folder = save_folder(tmp_path, "m", config)
    random_unet({**config, "block_out_channels": [8, 16, 16, 16]}).save_pretrained(tmp_path / "narrow")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "narrow" / "diffusion_pytorch_model.safetensors").read_bytes())
    assert "has shape" in one_line_error(cli("import", folder, "--out", out))
    from safetensors.torch import save_file

    tensors = dict(random_unet(config).state_dict())
    save_file({**tensors, "extra_block.weight": torch.zeros(2)}, folder / "diffusion_pytorch_model.safetensors")
    assert "extra_block.weight that its config.json does not describe" in one_line_error(
        cli("import", folder, "--out", out))
    poisoned = {**tensors, "conv_in.bias": torch.full_like(tensors["conv_in.bias"], float("nan"))}
    save_file(poisoned, folder / "diffusion_pytorch_model.safetensors")  # it sampled black images, exit 0
    assert "NaN or infinite" in one_line_error(cli("import", folder, "--out", out))
    save_file({**tensors, "conv_in.bias": tensors["conv_in.bias"].long()},
              folder / "diffusion_pytorch_model.safetensors")
    assert "not weights" in one_line_error(cli("import", folder, "--out", out))
    del tensors["conv_out.bias"]
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")
    assert "lacks tensor conv_out.bias" in one_line_error(cli("import", folder, "--out", out))
    # two variants and no plain file: which one is meant is not guessed (the first by name was taken); shards
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file(tensors, folder / "diffusion_pytorch_model.ema.safetensors")
    weights.rename(folder / "diffusion_pytorch_model.non_ema.safetensors")
    assert "cannot tell which is meant" in one_line_error(cli("import", folder, "--out", out))
    for p in folder.glob("diffusion_pytorch_model.*.safetensors"):
        p.unlink()
    save_file(tensors, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    assert "in shards" in one_line_error(cli("import", folder, "--out", out))
    (folder / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
    index = folder / "diffusion_pytorch_model.safetensors.index.json"  # a download of the JSON files alone
    index.write_text('{"metadata": {}, "weight_map": {}}')  # (an IndexError naming no shard)
    assert "in shards" in one_line_error(cli("import", folder, "--out", out))
    index.unlink()
    save_file(tensors, folder / "diffusion_pytorch_model.fp16.safetensors")  # one variant: taken
    assert "lacks tensor conv_out.bias" in one_line_error(cli("import", folder, "--out", out))
    (folder / "diffusion_pytorch_model.fp16.safetensors").unlink()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    assert "not a readable safetensors file" in one_line_error(cli("import", folder, "--out", out))
    (folder / "config.json").write_text("{not json")
    assert "not valid JSON" in one_line_error(cli("import", folder, "--out", out))
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_a_scheduler_without_betas_is_refused(tmp_path):
    _, folder = save_folder(tmp_path, "m", {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]})
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "ScoreSdeVeScheduler",
                                                              "sigma_max": 1348.0, "num_train_timesteps": 2000}))
    line = one_line_error(cli("import", folder, "--out", tmp_path / "x.safetensors"))
    assert "ScoreSdeVeScheduler without betas" in line and not (tmp_path / "x.safetensors").exists()
    # a DDPM-family scheduler without betas has DDPMScheduler's default ones (it was refused, while a folder with
    # no scheduler config at all took them); a network of continuous noise levels is refused (it was imported)
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler",
                                                              "num_train_timesteps": 1000}))
    ok("import", folder, "--out", tmp_path / "defaults.safetensors")
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                              "beta_schedule": "linear",
                                                              "timestep_type": "continuous"}))
    assert "timestep_type" in one_line_error(cli("import", folder, "--out", tmp_path / "y.safetensors"))


def test_pickled_weights_alone_are_refused(tmp_path):
    config = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    _, folder = save_folder(tmp_path, "m", config)
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    assert "pickle" in one_line_error(cli("import", folder, "--out", tmp_path / "x.safetensors"))


def test_an_export_diffusers_cannot_express_is_refused_in_one_line(trained_conditional_run, tmp_path):
    line = one_line_error(cli("export", trained_conditional_run, "--format", "diffusers", "--out", tmp_path / "p"))
    assert "class-conditional" in line and not (tmp_path / "p").exists()


def test_the_defaults_ddpm_assumes_are_diffusers_own():
    """A key that config.json leaves out takes UNet2DModel's (DDPMScheduler's) default: ddpm's copy must agree."""
    import inspect

    from ddpm_cli.engine.diffusers_format import SCHEDULER_DEFAULTS, UNET_DEFAULTS

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    unet, scheduler = defaults(UNet2DModel), defaults(DDPMScheduler)
    for key, value in UNET_DEFAULTS.items():
        assert key in unet and (list(unet[key]) if isinstance(unet[key], tuple) else unet[key]) == value, key
    for key, value in SCHEDULER_DEFAULTS.items():
        assert scheduler[key] == value, key


@pytest.mark.parametrize("model", [{}, {"channel_mults": [1, 2, 3], "num_res_blocks": 1, "image_size": 16,
                                        "base_channels": 8, "norm_groups": 4, "attention_resolutions": [16, 4]}])
def test_the_tensor_plan_names_every_tensor_of_the_network_once(model):
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.build import build_unet
    from ddpm_cli.engine.diffusers_format import tensor_plan, unet_config_from_model

    cfg = validate_config({"model": model}).model
    plan = tensor_plan(cfg)
    with torch.device("meta"):
        assert [t.ddpm for t in plan] == list(build_unet(cfg).state_dict())
        names = set(UNet2DModel(**unet_config_from_model(cfg)).state_dict())
    ours = {n for t in plan for n in t.diffusers}
    assert ours == {n for n in names if ".Conv2d_0." not in n}  # Conv2d_0: diffusers' alias of downsamplers' conv


@pytest.mark.parametrize("model,message", [
    ({"activation": "mish"}, "activation mish"),
    ({"channel_mults": [2, 2]}, "a first multiplier of 1"),
    ({"num_heads": 2, "base_channels": 64, "channel_mults": [1, 2], "attention_resolutions": [32, 16],
      "image_size": 32}, "heads of different widths"),
])
def test_models_diffusers_cannot_express_are_refused_with_the_reason(model, message):
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.diffusers_format import unet_config_from_model
    from ddpm_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match=message):
        unet_config_from_model(validate_config({"model": model}).model)


def test_an_export_folder_is_replaced_only_when_asked_and_only_if_it_is_one(trained_run, tmp_path):
    src = latest_checkpoint(trained_run)
    ok("export", src, "--format", "diffusers", "--out", tmp_path / "pipe")
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.read_bytes()
    assert "--overwrite" in one_line_error(cli("export", src, "--format", "diffusers", "--out", tmp_path / "pipe"))
    assert weights.read_bytes() == before
    ok("export", src, "--format", "diffusers", "--out", tmp_path / "pipe", "--overwrite", "--dtype", "fp16")
    assert {t["dtype"] for t in read_header(weights, require_ddpm=False).tensors.values()} == {"F16"}
    import shutil

    shutil.copy(src, tmp_path / "ckpt-00000020.safetensors")
    r = ok("export", tmp_path / "ckpt-00000020.safetensors", "--format", "diffusers", "--no-ema")
    assert (tmp_path / "ckpt-00000020-raw-diffusers" / "model_index.json").is_file()  # default: beside, named
    assert "ckpt-00000020-raw-diffusers" in r.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    line = one_line_error(cli("export", src, "--format", "diffusers", "--out", tmp_path / "mine", "--overwrite"))
    assert "not a diffusers pipeline folder" in line and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000020-raw-diffusers", "ckpt-00000020.safetensors",
                                                          "mine", "pipe"]  # no temporary left behind


def test_overwrite_replaces_the_exports_files_and_keeps_the_rest_of_the_folder(trained_run, tmp_path, monkeypatch):
    """--overwrite of a pipeline folder removed the whole folder first: a hub clone's .git and README.md were lost,
    and an output that failed after the removal left nothing. `-o .` in the folder was a traceback."""
    src = latest_checkpoint(trained_run)
    hub = tmp_path / "hub"
    ok("export", src, "--format", "diffusers", "--out", hub)
    (hub / ".git").mkdir()
    (hub / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (hub / "README.md").write_text("# card")
    weights = hub / "unet" / "diffusion_pytorch_model.safetensors"
    ok("export", src, "--format", "diffusers", "--out", hub, "--overwrite", "--dtype", "fp16")
    assert {t["dtype"] for t in read_header(weights, require_ddpm=False).tensors.values()} == {"F16"}
    assert (hub / "README.md").read_text() == "# card" and (hub / ".git" / "HEAD").is_file()
    monkeypatch.chdir(hub)
    ok("export", src, "--format", "diffusers", "--out", ".", "--overwrite")  # the folder one is in
    assert {t["dtype"] for t in read_header(weights, require_ddpm=False).tensors.values()} == {"F32"}
    assert (hub / "README.md").read_text() == "# card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no temporary left behind


@pytest.mark.parametrize("model,diffusion", [
    ({"norm": "layer", "num_heads": 2, "channel_mults": [1, 1], "downsample_padding": "bottom-right"},
     {"schedule": "cosine", "num_timesteps": 50}),
    ({"head_channels": 4, "time_embedding_order": "cos-sin", "time_freq_shift": 0.0, "norm_eps": 1e-3},
     {"schedule": "dns", "num_timesteps": 40, "variance": "posterior"}),
])
def test_other_architectures_and_schedules_export_to_the_same_network_and_betas(tmp_path, model, diffusion):
    from conftest import tiny_overrides
    from ddpm_cli.config import validate_config
    from ddpm_cli.engine.build import build_diffusion, build_unet
    from ddpm_cli.engine.checkpoint import save_weights, weights_metadata

    data = tiny_overrides(tmp_path)
    cfg = validate_config({"model": {**data["model"], **model}, "diffusion": diffusion})
    torch.manual_seed(0)
    net = build_unet(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_weights(tmp_path / "m.safetensors", net, None, weights_metadata(cfg, 1, 1, 1, False, []))
    ok("export", tmp_path / "m.safetensors", "--format", "diffusers", "--out", tmp_path / "pipe")
    unet = UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    assert compare(unet, tmp_path / "m.safetensors") < 1e-5
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert torch.allclose(scheduler.betas, build_diffusion(cfg.diffusion).betas, rtol=1e-5)
    # and back: the same schedule (dns's betas were refused as unnamed, in a 22 KB line)
    ok("import", tmp_path / "pipe", "--out", tmp_path / "back.safetensors")
    from ddpm_cli.engine.checkpoint import load_checkpoint

    back = load_checkpoint(tmp_path / "back.safetensors").config.diffusion
    assert (back.schedule, back.num_timesteps) == (cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    assert torch.allclose(build_diffusion(back).betas, build_diffusion(cfg.diffusion).betas)


def test_any_value_of_any_field_is_mapped_or_refused_in_one_error():
    """Every known field of both configs, set to values of every JSON kind: a config or a CheckpointError, never
    another exception (there were 59 tracebacks here: lists where numbers belong, numbers where lists do)."""
    from pathlib import Path

    from ddpm_cli.engine.diffusers_format import SCHEDULER_DEFAULTS, UNET_DEFAULTS
    from ddpm_cli.engine.diffusers_io import DiffusersFolder, run_config
    from ddpm_cli.errors import CheckpointError

    unet = {**DDPM_UNET, **CONFIGS["ddpm-cifar10-32"]}
    odd = [None, "x", -1, 0, 2.5, 1e9, True, float("nan"), [], [0], [-5, 3], ["a"], {}]
    cases = [({**unet, k: v}, SCHEDULER) for k in UNET_DEFAULTS for v in odd]
    cases += [(unet, {**SCHEDULER, k: v}) for k in SCHEDULER_DEFAULTS for v in odd]
    refused = 0
    for u, s in cases:
        try:
            run_config(DiffusersFolder(Path("m"), u, "", s, "", Path("m/w.safetensors")))
        except CheckpointError as e:
            refused += 1
            assert "\n" not in str(e)
    assert refused > len(cases) // 2
