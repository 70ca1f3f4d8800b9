from smear.pipeline.modelcard import render_card_md


def test_comparison_table_shows_columns_that_only_later_rows_have():
    md = render_card_md({"comparison": [{"run": "a", "val": 0.8}, {"run": "b", "val": 0.9, "chula": 0.97}]}, "T")
    assert "| run | val | chula |" in md
    assert "| a | 0.8 |  |" in md and "| b | 0.9 | 0.97 |" in md
