"""The UNet: shapes, the paper's parameter count, conditioning, and every architecture switch doing something."""
from __future__ import annotations

import pytest
import torch

from ddpm_cli.config import RunConfig, validate_config
from ddpm_cli.engine.build import build_unet, count_params
from ddpm_cli.nn.unet import UNet


def test_default_cifar10_model_has_the_papers_parameter_count():
    n = count_params(build_unet(RunConfig().model))
    assert abs(n - 35_746_307) / 35_746_307 < 0.01


def test_output_shape_matches_input():
    m = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
             norm_groups=4, in_channels=1)
    x = torch.randn(3, 1, 16, 16)
    assert m(x, torch.tensor([0, 5, 99])).shape == (3, 1, 16, 16)


def test_class_embedding_has_a_null_slot_and_changes_output():
    torch.manual_seed(0)
    m = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, norm_groups=4,
             attention_resolutions=(), num_classes=10).eval()
    assert m.class_emb.num_embeddings == 11
    # Zero-initialised output layers make every output 0 at init; perturb them to see conditioning.
    for p in m.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    a, b = m(x, t, torch.tensor([1, 1])), m(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    assert torch.allclose(m(x, t, None), m(x, t, torch.tensor([10, 10])))  # None means the null class


@pytest.mark.parametrize("override", [
    {"num_res_blocks": 2}, {"channel_mults": [1, 2, 2]}, {"base_channels": 32}, {"time_emb_dim": 128},
    {"attention_resolutions": [16, 8]},
])
def test_architecture_fields_change_the_model(override):
    base = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "norm_groups": 4}
    n0 = count_params(build_unet(validate_config({"model": base}).model))
    n1 = count_params(build_unet(validate_config({"model": {**base, **override}}).model))
    assert n1 > n0


@pytest.mark.parametrize("field,value", [("activation", "mish"), ("norm", "layer"), ("dropout", 0.5),
                                         ("num_heads", 4)])
def test_behaviour_fields_change_the_output(field, value):
    base = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [8], "norm_groups": 4, "dropout": 0.0}
    outs = []
    for cfg in (base, {**base, field: value}):
        torch.manual_seed(0)
        m = build_unet(validate_config({"model": cfg}).model).train()
        for p in m.parameters():
            p.data += 0.1 * torch.randn_like(p)
        torch.manual_seed(1)
        outs.append(m(torch.randn(2, 3, 16, 16), torch.tensor([3, 50])))
    assert not torch.allclose(outs[0], outs[1])
