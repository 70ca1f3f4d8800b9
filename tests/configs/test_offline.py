"""The offline switches: set without errors, and ultralytics' network settings off."""

from __future__ import annotations

import os


def test_offline_switches_turn_ultralytics_network_settings_off(monkeypatch):
    from ultralytics.utils import SETTINGS

    import smear.configs.offline as offline

    monkeypatch.setattr(offline, "_DONE", False)
    before = dict(SETTINGS)
    try:
        SETTINGS.update({"sync": True})
        offline.ensure_offline()
        assert SETTINGS["sync"] is False
        assert all(SETTINGS[k] is False for k in offline.OFFLINE_SETTINGS if k in SETTINGS)
        assert os.environ["YOLO_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        SETTINGS.update(before)
