"""The run config: examples validate, errors name the field, overrides coerce types, schedules match formulas."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT, write_yaml
from ddpm_cli.cli.app import app
from ddpm_cli.config import RunConfig, load_config, reference_markdown, to_commented_yaml
from ddpm_cli.diffusion.schedules import make_betas
from ddpm_cli.errors import ConfigError

runner = CliRunner()
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_defaults_are_the_ddpm_cifar10_recipe():
    cfg = RunConfig()
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    assert (m.base_channels, tuple(m.channel_mults), m.num_res_blocks, tuple(m.attention_resolutions)) == \
        (128, (1, 2, 2, 2), 2, (16,))
    assert m.dropout == 0.1 and t.lr == 2e-4 and t.batch_size == 128 and t.optimizer == "adam"
    assert (d.schedule, d.num_timesteps, d.schedule_low, d.schedule_high) == ("linear", 1000, 1e-4, 0.02)
    assert t.ema_decay == 0.9999 and cfg.data.random_flip
    assert load_config(ROOT / "examples" / "cifar10.yaml").model == m


def test_misspelt_field_exits_1_and_names_it(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"model": {"base_chanels": 64}})
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 1
    out = result.output + (result.stderr if hasattr(result, "stderr") else "")
    assert "model.base_chanels" in out and "base_channels" in out  # names the field and suggests the fix


def test_bad_value_exits_1_and_names_field_and_choices(tmp_path):
    bad = write_yaml(tmp_path / "bad.yaml", {"diffusion": {"schedule": "quadratic"}, "train": {"lr": -1}})
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    problems = "\n".join(e.value.problems)
    assert "diffusion.schedule" in problems and "'linear'" in problems and "'dns'" in problems
    assert "train.lr" in problems  # all problems at once
    result = runner.invoke(app, ["config", "validate", str(bad)])
    assert result.exit_code == 1


def test_a_choice_of_text_and_booleans_is_named_as_yaml_spells_them(tmp_path):
    """train.compile_ahead is one of auto, true, false: the problem names them so, not as Python's True and False."""
    bad = write_yaml(tmp_path / "bad.yaml", {"train": {"compile_ahead": "maybe"}})
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    (line,) = e.value.problems
    assert line.startswith("train.compile_ahead:") and "'auto', true or false" in line and '"maybe"' in line


@pytest.mark.parametrize("data,field", [
    ({"model": {"channel_mults": []}}, "model.channel_mults"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"model": {"attention_resolutions": [7]}}, "attention at 7x7"),
    ({"model": {"norm_groups": 5}}, "model.norm_groups: 5"),
    ({"model": {"head_channels": 48}}, "model.head_channels: 48"),  # attention at 128 and 256 channels
    ({"model": {"time_freq_shift": 2}}, "model.time_freq_shift"),
    ({"model": {"downsample_padding": "same"}}, "model.downsample_padding"),
    # found by a helper's sweep: each passed validation and then died in the engine with a traceback, or ran with
    # a value the user did not mean
    ({"model": {"attention_resolutions": [], "base_channels": 64, "num_heads": 3}}, "model.num_heads: 3"),  # the middle
    ({"train": {"adam_betas": [1.5, 0.9]}}, "train.adam_betas.0"),
    ({"train": {"seed": 2**63 - 1}}, "train.seed"),  # seed x 1,000,003 (the data order's) overflowed
    ({"data": {"shapes_seed": -1}}, "data.shapes_seed"),
    ({"train": {"batch_size": True}}, "train.batch_size"),  # true was read as 1
    ({"model": {"in_channels": True}}, "model.in_channels"),
    ({"train": {"max_time": False}}, "train.max_time"),
    ({"model": {"channel_mults": [True, 2]}}, "model.channel_mults"),  # inside a list too: read as [1, 2]
    ({"train": {"adam_betas": [0.9, True]}}, "train.adam_betas"),
    ({"diffusion": {"timestep_sampling": "lognormal", "lognormal_mean": 9}}, "lognormal_mean 9"),
    ({"diffusion": {"lognormal_std": 0}}, "diffusion.lognormal_std"),
])
def test_out_of_range_values(tmp_path, data, field):
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    assert field in "\n".join(e.value.problems)


def test_assigning_a_field_leaves_the_others_as_validated():
    """The check for true/false inside lists turned every tuple field into a list whenever one field was assigned
    (pydantic runs the section's before-validator on assignment): pydantic then warned at each serialisation."""
    cfg = load_config(None, [])
    cfg.train.steps = 5
    assert isinstance(cfg.train.adam_betas, tuple) and isinstance(cfg.model.channel_mults, tuple)


def test_overrides_coerce_types():
    cfg = load_config(ROOT / "examples" / "cifar10.yaml",
                      ["train.batch_size=64", "diffusion.schedule=cosine", "model.channel_mults=[1,2]",
                       "train.ema=false", "train.lr=1e-4"])
    assert cfg.train.batch_size == 64 and cfg.diffusion.schedule == "cosine"
    assert cfg.model.channel_mults == (1, 2) and cfg.train.ema is False and cfg.train.lr == 1e-4


def test_a_problem_across_fields_that_a_set_made_names_the_set(tmp_path):
    """It was reported under the file (or "defaults") alone, though the file without the --set is valid."""
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "examples" / "cifar10-fast.yaml", ["diffusion.num_timesteps=10"])
    assert str(e.value).startswith("--set:") and "(with --set diffusion.num_timesteps=10)" in e.value.problems[0]
    bad = write_yaml(tmp_path / "bad.yaml", {"diffusion": {"num_timesteps": 10}})  # the file's own problem
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.lr=1e-4"])
    assert str(e.value).startswith(str(bad)) and "--set" not in e.value.problems[0]


def test_bad_override_is_a_config_error():
    from ddpm_cli.errors import UsageError

    with pytest.raises(UsageError, match="KEY=VALUE"):  # a malformed --set is a usage error: exit 2 (issue 26)
        load_config(None, ["train.batch_size"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.nope=3"])
    assert "train.nope" in "\n".join(e.value.problems)


@pytest.mark.parametrize("text,needle", [
    ("", "empty"), ("- 1\n- 2\n", "mapping"), ("model: [unclosed\n", "not valid YAML"),
    ("train:\n  steps: 100\ntrain:\n  batch_size: 8\n", "'train' is given twice"),  # YAML kept the last, whole
    ("train:\n  steps: 100\n  steps: 5\n", "line 3.*'steps' is given twice"),
])
def test_garbage_files(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(p)


def test_yaml_merge_keys_may_be_overridden():
    """A `<<: *anchor` merge and a key of the same name after it is YAML's override, not a key given twice."""
    import yaml

    from ddpm_cli.config.loading import _UniqueKeyLoader

    text = "base: &b {batch_size: 16, lr: 0.001}\ntrain:\n  <<: *b\n  batch_size: 8\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == yaml.safe_load(text)  # noqa: S506 - a SafeLoader
    assert yaml.safe_load(text)["train"] == {"batch_size": 8, "lr": 0.001}


def test_linear_cosine_dns_betas_match_formulas():
    T = 1000
    lin = make_betas("linear", T, 1e-4, 0.02)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert np.prod(1 - lin) == pytest.approx(4.04e-5, rel=0.02)  # alpha_bar_T of DDPM's schedule
    lin500 = make_betas("linear", 500, 1e-4, 0.02)
    assert lin500[0] == pytest.approx(2e-4) and lin500[-1] == pytest.approx(0.04)  # scaled by 1000/T

    cos = make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert cos[0] == pytest.approx(1 - f(1) / f(0))
    assert cos[-1] == pytest.approx(0.999)  # clipped
    assert np.prod(1 - cos) == pytest.approx(np.prod(1 - cos))

    off = 5
    dns = make_betas("dns", T, 1e-4, 0.02, dns_offset=off)
    assert dns[0] == pytest.approx(1e-4 + (0.02 - 1e-4) * (off / (T + 1 + off)) ** 2)
    assert dns[-1] == pytest.approx(1e-4 + (0.02 - 1e-4) * ((T - 1 + off) / (T + 1 + off)) ** 2)
    dnst = make_betas("dns", T, 1e-4, 0.02, dns_offset=T)  # the seed's DNST variant
    assert dnst[0] == pytest.approx(1e-4 + (0.02 - 1e-4) * (T / (2 * T + 1)) ** 2)


def test_schedule_outside_unit_interval_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["diffusion.num_timesteps=10"])
    assert "diffusion" in "\n".join(e.value.problems) and "outside (0, 1)" in "\n".join(e.value.problems)
    load_config(None, ["diffusion.num_timesteps=10", "diffusion.schedule=cosine"])  # cosine is fine


def test_show_prints_help_comments_and_reference_lists_every_field():
    text = to_commented_yaml(RunConfig())
    assert "# Residual blocks per resolution level" in text and "num_res_blocks: 2" in text
    result = runner.invoke(app, ["config", "show", "--config", str(ROOT / "examples" / "cifar10.yaml"),
                                 "--set", "train.batch_size=64"])
    assert result.exit_code == 0 and "batch_size: 64" in result.output
    result = runner.invoke(app, ["config", "show", "--set", "data.root=fötos/日本"])  # as typed, not \xF6 escapes
    assert result.exit_code == 0 and "root: fötos/日本" in result.output
    table = reference_markdown()
    for field in ("model.norm_groups", "train.early_stopping.patience", "logging.wandb_entity", "data.root"):
        assert f"`{field}`" in table


def test_show_takes_the_config_as_its_argument_as_validate_does():
    """`ddpm config show examples/quickstart.yaml` was a usage error (an unexpected extra argument): show took the
    file only with -c, while validate took it either way."""
    path = str(ROOT / "examples" / "quickstart.yaml")
    result = runner.invoke(app, ["config", "show", path, "--set", "train.batch_size=64"])
    assert result.exit_code == 0 and "batch_size: 64" in result.output, result.output
    assert result.output == runner.invoke(app, ["config", "show", "-c", path, "--set", "train.batch_size=64"]).output
    assert "dataset: shapes" in result.output  # the file's, not the defaults' (cifar10)
    result = runner.invoke(app, ["config", "show", path, "-c", path])
    assert result.exit_code == 2 and "give the config once" in result.stderr, result.stderr
    result = runner.invoke(app, ["config", "show", "train.batch_size=8"])  # a --set forgotten
    assert result.exit_code == 2 and "pass --set train.batch_size=8" in result.stderr, result.stderr


def test_bare_on_off_are_read_as_the_choices(tmp_path):
    """YAML 1.1 turns `off` into false: `--set train.compile=off` and `on_device: on` must still work."""
    cfg = load_config(None, ["train.compile=off", "train.channels_last=on"])
    assert cfg.train.compile == "off" and cfg.train.channels_last == "on"
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  on_device: off\ntrain:\n  compile: on\n")
    cfg = load_config(p)
    assert cfg.data.on_device == "off" and cfg.train.compile == "on"
    with pytest.raises(ConfigError):
        load_config(None, ["train.ema=maybe"])  # real bool fields are untouched
    # a choice of "off" without "on" (wandb: off, online, offline), from a file and from --set
    p.write_text("logging:\n  wandb: off\n")
    assert load_config(p).logging.wandb == "off"
    assert load_config(None, ["logging.wandb=off"]).logging.wandb == "off"
    with pytest.raises(ConfigError):
        load_config(None, ["logging.wandb=on"])  # not a choice of its


def test_a_guide_step_past_the_run_is_refused(tmp_path):
    from conftest import tiny_overrides
    from ddpm_cli.config import validate_config
    from ddpm_cli.errors import ConfigError

    cfg = tiny_overrides(tmp_path)
    cfg["train"].update(steps=20, guide_step=30)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg)
    assert any("guide_step (30) must not exceed steps (20)" in p for p in e.value.problems)
    cfg["train"].update(guide_step=20, guide_weight=1.0)
    with pytest.raises(ConfigError):  # a weight of 1 would not guide at all
        validate_config(cfg)


@pytest.mark.parametrize("name, size, params", [("ddpm-256.yaml", 256, 113_673_219), ("iddpm-64.yaml", 64, 115_938_691)])
def test_the_large_image_examples_are_their_papers_networks_and_diffusers_holds_them(name, size, params):
    """ddpm-256: the DDPM paper's CelebA-HQ/LSUN network (114M there); iddpm-64: Improved DDPM's ImageNet-64 size.
    The same network as diffusers' UNet2DModel, so the benchmark's peer is the same model (counted on meta)."""
    import torch
    from diffusers import UNet2DModel

    from ddpm_cli.engine.build import build_unet, count_params
    from ddpm_cli.engine.diffusers_format import unet_config_from_model

    cfg = load_config(ROOT / "examples" / name)
    assert cfg.model.hw == (size, size) and cfg.data.dataset == "folder" and cfg.data.streaming == "auto"
    peer_cfg = {k: v for k, v in unet_config_from_model(cfg.model).items() if not k.startswith("_")}
    with torch.device("meta"):
        assert count_params(build_unet(cfg.model)) == params
        assert sum(p.numel() for p in UNet2DModel(**peer_cfg).parameters()) == params
    wide = load_config(ROOT / "examples" / name, [f"model.image_size=[{size},{size * 3 // 2}]"])  # non-square:
    assert wide.model.hw == (size, size * 3 // 2)  # attention keyed by the shorter side stays where it was


def test_a_set_on_a_text_field_takes_the_text_as_written(tmp_path):
    """YAML reads 2024 as a number, 001 as 1 and on as true; a text field (a run name, a data root) takes what
    was typed, while other fields keep YAML's reading."""
    cfg = load_config(None, ["logging.run_name=001", "data.root=123", "train.steps=5", "train.guide_step=null"])
    assert cfg.logging.run_name == "001" and cfg.data.root == "123"
    assert cfg.train.steps == 5 and cfg.train.guide_step is None
    assert load_config(None, ["logging.run_name=2024"]).logging.run_name == "2024"
    assert load_config(None, ["data.root=on"]).data.root == "on"
    # dates, comments, lists and nulls as YAML reads them: the text, not a date, a cut value or an error
    cfg = load_config(None, ["data.root=my photos #2", "logging.run_name=2026-01-01", "logging.fid_ref=[a]"])
    assert (cfg.data.root, cfg.logging.run_name, cfg.logging.fid_ref) == ("my photos #2", "2026-01-01", "[a]")
    assert load_config(None, ["data.root=2026-01-01"]).data.root == "2026-01-01"
    assert load_config(None, ["data.root=~/data"]).data.root == "~/data"
    assert load_config(None, ["data.root=a: b"]).data.root == "a: b"
    # a quoted string is YAML's reading, unquoted; null clears a field that may be empty
    assert load_config(None, ["data.root='x y'"]).data.root == "x y"
    assert load_config(None, ["logging.run_name=abc", "logging.run_name=null"]).logging.run_name is None


@pytest.mark.parametrize("name", [".", "..", "../escape", "a/b", "/abs", ""])
def test_a_run_name_is_a_folder_name(name):
    """The run's folder goes under logging.run_dir: '.' wrote the run into run_dir itself, '../x' outside it."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"logging.run_name={name}"])
    assert "logging.run_name" in e.value.problems[0] and "not a folder name" in e.value.problems[0]


@pytest.mark.parametrize("device,meant", [("gpu", "cuda"), ("gpu:1", "cuda:1"), ("CUDA", "cuda"), ("cuda:x", None),
                                           ("cuda:01", None), ("tpu", None), ("", None)])
def test_a_device_torch_would_not_take_is_refused_and_gpu_is_taken_for_cuda(tmp_path, device, meant):
    """`train.device: gpu` passed validation (`ddpm config validate` said valid) and failed only when training
    started; the device is refused with the config, and the device meant is named."""
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", {"train": {"device": device}}))
    problem = e.value.problems[0]
    assert problem.startswith("train.device") and "use auto, cpu, cuda or cuda:N" in problem, problem
    assert (f"did you mean {meant}?" in problem) if meant else "did you mean" not in problem, problem
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and "train.device" in result.stderr
    for good in ("auto", "cpu", "cuda", "cuda:1", "mps", "xpu", "xpu:0"):
        assert load_config(None, [f"train.device={good}"]).train.device == good


def test_a_schedule_that_overflows_is_one_problem_and_no_numpy_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning printed its source line above the error
        with pytest.raises(ConfigError) as e:
            load_config(None, ["diffusion.num_timesteps=100", "diffusion.schedule_low=1e308",
                               "diffusion.schedule_high=1e308"])
    assert len(e.value.problems) == 1 and "diffusion: linear schedule" in e.value.problems[0]


def test_an_integer_written_with_an_exponent_says_how_to_write_it(tmp_path):
    """YAML 1.1 (PyYAML, reading and writing) takes 1e5 as text: `steps: 1e5` was refused as "unable to parse
    string as an integer", which reads as if no number was written. The line says what to write; a float field
    takes the text as its number, as before."""
    (tmp_path / "e.yaml").write_text("train:\n  steps: 1e5\n  lr: 2E-4\n  max_time: 5e+2\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "e.yaml")
    assert e.value.problems == [e.value.problems[0]] and "write it as 100000" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.steps=2e3"])
    assert "write it as 2000" in e.value.problems[0]
    cfg = load_config(None, ["train.lr=2E-4", "train.max_time=5e+2", "logging.run_name=1e5"])
    assert cfg.train.lr == 2e-4 and cfg.train.max_time == 500 and cfg.logging.run_name == "1e5"


def test_a_section_left_empty_takes_its_defaults(tmp_path):
    """A section whose fields are all commented out is null to YAML; it was refused as "not a dictionary"."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  # steps: 3\nmodel:\ndata:\n  dataset: shapes\n")
    cfg = load_config(p)
    assert cfg.train == RunConfig().train and cfg.model == RunConfig().model and cfg.data.dataset == "shapes"
    assert load_config(p, ["train.steps=5"]).train.steps == 5  # a --set into the empty section
    with pytest.raises(ConfigError):
        load_config(None, ["model=null"])  # a --set that empties a section is no shorthand for its defaults
    p.write_text("train:\n  steps: 3\n  early_stopping:\n    # enabled: true\n")  # a section in a section too
    assert load_config(p).train.early_stopping == RunConfig().train.early_stopping


def test_a_text_field_that_yaml_reads_as_a_date_or_number_says_to_quote_it(tmp_path):
    """`run_name: 2024-01-05` in a file is a date to YAML; the field said "should be a valid string" of what looks
    like one. The problem line says to quote it."""
    p = tmp_path / "c.yaml"
    p.write_text("logging:\n  run_name: 2024-01-05\ndata:\n  root: 2024\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    lines = "\n".join(e.value.problems)
    assert "logging.run_name" in lines and "data.root" in lines
    assert all("quote it" in line for line in e.value.problems), lines


def test_a_set_of_a_whole_section_changes_only_the_fields_it_names():
    """`--set 'train={steps: 3}'` replaced the section, so every other train field of the file went back to its
    default without a word; it merges, as a --set of each field would."""
    base = load_config(ROOT / "examples" / "cifar10-fast.yaml")
    cfg = load_config(ROOT / "examples" / "cifar10-fast.yaml", ["train={steps: 8000}"])
    assert cfg.train.steps == 8000 and cfg.train.batch_size == base.train.batch_size and cfg.train.lr == base.train.lr
    assert cfg.train.batch_size != RunConfig().train.batch_size or cfg.train.lr != RunConfig().train.lr


def test_validate_lists_field_and_combination_problems_at_once_each_at_its_field(tmp_path):
    """`ddpm config validate` promises every problem at once: the checks of how fields go together ran only once
    every field was valid, so a second run showed new problems, and under "config:" rather than their field."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  image_size: 33\n  foo: 1\n  norm_groups: 5\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert [p.split(":")[0] for p in e.value.problems] == ["model.foo", "train.lr", "model.image_size",
                                                           "model.norm_groups"]
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 1 and "4 problem(s)" in result.output + result.stderr
    # a combination that reads an invalid field is not judged on the default put in its place
    path.write_text("model:\n  image_size: abc\n  channel_mults: [1, 2, 2, 2, 2, 2, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("model.image_size: must be one side")
