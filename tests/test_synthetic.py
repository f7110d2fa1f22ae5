import csv
import json
from dataclasses import replace

import numpy as np
import openslide
import pytest
import tifffile

from histoweak.data.synthetic import CLASSES, PRESETS, SynthPreset, render_slide


def test_deterministic_from_seed():
    p = replace(PRESETS["tiny"], size=512)
    a_rgb, a_mask = render_slide(p, seed=5)
    b_rgb, b_mask = render_slide(p, seed=5)
    c_rgb, _ = render_slide(p, seed=6)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_rgb, c_rgb)


def test_written_dataset(synth_dir):
    rows = list(csv.DictReader(open(synth_dir / "slides.csv")))
    assert [r["split"] for r in rows] == ["train", "val", "test"]
    assert json.loads((synth_dir / "classes.json").read_text()) == {str(i): c for i, c in enumerate(CLASSES)}
    for r in rows:
        with openslide.OpenSlide(str(synth_dir / r["path"])) as s:
            assert s.level_count == 3 and s.properties["openslide.mpp-x"] == "0.5"
        mask = tifffile.imread(synth_dir / r["mask_path"], key=0)
        assert mask.dtype == np.uint8 and mask.shape == (1024, 1024) and mask.max() < len(CLASSES)
        assert int(r["label"]) == int((mask == 1).any())


def test_classes_have_distinct_colours():
    rgb, mask = render_slide(replace(PRESETS["default"], size=1024), seed=2)
    means = {c: rgb[mask == c].mean(axis=0) for c in np.unique(mask)}
    assert {0, 1, 2} <= set(means)
    for a in means:
        for b in means:
            if a < b:
                assert np.abs(means[a] - means[b]).max() > 8, (a, b)


def _tile_tissue_by_tumour(shortcut: float, seeds=range(3), n=1024, t=64):
    tumour, other = [], []
    for seed in seeds:
        _, mask = render_slide(replace(PRESETS["default"], size=n, shortcut=shortcut), seed=seed, has_tumor=True)
        blocks = mask.reshape(n // t, t, n // t, t).transpose(0, 2, 1, 3).reshape(-1, t * t)
        tissue = (blocks > 0).mean(1)
        has_t = (blocks == 1).any(1)
        keep = tissue > 0
        tumour += list(tissue[keep & has_t])
        other += list(tissue[keep & ~has_t])
    return np.mean(tumour), np.mean(other)


def test_shortcut_knob_controls_tissue_tumour_correlation():
    t_hi, o_hi = _tile_tissue_by_tumour(0.9)
    t_lo, o_lo = _tile_tissue_by_tumour(0.0)
    assert t_hi > o_hi  # tumour tiles hold more tissue (GERNE's observation)
    assert (t_hi - o_hi) > (t_lo - o_lo)  # and more so with a stronger shortcut


def test_preset_validation_names_the_key():
    with pytest.raises(ValueError, match="'shortcut'"):
        SynthPreset(shortcut=2.0)
    from histoweak.data.synthetic import synthesize

    with pytest.raises(ValueError, match="unknown synthetic preset 'nope'"):
        synthesize("/tmp/never", "nope")
