"""Stored benchmark results: one tidy CSV per benchmark in ``benchmarks/results``, appended run by run.

Every row starts with the standard columns of the run that wrote it, then the benchmark's own:

- ``date``: when the run started (ISO, to the second; rows converted from older files carry the
  day of the commit that stored them);
- ``commit``: the code that ran (``+dirty`` when the checkout had uncommitted changes);
- ``machine``: CPU model and CPU count, plus the GPU's name on a CUDA device (rows converted
  from older files: the GPU's name where they named it, else empty);
- ``device``: the torch device (``cpu``, ``cuda``);
- ``variant``: what was run (a model, a recipe, an option set), named by the script's ``--variant``;
- ``seed``: the random seed where one matters, else empty.

A run appends its rows; when it brings a column the table lacks, the table is rewritten with the
union of the columns (older rows get empty cells), so a benchmark stays one table. A script takes
its stamp when the run starts (:func:`run_stamp`), so rows appended over a long run keep one date
and the commit of the code that ran. A run is named ``VARIANT[:SEED[:DEVICE]]`` where a script
reads stored rows back (:func:`latest_run`).
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STANDARD = ("date", "commit", "machine", "device", "variant", "seed")


def results_csv(benchmark: str) -> Path:
    """``benchmarks/results/<benchmark>.csv``."""
    return RESULTS / f"{benchmark}.csv"


def machine(device: str = "cpu") -> str:
    """CPU model and the CPUs this process may use; on a CUDA device, the GPU's name too (model cards say the same)."""
    from smear.configs.paths import machine_description

    return machine_description(device)


def model_name(weights: str | os.PathLike | None) -> str:
    """A default variant for a model given as a path: its run or model folder's name; ``shipped`` for none."""
    if not weights:
        return "shipped"
    p = Path(weights)
    if p.suffix and p.stem not in ("weights", "best", "last", "model"):
        return p.stem
    if p.suffix:
        p = p.parent
    while p.name in ("weights", "model") and p.parent != p:
        p = p.parent
    return p.name or "shipped"


def run_stamp(variant: str, seed: int | str = "", device: str = "cpu") -> dict:
    """The standard columns of a run, taken when it starts."""
    from smear.configs.paths import git_commit

    return {"date": datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
            "machine": machine(device), "device": device, "variant": variant, "seed": "" if seed is None else seed}


def read_rows(path: str | os.PathLike, **match) -> list[dict]:
    """The rows of a stored table (values as text), those whose columns equal ``match`` when given."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    want = {k: str(v) for k, v in match.items() if v is not None}
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def _header(path: Path) -> list[str]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def append_rows(path: str | os.PathLike, rows: list[dict], variant: str | None = None, seed: int | str = "",
                device: str = "cpu", *, stamp: dict | None = None) -> Path:
    """Append a run's rows to a benchmark's table, each after the standard columns of the run.

    Args:
        path: the table, ``benchmarks/results/<benchmark>.csv`` (:func:`results_csv`).
        rows: the benchmark's own columns, one dict per row; they may not hold a standard column.
        variant, seed, device: the run, stamped now; or ``stamp``, taken by :func:`run_stamp` when the run began.

    Returns:
        ``path``. A column new to the table rewrites it (atomically) with the union of the columns.
    """
    if stamp is None:
        if variant is None:
            raise TypeError("append_rows: give the variant (or a stamp from run_stamp)")
        stamp = run_stamp(variant, seed, device)
    clash = sorted({k for r in rows for k in r} & set(STANDARD))
    if clash:
        raise ValueError(f"append_rows: rows may not hold the standard columns {clash}; the stamp gives them")
    path = Path(path)
    new = [{**{c: stamp[c] for c in STANDARD}, **r} for r in rows]
    if not new:
        return path
    header = _header(path)
    columns = list(STANDARD) + [c for c in header if c not in STANDARD]
    for r in new:
        columns += [c for c in r if c not in columns]
    if header == columns:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=columns, restval="").writerows(new)
        return path
    from smear.pipeline.report import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(read_rows(path) + new)
    atomic_write_text(path, buf.getvalue())
    return path


def parse_run(spec: str) -> tuple[str, str | None, str | None]:
    """``VARIANT[:SEED[:DEVICE]]`` -> (variant, seed or None, device or None)."""
    variant, seed, device = (spec.split(":") + [None, None])[:3]
    return variant, seed or None, device or None


def latest_run(rows: list[dict], spec: str) -> list[dict]:
    """The rows of the last stored run (in file order) named ``VARIANT[:SEED[:DEVICE]]``.

    A table without the standard columns is one run: all its rows. Runs that differ only in date,
    commit or machine are repeats, and the last one counts.

    Raises:
        ValueError: no run of that name, or runs of several seeds or devices where the name gives none.
    """
    if rows and "variant" not in rows[0]:
        return rows
    variant, seed, device = parse_run(spec)
    match = [r for r in rows if r["variant"] == variant and seed in (None, r["seed"]) and device in (None, r["device"])]
    if not match:
        raise ValueError(f"no stored run {spec!r}; runs: {', '.join(sorted(run_names(rows))) or 'none'}")
    kinds = {(r["seed"], r["device"]) for r in match}
    if len(kinds) > 1:
        raise ValueError(f"{spec!r} names runs of several seeds or devices ({', '.join(sorted(run_names(match)))}); "
                         "give VARIANT:SEED:DEVICE")
    last = tuple(match[-1][c] for c in STANDARD)
    return [r for r in match if tuple(r[c] for c in STANDARD) == last]


def run_names(rows: list[dict]) -> set[str]:
    """``VARIANT:SEED:DEVICE`` of each stored run in ``rows``."""
    return {f"{r['variant']}:{r['seed']}:{r['device']}" for r in rows}
