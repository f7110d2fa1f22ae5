"""BCSS-WSSS: breast cancer, 224x224 patches cut from BCSS (Amgad et al. 2019) by Han et al. (MedIA 2022).

23,422 training patches labelled by file name
(``TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500+0[1101].png``: BCSS image,
patch index, then TUM STR LYM NEC presence), 3,418 validation and 4,986 test
patches with palette masks. Mask index 4 ("background or exclude") also
covers BCSS's other tissue classes. Layout and mask mapping: ``_patches``.
"""

from __future__ import annotations

from histoweak.data.sources._patches import PatchDataset, register_source

__all__ = ["BCSS_WSSS"]

BCSS_WSSS = register_source(PatchDataset(
    name="bcss-wsss",
    classes=("tumor", "stroma", "lymphocytic infiltrate", "necrosis"),
    codes=("TUM", "STR", "LYM", "NEC"),
    reference="https://github.com/ChuHan89/WSSS-Tissue (dataset Readme.txt)",
))
