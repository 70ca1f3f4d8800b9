"""The ``smear`` command line: parse, call one library function, print.

Heavy imports (torch, ultralytics) happen inside commands so ``smear --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from smear.configs.errors import SmearError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="smear: find, classify and count blood cells in peripheral smear images, with the WBC differential and "
         "evidence-backed warning flags (decision support, not diagnosis).\n\n"
         "Examples:\n\n"
         "  smear analyze field.jpg\n\n"
         "  smear analyze slides/ --output out/ --capture-mode wbc-centred\n\n"
         "  smear data prepare --source ../shared/data/bccd --out runs/prepared/bccd\n\n"
         "  smear detector train epochs=40 imgsz=640\n\n"
         "  smear classifier evaluate --split test",
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data from labelled sources.")
detector_app = typer.Typer(no_args_is_help=True, help="Train, evaluate and export the YOLO cell detector.")
classifier_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the crop classifier.")
app.add_typer(data_app, name="data")
app.add_typer(detector_app, name="detector")
app.add_typer(classifier_app, name="classifier")

log = logging.getLogger("smear")

OVERRIDES_HELP = "config overrides as key=value (e.g. epochs=40 imgsz=640); they win over --config"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"smear: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def main_callback(verbose: bool = typer.Option(False, "--verbose", "-v", help="show debug logging"),
                  quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings and errors")) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


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

    from smear.classifier.morphology import resolve_morphology_folder
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


@detector_app.command("evaluate")
def detector_evaluate(
    weights: Optional[Path] = typer.Option(None, "--weights", help="detector .pt or model folder (default: shipped)"),
    split: str = typer.Option("test", "--split", help="val or test"),
    data: Optional[Path] = typer.Option(None, "--data", help="YOLO data.yaml (default: configs' prepared BCCD)"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for metrics.json and plots"),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="image size (default: the model's)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """mAP50, mAP50-95, per-class AP, precision, recall, confusion matrix and PR curves on a split."""
    from smear.detector.evaluate import evaluate_detector

    if split not in ("val", "test", "train"):
        _fail(f"--split {split!r}: expected val or test")
    m = evaluate_detector(weights, split=split, data=data, output=output, imgsz=imgsz, device=device)
    typer.echo(json.dumps(m, indent=2))


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
) -> None:
    """Export the detector as a model folder (weights + card); run it with --set detector_weights=FOLDER.

    ONNX needs pip install 'smear[onnx]' (onnx to export, onnxruntime to run); nothing is downloaded.
    """
    from smear.detector.export import export_detector

    typer.echo(f"written: {export_detector(weights, format, out)}")


# ------------------------------------------------------------------ classifier

TASK_HELP = "cells: RBC/platelets/WBC subtypes on BCCD; rbc-morphology: 13 RBC shapes on Chula RBC-12"


def _check_task(task: str) -> None:
    if task not in ("cells", "rbc-morphology"):
        _fail(f"--task {task!r}: expected cells or rbc-morphology")


@classifier_app.command("train")
def classifier_train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/classifier.yaml, "
                                          "configs/morphology.yaml)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run's last checkpoint"),
    task: str = typer.Option("cells", "--task", help=TASK_HELP),
    overrides: List[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Train the crop classifier (two phases, as in the study; checkpoint every epoch).

    Examples:

      smear classifier train backbone=mobilenet_v2 crop_size_px=128 name=mnv2-128

      smear classifier train --task rbc-morphology threads=1
    """
    _check_task(task)
    if task == "rbc-morphology":
        from smear.classifier.morphology import MorphologyConfig, train_morphology

        folder = train_morphology(_load(MorphologyConfig, config, overrides or []), resume=resume)
    else:
        from smear.classifier.config import ClassifierConfig
        from smear.classifier.train import train_classifier

        folder = train_classifier(_load(ClassifierConfig, config, overrides or []), resume=resume)
    typer.echo(f"model folder: {folder}")


@classifier_app.command("evaluate")
def classifier_evaluate(
    weights: Optional[Path] = typer.Option(None, "--weights", help="classifier model folder (default: shipped)"),
    split: str = typer.Option("test", "--split", help="val or test"),
    manifest: Path = typer.Option(Path("runs/prepared/bccd/crops/manifest.csv"), "--manifest",
                                  help="crop manifest from 'smear data prepare'"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for metrics.json and PNG plots"),
    task: str = typer.Option("cells", "--task", help=TASK_HELP),
) -> None:
    """Accuracy, per-class P/R/F1, confusion matrix, ROC/AUC (7 classes and 3 groups) on ground-truth boxes.

    With --task rbc-morphology: per-class P/R/F1, macro-F1, confusion matrix and normal-vs-abnormal ROC
    on the model's own held-out Chula images.
    """
    _check_task(task)
    if task == "rbc-morphology":
        from smear.classifier.morphology import evaluate_morphology

        rep = evaluate_morphology(weights, split, output)
        typer.echo(json.dumps({k: rep[k] for k in ("n", "accuracy", "macro_f1", "normal_vs_abnormal", "per_class")
                               if k in rep}, indent=2))
        return
    from smear.classifier.evaluate import evaluate_classifier

    m = evaluate_classifier(weights, manifest, split, output)
    short = {k: m[k] for k in ("split", "n", "accuracy", "balanced_accuracy") if k in m}
    short["groups_accuracy"] = m["groups"]["accuracy"]
    short["subtype"] = m.get("subtype")
    short["per_class"] = m["per_class"]
    short["roc_auc_ovr"] = m.get("roc_auc_ovr")
    typer.echo(json.dumps(short, indent=2))


@app.command("classify")
def classify(
    paths: List[str] = typer.Argument(..., help="cell images (pre-cropped), folders or globs"),
    output: Optional[Path] = typer.Option(None, "--output", help="write DIR/predictions.jsonl"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="classifier model folder (default: shipped)"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Classify pre-cropped cell images (tight, or with a margin up to ~30%).

    Example: smear classify cells/ --output out/
    """
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_files
    from smear.data.images import expand_inputs

    files = expand_inputs(paths)
    if not files:
        _fail(f"no images found in {' '.join(paths)}")
    model = load_classifier(weights, device=device)
    records = classify_files(model, files)
    failed = [r for r in records if r.get("error")]
    if output:
        output.mkdir(parents=True, exist_ok=True)
        from .report import atomic_write_text

        atomic_write_text(output / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        typer.echo(f"{len(records)} predictions written to {output / 'predictions.jsonl'}")
    else:
        w = min(50, max(len(Path(r["image"]).name) for r in records))
        typer.echo(f"{'image':<{w}} {'label':<11} score")
        for r in records:
            name = Path(r["image"]).name[:w]
            typer.echo(f"{name:<{w}} ERROR: {r['error']}" if r.get("error") else f"{name:<{w}} {r['label']:<11} {r['score']:.3f}")
    if failed:
        typer.echo(f"{len(failed)} file(s) failed:", err=True)
        for r in failed:
            typer.echo(f"  {r['error']}", err=True)
        raise typer.Exit(1)


# ------------------------------------------------------------------ analyze / info

@app.command("analyze")
def analyze(
    paths: List[str] = typer.Argument(..., help="images, folders (recursive) or globs; JPEG, PNG, TIFF, BMP"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write results.jsonl, summary.csv, slides.json, run.json, overlays/ and report.html here"),
    as_json: bool = typer.Option(False, "--json", help="print the records as JSON lines on stdout"),
    slide: Optional[str] = typer.Option(None, "--slide", help="slide name for all inputs (default: one slide per "
                                        "sub-folder of a folder input)"),
    conf: Optional[float] = typer.Option(None, "--conf", help="minimum detection score kept, one for every class "
                                         "unless --set class_conf=... is given too (0.001: full ranked list)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda:0, mps"),
    batch: Optional[int] = typer.Option(None, "--batch", help="images per detector batch"),
    capture_mode: Optional[str] = typer.Option(None, "--capture-mode", help="wbc-centred (BCCD) or random fields"),
    pixel_size_um: Optional[float] = typer.Option(None, "--pixel-size-um", help="micrometres per pixel of the inputs"),
    scale: Optional[float] = typer.Option(None, "--scale", help="resize factor before detection"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/pipeline.yaml)"),
    overrides: List[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
) -> None:
    """Find, classify and count cells; differential and flags per image and per slide.

    Examples:

      smear analyze field.jpg

      smear analyze slides/ --output out/ --capture-mode random --set platelet_factor_per_field=15000
    """
    from smear.data.images import expand_inputs

    from .analyze import Analyzer, slide_names
    from .config import PipelineConfig
    from .report import ResultWriter, table_header, table_name_width, table_row

    cfg = _load(PipelineConfig, config, overrides, {"conf": conf, "device": device, "batch": batch,
                                                   "capture_mode": capture_mode, "pixel_size_um": pixel_size_um,
                                                   "scale": scale})
    files = expand_inputs(paths)
    if not files:
        _fail(f"no images found in {' '.join(paths)}")
    analyzer = Analyzer(cfg)
    writer = ResultWriter(output, run_info=analyzer.provenance()) if output else None
    # Each result is written and dropped as it comes (memory flat over any batch); only its table
    # line is kept, to print the table after the progress bar as before.
    name_width = table_name_width(str(f) for f in files)
    table = [table_header(name_width)]

    def on_result(result, image):
        if writer:
            writer.add(result, image)
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
        else:
            table.append(table_row(result, name_width))

    batch = analyzer.analyze_batch(files, slide_names(files, paths, slide), on_result=on_result,
                                   progress=sys.stderr.isatty())
    if writer:
        writer.close(slides=batch.slides)
    if not as_json:
        typer.echo("\n".join(table))
        for s in batch.slides:
            flags = ", ".join(f"{f.name} ({f.severity})" for f in s.flags) or "none"
            d = s.differential
            diff = ", ".join(f"{k[:3]} {d[k]['percent']}%" for k in d if k != "n_wbc" and d[k]["percent"] is not None)
            typer.echo(f"slide {s.slide}: {s.n_fields} fields, counts {s.counts}; differential (n={d['n_wbc']}) "
                       f"{diff or '-'}; flags: {flags}")
        if output:
            typer.echo(f"outputs in {output} (results.jsonl, summary.csv, slides.json, run.json, overlays/, report.html)")
    if batch.failed:
        typer.echo(f"{len(batch.failed)} of {batch.n_images} file(s) failed:", err=True)
        for r in batch.failed:
            typer.echo(f"  {r.error}", err=True)
        raise typer.Exit(1)


@app.command("info")
def info(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The models in use (weights, image size, classes) and their test metrics."""
    from .analyze import Analyzer

    data = Analyzer().info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for stage, d in data.items():
        typer.echo(f"{stage}:")
        for k, v in d.items():
            typer.echo(f"  {k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")


@app.command("annotate")
def annotate(
    directory: Path = typer.Argument(..., help="folder of images (walked recursively)"),
    output: Optional[Path] = typer.Option(None, "--output", help="annotation folder (default: DIR/annotations)"),
    format: str = typer.Option("voc", "--format", help="voc, yolo or coco"),
    labels: str = typer.Option("groups", "--labels", help="groups (RBC/WBC/Platelets) or subtypes"),
    conf: float = typer.Option(0.25, "--conf", help="minimum score kept"),
    overwrite: bool = typer.Option(False, "--overwrite", help="re-annotate images smear annotated before"),
    force: bool = typer.Option(False, "--force", help="with --overwrite, also replace files a person edited"),
) -> None:
    """Pre-annotate new slides for review (VOC, YOLO or COCO); resumable and safe to re-run."""
    try:
        from .annotate import annotate_folder
    except ImportError:
        _fail("annotate is not implemented yet (issue 7)", code=2)
    summary = annotate_folder(directory, output, format=format, labels=labels, conf=conf, overwrite=overwrite,
                              force=force)
    typer.echo(summary.text())
    if summary.failed:
        raise typer.Exit(1)


@app.command("benchmark")
def benchmark(
    data: Optional[Path] = typer.Option(None, "--data", help="labelled set: VOC folder, YOLO data.yaml or COCO json "
                                        "(default: ../shared/data/bccd)"),
    split: str = typer.Option("test", "--split", help="split to score"),
    output: Path = typer.Option(Path("runs/benchmark"), "--output", help="folder for cells.csv, images.csv, summary"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML pipeline config (configs/pipeline.yaml)"),
    overrides: List[str] = typer.Option([], "--set", help="pipeline config override key=value (repeatable), e.g. "
                                        "class_conf=Platelets=0.5 to score another operating point"),
) -> None:
    """Cell-level and image-level evaluation, with detector-versus-classifier error attribution."""
    from .benchmark import run_benchmark
    from .config import PipelineConfig

    summary = run_benchmark(data, split, output, cfg=_load(PipelineConfig, config, overrides))
    typer.echo(summary)


def main() -> None:
    """Console entry point: SmearError becomes one line on stderr and exit code 1."""
    try:
        app()
    except SmearError as e:
        typer.echo(f"smear: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("smear: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
