"""Method configs: validated when made, one registry, unknown names fail by name."""

from __future__ import annotations

import dataclasses

import pytest

from lowrank_infer.allocation import METHODS, ARAConfig, DRankConfig, MethodConfig, PlanError, UniformConfig


def test_the_registry_maps_each_name_to_its_config():
    assert METHODS == {"uniform": UniformConfig, "drank": DRankConfig, "ara": ARAConfig}
    assert all(cls.name == name and issubclass(cls, MethodConfig) for name, cls in METHODS.items())


@pytest.mark.parametrize("keep", [0.0, 1.5, float("nan"), "x"])
def test_bad_keep(keep):
    with pytest.raises(PlanError, match="keep"):
        UniformConfig(keep=keep)


@pytest.mark.parametrize("changes, words", [
    ({"multiple_of": 0}, "multiple_of must be an integer >= 1"),
    ({"multiple_of": 2.5}, "multiple_of must be an integer >= 1"),
    ({"whiten": "yes"}, "whiten must be True or False"),
])
def test_bad_shared_settings(changes, words):
    with pytest.raises(ValueError, match=words):
        DRankConfig(**changes)


@pytest.mark.parametrize("cls, changes, words", [
    (ARAConfig, {"steps": 1.5}, r"steps=1.5 should be like its default 100"),
    (ARAConfig, {"steps": True}, r"steps=True should be like its default 100"),
    (ARAConfig, {"lr": "fast"}, r"lr='fast' should be like its default 0.02"),
    (ARAConfig, {"lr": float("inf")}, r"lr=inf should be like its default"),
    (ARAConfig, {"steps": 0}, "ARA needs steps >= 1"),
    (DRankConfig, {"beta": 1.0}, r"beta must be 'auto' or a number in \[0, 1\), got 1.0"),
    (DRankConfig, {"beta": "high"}, r"got 'high'"),
    (DRankConfig, {"candidates": [0.1, 2.0]}, r"got 2.0"),
    (DRankConfig, {"candidates": []}, r"candidates=\[\] should be like its default"),
])
def test_bad_hyperparameters_fail_when_the_config_is_made(cls, changes, words):
    with pytest.raises(ValueError, match=words):
        cls(**changes)


def test_numbers_are_normalized_to_the_field_kind():
    config = ARAConfig(lr=1, alpha=3)
    assert type(config.lr) is float and config.lr == 1.0 and type(config.alpha) is float
    assert DRankConfig(candidates=[0, 0.5]).candidates == (0.0, 0.5)
    assert UniformConfig(include=["mlp"]).include == ("mlp",)


def test_replace_checks_names_and_values():
    base = DRankConfig()
    assert base.replace(beta=0.3) == DRankConfig(beta=0.3)
    with pytest.raises(ValueError, match=r"method 'drank' takes no parameter 'steps' \(its parameters: beta, candidates\)"):
        base.replace(steps=3)
    with pytest.raises(ValueError, match="beta"):
        base.replace(beta=-0.1)
    with pytest.raises(ValueError, match="takes no parameter 'beta' \\(its parameters: none\\)"):
        UniformConfig().replace(beta=0.3)


def test_configs_are_frozen_and_hyperparameters_exclude_the_shared_settings():
    config = ARAConfig(keep=0.6, steps=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 6
    assert config.hyperparameters()["steps"] == 5 and "keep" not in config.hyperparameters()
    assert UniformConfig().hyperparameters() == {}


def test_what_each_method_needs():
    assert UniformConfig().needs_calibration and not UniformConfig(whiten=False).needs_calibration
    assert DRankConfig(whiten=False).needs_calibration  # beta="auto" scores plans on calibration data
    assert not DRankConfig(whiten=False, beta=0.3).needs_calibration
    assert ARAConfig(whiten=False).needs_calibration
    # ARA keeps factors past break-even (m·n/(m+n) = 48 for 64x192) so that dense stays reachable.
    assert UniformConfig().factor_cap(64, 192) == 47 and ARAConfig().factor_cap(64, 192) == 58
