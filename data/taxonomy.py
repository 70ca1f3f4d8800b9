"""Cell classes: detector groups, WBC subtypes, and the canonical spelling of a label."""

from __future__ import annotations

GROUPS = ("RBC", "WBC", "Platelets")


# The WBC differential's classes: the five mature subtypes and immature granulocytes (promyelocytes, myelocytes,
# metamyelocytes), which count inside the differential as manual and automated differentials count them.
SUBTYPES = ("Neutrophil", "Eosinophil", "Lymphocyte", "Monocyte", "Basophil", "ImmatureGranulocyte")

# Nucleated RBCs (erythroblasts): found by the detector among the nucleated cells (its WBC group), named by the
# classifier, kept out of the differential and reported per 100 WBCs.
NRBC = "Erythroblast"


CELL_CLASSES = ("RBC", "Platelets") + SUBTYPES + (NRBC,)


_NAME_ALIASES = {"rbc": "RBC", "wbc": "WBC", "platelets": "Platelets", "platelet": "Platelets", "plt": "Platelets",
                 "ig": "ImmatureGranulocyte", "immature_granulocyte": "ImmatureGranulocyte",
                 "immature granulocyte": "ImmatureGranulocyte", "nrbc": NRBC, "nucleated_rbc": NRBC}


def group_of(label: str) -> str:
    """The detector group (RBC, WBC, Platelets) of a cell label."""
    if label in SUBTYPES or label in ("WBC", NRBC):
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
