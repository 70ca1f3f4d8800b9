from smear.configs.modelcard import render_card_md


def test_comparison_table_shows_columns_that_only_later_rows_have():
    md = render_card_md({"comparison": [{"run": "a", "val": 0.8}, {"run": "b", "val": 0.9, "chula": 0.97}]}, "T")
    assert "| run | val | chula |" in md
    assert "| a | 0.8 |  |" in md and "| b | 0.9 | 0.97 |" in md


def test_count_and_chula_figures_are_rendered():
    md = render_card_md({"count_mae_test": {"Platelets": 0.375}, "chula_test": {"found": 0.988}}, "T")
    assert "## Count error per image (official test split)" in md and '"Platelets": 0.375' in md
    assert "## Chula RBC-12 counting (test)" in md and '"found": 0.988' in md
    assert "Chula RBC-12 counting (val)" not in md  # absent keys give no empty section


def test_card_round_trips_and_keeps_key_order(tmp_path):
    import json

    from smear.configs.modelcard import ModelCard

    card = {"kind": "detector", "summary": "s", "classes": ["RBC"], "commit": "abc", "operating_thresholds": {"RBC": 0.4}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    c = ModelCard.read(tmp_path)
    assert c.classes == ("RBC",) and c.operating_thresholds == {"RBC": 0.4} and c.extra == {"summary": "s"}
    c.set("test_metrics", {"mAP50": 0.9}).write(tmp_path)
    out = json.loads((tmp_path / "card.json").read_text())
    assert list(out) == list(card) + ["test_metrics"] and out["test_metrics"] == {"mAP50": 0.9}
    assert (tmp_path / "card.md").read_text().startswith("# Detector " + tmp_path.name)


def test_a_card_naming_uncommitted_code_is_refused(tmp_path):
    import pytest

    from smear.configs.errors import SmearError
    from smear.configs.modelcard import ModelCard

    with pytest.raises(SmearError, match="uncommitted"):
        ModelCard(kind="detector", commit="abc+dirty").write(tmp_path, allow_dirty=False)
    with pytest.raises(SmearError, match="uncommitted"):
        ModelCard(kind="detector", commit="abc").set("test_metrics", {"commit": "def+dirty"}).write(tmp_path,
                                                                                                    allow_dirty=False)
    assert not (tmp_path / "card.json").exists()
    ModelCard(kind="detector", commit="abc+dirty").write(tmp_path)  # a run's own folder: not shipped, allowed
    assert (tmp_path / "card.json").is_file()


def test_only_the_package_model_folders_count_as_shipped(tmp_path):
    from smear.configs.modelcard import is_shipped_model_folder
    from smear.configs.paths import PACKAGE_ROOT

    assert is_shipped_model_folder(PACKAGE_ROOT / "detector" / "models" / "bccd-chula-yolov8n-cpu")
    assert is_shipped_model_folder(PACKAGE_ROOT / "classifier" / "models" / "new-one")
    assert not is_shipped_model_folder(tmp_path / "models" / "x")


def test_shipped_cards_are_written_by_code_from_committed_code():
    """Every shipped card.md is the rendering of its card.json (no hand edits), and no card names '+dirty' code."""
    import json
    from pathlib import Path

    from smear.configs.modelcard import DIRTY, card_title

    root = Path(__file__).resolve().parents[2]
    cards = sorted(root.glob("*/models/*/card.json"))
    assert len(cards) >= 5
    for path in cards:
        card = json.loads(path.read_text())
        assert DIRTY not in json.dumps(card), path
        title = card.get("title") or card_title(card.get("kind", ""), path.parent)
        assert (path.parent / "card.md").read_text() == render_card_md(card, title), path
