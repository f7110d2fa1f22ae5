"""LUAD-HistoSeg: lung adenocarcinoma, 224x224 patches at 10x (Han et al., MedIA 2022).

16,678 training patches labelled by file name (``1031280-2300-27920-[1 0 0 1].png``:
patient, x, y, then TE NEC LYM TAS presence), 300 validation and 307 test
patches with palette masks. Layout and mask mapping: ``_patches``.
"""

from __future__ import annotations

from histoweak.data.sources._patches import PatchDataset, register_source

__all__ = ["LUAD_HISTOSEG"]

LUAD_HISTOSEG = register_source(PatchDataset(
    name="luad-histoseg",
    classes=("tumor epithelial", "necrosis", "lymphocyte", "tumor-associated stroma"),
    codes=("TE", "NEC", "LYM", "TAS"),
    reference="https://github.com/ChuHan89/WSSS-Tissue (dataset Readme.txt)",
))
