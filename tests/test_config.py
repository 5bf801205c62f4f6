"""Typed configs: YAML chains, dotted overrides and the errors a user sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from passreid.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    config_diff,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from passreid.errors import ConfigError


@dataclass
class Optim:
    lr: float = 0.1
    batch_size: int = 64
    num_instances: int = 4


@dataclass
class Schema:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: Optim = field(default_factory=Optim)


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_then_yaml_chain_then_overrides(tmp_path):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.5\n  batch_size: 32\nmodel:\n  fusion: mean\n")
    recipe = write(tmp_path / "recipe.yaml", "_base_: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_config(Schema, recipe, ["optim.batch_size=16", "data.img_size=[384,128]"])
    assert cfg.optim.lr == 0.25  # child beats base
    assert cfg.optim.batch_size == 16  # override beats both
    assert cfg.model.fusion == "mean"  # from the base
    assert cfg.data.img_size == [384, 128]
    assert cfg.run.epochs == RunConfig().epochs  # untouched default
    assert isinstance(cfg, Schema) and isinstance(cfg.optim, Optim)


def test_empty_override_is_the_empty_string():
    assert load_config(Schema, None, ["model.pretrained=/a.pth", "model.pretrained="]).model.pretrained == ""


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Schema, None, ["optim.lr=0.01", "model.neck=single"])
    saved = write(tmp_path / "resolved.yaml", config_to_yaml(cfg))
    assert config_to_dict(load_config(Schema, saved)) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.nope=1", "optim.nope"),
        ("optim.batch_size=many", "optim.batch_size"),
        ("model.fusion=sum", "model.fusion"),
        ("data.img_size=[250,128]", "data.img_size"),
        ("run.precision=fp8", "run.precision"),
        ("run.epochs=0", "run.epochs"),
        ("optim.lr", "key.sub=value"),
        ("model.name=pass_vit_huge", "model.name"),
        ("data.dataset=market", "data.dataset"),
        ("data.color_jitter=1.5", "data.color_jitter"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_config(Schema, None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    recipe = write(tmp_path / "bad.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Schema, recipe)
    assert "bad.yaml" in str(err.value) and "learning_rate" in str(err.value)


def test_missing_file_and_cyclic_base(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Schema, tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(Schema, tmp_path / "a.yaml")


def test_config_diff_lists_changed_dotted_keys():
    old = {"optim": {"lr": 0.1, "batch_size": 64}, "run": {"output_dir": "a"}}
    new = {"optim": {"lr": 0.2, "batch_size": 64}, "run": {"output_dir": "b"}}
    assert config_diff(old, new, ignore=["run.output_dir"]) == ["optim.lr: 0.1 -> 0.2"]


# ----------------------------------------------------------------------------- one learning-rate key


def test_old_finetune_lr_key_loads_under_its_new_name(tmp_path, caplog) -> None:
    from passreid.engine import check_resume_config
    from passreid.finetune import FinetuneConfig

    recipe = tmp_path / "old.yaml"
    recipe.write_text("optim: {base_lr: 0.02, batch_size: 8, num_instances: 4}\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(FinetuneConfig, recipe)
    assert cfg.optim.lr == 0.02
    assert f"{recipe}: config key 'optim.base_lr' is now 'optim.lr'" in caplog.text
    assert load_config(FinetuneConfig, None, ["optim.base_lr=0.03"]).optim.lr == 0.03
    assert load_config(FinetuneConfig, recipe, ["optim.lr=0.05"]).optim.lr == 0.05  # the new name wins later
    recipe.write_text("optim: {base_lr: 0.02, lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: config keys 'optim.base_lr' and 'optim.lr' both set"):
        load_config(FinetuneConfig, recipe)
    # A run folder saved before the rename resumes without a config difference.
    check_resume_config({"optim": {"base_lr": 0.02}}, {"optim": {"lr": 0.02}})
    with pytest.raises(ConfigError, match=r"optim.lr: 0.02 -> 0.04"):
        check_resume_config({"optim": {"base_lr": 0.02}}, {"optim": {"lr": 0.04}})
