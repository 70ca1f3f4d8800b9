"""Cell classes: detector groups, WBC subtypes, and the canonical spelling of a label."""

from __future__ import annotations

GROUPS = ("RBC", "WBC", "Platelets")


SUBTYPES = ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil")


CELL_CLASSES = ("RBC", "Platelets") + SUBTYPES


_NAME_ALIASES = {"rbc": "RBC", "wbc": "WBC", "platelets": "Platelets", "platelet": "Platelets", "plt": "Platelets"}


def group_of(label: str) -> str:
    """The detector group (RBC, WBC, Platelets) of a cell label."""
    if label in SUBTYPES or label == "WBC":
        return "WBC"
    return label


def _canonical_label(name: str) -> str:
    n = name.strip()
    if n in CELL_CLASSES or n in GROUPS:
        return n
    low = n.lower()
    for c in CELL_CLASSES:
        if c.lower() == low:
            return c
    return _NAME_ALIASES.get(low, n)


# Chula RBC-12's 13 red-cell morphology classes, in its label order (0-12).
MORPHOLOGY_CLASSES = ("normal", "macrocyte", "microcyte", "spherocyte", "target_cell", "stomatocyte", "ovalocyte",
                      "teardrop", "burr_cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte")


NORMAL = "normal"


UNCATEGORISED = "uncategorised"
