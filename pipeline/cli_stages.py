"""``smear data``, ``smear detector`` and ``smear classifier``: the per-stage sub-commands of the CLI.

Each command parses, calls one library function and prints; heavy imports stay inside commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

data_app = typer.Typer(no_args_is_help=True, help="Prepare training data from labelled sources.")
detector_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and export the YOLO cell detector.")
classifier_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the crop classifier.")

OVERRIDES_HELP = "config overrides as key=value (e.g. epochs=40 imgsz=640); they win over --config"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"smear: error: {message}", err=True)
    raise typer.Exit(code)


def _load(cls, config: Optional[Path], overrides: List[str], extra: dict | None = None):
    from smear.configs.loader import load_config, parse_overrides

    values = parse_overrides(overrides)
    values.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_config(cls, config, values)


# ------------------------------------------------------------------ data

@data_app.command("prepare")
def data_prepare(
    source: List[Path] = typer.Option(None, "--source", help="labelled source(s): VOC folder, YOLO data.yaml or COCO "
                                      ".json; repeat to merge (default: ../shared/data/bccd)"),
    out: Path = typer.Option(Path("runs/prepared/bccd"), "--out", help="output folder"),
    images: Optional[Path] = typer.Option(None, "--images", help="take images from this folder (reviewed annotations)"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/data.yaml)"),
    overrides: List[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Audit a labelled source and write the YOLO set, the classifier crops and the audit.

    Example: smear data prepare --source ../shared/data/bccd --out /tmp/bccd
    """
    from smear.configs.paths import resolve_path
    from smear.data.config import DataConfig
    from smear.data.prepare import prepare_dataset

    cfg = _load(DataConfig, config, overrides or [])
    sources = [Path(s) for s in source] if source else [resolve_path(cfg.source)]
    subtypes = resolve_path(cfg.subtypes_csv) if cfg.subtypes_csv else None
    summary = prepare_dataset(sources, out, cfg, images=images, subtypes_csv=subtypes)
    typer.echo(f"images: {summary.images} ({', '.join(f'{k} {v}' for k, v in summary.images_per_split.items())})")
    typer.echo("boxes per class: " + ", ".join(f"{k} {v}" for k, v in summary.boxes_per_class.items()))
    typer.echo("crops per label: " + ", ".join(f"{k} {v}" for k, v in summary.crops_per_label.items()))
    typer.echo("audit (fixed or dropped box by box; full list in audit.csv):")
    for reason, n in summary.audit_counts.items():
        typer.echo(f"  {n:5d}  {reason}")
    if summary.failed_images:
        typer.echo(f"{len(summary.failed_images)} image(s) could not be read:", err=True)
        for f in summary.failed_images:
            typer.echo(f"  {f}", err=True)
    typer.echo(f"written to {out} (yolo/data.yaml, crops/manifest.csv, audit.csv, summary.json)")
    if summary.failed_images:
        raise typer.Exit(1)


@data_app.command("complete")
def data_complete(
    shared: Path = typer.Option(Path("../shared/data"), "--shared", help="folder holding bccd/, bccd-relabel/ and "
                                "txl-external/"),
    out: Path = typer.Option(Path("runs/prepared/complete"), "--out", help="output folder (gets yolo/)"),
    exclude: List[str] = typer.Option(None, "--exclude", help="leave a source out (bccd, pbc, raabin): train without "
                                      "it, then test on it (leave-one-source-out); repeatable"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="share of PBC and Raabin fields held for val "
                                       "(by a hash of the image bytes; BCCD keeps its official split)"),
) -> None:
    """Write a detector set of completely labelled fields from three labs, every field at one RBC size.

    Example: smear data complete --out runs/prepared/complete-no-pbc --exclude pbc
    """
    from smear.configs.paths import resolve_path
    from smear.data.complete import SOURCES, list_fields, source_scale, write_yolo_set

    unknown = sorted(set(exclude or []) - set(SOURCES))
    if unknown:
        _fail(f"--exclude {', '.join(unknown)}: valid sources are {', '.join(SOURCES)}")
    fields = list_fields(resolve_path(str(shared)), val_fraction)
    data_yaml = write_yolo_set(fields, Path(out) / "yolo", exclude=tuple(exclude or ()))
    typer.echo("resize per source (to an RBC of 97.5 px): " + ", ".join(f"{k} x{v:g}" for k, v in
                                                                          source_scale(fields).items()))
    kept = [f for f in fields if f.source not in (exclude or [])]
    for split in ("train", "val"):
        typer.echo(f"{split}: " + ", ".join(f"{s} {sum(f.split == split and f.source == s for f in kept)}"
                                            for s in SOURCES if s not in (exclude or [])))
    typer.echo(f"written: {data_yaml} (per field: {data_yaml.parent / 'fields.csv'})")


@data_app.command("add-points")
def data_add_points(
    source: Path = typer.Option(Path("../shared/data/chula-rbc-12"), "--source", help="point-labelled fields "
                                "(Chula RBC-12 layout: Dataset/N.jpg, Label/N.txt 'x y class')"),
    base: Path = typer.Option(Path("runs/prepared/bccd/yolo"), "--base", help="YOLO set from 'smear data prepare'"),
    out: Path = typer.Option(Path("runs/prepared/bccd-chula"), "--out", help="output folder (gets yolo/)"),
    scale: float = typer.Option(2.5, "--scale", help="resize factor to the detector's training scale "
                                "(Chula RBCs ~39 px -> BCCD ~100 px: 2.5)"),
    split_from: Optional[Path] = typer.Option(None, "--split-from", help="model folder whose split.json names the "
                                              "training ids (default: the shipped morphology model's)"),
    max_images: int = typer.Option(200, "--max-images", help="at most this many training fields (0: all)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="detector that proposes boxes (default: shipped)"),
) -> None:
    """Add point-labelled fields (training split only) to a YOLO set, as weak labels for the detector.

    Example: smear data add-points --source ../shared/data/chula-rbc-12 --out runs/prepared/bccd-chula
    """
    import json

    from smear.classifier.model import resolve_morphology_folder
    from smear.configs.paths import resolve_path
    from smear.data.pointlabels import build_point_augmented_set
    from smear.detector.predict import Detector

    folder = Path(split_from) if split_from else resolve_morphology_folder(None)
    train_ids = json.loads((folder / "split.json").read_text())["train"]
    det = Detector(weights)
    data_yaml, rows = build_point_augmented_set(
        resolve_path(str(base)), out, resolve_path(str(source)), train_ids, scale,
        lambda rgb, k: det.predict([rgb], scale=k)[0], float(det.info.card.get("rbc_median_diameter_px") or 100.0),
        max_images=max_images)
    n = len(rows)
    typer.echo(f"{n} point-labelled training fields added (split from {folder / 'split.json'})")
    if n:
        typer.echo("boxes: " + ", ".join(f"{k} {sum(getattr(r, k) for r in rows)}" for k in (
            "points", "boxes_from_detector", "boxes_from_mask", "boxes_from_median", "pseudo_labels")))
    typer.echo(f"written: {data_yaml} (per field: {data_yaml.parent / 'point_fields_train.csv'})")


@data_app.command("pbc")
def data_pbc(
    source: Path = typer.Option(Path("../shared/data/pbc"), "--source", help="PBC folder (labels.csv, <class>/*.jpg)"),
    out: Path = typer.Option(Path("runs/prepared/pbc"), "--out", help="output folder (gets manifest.csv)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="detector that boxes the centred cells "
                                          "(default: shipped)"),
    scale: str = typer.Option("auto", "--scale", help="'auto', or the resize factor to the detector's training scale"),
    limit: int = typer.Option(0, "--limit", help="at most this many images per class (0: all)"),
    fields: bool = typer.Option(True, "--fields/--no-fields", help="add the boxed cells of txl-external's PBC and "
                                "Raabin fields (RBCs, platelets; Raabin WBCs as group-only 'WBC' rows)"),
) -> None:
    """Box the centred cell of every PBC image and write a crop manifest for the classifier (content-hashed splits).

    Example: smear data pbc --out runs/prepared/pbc
    """
    from smear.configs.paths import resolve_path
    from smear.data.complete import list_fields
    from smear.data.pbc import build_pbc_manifest
    from smear.detector.predict import Detector

    det = Detector(weights)
    k = scale if scale == "auto" else float(scale)
    shared = resolve_path(str(source)).parent
    path = build_pbc_manifest(resolve_path(str(source)), out, lambda rgb: det.predict([rgb], conf=0.05, scale=k)[0],
                              limit=limit, fields=list_fields(shared) if fields else ())
    import pandas as pd

    m = pd.read_csv(path)
    typer.echo(m.groupby(["label", "split"]).size().unstack(fill_value=0).to_string())
    typer.echo(f"boxes: " + ", ".join(f"{k} {v}" for k, v in m["box_from"].value_counts().items()))
    typer.echo(f"written: {path}")


@data_app.command("pseudo-label")
def data_pseudo_label(
    base: Path = typer.Option(Path("runs/prepared/bccd-chula/yolo"), "--base", help="YOLO set to start from"),
    out: Path = typer.Option(..., "--out", help="output folder (gets yolo/)"),
    weights: Optional[str] = typer.Option(None, "--weights", help="detector that proposes labels (default: shipped)"),
    conf: float = typer.Option(0.5, "--conf", help="minimum score of an RBC pseudo-label"),
    wbc_conf: float = typer.Option(0.8, "--wbc-conf", help="minimum score of a WBC pseudo-label"),
) -> None:
    """Copy a YOLO set and label the cells its annotators skipped in the training split (val and test untouched).

    Example: smear data pseudo-label --out runs/prepared/bccd-chula-pl
    """
    from smear.configs.paths import resolve_path
    from smear.data.pointlabels import copy_yolo_set, pseudo_label_split
    from smear.detector.predict import Detector

    yolo = copy_yolo_set(resolve_path(str(base)), out)  # a SmearError becomes one line via main()
    det = Detector(weights)
    rows = pseudo_label_split(yolo, lambda rgb, k: det.predict([rgb], conf=min(conf, wbc_conf), scale=k)[0], "train",
                              conf=conf, wbc_conf=wbc_conf)
    added = {g: sum(r[f"pseudo_{g}"] for r in rows) for g in ("RBC", "WBC", "Platelets")}
    typer.echo(f"{len(rows)} training images; labelled boxes {sum(r['labelled'] for r in rows)}; "
               f"pseudo-labels added: " + ", ".join(f"{g} {n}" for g, n in added.items()))
    typer.echo(f"written: {yolo / 'data.yaml'} (per image: {yolo / 'pseudo_labels_train.csv'})")


# ------------------------------------------------------------------ detector

@detector_app.command("train")
def detector_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/detector.yaml)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run's last checkpoint"),
    overrides: List[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train the YOLO detector (checkpoint every epoch; --resume continues).

    Example: smear detector train --config configs/detector.yaml epochs=40 name=v8n-640
    """
    from smear.detector.config import DetectorConfig
    from smear.detector.train import train_detector

    cfg = _load(DetectorConfig, config, overrides or [])
    run = train_detector(cfg, resume=resume)
    typer.echo(f"run folder: {run}")


@detector_app.command("package")
def detector_package(
    run: Path = typer.Argument(..., help="training run folder (runs/detector/NAME)"),
    out: Path = typer.Option(..., "--out", help="model folder to write (e.g. detector/models/NAME)"),
    summary: str = typer.Option("", "--summary", help="one paragraph for the card: what the model is"),
) -> None:
    """Copy a run's best weights into a self-describing model folder with its card (weights.pt, card.json, card.md).

    Example: smear detector package runs/detector/my-run --out detector/models/my-model --summary "..."
    """
    from smear.detector.train import package_detector

    dest = package_detector(run, out, {"summary": summary} if summary else None)
    typer.echo(f"model folder: {dest} (card.json, card.md, weights.pt); run it with --set detector_weights={dest}")


@detector_app.command("evaluate")
def detector_evaluate(
    weights: Optional[Path] = typer.Option(None, "--weights", help="detector .pt or model folder (default: shipped)"),
    split: str = typer.Option("test", "--split", help="val or test"),
    data: Optional[Path] = typer.Option(None, "--data", help="YOLO data.yaml (default: configs' prepared BCCD)"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for metrics.json and plots"),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="image size (default: the model's)"),
    device: str = typer.Option("cpu", "--device"),
    write_card: bool = typer.Option(False, "--write-card", help="store the metrics in the model folder's card "
                                    "(card.json and card.md): <split>_metrics, with command, date and commit"),
) -> None:
    """mAP50, mAP50-95, per-class AP, precision, recall, confusion matrix and PR curves on a split.

    Example: smear detector evaluate --split test --write-card
    """
    import sys

    from smear.detector.evaluate import evaluate_detector, record_metrics

    if split not in ("val", "test", "train"):
        _fail(f"--split {split!r}: expected val or test")
    m = evaluate_detector(weights, split=split, data=data, output=output, imgsz=imgsz, device=device)
    typer.echo(json.dumps(m, indent=2))
    if write_card:
        folder = record_metrics(weights, m, "smear " + " ".join(sys.argv[1:]))
        typer.echo(f"card updated: {folder / 'card.json'}")


@detector_app.command("thresholds")
def detector_thresholds(
    weights: Optional[Path] = typer.Option(None, "--weights", help="detector model folder (default: shipped)"),
    split: str = typer.Option("val", "--split", help="labelled split to choose on (val; never test)"),
    data: Optional[Path] = typer.Option(None, "--data", help="YOLO data.yaml with complete labels"),
    device: str = typer.Option("cpu", "--device"),
    write_card: bool = typer.Option(False, "--write-card", help="store them as the card's operating_thresholds, "
                                    "which 'smear analyze' uses by default"),
) -> None:
    """Choose each group's operating threshold by the count error per image on a labelled split.

    Example: smear detector thresholds --data runs/prepared/complete/yolo/data.yaml --write-card
    """
    import sys

    from smear.detector.evaluate import choose_thresholds, record_thresholds

    res = choose_thresholds(weights, split=split, data=data, device=device)
    for g, r in res["chosen"].items():
        typer.echo(f"{g:<10} threshold {r['threshold']:.2f}  count MAE {r['count_mae']:.3f}  "
                   f"bias {r['count_bias']:+.3f}")
    if write_card:
        folder = record_thresholds(weights, res, "smear " + " ".join(sys.argv[1:]))
        typer.echo(f"card updated: {folder / 'card.json'}")


@detector_app.command("stain-reference")
def detector_stain_reference(
    model: Path = typer.Argument(..., help="detector model folder whose card gets the reference"),
    data: Path = typer.Option(Path("runs/prepared/complete/yolo/data.yaml"), "--data",
                              help="the set the model trained on (its fields.csv names each field's lab and split)"),
    shared: Path = typer.Option(Path("../shared/data"), "--shared", help="the shared data folder (original fields)"),
    every: int = typer.Option(2, "--every", min=1, help="use every n-th training field of each lab"),
    tolerance: float = typer.Option(4.0, "--tolerance", help="fields within this many SDs of a lab's colours are "
                                    "detected as they are"),
) -> None:
    """Store the training labs' colours in a detector's card: fields unlike all of them are stain-normalised.

    Example: smear detector stain-reference runs/detector/loso-no-raabin-wise --data runs/prepared/complete-no-raabin/yolo/data.yaml
    """
    import csv

    from smear.configs.modelcard import ModelCard
    from smear.configs.paths import resolve_path
    from smear.data.complete import list_fields
    from smear.detector.stain import reference_from_fields

    listing = resolve_path(data).parent / "fields.csv"
    if not listing.is_file():
        _fail(f"{listing}: not found; the set the model trained on (smear data complete --out ...) lists its fields there")
    with open(listing, newline="") as f:
        train = {r["image"]: r["source"] for r in csv.DictReader(f) if r["split"] == "train"}
    originals = {f"{f.source}_{f.image.stem}": f.image for f in list_fields(resolve_path(shared))}
    missing = [name for name in train if name not in originals]
    if missing:
        _fail(f"{listing}: {len(missing)} training field(s) not found under {shared} (e.g. {missing[0]})")
    ref = reference_from_fields([(lab, str(originals[name])) for name, lab in train.items()], every, tolerance)
    card = ModelCard.read(model)
    card.set("stain_norm", {**ref.to_card(), "from": f"training fields of {data} (every {every})"})
    card.write(model)
    for lab in ref.labs:
        typer.echo(f"{lab.name}: {lab.fields} fields, L*a*b* mean {lab.mean[:3]} SD {lab.mean[3:]}")
    typer.echo(f"card updated: {Path(model) / 'card.json'}")


@detector_app.command("interpolate")
def detector_interpolate(
    base: Path = typer.Argument(..., help="the model the fine-tune started from (.pt or model folder)"),
    tuned: Path = typer.Argument(..., help="the fine-tuned model (.pt or model folder)"),
    alpha: float = typer.Option(..., "--alpha", help="weight of the tuned model, 0..1 (choose it on val)"),
    out: Path = typer.Option(..., "--out", help="model folder to write"),
) -> None:
    """Average a fine-tuned detector with the one it started from (WiSE-FT); no training.

    Example: smear detector interpolate base.pt runs/detector/ft/weights/best.pt --alpha 0.8 --out runs/detector/wise-0.8
    """
    from smear.detector.interpolate import interpolate_detectors

    typer.echo(f"written: {interpolate_detectors(base, tuned, alpha, out)}")


@detector_app.command("export")
def detector_export(
    weights: Optional[Path] = typer.Option(None, "--weights", help="detector .pt or model folder (default: shipped)"),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
    out: Optional[Path] = typer.Option(None, "--out", help="model folder to write (default: runs/export/NAME-FORMAT)"),
    in_place: bool = typer.Option(False, "--in-place", help="write weights.onnx into the model folder itself, beside "
                                  "weights.pt, and record it in its card: the default runtime (onnx) then runs it"),
) -> None:
    """Export the detector as a model folder (weights + card); run it with --set detector_weights=FOLDER.

    Exporting needs pip install 'smear[onnx]' (the onnx package); nothing is downloaded.

    Examples:

      smear detector export --weights detector/models/my-model --in-place

      smear detector export --format torchscript --out runs/export/my-model-ts
    """
    from smear.detector.export import export_detector

    typer.echo(f"written: {export_detector(weights, format, out, in_place=in_place)}")


# ------------------------------------------------------------------ classifier

TASK_HELP = ("cells: RBC, platelets and WBC subtypes (BCCD crops); wbc-subtypes: the 5 WBC subtypes (BCCD crops); "
             "rbc-morphology: 13 RBC shapes (Chula RBC-12)")


@classifier_app.command("train")
def classifier_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/classifier.yaml; "
                                          "configs/morphology.yaml with task=rbc-morphology)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run's last checkpoint"),
    task: Optional[str] = typer.Option(None, "--task", help="the same as task=TASK"),
    overrides: List[str] = typer.Argument(None, help="task=TASK (" + TASK_HELP + "; default cells) and config "
                                          "overrides as key=value; they win over --config"),
) -> None:
    """Train a classifier of one task with the shared loop (checkpoint every epoch).

    Examples:

      smear classifier train backbone=mobilenet_v2 crop_size_px=128 name=mnv2-128

      smear classifier train task=wbc-subtypes crop_size_px=128 name=sub-128

      smear classifier train task=rbc-morphology threads=1 max_minutes=10
    """
    from smear.classifier.config import load_task_config
    from smear.classifier.train import train
    from smear.configs.loader import parse_overrides

    values = parse_overrides(overrides or [])
    if task is not None and values.get("task", task) != task:
        _fail(f"--task {task} and task={values['task']}: give the task once")
    task = values.pop("task", task)
    folder = train(load_task_config(None if task is None else str(task), config, values), resume=resume)
    typer.echo(f"model folder: {folder}")


@classifier_app.command("package")
def classifier_package(
    model: Path = typer.Argument(..., help="trained model folder (runs/classifier/NAME/model)"),
    out: Path = typer.Option(..., "--out", help="model folder to write (e.g. classifier/models/NAME)"),
    summary: str = typer.Option("", "--summary", help="one paragraph for the card: what the model is"),
) -> None:
    """Copy a trained classifier into a self-describing model folder; its card names the machine and cites the data.

    Example: smear classifier package runs/classifier/my-run/model --out classifier/models/my-model --summary "..."
    """
    from smear.classifier.train import package_classifier

    dest = package_classifier(model, out, {"summary": summary} if summary else None)
    typer.echo(f"model folder: {dest}; use it with --set classifier_weights={dest}")


@classifier_app.command("cascade")
def classifier_cascade(
    model: Path = typer.Argument(..., help="classifier model folder that scores every crop (the primary)"),
    subtyper: Optional[str] = typer.Option(None, "--subtyper", help="model folder of WBC subtypes (a "
                                           "'classes=subtypes' model) that names the subtype of likely WBCs; "
                                           "'none' removes the stage"),
    subtype_min_prob: float = typer.Option(0.5, "--subtype-min-prob", min=0.0, max=1.0,
                                           help="WBC probability from which a crop goes to the subtype stage"),
    refiner: Optional[str] = typer.Option(None, "--refiner", help="model folder with the primary's classes that "
                                          "re-scores the crops of --refine-groups; 'none' removes the stage"),
    refine_groups: str = typer.Option("WBC", "--refine-groups", help="groups re-scored by the refiner, comma-separated"),
    refine_min_prob: float = typer.Option(0.05, "--refine-min-prob", min=0.0, max=1.0,
                                          help="group probability from which a crop goes to the refiner"),
) -> None:
    """Declare a classifier cascade in the primary's card: a subtype stage and/or a refiner, each a model folder
    named by its path relative to the primary. The cascade is loaded before the command ends; a card whose stages
    do not fit is left as it was.

    Example: smear classifier cascade models/my-primary --subtyper models/my-subtypes
    """
    from smear.classifier.export import declare_cascade

    if subtyper is None and refiner is None:
        _fail("give --subtyper and/or --refiner (a model folder, or 'none' to remove the stage)")
    groups = tuple(g.strip() for g in refine_groups.split(",") if g.strip())
    folder = declare_cascade(model, subtyper, refiner, subtype_min_prob, groups, refine_min_prob)
    card = json.loads((folder / "card.json").read_text())
    for role in ("refiner", "subtyper"):
        if card.get(role):
            typer.echo(f"{role}: {card[role]['weights']} (min_prob {card[role]['min_prob']})")
    typer.echo(f"cascade declared in {folder / 'card.json'}; export it again for the onnx runtime: "
               f"smear classifier export --weights {folder}")


@classifier_app.command("ensemble")
def classifier_ensemble(
    members: List[Path] = typer.Argument(..., help="trained model folders of one recipe (same backbone, crop and "
                                         "classes), e.g. runs of it with different seeds"),
    output: Path = typer.Option(..., "--output", help="model folder to write"),
) -> None:
    """Average several classifiers of one recipe into one model folder (the mean of their class probabilities), for
    use wherever a model folder goes: as a cascade stage (smear classifier cascade ... --subtyper OUTPUT), with
    --weights, or exported to ONNX. Each member's run is recorded in the card.

    Example: smear classifier ensemble runs/classifier/sub-192/model runs/classifier/sub-192-s1/model --output models/sub-192x2
    """
    from smear.classifier.export import make_ensemble

    folder = make_ensemble(list(members), output)
    typer.echo(f"model folder: {folder} ({len(members)} networks averaged)")


@classifier_app.command("adapt")
def classifier_adapt(
    cells_dir: Optional[Path] = typer.Argument(None, help="CELLS_DIR/<class>/* cell images of your lab (class folder "
                                               "names as smear names them, any case: neutrophil, lymphocyte, ig, "
                                               "erythroblast, ...)"),
    output: Path = typer.Option(..., "--output", help="model folder to write (weights.pt, card.json, card.md)"),
    base: Optional[str] = typer.Option(None, "--base", help="model folder to start from (default: the shipped "
                                       "multi-lab classifier, multilab-mnv2-128)"),
    fields: Optional[List[str]] = typer.Option(None, "--fields", help="instead of labelled cells: your lab's whole "
                                               "fields, unlabelled (files, folders or globs; repeatable); the subtype "
                                               "stage's batch-norm statistics are re-estimated on the WBCs the "
                                               "detector finds in them. For slides unlike the training labs' "
                                               "(BCCD, PBC): on one of those it lowers accuracy"),
    steps: int = typer.Option(150, "--steps", help="optimisation steps of 32 cells"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
) -> None:
    """Fit the classifier to a lab: fine-tune on its labelled cells (minutes on a CPU; classes without a folder keep
    the base model's knowledge), or, with --fields, re-estimate the subtype stage's statistics on its unlabelled
    fields. Use the result with 'smear classify --weights MODEL_DIR' or
    'smear analyze --set classifier_weights=MODEL_DIR'.

    Examples:

      smear classifier adapt my_cells/ --output models/my-lab

      smear classifier adapt --fields my_slides/ --output models/my-lab-fields
    """
    if output.exists() and any(output.iterdir()):
        _fail(f"{output}: folder exists and is not empty; choose a new --output")
    if (cells_dir is None) == (not fields):
        _fail("give CELLS_DIR (labelled cells) or --fields (unlabelled fields), one of the two")
    if fields:
        from smear.configs.errors import SmearError
        from smear.data.images import expand_inputs, read_image
        from smear.pipeline.adapt import adapt_from_fields

        failed: list[str] = []

        def images():
            for path in expand_inputs(fields):
                try:
                    yield read_image(path)
                except SmearError as e:  # names the file already, as in smear analyze
                    failed.append(str(e))
                except Exception as e:  # noqa: BLE001  one bad file never stops the batch
                    failed.append(f"{path}: {type(e).__name__}: {e}")

        try:
            folder = adapt_from_fields(images(), output, base, source=", ".join(fields))
        finally:
            for bad in failed:
                typer.echo(f"skipped: {bad}", err=True)
        done = json.loads((folder / "card.json").read_text())["batchnorm_adaptation"]
        typer.echo(f"subtype stage's statistics re-estimated on {done['wbcs']} WBCs of {done['fields']} fields "
                   f"({done['minutes']} min); model folder: {folder}\ncheck it on a few labelled cells of your lab "
                   f"before relying on it: smear classify CELLS --weights {folder}")
        return
    from smear.classifier.adapt import AdaptConfig, adapt

    folder = adapt(cells_dir, output, base, AdaptConfig(steps=steps, seed=seed))
    card = json.loads((folder / "card.json").read_text())
    used = card["adapt"]["cells_per_class"]
    typer.echo(f"adapted on {sum(used.values())} cells: " + ", ".join(f"{c} {n}" for c, n in used.items()))
    for bad in card["adapt"]["unreadable"]:
        typer.echo(f"skipped: {bad}", err=True)
    if card.get("subtyper"):
        typer.echo("WBC folders only: the base model still decides RBC / WBC / platelet; the adapted network names "
                   "the subtype of likely WBCs")
    typer.echo(f"model folder: {folder}")


@classifier_app.command("export")
def classifier_export(
    weights: Optional[Path] = typer.Option(None, "--weights", help="classifier or morphology model folder (default: "
                                           "the task's shipped one)"),
    task: str = typer.Option("cells", "--task", help="the shipped folder exported without --weights: cells, "
                             "wbc-subtypes or rbc-morphology"),
) -> None:
    """Write weights.onnx into a model folder (and its cascade's refiner and subtype stage) and record it in the
    card: 'smear analyze' then runs it under ONNX Runtime (runtime: onnx, the default). Needs the onnx package
    (pip install 'smear[onnx]'); run it again after retraining a folder.

    Example: smear classifier export --weights models/my-lab
    """
    from smear.classifier.export import export_classifier

    for f in export_classifier(weights, task):
        typer.echo(f"written: {f}")


@classifier_app.command("evaluate")
def classifier_evaluate(
    weights: Optional[Path] = typer.Option(None, "--weights", help="model folder (default: the task's shipped one)"),
    split: str = typer.Option("test", "--split", help="train, val or test"),
    manifest: Path = typer.Option(Path("runs/prepared/bccd/crops/manifest.csv"), "--manifest",
                                  help="crop manifest from 'smear data prepare' (cells, wbc-subtypes)"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for metrics.json, PNG plots and "
                                          "predictions.csv"),
    task: Optional[str] = typer.Option(None, "--task", help=TASK_HELP + "; default: the --weights folder's own"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Chula RBC-12 folder, if not the card's "
                                             "(rbc-morphology)"),
    write_card: bool = typer.Option(False, "--write-card", help="store the metrics in the model folder's card "
                                    "(card.json and card.md) as <split>_metrics, with date and commit"),
) -> None:
    """Accuracy, balanced accuracy, macro-F1, per-class P/R/F1, confusion matrix and ROC/AUC of a model folder.

    cells and wbc-subtypes are scored on the ground-truth boxes of a manifest split (with the 3-group and
    WBC-subtype figures); rbc-morphology on the model's own held-out Chula images (with normal vs abnormal).

    Examples:

      smear classifier evaluate --split test --output runs/eval/classifier

      smear classifier evaluate --task rbc-morphology --split test --write-card
    """
    from smear.classifier.evaluate import evaluate

    rep = evaluate(weights, split, output, task=task, manifest=manifest, data_root=data_root, write_card=write_card)
    short = {k: rep[k] for k in ("split", "n", "accuracy", "balanced_accuracy", "macro_f1", "subtype",
                                 "normal_vs_abnormal", "per_class", "roc_auc_ovr") if k in rep}
    if "groups" in rep:
        short["groups_accuracy"] = rep["groups"]["accuracy"]
    typer.echo(json.dumps(short, indent=2))
