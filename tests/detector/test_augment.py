"""Stain jitter and defocus for detector training: what they do to an image, and that training uses them."""

from __future__ import annotations

import numpy as np
import pytest

from smear.detector.augment import Defocus, StainJitter, hed_jitter


def _field(seed: int = 0) -> np.ndarray:
    from tests.conftest import draw_field

    img, _ = draw_field(seed=seed)
    return img


def test_hed_jitter_identity_gives_the_image_back():
    img = _field()
    same = hed_jitter(img, np.ones(3), np.zeros(3))
    assert np.abs(same.astype(int) - img.astype(int)).max() <= 1


def test_more_haematoxylin_darkens_the_stained_cell_not_the_background():
    img = np.full((8, 16, 3), 250, np.uint8)  # near-white background: no stain to scale
    img[:, 8:] = (120, 60, 160)  # a purple nucleus
    stronger = hed_jitter(img, np.array([1.5, 1.0, 1.0]), np.zeros(3)).astype(float)
    assert np.abs(stronger[:, :8] - 250).max() <= 2
    assert stronger[:, 8:].sum() < img[:, 8:].astype(float).sum() - 8 * 8 * 30  # denser stain absorbs more light


def test_stain_jitter_changes_colours_only_and_keeps_labels(monkeypatch):
    img = _field()
    labels = {"img": img[..., ::-1].copy(), "cls": np.array([[0]]), "instances": "untouched"}
    np.random.seed(0)
    out = StainJitter(0.2)(dict(labels))
    assert out["img"].shape == img.shape and out["img"].dtype == np.uint8
    assert not np.array_equal(out["img"], labels["img"])
    assert out["instances"] == "untouched" and out["cls"] is labels["cls"]
    off = StainJitter(0.0)(dict(labels))
    assert off["img"] is labels["img"]


def test_defocus_blurs_with_its_probability():
    img = np.zeros((64, 64, 3), np.uint8)
    img[32, 32] = 255
    np.random.seed(1)
    always = Defocus(1.0)({"img": img.copy()})["img"]
    assert always[32, 32, 0] < 255 and always[32, 33, 0] > 0  # the point spread
    never = Defocus(0.0)({"img": img.copy()})["img"]
    assert np.array_equal(never, img)


@pytest.mark.filterwarnings("ignore")
def test_training_set_carries_the_augmentation_through_close_mosaic(tmp_path):
    """The trainer built for stain_jitter / blur adds both to the training transforms, also after mosaic closes."""
    from ultralytics.nn.tasks import DetectionModel

    from smear.configs.offline import ensure_offline
    from smear.data.config import DataConfig
    from smear.data.prepare import prepare_dataset
    from smear.detector.augment import augmenting_trainer
    from tests.conftest import write_voc

    ensure_offline()
    voc = write_voc(tmp_path / "voc", n_images=4)
    prepare_dataset([voc], tmp_path / "prep", DataConfig(), subtypes_csv=None)
    trainer = augmenting_trainer(0.2, 0.5)(overrides={"model": "yolov8n.yaml",
                                                      "data": str(tmp_path / "prep" / "yolo" / "data.yaml"),
                                                      "imgsz": 64, "device": "cpu", "workers": 0, "plots": False,
                                                      "project": str(tmp_path / "runs"), "name": "t"})
    trainer.model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    train = trainer.build_dataset(trainer.data["train"], "train", 2)
    names = [type(t).__name__ for t in train.transforms.transforms]
    assert names[-3:] == ["StainJitter", "Defocus", "Format"]
    train.close_mosaic(trainer.args)
    assert [type(t).__name__ for t in train.transforms.transforms][-3:] == ["StainJitter", "Defocus", "Format"]
    val = trainer.build_dataset(trainer.data["val"], "val", 2)
    assert "StainJitter" not in [type(t).__name__ for t in val.transforms.transforms]  # measured as they are
    assert train[0]["img"].shape[0] == 3


def test_a_resumed_run_keeps_the_augmentation_it_started_with(tmp_path):
    """ultralytics resumes with the arguments in its checkpoint; stain_jitter and blur come from the run folder."""
    from smear.configs.loader import build_config, dump_config
    from smear.detector.config import DetectorConfig
    from smear.detector.train import _trainer, run_config

    started = build_config(DetectorConfig, {"stain_jitter": 0.2, "blur": 0.25, "name": "aug"})
    (tmp_path / "smear_config.yaml").write_text(dump_config(started))
    resumed_with = build_config(DetectorConfig, {"name": "aug"})  # 'smear detector train name=aug --resume'
    assert (run_config(tmp_path, resumed_with).stain_jitter, run_config(tmp_path, resumed_with).blur) == (0.2, 0.25)
    assert "trainer" in _trainer(run_config(tmp_path, resumed_with)) and not _trainer(resumed_with)
    assert run_config(tmp_path / "no-such-run", resumed_with) is resumed_with


def test_a_resumed_runs_card_records_the_settings_it_started_with(tmp_path, monkeypatch):
    """The card of a resumed run gives the run's settings (data, augmentation), not the resume command's defaults;
    ultralytics itself is replaced here by a stand-in that records what it was asked to do."""
    import json

    import ultralytics

    from smear.configs.loader import build_config, dump_config
    from smear.detector.config import DetectorConfig
    from smear.detector.train import train_detector

    data = tmp_path / "set" / "data.yaml"
    data.parent.mkdir()
    data.write_text("names: {0: RBC, 1: WBC, 2: Platelets}\n")
    run = tmp_path / "runs" / "aug"
    (run / "weights").mkdir(parents=True)
    (run / "weights" / "last.pt").write_bytes(b"checkpoint")
    started = build_config(DetectorConfig, {"data": str(data), "stain_jitter": 0.2, "blur": 0.25, "imgsz": 320,
                                            "project": str(tmp_path / "runs"), "name": "aug"})
    (run / "smear_config.yaml").write_text(dump_config(started))
    calls = []

    class FakeYOLO:
        def __init__(self, weights):
            calls.append(("load", weights))

        def train(self, **kwargs):
            calls.append(("train", kwargs))

    monkeypatch.setattr(ultralytics, "YOLO", FakeYOLO)
    resumed_with = build_config(DetectorConfig, {"project": str(tmp_path / "runs"), "name": "aug"})
    train_detector(resumed_with, resume=True)
    assert calls[0] == ("load", str(run / "weights" / "last.pt"))
    assert calls[1][1]["resume"] is True and "trainer" in calls[1][1]
    card = json.loads((run / "card.json").read_text())
    assert (card["config"]["stain_jitter"], card["config"]["blur"], card["config"]["imgsz"]) == (0.2, 0.25, 320)
    assert card["data"] == str(data)
