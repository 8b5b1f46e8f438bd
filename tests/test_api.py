"""The Python API (ddpm_cli/api.py) refuses bad arguments with a DdpmError that names them, as the CLI does: a
helper's sweep found zero, negative or fractional counts, out-of-range or float labels, uint8 images and NaN
guidance raising deep tracebacks, and NaN guidance returning black images."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import tiny_overrides
from ddpm_cli.api import Diffusion, load_config, load_data
from ddpm_cli.errors import DdpmError


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    data = tiny_overrides(tmp_path_factory.mktemp("api"), model__conditional=True, model__num_classes=10)
    return Diffusion.from_config(data, device="cpu")  # a dict of sections is a config too


@pytest.mark.parametrize("call, needle", [
    (lambda d: d.sample(0), "positive int"),
    (lambda d: d.sample(-1), "positive int"),
    (lambda d: d.sample(2.5), "positive int"),
    (lambda d: d.sample(2, steps=2.5), "steps is an int"),
    (lambda d: d.sample(2, seed=2**70), "seed"),
    (lambda d: d.sample(2, guidance=float("nan")), "finite"),
    (lambda d: d.sample(2, guidance=True), "finite number"),
    (lambda d: d.sample(2, y=[1, 2], guidance=2.0, guide="early.safetensors"), "guide is a Diffusion"),
    (lambda d: d.sample(2, y=[1, 2], guidance=2.0, guide=d), "this model itself"),
    (lambda d: d.sample(2, y=[1, 2], guide=Diffusion.from_config(d.cfg, device="cpu")), "no effect at guidance 1"),
    (lambda d: d.sample(2, y=[1, 2], guidance=2.0, guide=Diffusion.from_config(
        {**d.cfg.model_dump(), "diffusion": {"schedule": "linear", "num_timesteps": 1000}}, device="cpu")),
     "differs from this model in its noise schedule"),
    (lambda d: d.sample(2, y=torch.tensor([10, 99])), "lie in [0, 10)"),
    (lambda d: d.sample(2, y=torch.tensor([1, 2, 3])), "3 labels for 2 images"),
    (lambda d: d.sample(2, y=torch.tensor([0.5, 1.0])), "integers"),
    (lambda d: d.sample(2, y="cats"), "integers"),
    (lambda d: d.loss(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)), "floats in [-1, 1]"),
    (lambda d: d.loss(torch.zeros(2, 1, 16, 16)), "the model takes (B, 3, 16, 16)"),
    (lambda d: d.loss([[0.0]]), "float tensor"),
    (lambda d: d.loss(torch.zeros(2, 3, 16, 16), y=[-5, 2]), "lie in [0, 10)"),
])
def test_bad_arguments_are_one_clear_error(conditional, call, needle):
    with pytest.raises(DdpmError) as e:
        call(conditional)
    assert needle in str(e.value), str(e.value)


def test_sample_takes_labels_as_ddpm_sample_does(conditional, tmp_path):
    """Without y a conditional model drew every image from its null class, where `ddpm sample` gives the classes
    in turn; y given to an unconditional model, and steps to the ddpm sampler, were ignored without a word."""
    conditional = Diffusion.from_config(conditional.cfg, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh model's zeroed output layers would make every label give the same images
        for p in conditional.ema.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    in_turn = conditional.sample(4, steps=2, seed=3)
    assert torch.equal(in_turn, conditional.sample(4, y=[0, 1, 2, 3], steps=2, seed=3))
    assert not torch.equal(in_turn, conditional.sample(4, y=[1, 1, 1, 1], steps=2, seed=3))
    guided = conditional.sample(4, steps=2, seed=3, guidance=3.0)  # classifier-free, by the same labels
    assert torch.equal(guided, conditional.sample(4, y=[0, 1, 2, 3], steps=2, seed=3, guidance=3.0))
    plain = Diffusion.from_config(tiny_overrides(tmp_path), device="cpu")
    with pytest.raises(DdpmError, match="unconditional"):
        plain.sample(2, y=[0, 1], steps=2)
    with pytest.raises(DdpmError, match="needs a class-conditional model"):
        plain.sample(2, guidance=3.0, steps=2)
    with pytest.warns(UserWarning, match="always takes all T = 100 steps") as caught:
        plain.sample(1, sampler="ddpm", steps=5)
    assert caught[0].filename == __file__  # the caller's line, not torch's no_grad wrapper
    assert "steps is ignored (use sampler='ddim'" in str(caught[0].message) and "--" not in str(caught[0].message)
    with pytest.warns(UserWarning, match="steps=500 is more than the model's T = 100") as caught:
        plain.sample(1, sampler="ddim", steps=500)  # (it took the CLI's words, with their flags' dashes dropped)
    assert "--" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config's variance is no caller's option to ignore
        plain.sample(1, sampler="ddim", steps=2)


def test_labels_may_be_lists_or_one_int_and_configs_dicts_or_paths(conditional, tmp_path):
    assert conditional.sample(2, y=[1, 2], steps=2).shape == (2, 3, 16, 16)
    assert conditional.sample(2, y=3, steps=2).shape == (2, 3, 16, 16)  # every image of class 3
    loss = conditional.loss(torch.zeros(2, 3, 16, 16), y=[0, 9])
    assert torch.isfinite(loss)
    cfg = load_config(tiny_overrides(tmp_path))
    assert len(load_data(cfg)) == cfg.data.shapes_count
    with pytest.raises(DdpmError, match="not int"):
        load_config(5)


def test_a_model_trained_on_load_data_saves_its_class_names(tmp_path):
    """load_data kept the labels and dropped their names, so a model trained on it saved none (`ddpm sample --class
    circle` then failed, and inspect listed no classes); its dataset now carries `classes`, as torchvision's do."""
    from ddpm_cli.engine.checkpoint import class_names, read_header
    from ddpm_cli.engine.data import SHAPE_CLASSES

    cfg = load_config(tiny_overrides(tmp_path, model__conditional=True, model__num_classes=len(SHAPE_CLASSES)))
    data = load_data(cfg)
    assert data.classes == list(SHAPE_CLASSES)
    d = Diffusion.from_config(cfg, device="cpu")
    d.classes = data.classes
    d.save(tmp_path / "m.safetensors")
    assert class_names(read_header(tmp_path / "m.safetensors").metadata) == list(SHAPE_CLASSES)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_loss_drops_labels_as_the_config_says(tmp_path, dropout):
    """train.label_dropout trains the null class that classifier-free guidance subtracts: the API's loss ignored
    it, so a model trained through the README's loop guided against an untrained embedding."""
    data = tiny_overrides(tmp_path, model__conditional=True, model__num_classes=10, train__label_dropout=dropout)
    d = Diffusion.from_config(data, device="cpu")
    with torch.no_grad():  # (the zero-initialised output layer would pass no gradient back to the embeddings)
        for p in d.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)  # (at 0.5, some of the 8 labels are dropped: 1 - 2^-8 of seeds)
    d.loss(torch.zeros(8, 3, 16, 16), y=[1, 2, 3, 4, 1, 2, 3, 4]).backward()
    grad = d.model.class_emb.weight.grad.abs().sum(dim=1)
    assert bool(grad[10] > 0) == (dropout > 0) and bool(grad[5:10].sum() == 0), grad


def test_a_checkpoint_loaded_and_saved_keeps_its_class_names_and_no_run_is_overwritten(trained_conditional_run,
                                                                                      tmp_path):
    """from_checkpoint then save dropped the class names (`ddpm sample --class NAME` then failed) and the images
    seen; save replaced a run's training checkpoint, whose run then resumed from another model."""
    from ddpm_cli.engine.checkpoint import read_header
    from ddpm_cli.engine.runs import latest_checkpoint

    src = latest_checkpoint(trained_conditional_run)
    d = Diffusion.from_checkpoint(src, device="cpu")
    d.save(tmp_path / "copy.safetensors")
    a, b = read_header(src).metadata, read_header(tmp_path / "copy.safetensors").metadata
    assert b["classes"] == a["classes"] != "[]" and b["images_seen"] == a["images_seen"]
    before = src.read_bytes()
    with pytest.raises(DdpmError, match="training checkpoint"):
        d.save(src)
    assert src.read_bytes() == before
    for own in ("latest.json", "config.yaml"):  # the run's other files: written over with weights (a review)
        path = trained_conditional_run / own
        before = path.read_bytes()
        with pytest.raises(DdpmError, match="one of the run's own files"):
            d.save(path)
        assert path.read_bytes() == before


def test_the_images_a_model_is_trained_on_are_counted_into_its_checkpoint(tmp_path):
    """The API saved 'images seen 0' after training: loss() never counted its batches (a loss taken without
    gradients, to evaluate, is not training)."""
    from ddpm_cli.engine.checkpoint import read_header

    conditional = Diffusion.from_config(tiny_overrides(tmp_path, model__conditional=True, model__num_classes=10),
                                        device="cpu")
    start = conditional.images_seen
    conditional.loss(torch.zeros(3, 3, 16, 16), y=[0, 1, 2]).backward()
    conditional.update_ema()
    with torch.no_grad():
        conditional.loss(torch.zeros(2, 3, 16, 16), y=[0, 1])
    conditional.save(tmp_path / "c.safetensors")
    assert int(read_header(tmp_path / "c.safetensors").metadata["images_seen"]) == start + 3


def test_loss_takes_float64_images_as_numpy_gives_them(conditional):
    """torch.from_numpy of a float array is float64: a raw "Input type (double) and bias type (float)" error."""
    loss = conditional.loss(torch.zeros(2, 3, 16, 16, dtype=torch.float64), y=[1, 2])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_load_config_applies_its_overrides_to_a_dict_or_a_config(tmp_path):
    """Given a dict, the overrides were ignored (and a problem of the dict blamed on them); given a RunConfig, too."""
    data = tiny_overrides(tmp_path)
    cfg = load_config(data, ["train.steps=5", "model.dropout=0.2"])
    assert cfg.train.steps == 5 and cfg.model.dropout == 0.2 and data["train"]["steps"] == 20  # the dict unchanged
    assert load_config(cfg, ["train.steps=7"]).train.steps == 7 and cfg.train.steps == 5
