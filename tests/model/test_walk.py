"""pyengine.model.walk: every linear layer once, under the names recipes use, sliced models
included."""

from __future__ import annotations

import torch

from pyengine.model.random import random_model
from pyengine.model.walk import linear_holder, linear_sites
from pyengine.nn.sliced import ResidualProjection
from pyengine.slicing.pca import slice_model


def test_linear_sites_of_a_plain_model():
    model = random_model("llama", num_hidden_layers=2)
    sites = list(linear_sites(model))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [s.name for s in sites] == [n for n, _ in linears]
    for site in sites:
        assert getattr(site.parent, site.attr) is site.linear
        assert linear_holder(model, site.name) == (site.parent, site.attr)


def test_a_sliced_projection_goes_by_its_holders_name(rng):
    model = random_model("llama", num_hidden_layers=2)
    calib = torch.randint(3, 160, (4, 16), generator=rng)
    slice_model(model, [48, 40], calib, show_progress=False)
    sites = {s.name: s for s in linear_sites(model)}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(sites) == len(linears)  # each linear once
    assert {id(s.linear) for s in sites.values()} == {id(m) for m in linears}
    for i in range(2):
        for name in (f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"):
            site = sites[name]
            assert isinstance(site.parent, ResidualProjection) and site.attr == "proj"
            assert site.linear is site.parent.proj
            assert linear_holder(model, name) == (site.parent, "proj")
    assert not any(name.endswith(".proj") for name in sites)
