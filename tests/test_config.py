"""config.py: presets, strict keys, type and range checks, overrides, exact TOML round trip."""
from __future__ import annotations

import dataclasses
import math

import pytest

from robustmargin.config import (Config, DataConfig, ModelConfig, TrainConfig, config_from_dict, load_config,
                                 load_preset, preset_names, with_overrides)
from robustmargin.errors import UserError


def test_presets_load():
    names = preset_names()
    assert "quick" in names
    for name in names:
        cfg = load_preset(name)
        assert isinstance(cfg, Config)
        assert cfg == config_from_dict(cfg.to_dict())  # already valid, nothing changes on revalidation


def test_quick_preset_is_a_cpu_run_past_the_paper_thresholds():
    cfg = load_preset("quick")
    assert cfg.data.name == "mnist5k" and cfg.train.device == "cpu"
    assert cfg.model.bias in ("none", "first")  # homogeneous
    assert set(cfg.train.thresholds) >= {-10.0, -15.0, -20.0, -120.0}
    assert cfg.train.stop_log10_loss < -120.0


@pytest.mark.parametrize("name,model,lr", [("mnist", "cnn", 0.01), ("cifar", "vgg16", 0.1)])
def test_paper_presets_match_the_paper(name, model, lr):
    main, constant = load_preset(f"paper-{name}"), load_preset(f"paper-{name}-constant")
    for cfg in (main, constant):
        assert (cfg.model.name, cfg.model.width, cfg.train.batch_size, cfg.train.epochs) == (model, 1.0, 100, 10000)
        assert cfg.data.n_train == 0 and cfg.train.device == "cuda"
    assert main.train.schedule == "loss-based" and (main.train.alpha0, main.train.r_up, main.train.r_down) == (
        0.1, 2 ** (1 / 5), 2 ** (1 / 10))
    assert constant.train.schedule == "constant" and constant.train.lr == lr
    assert main.data == constant.data and main.model == constant.model


def test_unknown_preset():
    with pytest.raises(UserError, match="nosuch"):
        load_preset("nosuch")


def test_empty_config_is_defaults():
    assert config_from_dict({}) == Config()
    assert config_from_dict({"train": {}}) == Config()


def test_unknown_section_names_it():
    with pytest.raises(UserError, match="optimizer"):
        config_from_dict({"optimizer": {"lr": 0.1}})


@pytest.mark.parametrize("section,key", [("data", "shuffle"), ("model", "depth"), ("train", "momentum")])
def test_unknown_key_names_it(section, key):
    with pytest.raises(UserError, match=rf"{section}\.{key}"):
        config_from_dict({section: {key: 1}})


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 3\nweight_decay = 0.0\n')
    with pytest.raises(UserError, match=r"train\.weight_decay"):
        load_config(path)


@pytest.mark.parametrize("raw,key", [
    ({"train": {"batch_size": "100"}}, "train.batch_size"),
    ({"train": {"batch_size": 100.0}}, "train.batch_size"),
    ({"train": {"epochs": True}}, "train.epochs"),
    ({"train": {"lr": "0.1"}}, "train.lr"),
    ({"train": {"lr": True}}, "train.lr"),
    ({"data": {"download": 1}}, "data.download"),
    ({"data": {"name": 5}}, "data.name"),
    ({"model": {"hidden": 512}}, "model.hidden"),
    ({"model": {"hidden": [512, "a"]}}, "model.hidden"),
    ({"model": {"hidden": [512, 1.5]}}, "model.hidden"),
    ({"train": {"thresholds": [-10.0, True]}}, "train.thresholds"),
    ({"train": {"thresholds": "-10"}}, "train.thresholds"),
])
def test_wrong_types(raw, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_section_must_be_table():
    with pytest.raises(UserError, match="train"):
        config_from_dict({"train": 5})


@pytest.mark.parametrize("raw,key", [
    ({"train": {"lr": -0.1}}, "train.lr"),
    ({"train": {"lr": 0}}, "train.lr"),
    ({"train": {"lr": math.nan}}, "train.lr"),
    ({"train": {"alpha0": -1.0}}, "train.alpha0"),
    ({"train": {"lr_floor": 0.0}}, "train.lr_floor"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"train": {"batch_size": -5}}, "train.batch_size"),
    ({"train": {"eval_batch_size": 0}}, "train.eval_batch_size"),
    ({"train": {"epochs": -1}}, "train.epochs"),
    ({"train": {"max_seconds": 0.0}}, "train.max_seconds"),
    ({"train": {"batch_loss_ceiling": -1.0}}, "train.batch_loss_ceiling"),
    ({"train": {"checkpoint_every_decades": -5.0}}, "train.checkpoint_every_decades"),
    ({"train": {"r_down": 1.0}}, "train.r_down"),
    ({"train": {"r_up": 0.5}}, "train.r_up"),
    ({"train": {"thresholds": [-10.0, 5.0]}}, "train.thresholds"),
    ({"data": {"n_train": -1}}, "data.n_train"),
    ({"data": {"n_test": -2}}, "data.n_test"),
    ({"model": {"width": 0.0}}, "model.width"),
    ({"model": {"width": -0.5}}, "model.width"),
    ({"model": {"hidden": [512, 0]}}, "model.hidden"),
    ({"data": {"name": "imagenet"}}, "data.name"),
    ({"model": {"name": "resnet18"}}, "model.name"),
    ({"model": {"bias": "last"}}, "model.bias"),
    ({"model": {"activation": "gelu"}}, "model.activation"),
    ({"train": {"schedule": "cosine"}}, "train.schedule"),
    ({"train": {"loss": "hinge"}}, "train.loss"),
    ({"train": {"device": "tpu"}}, "train.device"),
])
def test_out_of_range_and_unknown_choices(raw, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_valid_choices_and_coercion():
    cfg = config_from_dict({"data": {"name": "cifar10"}, "model": {"name": "vgg16", "bias": "none", "width": 2},
                            "train": {"lr": 1, "schedule": "constant", "loss": "exp", "device": "cuda:1",
                                      "thresholds": [-10, -20.5], "epochs": 0}})
    assert cfg.model.width == 2.0 and isinstance(cfg.model.width, float)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.thresholds == [-10.0, -20.5] and all(isinstance(v, float) for v in cfg.train.thresholds)
    assert (cfg.data.name, cfg.model.name, cfg.train.schedule, cfg.train.loss) == ("cifar10", "vgg16", "constant", "exp")


def test_with_overrides_applies_and_revalidates():
    base = load_preset("quick")
    before = base.to_dict()
    cfg = with_overrides(base, {"train.epochs": 5, "train.seed": 3, "data.n_train": 200, "train.lr": None,
                                "train.device": "cpu"})
    assert (cfg.train.epochs, cfg.train.seed, cfg.data.n_train) == (5, 3, 200)
    assert cfg.train.lr == base.train.lr  # None = not given
    assert cfg.model == base.model
    assert base.to_dict() == before  # the input is not mutated
    with pytest.raises(UserError, match=r"train\.epochs"):
        with_overrides(base, {"train.epochs": -3})
    with pytest.raises(UserError, match=r"train\.batch_size"):
        with_overrides(base, {"train.batch_size": "many"})
    with pytest.raises(UserError, match=r"train\.momentum"):
        with_overrides(base, {"train.momentum": 0.9})


def test_with_overrides_unknown_section_is_user_error():
    with pytest.raises(UserError, match="optim"):
        with_overrides(Config(), {"optim.lr": 0.1})


def roundtrip_configs() -> list[Config]:
    custom = Config(
        data=DataConfig(name="mnist", root="/tmp/some where/ä", download=True, n_train=123, n_test=45, split_seed=9),
        model=ModelConfig(name="mlp", bias="none", width=0.1 + 0.2, activation="relu2", hidden=[7, 3, 1]),
        train=TrainConfig(loss="logistic", schedule="normalized", lr=1 / 3, alpha0=2 ** -0.5, r_up=1.0,
                          r_down=1 + 2 ** -52, lr_floor=5e-324, batch_loss_ceiling=1e308, batch_size=1,
                          eval_batch_size=7, epochs=0, seed=2 ** 40, device="cuda:0",
                          thresholds=[-1e-300, -7.25, -880.0], checkpoint_every_decades=5.0,
                          stop_log10_loss=-1234.5678901234567, max_seconds=0.1),
    )
    return [Config(), load_preset("quick"), custom]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_toml_round_trip_is_exact(tmp_path, index):
    cfg = roundtrip_configs()[index]
    config_from_dict(cfg.to_dict())  # the custom config is valid
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    back = load_config(path)
    assert back == cfg
    for section in ("data", "model", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            a, b = getattr(getattr(cfg, section), f.name), getattr(getattr(back, section), f.name)
            assert type(a) is type(b), f.name
            if isinstance(a, float):
                assert a == b or (math.isinf(a) and a == b), f.name
    assert back.to_toml() == cfg.to_toml()


def test_load_config_missing_and_invalid(tmp_path):
    with pytest.raises(UserError, match="nothere"):
        load_config(tmp_path / "nothere.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3\n")
    with pytest.raises(UserError, match="bad.toml"):
        load_config(bad)


def test_load_config_non_utf8_file_is_user_error(tmp_path):
    # DESIGN.md: a corrupt file is a one-line user error (exit 2), not a traceback
    bad = tmp_path / "binary.toml"
    bad.write_bytes(b"\xff\xfe\x00[train]\n")
    with pytest.raises(UserError):
        load_config(bad)
