"""Package a trained classifier folder (any task) as a shipped model: its files, and its card with the
sections added after training (summary, comparison, cascade links), rendered as ``card.md``; and export its
network to ONNX, into the folder itself, for the pipeline's onnx runtime.

``weights.onnx`` takes normalised crops (N, 3, H, W) with a dynamic batch axis and gives logits, as
``weights.pt``'s network does; the card records which file is which runtime's (``runtimes``) and the
SHA-256 of the ``weights.pt`` it came from (``onnx_export``), so a folder retrained since runs on torch
until it is exported again. A cascade's refiner and subtype stage are exported with it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

from smear.configs.errors import SmearError
from smear.configs.paths import git_commit, machine_description
from smear.configs.runtime import ONNX_FILE, TORCH_FILE, export_record

from .model import (CellClassifierEnsemble, ensemble_size, load_network, read_card, resolve_model_folder,
                    save_model_folder, write_model_card)

log = logging.getLogger(__name__)

# Everything a model folder may hold besides weights.pt and the card (split.json: rbc-morphology).
MODEL_FILES = ("weights.pt", "weights.onnx", "history.json", "curves.png", "split.json", "confusion_matrix_test.png")
# The opset this torch's TorchScript-based exporter writes and ONNX Runtime >= 1.17 runs.
OPSET = 17


def package_model(model_folder: str | Path, dest: str | Path, extra: dict | None = None) -> Path:
    """Copy ``model_folder`` (``project/name/model``) to ``dest`` (e.g. the shipped models folder) with its
    card updated by ``extra``.

    Example:
        >>> package_model("runs/classifier/mnv2-48/model", shipped_models_dir() / "bccd-mobilenetv2-48",
        ...               {"summary": "Cascade crop classifier ..."})
    """
    model_folder, dest = Path(model_folder), Path(dest)
    card = json.loads((model_folder / "card.json").read_text())
    card.update(extra or {})
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, dest / name)
    write_model_card(dest, card)
    return dest


def declare_cascade(folder: str | Path, subtyper: str | Path | None = None, refiner: str | Path | None = None,
                    subtype_min_prob: float = 0.5, refine_groups: tuple[str, ...] = ("WBC",),
                    refine_min_prob: float = 0.05) -> Path:
    """Make ``folder`` a cascade: its card names ``subtyper`` (a model of WBC subtypes that shares out the WBC
    probability of crops with at least ``subtype_min_prob`` of it) and/or ``refiner`` (a model of the same classes
    that re-scores crops of ``refine_groups`` with at least ``refine_min_prob``), by paths relative to ``folder``;
    ``"none"`` removes that stage. The cascade is loaded before this returns: if it does not load (classes that do
    not fit, a member without weights), the card is left as it was and the error says why.

    Example:
        >>> declare_cascade("classifier/models/multilab-mnv2-128", subtyper="classifier/models/multilab-subtypes-192")
    """
    import os

    from smear.configs.modelcard import ModelCard
    from smear.data.taxonomy import GROUPS

    from .model import load_classifier

    folder = Path(folder)
    if not (folder / "card.json").is_file():
        raise SmearError(f"{folder}: no card.json; give a classifier model folder")
    unknown = [g for g in refine_groups if g not in GROUPS]
    if refiner is not None and (unknown or not refine_groups):
        raise SmearError(f"refine groups {', '.join(unknown) or '(none)'}: give groups among {', '.join(GROUPS)}")
    before = (folder / "card.json").read_text()
    card = ModelCard.read(folder)
    if card.kind not in ("", "classifier"):
        raise SmearError(f"{folder}: card.json kind is {card.kind!r}; only a classifier takes cascade stages")
    stages = {"subtyper": (subtyper, {"min_prob": subtype_min_prob}),
              "refiner": (refiner, {"groups": list(refine_groups), "min_prob": refine_min_prob})}
    for role, (target, settings) in stages.items():
        if target is None:
            continue
        if str(target).lower() == "none":
            card.extra.pop(role, None)
            continue
        member = Path(target).resolve()
        if member == folder.resolve():
            raise SmearError(f"{target}: the {role} must be another model folder than {folder}")
        card.set(role, {"weights": os.path.relpath(member, folder.resolve()), **settings})
    card.write(folder)
    try:
        load_classifier(folder)
    except SmearError:
        (folder / "card.json").write_text(before)
        write_model_card(folder, json.loads(before))
        raise
    return folder


#: What a member's card says about its own run, kept per member in an ensemble's card
MEMBER_KEYS = ("date", "commit", "machine", "best_epoch", "val_metrics", "train_minutes")
#: Config keys in which ensemble members may differ (their runs' seeds and names)
MEMBER_CONFIG_FREE = ("seed", "name", "max_minutes", "threads", "device")


def make_ensemble(members: list[str | Path], output: str | Path) -> Path:
    """Write ``output``: one model folder whose network averages the class probabilities of ``members`` (trained
    model folders of one architecture, crop and classes, e.g. one recipe run with two seeds). Its ``weights.pt``
    holds every member's weights, its card the first member's config and data, and each member's run (``ensemble``).

    Example:
        >>> make_ensemble(["runs/classifier/sub-192/model", "runs/classifier/sub-192-s1/model"], "models/sub-192x2")

    Raises:
        SmearError: fewer than two members, a member without weights or card, members that differ in
            architecture, crop or classes, or an existing ``output``.
    """
    folders = [resolve_model_folder(m, "", "classifier model", "'smear classifier train'") for m in members]
    if len(folders) < 2:
        raise SmearError("an ensemble needs at least two model folders")
    output = Path(output)
    if output.exists():
        raise SmearError(f"{output}: exists; choose another --output or remove it first")
    cards = [read_card(f, "classifier") for f in folders]
    first = cards[0]

    def fixed(card: dict) -> tuple:
        cfg = {k: v for k, v in card["config"].items() if k not in MEMBER_CONFIG_FREE}
        return card["classes"], json.dumps(cfg, sort_keys=True)

    for folder, card in zip(folders[1:], cards[1:]):
        if ensemble_size(card) > 1:
            raise SmearError(f"{folder}: is an ensemble already; give its members")
        if fixed(card) != fixed(first):
            raise SmearError(f"{folder}: classes or training config differ from {folders[0]}'s (all but "
                             f"{', '.join(MEMBER_CONFIG_FREE)} must match)")
    net = CellClassifierEnsemble([load_network(f, c) for f, c in zip(folders, cards)])
    keep = ("kind", "task", "classes", "config", "data", "split", "data_sources", "subtype_views")
    card = {k: first[k] for k in keep if k in first}
    card.update({
        "title": f"Ensemble of {len(folders)} classifiers ({first['config'].get('backbone')}, "
                 f"{first['config'].get('crop_size_px')} px)",
        "summary": (f"The mean of the class probabilities of {len(folders)} networks of one recipe "
                    f"({', '.join(f.parent.name if f.name == 'model' else f.name for f in folders)})."),
        "ensemble": {"members": [{"folder": str(m), "seed": c["config"].get("seed"),
                                  **{k: c[k] for k in MEMBER_KEYS if k in c}} for m, c in zip(members, cards)]},
    })
    card.update({"date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
                 "machine": first.get("machine") or machine_description("cpu")})
    save_model_folder(output, net, card)
    return output


def _member_folders(folder: Path, card: dict) -> list[Path]:
    """The folder, then the cascade members its card names (refiner, subtype stage), each once."""
    out = [folder]
    for role in ("refiner", "subtyper"):
        if isinstance(card.get(role), dict) and card[role].get("weights"):
            member = (folder / card[role]["weights"]).resolve()
            if member not in out:
                out.append(member)
    return out


def export_folder(folder: Path, commit: str | None = None) -> Path:
    """Write ``folder/weights.onnx`` from its ``weights.pt`` and record it in its card (``commit``: the code's,
    taken before the export changed any card; default now); returns the file."""
    import torch

    card = json.loads((folder / "card.json").read_text())
    net = load_network(folder, card).to(memory_format=torch.contiguous_format)
    size = int(card["config"]["crop_size_px"])
    target = folder / ONNX_FILE
    partial = folder / (ONNX_FILE + ".partial")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the TorchScript-based exporter (ultralytics' too) needs no onnxscript; its deprecation notes are noise
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(net, (torch.zeros(2, 3, size, size),), str(partial), input_names=["crops"],
                              output_names=["logits"], dynamic_axes={"crops": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    except Exception as e:  # noqa: BLE001  a missing exporter package is the usual cause
        partial.unlink(missing_ok=True)
        raise SmearError(f"{folder / TORCH_FILE}: export to ONNX failed ({type(e).__name__}: {e}); "
                         "pip install 'smear[onnx]'") from e
    partial.replace(target)
    card["runtimes"] = {"torch": TORCH_FILE, "onnx": ONNX_FILE}
    card["onnx_export"] = export_record(folder / TORCH_FILE, commit, opset=OPSET, dynamic_axes=["batch"],
                                        input="crops (N, 3, H, W), ImageNet-normalised RGB", output="logits",
                                        torch=torch.__version__.split("+")[0])
    write_model_card(folder, card)
    return target


def export_classifier(weights: str | Path | None = None, task: str = "cells") -> list[Path]:
    """Export a classifier or morphology folder (default: the shipped cell classifier) and its cascade members.

    Returns the ``weights.onnx`` files written.

    Example:
        >>> export_classifier("classifier/models/bccd-mobilenetv2-48")   # and its refiner and subtype stage
    """
    from .model import DEFAULT_MODELS

    folder = resolve_model_folder(weights, DEFAULT_MODELS[task], "classifier model",
                                  f"'smear classifier train task={task}'")
    from smear.configs.paths import git_commit

    card = json.loads((folder / "card.json").read_text())
    members = _member_folders(folder, card)
    for member in members:
        if not (member / TORCH_FILE).is_file():
            raise SmearError(f"{member}: a cascade member named by {folder / 'card.json'} has no {TORCH_FILE}")
    commit = git_commit()  # before the first card is rewritten, which would make the checkout look dirty
    written = []
    for member in members:
        written.append(export_folder(member, commit))
        log.info("wrote %s", written[-1])
    return written
