"""The rank-plan JSON format: what loads, and the error for each malformed document."""

import copy
import json

import pytest

from lowrank_infer.allocation import PlanError, RankPlan

PLAN = {
    "format_version": 1, "model": "tiny", "method": "uniform", "params": {}, "keep_target": 0.5,
    "layers": [{"name": "model.layers.0.mlp.up_proj", "out_features": 160, "in_features": 64, "rank": 20},
               {"name": "model.layers.0.mlp.down_proj", "out_features": 64, "in_features": 160, "rank": None}],
}


def test_round_trip_through_json(tmp_path):
    plan = RankPlan.from_dict(PLAN)
    plan.save(tmp_path / "plan.json")
    again = RankPlan.load(tmp_path / "plan.json")
    assert again.ranks == {"model.layers.0.mlp.up_proj": 20, "model.layers.0.mlp.down_proj": None}
    # keep_achieved = (20·(160+64) + 64·160) / (2·64·160), written for readers of the file.
    assert json.loads((tmp_path / "plan.json").read_text())["keep_achieved"] == pytest.approx(
        (20 * 224 + 10240) / 20480, abs=1e-6)


def _with(path, value):
    data = copy.deepcopy(PLAN)
    *parents, key = path
    target = data
    for part in parents:
        target = target[part]
    target[key] = value
    return data


@pytest.mark.parametrize(("path", "value", "message"), [
    (("format_version",), True, "unsupported rank-plan format_version True"),
    (("format_version",), 2, "unsupported rank-plan format_version 2"),
    (("params",), [1, 2], "'params' must be a JSON object"),
    (("layers",), {"a": 1}, "'layers' must be a list"),
    (("layers", 0), 5, "layer #0 must be an object with name, out_features, in_features and rank"),
    (("layers", 0, "out_features"), 160.9, "'model.layers.0.mlp.up_proj': out_features must be an integer, got 160.9"),
    (("layers", 0, "in_features"), "64", "in_features must be an integer, got '64'"),
    (("layers", 0, "out_features"), True, "out_features must be an integer, got True"),
    (("layers", 0, "rank"), 2.5, "rank must be a positive integer or null, got 2.5"),
    (("layers", 0, "rank"), "dense", "rank must be a positive integer or null, got 'dense'"),
    (("keep_target",), 1.5, "keep must be in (0, 1]"),
])
def test_malformed_plans_are_named(path, value, message):
    with pytest.raises(PlanError) as err:
        RankPlan.from_dict(_with(path, value))
    assert message in str(err.value)


def test_missing_layer_key_is_named():
    data = copy.deepcopy(PLAN)
    del data["layers"][1]["rank"]
    with pytest.raises(PlanError, match="layer #1 must be an object with name, out_features, in_features and rank"):
        RankPlan.from_dict(data)
