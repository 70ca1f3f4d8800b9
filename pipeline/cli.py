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
from smear.data.taxonomy import SUBTYPES

from .cli_stages import _fail, _load, classifier_app, data_app, detector_app

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
app.add_typer(data_app, name="data")
app.add_typer(detector_app, name="detector")
app.add_typer(classifier_app, name="classifier")

log = logging.getLogger("smear")


@app.callback()
def main_callback(verbose: bool = typer.Option(False, "--verbose", "-v", help="show debug logging"),
                  quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings and errors")) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)



@app.command("classify")
def classify(
    paths: List[str] = typer.Argument(..., help="cell images (pre-cropped), folders or globs"),
    output: Optional[Path] = typer.Option(None, "--output", help="write DIR/predictions.jsonl"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="classifier model folder (default: shipped)"),
    device: str = typer.Option("cpu", "--device"),
    runtime: str = typer.Option("onnx", "--runtime", help="onnx (the folder's weights.onnx on ONNX Runtime; torch "
                                "where it has none) or torch; another device than cpu runs torch"),
) -> None:
    """Classify pre-cropped cell images (tight, or with a margin up to ~30%).

    Example: smear classify cells/ --output out/
    """
    from smear.classifier.model import load_classifier
    from smear.classifier.predict import classify_files
    from smear.configs.runtime import RUNTIMES, warn_torch_fallbacks
    from smear.data.images import expand_inputs

    files = expand_inputs(paths)
    if not files:
        _fail(f"no images found in {' '.join(paths)}")
    if runtime not in RUNTIMES:
        _fail(f"--runtime {runtime!r}: choose {' or '.join(RUNTIMES)}")
    model = load_classifier(weights, device=device, runtime=runtime if device == "cpu" else "torch")
    warn_torch_fallbacks(model.onnx_fallbacks(), "the same calls")
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
    scale: Optional[str] = typer.Option(None, "--scale", help="'auto' (default: from each image's RBC size) or a "
                                        "resize factor before detection"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/pipeline.yaml)"),
    overrides: List[str] = typer.Option([], "--set", help="config override key=value (repeatable)"),
    fields: bool = typer.Option(True, "--fields/--no-fields", help="with --output, copy each input field into "
                                "OUT/fields/ (smear review cuts its cell crops from them, never from outside OUT)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous run in --output (its results, "
                                   "overlays and field copies are removed first; a folder with a review is refused)"),
    resume: bool = typer.Option(False, "--resume", help="finish an interrupted run in --output: fields whose "
                                "record is there and whose file is unchanged (SHA-256) are not analysed again"),
    engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a pool of Ray actors, the "
                               "same outputs; needs pip install 'smear[ray]')"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="with --engine ray, a running Ray "
                                              "cluster (HOST:PORT; default: a local cluster for this run)"),
) -> None:
    """Find, classify and count cells; differential and flags per image and per slide.

    Examples:

      smear analyze field.jpg

      smear analyze slides/ --output out/ --capture-mode random --set platelet_factor_per_field=15000

      smear analyze slides/ --output out/ --engine ray --ray-address ray-head:6379
    """
    from smear.data.images import expand_inputs

    from .analyze import Analyzer, SlideAggregator, slide_names
    from .config import PipelineConfig
    from .report import ResultWriter, table_header, table_name_width, table_row

    cfg = _load(PipelineConfig, config, overrides, {"conf": conf, "device": device, "batch": batch,
                                                   "capture_mode": capture_mode, "pixel_size_um": pixel_size_um,
                                                   "scale": scale})
    if engine not in ("local", "ray"):
        _fail(f"--engine {engine!r}: choose local or ray")
    if ray_address and engine != "ray":
        _fail("--ray-address goes with --engine ray")
    files = expand_inputs(paths)
    if not files:
        _fail(f"no images found in {' '.join(paths)}")
    if not any(f.is_file() for f in files):  # before any model loads or any output is written
        _fail("nothing to analyse: " + "; ".join(f"{f}: " + ("a folder with no images" if f.is_dir() else "no such file")
                                                 for f in files[:3])
              + (f"; and {len(files) - 3} more" if len(files) > 3 else ""))
    from smear.configs.paths import check_device

    check_device(cfg.device)
    if resume and (overwrite or not output):
        _fail("--resume needs --output (the folder of the interrupted run) and cannot go with --overwrite")
    if engine == "ray":
        from .engine_ray import require_ray

        try:
            require_ray()
        except SmearError as e:
            _fail(str(e))
    previous = None
    if output:
        prepare_output(output, overwrite or resume, keep_records=resume)
    if resume:
        from .resume import PreviousRecords

        previous = PreviousRecords(output)
        logging.getLogger(__name__).info("resuming: %d record(s) of the previous run in %s", len(previous), output)
    ray_engine = None
    if engine == "ray":
        from .engine_ray import RayEngine

        ray_engine = RayEngine(cfg, address=ray_address, render=bool(output))
        ray_engine.start(files, previous)
    try:
        # With --engine ray this process loads no model: the actors' Analyzer says what the slides and run.json
        # need (unless --resume kept every field, so that no actor ran).
        about = ray_engine.describe() if ray_engine else None
        analyzer = SlideAggregator(about["cfg"], about["morphology_diameter_px"]) if about else Analyzer(cfg)
        run_info = about["run_info"] if about else analyzer.provenance()
    except BaseException:
        if ray_engine:
            ray_engine.close()
        raise
    writer = ResultWriter(output, run_info=run_info, fields=fields) if output else None
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

    show_bar = sys.stderr.isatty() and logging.getLogger().getEffectiveLevel() <= logging.INFO  # not with -q
    if ray_engine:
        with ray_engine:
            batch = analyzer.collect_batch(ray_engine.iter_images(show_bar), slide_names(files, paths, slide),
                                           on_result=on_result)
    else:
        batch = analyzer.analyze_batch(files, slide_names(files, paths, slide), on_result=on_result,
                                       progress=show_bar, previous=previous.lookup if previous else None)
    if writer:
        writer.close(slides=batch.slides)
    if previous:
        previous.finish()
        typer.echo(f"resumed: {previous.used} of {batch.n_images} field(s) kept from the interrupted run", err=True)
    if not as_json:
        typer.echo("\n".join(table))
        for s in batch.slides:
            flags = ", ".join(f"{f.name} ({f.severity})" for f in s.flags) or "none"
            d = s.differential
            diff = ", ".join(f"{'IG' if k == 'ImmatureGranulocyte' else k[:3]} {d[k]['percent']}%" for k in SUBTYPES
                             if (d.get(k) or {}).get("percent") is not None)
            if (d.get("nrbc_per_100_wbc") or {}).get("count"):
                diff += f"; NRBC {d['nrbc_per_100_wbc']['per_100_wbc']} per 100 WBCs"
            typer.echo(f"slide {s.slide}: {s.n_fields} fields, counts {s.counts}; differential (n={d['n_wbc']}) "
                       f"{diff or '-'}; flags: {flags}")
        if output:
            typer.echo(f"outputs in {output} (results.jsonl, summary.csv, slides.json, run.json, overlays/, fields/, "
                       f"report.html); check and correct the calls with: smear review {output}")
    if batch.failed:
        typer.echo(f"{len(batch.failed)} of {batch.n_images} file(s) failed:", err=True)
        for r in batch.failed:
            typer.echo(f"  {r.error}", err=True)
        raise typer.Exit(1)


def _info_value(v) -> str:
    """One readable cell of 'smear info': lists joined, metric dicts cut to their scalar headline figures."""
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, list):
        return ", ".join(_info_value(x) for x in v)
    if isinstance(v, dict):
        parts = [f"{k} {_info_value(x)}" for k, x in v.items()
                 if isinstance(x, (int, float, str)) and not (isinstance(x, str) and len(x) > 40)]
        return "; ".join(parts) if parts else "(see --json)"
    return str(v)


@app.command("info")
def info(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The models in use (weights, image size, classes) and their test metrics."""
    from .analyze import Analyzer

    data = Analyzer().info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for stage, d in data.items():
        rows = [(k, _info_value(v)) for k, v in d.items() if v not in (None, {}, [])]
        typer.echo(stage)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"  {k:<{width}}  {v}")


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


#: What 'smear analyze --output' writes: an earlier run's files that --overwrite removes (nothing else is touched)
RUN_OUTPUTS = ("results.jsonl", "results.previous.jsonl", "summary.csv", "slides.json", "slides.csv", "run.json", "report.html", "overlays",
               "fields")


def prepare_output(output: Path, overwrite: bool, keep_records: bool = False) -> None:
    """Refuse an output folder that holds a previous run, unless ``overwrite``; then clear that run's files so no
    stale overlay or field copy stays beside the new ones. A folder with a review (review.sqlite) is never cleared.
    ``keep_records`` (``--resume``) leaves results.jsonl (and the aside file of an interrupted resume) for
    :class:`~smear.pipeline.resume.PreviousRecords`."""
    import shutil

    from .resume import PREVIOUS, RESULTS

    output = Path(output)
    if output.exists() and not output.is_dir():
        _fail(f"{output}: exists and is not a folder")
    previous = [name for name in RUN_OUTPUTS if (output / name).exists()]
    if not previous:
        return
    if not overwrite:
        _fail(f"{output}: holds a previous run ({', '.join(previous)}); pass --overwrite to replace it, --resume to finish it, or choose "
              "another --output")
    if (output / "review.sqlite").exists() or (output / "reviewed").exists():
        _fail(f"{output}: holds a review of the previous run (review.sqlite, reviewed/); move it away before "
              "re-analysing into this folder")
    for name in previous:
        if keep_records and name in (RESULTS, PREVIOUS):
            continue
        path = output / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command("review")
def review(
    out: Path = typer.Argument(..., help="an analysis folder ('smear analyze ... --output OUT')"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; any other than the loopback needs a token"),
    port: int = typer.Option(8765, "--port", help="port to listen on"),
    token: Optional[str] = typer.Option(None, "--token", help="access token (default off the loopback: a random one, "
                                        "printed)"),
    no_browser: bool = typer.Option(False, "--no-browser", help="do not open a browser"),
    export: Optional[Path] = typer.Option(None, "--export", help="no server: write the reviewed cells as DIR/<class>/"
                                          "*.png crops (for 'smear classifier adapt') and DIR/voc/ fields"),
) -> None:
    """Check every call of an analysis folder in a local page: correct, accept, sign a slide off.

    Corrections live in OUT/review.sqlite; a signed-off slide is written to OUT/reviewed/<slide>.json.

    Examples:

      smear review out/

      smear review out/ --export reviewed_cells/
    """
    if export is not None:
        from .review.export import export_reviewed

        done = export_reviewed(out, export)
        typer.echo(f"exported {sum(done['cells'].values())} cells (" + ", ".join(f"{c} {n}" for c, n in
                   sorted(done["cells"].items())) + f") and {done['fields']} fields to {export}")
        for line in done["skipped"]:
            typer.echo(f"skipped: {line}", err=True)
        return
    try:
        import uvicorn

        from .review.app import create_app
    except ImportError as e:
        _fail(f"smear review needs the review extra: pip install 'smear[review]' ({e})")
    if host not in LOOPBACK and not token:
        import secrets

        token = secrets.token_urlsafe(16)
    app_ = create_app(out, token)  # a SmearError (no results.jsonl) is one line via main()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/" + (f"?token={token}" if token else "")
    typer.echo(f"smear review of {Path(out).resolve()} at {url}  (Ctrl+C stops; corrections are saved as you go)")
    if not no_browser:
        import threading
        import webbrowser

        threading.Timer(1.0, webbrowser.open, (url,)).start()
    uvicorn.run(app_, host=host, port=port, log_level="warning")


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
