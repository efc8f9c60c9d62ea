"""lsa_ext.presets: one table of per-dataset defaults that data, models, evaluation, reproduce
and the CLI all read."""

from __future__ import annotations

import pytest
import torch

from lsa_ext import evaluation, presets, reproduce
from lsa_ext.cli import analyze as cli_analyze
from lsa_ext.cli import train as cli_train
from lsa_ext.data import DATASETS, dataset_info
from lsa_ext.models import DEFAULT_MODEL, build_model


def test_every_builtin_dataset_has_a_preset_and_the_views_agree():
    assert set(presets.PRESETS) == set(DATASETS)
    for name, p in presets.PRESETS.items():
        assert presets.DATA_RANGES[name] == p.data_range == dataset_info(name).data_range
        assert DEFAULT_MODEL[name] == p.model
        assert cli_train.DEFAULT_EPS[name] == p.train_eps
        assert cli_analyze.DEFAULT_EPS[name] == p.analyze_eps
        assert evaluation.EPS_GRIDS[name] == p.eps_grid
        assert p.eps_grid[0] == 0.0 and list(p.eps_grid) == sorted(set(p.eps_grid))


@pytest.mark.parametrize("name", ["moons", "digits"])
def test_reproduction_protocols_take_the_presets(name):
    proto = reproduce.PROTOCOLS[name]
    p = presets.PRESETS[name]
    assert (proto.model, proto.eps, proto.eval_eps) == (p.model, p.train_eps, p.eps_grid)


@pytest.mark.parametrize("name", ["moons", "digits", "mnist"])  # VGG-19: see test_models
def test_default_model_builds_for_its_dataset(name):
    info = dataset_info(name)
    model = build_model(DEFAULT_MODEL[name], info)
    out = model(torch.zeros(2, *info.input_shape))
    assert out.shape[0] == 2
