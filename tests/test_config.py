import dataclasses

import pytest

from moe_understudy.config import DataConfig, TeacherConfig


def test_teacher_config_round_trips_through_yaml_text_and_file(tmp_path):
    cfg = TeacherConfig(preset="qwen3_moe", steps=7, data=DataConfig(source="x.jsonl", block_size=64))
    assert TeacherConfig.from_yaml(cfg.to_yaml()) == cfg
    path = tmp_path / "t.yaml"
    cfg.to_yaml(path)
    assert TeacherConfig.from_yaml(path) == cfg


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TeacherConfig().steps = 3  # type: ignore[misc]


def test_unknown_yaml_field_is_named():
    with pytest.raises(ValueError, match="stepz"):
        TeacherConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("bad", [dict(block_size=4), dict(val_fraction=0.0), dict(vocab_size=100)])
def test_data_config_validates_its_fields(bad):
    with pytest.raises(ValueError):
        DataConfig(**bad)


def test_distill_config_refuses_a_pair_weight_power_that_is_not_positive_and_round_trips_one_that_is():
    from moe_understudy.config import DistillConfig

    with pytest.raises(ValueError, match="pair_weight_power"):
        DistillConfig(arch="trunk", pair_weight_power=0.0)
    cfg = DistillConfig(arch="trunk", pair_weight_power=2.0)
    assert DistillConfig.from_yaml(cfg.to_yaml()) == cfg
