"""Detector training runs offline: one tiny epoch on drawn fields with every network call refused."""

from __future__ import annotations

import json
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_detector_trains_one_epoch_offline_and_writes_a_run_folder(tmp_path, no_network, restore_threads):
    from smear.configs.loader import build_config
    from smear.data.config import DataConfig
    from smear.data.prepare import prepare_dataset
    from smear.detector.config import DetectorConfig
    from smear.detector.train import package_detector, train_detector
    from tests.conftest import write_voc

    voc = write_voc(tmp_path / "voc", n_images=4)
    prepare_dataset([voc], tmp_path / "prep", DataConfig(), subtypes_csv=None)
    cfg = build_config(DetectorConfig, {"data": str(tmp_path / "prep" / "yolo" / "data.yaml"), "imgsz": 64,
                                        "epochs": 1, "batch": 2, "workers": 0, "mosaic": 0.0,
                                        "project": str(tmp_path / "runs"), "name": "tiny", "threads": 3,
                                        "nbs": 2, "cache": True})
    import torch

    run = train_detector(cfg)
    assert torch.get_num_threads() == 3  # ultralytics' trainer and validator did not lower it
    assert (run / "weights" / "last.pt").is_file() and (run / "weights" / "best.pt").is_file()
    card = json.loads((run / "card.json").read_text())
    assert card["classes"] == ["RBC", "WBC", "Platelets"] and card["config"]["imgsz"] == 64
    assert "smear_config.yaml" in {p.name for p in run.iterdir()}
    import yaml

    args = yaml.safe_load((run / "args.yaml").read_text())  # what ultralytics actually trained with
    assert (args["nbs"], args["cache"], args["batch"]) == (2, True, 2)
    shipped = package_detector(run, tmp_path / "model")
    assert {"weights.pt", "card.json", "card.md"} <= {p.name for p in shipped.iterdir()}
    assert json.loads((shipped / "card.json").read_text())["rbc_median_diameter_px"] > 0
