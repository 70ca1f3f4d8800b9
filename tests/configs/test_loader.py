"""The one config loader: defaults < YAML < overrides, helpful errors, configs/*.yaml mirror the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from smear.classifier.config import ClassifierConfig
from smear.configs.errors import ConfigError, SmearError
from smear.configs.loader import build_config, config_to_dict, dump_config, load_config, parse_overrides
from smear.data.config import DataConfig
from smear.detector.config import DetectorConfig
from smear.pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"data": DataConfig, "detector": DetectorConfig, "classifier": ClassifierConfig, "pipeline": PipelineConfig}


def test_defaults_without_file_or_overrides():
    assert load_config(DetectorConfig) == DetectorConfig()
    assert load_config(PipelineConfig, None, {}) == PipelineConfig()


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    f = tmp_path / "det.yaml"
    f.write_text("epochs: 7\nimgsz: 320\ncos_lr: true\n")
    cfg = load_config(DetectorConfig, f)
    assert (cfg.epochs, cfg.imgsz, cfg.cos_lr, cfg.batch) == (7, 320, True, DetectorConfig().batch)
    cfg = load_config(DetectorConfig, f, {"epochs": 3})
    assert (cfg.epochs, cfg.imgsz) == (3, 320)  # the flag wins, the YAML value it does not touch stays


def test_overrides_accept_dashes_and_cli_text():
    values = parse_overrides(["epochs=5", "lr0=0.02", "cos-lr=yes", "name=run-1"])
    cfg = load_config(DetectorConfig, None, values)
    assert (cfg.epochs, cfg.lr0, cfg.cos_lr, cfg.name) == (5, 0.02, True, "run-1")
    assert isinstance(cfg.epochs, int) and isinstance(cfg.lr0, float)


def test_override_without_equals_sign_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_empty_yaml_file_means_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(DataConfig, f) == DataConfig()


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError) as e:
        load_config(DetectorConfig, None, {"epoch": 3})
    msg = str(e.value)
    assert "'epoch'" in msg and "did you mean 'epochs'" in msg
    assert "Valid keys" in msg


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "cls.yaml"
    f.write_text("backbon: resnet50\n")
    with pytest.raises(ConfigError) as e:
        load_config(ClassifierConfig, f)
    assert str(f) in str(e.value) and "did you mean 'backbone'" in str(e.value)


def test_unknown_key_far_from_any_gives_no_suggestion():
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, None, {"zzzzqqq": 1})
    assert "did you mean" not in str(e.value)


def test_out_of_range_names_valid_range():
    with pytest.raises(ConfigError) as e:
        load_config(DetectorConfig, None, {"epochs": 0})
    assert "epochs" in str(e.value) and "valid range is [1, 1000]" in str(e.value)
    with pytest.raises(ConfigError, match=r"valid range is \[0.5, 1.0\]"):
        load_config(PipelineConfig, None, {"group_override_prob": 0.2})
    with pytest.raises(ConfigError, match=r"\[0, inf\]"):
        load_config(DataConfig, None, {"split_seed": -1})


def test_out_of_range_in_yaml(tmp_path):
    f = tmp_path / "pipe.yaml"
    f.write_text("conf: 1.5\n")
    with pytest.raises(ConfigError, match=r"conf: got 1.5; valid range is \[0.0, 1.0\]"):
        load_config(PipelineConfig, f)


def test_invalid_choice_lists_valid_values():
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, {"capture_mode": "centred"})
    assert "'wbc-centred'" in str(e.value) and "'random'" in str(e.value)


def test_subtype_views_takes_the_classifier_view_counts_or_0():
    from smear.classifier.model import SUBTYPE_VIEWS

    for n in (0, *SUBTYPE_VIEWS):
        assert load_config(PipelineConfig, None, {"subtype_views": str(n)}).subtype_views == n
    with pytest.raises(ConfigError, match=r"subtype_views: got 3; valid values are 0, 1, 2, 4, 8"):
        load_config(PipelineConfig, None, {"subtype_views": "3"})


@pytest.mark.parametrize("key,value,expected", [
    ("epochs", "abc", "expected an integer"),
    ("epochs", 2.5, "expected an integer"),
    ("epochs", True, "expected an integer"),
    ("epochs", [1, 2], "expected an integer"),
    ("epochs", "inf", "expected an integer"),
    ("epochs", "nan", "expected an integer"),
    ("lr0", "fast", "expected a number"),
    ("lr0", "nan", "expected a number"),
    ("cos_lr", "maybe", "expected true or false"),
    ("name", {"a": 1}, "expected text"),
])
def test_bad_type(key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(DetectorConfig, None, {key: value})
    assert f"DetectorConfig.{key}" in str(e.value) and expected in str(e.value)


def test_whole_numbers_given_as_float_are_integers():
    assert load_config(DetectorConfig, None, {"epochs": 3.0}).epochs == 3


def test_config_errors_are_smear_errors(tmp_path):
    assert issubclass(ConfigError, SmearError)
    with pytest.raises(ConfigError, match="not found"):
        load_config(DetectorConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DetectorConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DetectorConfig, listy)


def test_unparsable_override_value_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(DetectorConfig, None, parse_overrides(["epochs=[1"]))


def test_configs_are_frozen():
    cfg = DetectorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_documents_itself(name):
    for f in dataclasses.fields(CONFIGS[name]):
        assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_yaml_mirrors_code_defaults(name):
    cls = CONFIGS[name]
    path = ROOT / "configs" / f"{name}.yaml"
    assert path.is_file(), f"{path} missing; write it with dump_config({cls.__name__}())"
    assert load_config(cls, path) == cls()
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keys = [ln.split(":", 1)[0] for ln in lines]
    assert keys == [f.name for f in dataclasses.fields(cls)]  # every key, once, in code order
    for ln in lines:
        assert re.match(r"^\w+: .+  # \(\w+[^)]*\) \S", ln), f"{path.name}: not 'key: value  # (type, range) meaning': {ln}"
    assert path.read_text() == dump_config(cls()), f"{path} is stale; regenerate with dump_config({cls.__name__}())"


def test_dump_config_round_trips_non_defaults(tmp_path):
    cfg = build_config(ClassifierConfig, {"backbone": "resnet50", "crop_size_px": 64, "lr": 3e-5, "rotate": False})
    f = tmp_path / "c.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(ClassifierConfig, f) == cfg
    assert config_to_dict(cfg)["backbone"] == "resnet50"


def test_dump_config_shows_type_range_and_choices():
    text = dump_config(PipelineConfig())
    assert "conf: 0.4  # (float, 0.0..1.0)" in text
    assert "capture_mode: wbc-centred  # (str, one of wbc-centred|random)" in text
    assert "min_rbc_for_ratio: 300  # (int, 1..inf)" in text


def test_class_conf_overrides_conf_per_class_from_yaml_and_cli(tmp_path):
    assert PipelineConfig(conf=0.3, class_conf=()).thresholds() == {"RBC": 0.3, "WBC": 0.3, "Platelets": 0.3}
    path = tmp_path / "p.yaml"
    path.write_text("conf: 0.3\nclass_conf: [Platelets=0.6, rbc:0.2]\n")
    assert load_config(PipelineConfig, path).thresholds() == {"RBC": 0.2, "WBC": 0.3, "Platelets": 0.6}
    path.write_text("conf: 0.3\nclass_conf: {Platelets: 0.6, rbc: 0.2}\n")  # a YAML mapping works too
    assert load_config(PipelineConfig, path).thresholds() == {"RBC": 0.2, "WBC": 0.3, "Platelets": 0.6}
    cli = load_config(PipelineConfig, None, parse_overrides(["class_conf=WBC=0.9"]))
    assert cli.class_conf == ("WBC=0.9",) and cli.thresholds()["WBC"] == 0.9 and cli.thresholds()["Platelets"] == 0.4


@pytest.mark.parametrize("bad", ["Neutrophil=0.5", "Platelets=1.5", "Platelets", "Platelets=high"])
def test_bad_class_conf_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ConfigError, match=r"class_conf: got .*Class=score"):
        build_config(PipelineConfig, {"class_conf": bad})


def test_one_threshold_clears_the_per_class_entries():
    cfg = PipelineConfig(conf=0.4, class_conf=("Platelets=0.55",)).one_threshold(0.2)
    assert cfg.thresholds() == {"RBC": 0.2, "WBC": 0.2, "Platelets": 0.2} and cfg.class_conf == ()


TUNED_055 = {"operating_thresholds": {"RBC": 0.4, "WBC": 0.4, "Platelets": 0.55}}


def test_default_thresholds_come_from_the_detector_card():
    cfg = PipelineConfig()
    assert cfg.thresholds(TUNED_055) == TUNED_055["operating_thresholds"]
    resolved = cfg.for_detector(TUNED_055)
    assert resolved.class_conf == ("Platelets=0.55",) and resolved.thresholds() == TUNED_055["operating_thresholds"]
    assert resolved.for_detector({"operating_thresholds": {"Platelets": 0.9}}) == resolved  # resolved once


@pytest.mark.parametrize("cfg, card, expected", [
    (PipelineConfig(), {}, (0.4, 0.4, 0.4)),  # a user-trained detector without a tuned operating point: conf
    (PipelineConfig(conf=0.3), {}, (0.3, 0.3, 0.3)),
    (PipelineConfig(class_conf=("Platelets=0.7",)), TUNED_055, (0.4, 0.4, 0.7)),  # set on purpose: the card is unused
    (PipelineConfig(class_conf=("detector", "RBC=0.2")), TUNED_055, (0.2, 0.4, 0.55)),  # later entries win
    (PipelineConfig(class_conf=("RBC=0.2", "detector")), TUNED_055, (0.4, 0.4, 0.55)),
    (PipelineConfig(conf=0.3, class_conf=()), TUNED_055, (0.3, 0.3, 0.3)),  # --conf: one threshold for all
])
def test_class_conf_entries_and_the_card_in_order(cfg, card, expected):
    assert tuple(cfg.thresholds(card).values()) == expected
    assert tuple(cfg.for_detector(card).thresholds().values()) == expected


@pytest.mark.parametrize("yaml_text, cli, expected", [
    ("conf: 0.3\n", [], (0.3, 0.3, 0.3)),  # a YAML that sets conf alone: one threshold, as --conf does
    ("conf: 0.3\nclass_conf: [detector]\n", [], (0.4, 0.4, 0.55)),  # both named: the card's, as written
    ("conf: 0.3\nclass_conf: [Platelets=0.6]\n", [], (0.3, 0.3, 0.6)),
    ("class_conf: [Platelets=0.6]\n", ["conf=0.2"], (0.2, 0.2, 0.2)),  # a later layer's conf alone wins
    ("conf: 0.3\n", ["class_conf=[detector]"], (0.4, 0.4, 0.55)),  # a later layer's class_conf wins
    (None, [], (0.4, 0.4, 0.55)),  # nothing set: the card's
])
def test_each_config_layer_that_sets_conf_alone_means_one_threshold(tmp_path, yaml_text, cli, expected):
    path = None
    if yaml_text is not None:
        path = tmp_path / "p.yaml"
        path.write_text(yaml_text)
    cfg = load_config(PipelineConfig, path, parse_overrides(cli)).for_detector(TUNED_055)
    assert tuple(cfg.thresholds().values()) == expected


def test_a_conf_that_no_class_uses_is_warned_about(caplog):
    PipelineConfig(conf=0.2, class_conf=("detector",)).for_detector(TUNED_055)
    assert "conf 0.2 is used for no class" in caplog.text
    caplog.clear()
    PipelineConfig(conf=0.2, class_conf=("detector",)).for_detector({"operating_thresholds": {"Platelets": 0.55}})
    PipelineConfig().for_detector(TUNED_055)
    assert caplog.text == ""  # conf still counts RBC and WBC; the default conf is not a choice to warn about


@pytest.mark.parametrize("model", ["multilab-yolov8n-cpu", "bccd-chula-yolov8n-cpu", "bccd-chula-yolov8n"])
def test_shipped_detector_cards_carry_thresholds_for_every_group(model):
    """Each shipped detector brings the operating point chosen on val for it; the default config takes it."""
    import json

    from smear.detector.model import shipped_models_dir

    card = json.loads((shipped_models_dir() / model / "card.json").read_text())
    assert set(card["operating_thresholds"]) == {"RBC", "WBC", "Platelets"}
    assert PipelineConfig().thresholds(card) == card["operating_thresholds"]


@pytest.mark.parametrize("value, factor", [("auto", None), ("AUTO", None), (2, 2.0), ("0.5", 0.5)])
def test_scale_is_auto_or_a_factor(value, factor):
    from smear.configs.loader import load_config
    from smear.pipeline.config import PipelineConfig

    assert load_config(PipelineConfig, None, {"scale": value}).scale_factor() == factor


@pytest.mark.parametrize("value", ["big", 0, 100])
def test_a_bad_scale_names_the_key_and_what_is_valid(value):
    from smear.configs.errors import ConfigError
    from smear.configs.loader import load_config
    from smear.pipeline.config import PipelineConfig

    with pytest.raises(ConfigError, match="PipelineConfig.scale: .*'auto' or a resize factor between 0.05 and 20"):
        load_config(PipelineConfig, None, {"scale": value})
