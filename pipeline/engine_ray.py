"""``smear analyze --engine ray``: fields analysed by a pool of Ray actors, outputs written by the driver.

A Ray Data pipeline: the inputs become rows of one detector batch each (``cfg.batch`` paths in input order, as
:meth:`Analyzer.iter_images` groups them, so each field is detected and classified in the same company as by the local
engine and its record is byte for byte the same); ``map_batches`` on a fixed pool of actors, each holding one loaded
:class:`~smear.pipeline.analyze.Analyzer`, turns a row into its fields' records (JSON, with their input index) and,
when there is an output folder, their pictures (:func:`~smear.pipeline.report.render_field`: overlay PNG, thumbnail,
WBC crops), drawn where the field was decoded. An actor's first record also carries what its Analyzer resolved
(:meth:`Analyzer.describe`: settings with the detector card's thresholds, the morphology model's cell size, run.json's
provenance). So the driver loads no model and decodes no field: it takes the records back in input order and hands
``(result, rendering)`` to :meth:`SlideAggregator.collect_batch`, as the local engine does: one writer, the same output
folder.

The actors read the fields by path (``ray.data.read_binary_files`` would stop the whole dataset at the first missing
file, where smear writes an error record and goes on): on a cluster of several machines every node must see the inputs
at the same path (a shared file system), and the driver must see them too.

Example:
    >>> engine = RayEngine(cfg, address="ray-head:6379", render=True)
    >>> engine.start(paths)
    >>> about = engine.describe()  # the actors' Analyzer: cfg, morphology_diameter_px, run_info
    >>> aggregator = SlideAggregator(about["cfg"], about["morphology_diameter_px"])
    >>> batch = aggregator.collect_batch(engine.iter_images(), slides_of, on_result=writer.add)
    >>> engine.close()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import queue
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from smear.configs.errors import SmearError

from .config import PipelineConfig
from .progress import progress_bar
from .report import FieldRendering
from .results import ImageResult
from .resume import PreviousRecords

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'smear[ray]'"
_DONE = object()  # the consumer thread's last item


def require_ray() -> None:
    """Raise a one-line :class:`SmearError` naming the install command when Ray Data cannot be imported."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as e:
        raise SmearError(f"--engine ray needs Ray Data, which is not installed ({e}); install it with: "
                         f"{INSTALL_HINT}") from None


class FieldAnalyzer:
    """A Ray Data actor: one :class:`Analyzer` loaded once, then one detector batch of fields per call.

    Each output row is one field: ``index`` (its input index), ``record`` (JSON), ``rendering`` (a pickled
    :class:`~smear.pipeline.report.FieldRendering`, empty without ``render`` or for a failed field) and ``about``
    (a pickled :meth:`Analyzer.describe` on the actor's first row, else empty).
    """

    def __init__(self, cfg: PipelineConfig, cwd: str | None = None, render: bool = False,
                 torch_threads: int | None = None):
        from smear.configs.offline import ensure_offline, use_cpu_threads

        ensure_offline()
        if cwd and os.path.isdir(cwd):  # relative input paths mean what they meant to the driver
            os.chdir(cwd)
        from .analyze import Analyzer

        self.analyzer = Analyzer(cfg)
        if torch_threads and self.analyzer.torch_fallbacks:  # a model without ONNX weights: torch's sums depend on
            use_cpu_threads(torch_threads)                    # its thread count, so it gets the local engine's
        self.render = render
        self.about: bytes | None = pickle.dumps(self.analyzer.describe())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .report import render_field

        out: dict[str, list] = {"index": [], "record": [], "rendering": [], "about": []}
        for fields in batch["fields"]:
            pairs = json.loads(fields)  # [[input index, path], ...]: one detector batch, as the local engine's
            for (index, _), (result, image) in zip(pairs, self.analyzer.iter_images([p for _, p in pairs])):
                out["index"].append(index)
                out["record"].append(json.dumps(result.to_dict()))
                rendering = render_field(image, result) if self.render and image is not None and not result.error \
                    else None
                out["rendering"].append(pickle.dumps(rendering) if rendering is not None else b"")
                out["about"].append(self.about or b"")
                self.about = None
        return {"index": np.array(out["index"], dtype=np.int64), "record": np.array(out["record"], dtype=object),
                "rendering": np.array(out["rendering"], dtype=object), "about": np.array(out["about"], dtype=object)}


def actor_threads(cfg: PipelineConfig) -> tuple[int, int]:
    """``(threads per actor, torch threads)``: the records must be the local engine's to the last digit.

    ONNX Runtime's outputs do not depend on its thread count (measured on 2026-12-02: the 72 BCCD test fields'
    records byte-identical with 1 and 2 threads), so with the onnx runtime on the CPU each actor runs one thread, one
    actor per CPU (one thread per actor spends 12% less CPU per field than two, and the actors overlap their
    single-threaded steps). torch's sums do depend on it (the same fields' records differ in the last digits), so a
    model on torch runs the local engine's count: ``cfg.threads``, or one per core of this machine. A thread count
    set in the settings is kept for both.
    """
    local = cfg.threads or os.cpu_count() or 1
    if cfg.threads:
        return cfg.threads, cfg.threads
    return (1 if cfg.runtime == "onnx" and cfg.device == "cpu" else local), local


def pool_size(cluster_cpus: int, threads_per_actor: int) -> int:
    """Actors for a cluster of ``cluster_cpus``: one per ``threads_per_actor`` CPUs, at least one."""
    return max(1, cluster_cpus // max(1, threads_per_actor))


class RayEngine:
    """Analyse fields on a Ray cluster: a local one sized to this machine, or the one at ``address``.

    Args:
        cfg: the pipeline config, as for :class:`Analyzer`; ``threads`` is each actor's torch thread count (0: one
            per core of this machine, as the local engine would use).
        address: a running cluster (``ray start --head`` prints it); None starts a local cluster for this run.
        actors: actors in the pool (default: the cluster's CPUs divided by the threads per actor).
        render: the actors also draw each field's pictures for an output folder (:meth:`iter_images` then gives a
            :class:`~smear.pipeline.report.FieldRendering` in place of the image).
    """

    def __init__(self, cfg: PipelineConfig, address: str | None = None, actors: int | None = None,
                 render: bool = False):
        require_ray()
        self.cfg = cfg
        self.address = address
        self.actors = actors
        self.render = render
        self._about: dict | None = None
        self._described = threading.Event()
        self._started_ray = False
        self._paths: list[str] = []
        self._digests: list[str | None] = []
        self._previous: PreviousRecords | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ the cluster

    def _connect(self) -> None:
        import ray

        if ray.is_initialized():  # a cluster this process already joined (tests, notebooks): use it, leave it
            return
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # nothing leaves the machine
        # Ray's own notices (token auth, disabled progress bars, each execution's timing) only with smear -v.
        level = logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        common = {"log_to_driver": False, "logging_level": level, "include_dashboard": False}
        if self.address:
            ray.init(address=self.address, **common)
        else:
            ray.init(num_cpus=os.cpu_count(), **common)
        self._started_ray = True

    def close(self) -> None:
        """Stop the consumer thread and leave (or stop, when this engine started it) the cluster."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a thread waiting to put into a full queue
                try:
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the work

    def start(self, paths: Sequence[str | Path], previous: PreviousRecords | None = None) -> None:
        """Start analysing ``paths`` in the background (the caller may load its own models meanwhile).

        With ``previous`` (``--resume``), a field whose earlier record matches its file's SHA-256 is not sent.
        """
        from smear.data.images import file_sha256

        self._paths = [str(p) for p in paths]
        self._previous = previous
        self._digests = [file_sha256(p) for p in self._paths] if previous else []
        batch = self.cfg.batch
        chunks: list[str] = []
        for start in range(0, len(self._paths), batch):  # the local engine's detector batches, kept fields left out
            todo = [[i, self._paths[i]] for i in range(start, min(start + batch, len(self._paths)))
                    if not (previous and previous.matches(self._paths[i], self._digests[i]))]
            if todo:
                chunks.append(json.dumps(todo))
        if not chunks:
            self._queue.put(_DONE)
            return
        self._connect()
        dataset = self._dataset(chunks)
        self._thread = threading.Thread(target=self._consume, args=(dataset,), name="smear-ray-results", daemon=True)
        self._thread.start()

    def _dataset(self, chunks: list[str]):
        import ray
        import ray.data

        # Ray Data logs an actor's failure with its full stack trace; smear says it in one line (-v shows Ray's logs)
        logging.getLogger("ray.data").setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # smear draws its own bar over the fields
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        cluster_cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads, torch_threads = actor_threads(self.cfg)
        size = min(self.actors or pool_size(cluster_cpus, threads), len(chunks))
        cpus_per_actor = min(float(threads), cluster_cpus / size)
        actor_cfg = dataclasses.replace(self.cfg, threads=threads)
        log.info("ray engine: %d actor(s), %d torch thread(s) each, on %d cluster CPU(s); %d detector batch(es)",
                 size, threads, cluster_cpus, len(chunks))
        # On a cluster of several machines a lost actor is made again and its batches retried (Ray Data's default);
        # on this machine an actor that died (out of memory, most likely) would die again: the run stops, and
        # --resume finishes it.
        restarts = {} if self.address else {"max_restarts": 0}
        items = [{"fields": c} for c in chunks]
        with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                FieldAnalyzer, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=cpus_per_actor, fn_constructor_kwargs={"cfg": actor_cfg, "cwd": os.getcwd(),
                                                                "render": self.render,
                                                                "torch_threads": torch_threads}, **restarts)

    def _consume(self, dataset) -> None:
        try:
            for row in dataset.iter_rows():
                if self._stop.is_set():
                    return
                if row["about"] and self._about is None:
                    self._about = pickle.loads(row["about"])
                    self._described.set()
                self._queue.put((int(row["index"]), row["record"], row["rendering"]))
            self._queue.put(_DONE)
        except BaseException as e:  # noqa: BLE001  raised again in the caller's thread
            self._error = _cause(e)
            self._queue.put(self._error)
        finally:
            self._described.set()

    def describe(self) -> dict | None:
        """What the actors' :class:`Analyzer` resolved (:meth:`Analyzer.describe`), once the first record is back;
        None when no field was sent (every one kept by ``--resume``). An actor that could not load its models
        raises its error here."""
        if self._thread is None:
            return None
        self._described.wait()
        if self._about is None and self._error is not None:
            raise self._error
        return self._about

    def iter_images(self, progress: bool = False) -> Iterator[tuple[ImageResult, np.ndarray | FieldRendering | None]]:
        """``(result, picture)`` per path given to :meth:`start`, in input order, as soon as its turn comes.

        Records of kept fields (``--resume``) come from the earlier run, with their field read again here (for the
        writer to draw); every other record is an actor's, with the pictures it drew (``render``), else None.
        """
        from smear.data.images import read_image

        pending: dict[int, tuple[str, bytes]] = {}  # records that came before their turn
        finished = False
        bar = progress_bar(len(self._paths), "analyze", progress)
        try:
            for index, path in enumerate(self._paths):
                result = None
                if self._previous is not None:
                    result = self._previous.lookup(path, self._digests[index])
                while result is None and index not in pending:
                    if finished:
                        raise SmearError(f"the Ray actors returned no record for {path}; run again (--resume keeps "
                                         "the fields already written)")
                    item = self._queue.get()
                    if item is _DONE:
                        finished = True
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        pending[item[0]] = item[1:]
                picture = None
                if result is None:
                    record, rendering = pending.pop(index)
                    result = ImageResult.from_dict(json.loads(record))
                    picture = pickle.loads(rendering) if rendering else None
                elif not result.error and self.render:
                    try:
                        picture = read_image(path)
                    except Exception as e:  # noqa: BLE001  changed since the first run read it: the record counts
                        log.warning("%s: could not be read again for its overlay: %s", path, e)
                yield result, picture
                if bar:
                    bar.update(1)
        finally:
            if bar:
                bar.close()


def _cause(error: BaseException) -> BaseException:
    """The error an actor raised, out of Ray's wrappers (an actor that failed to start is an ``ActorDiedError``
    holding a ``RayTaskError`` holding the error; each adds the remote traceback to its message): smear's own one-line
    errors stay one line."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SmearError) and type(e).__module__.startswith("smear"):
            return e
        inner = [getattr(e, "cause", None), e.__cause__, e.__context__, *e.args]
        todo += [x for x in inner if isinstance(x, BaseException)]
    return error
