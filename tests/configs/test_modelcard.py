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
