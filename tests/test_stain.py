"""Macenko stain normalisation (``data.stain``), and the stream option that applies it (``TrainConfig.stain_norm``)."""

import numpy as np
import pytest

from histoweak.data.stain import fit_reference, normalize_images, pick_reference


def _he_tile(seed: int, shift=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A 64x64 H&E-like tile: two stains mixed in optical density (Beer-Lambert), optionally re-tinted."""
    rng = np.random.default_rng(seed)
    he = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]) * np.asarray(shift)  # haematoxylin, eosin OD vectors
    conc = np.stack([rng.gamma(2.0, 0.4, (64, 64)), rng.gamma(2.0, 0.3, (64, 64))], -1)
    od = conc @ he
    return np.clip(240 * np.exp(-od), 0, 255).astype(np.uint8)


def _od_mean(img: np.ndarray) -> np.ndarray:
    return (-np.log((img.reshape(-1, 3).astype(float) + 1) / 240)).mean(0)


def test_a_retinted_tile_moves_towards_the_reference_stains():
    ref_tile = _he_tile(0)
    ref = fit_reference(ref_tile)
    assert np.asarray(ref["he"]).shape == (3, 2) and len(ref["max_c"]) == 2
    tinted = _he_tile(1, shift=(1.6, 0.7, 1.2))
    out, skipped = normalize_images(tinted[None], ref)
    assert skipped == 0 and out.dtype == np.uint8 and out.shape == (1, 64, 64, 3)
    before = np.abs(_od_mean(tinted) - _od_mean(ref_tile)).sum()
    after = np.abs(_od_mean(out[0]) - _od_mean(ref_tile)).sum()
    assert after < 0.5 * before  # the colour cast is mostly gone


def test_the_reference_itself_barely_changes_and_white_tiles_are_kept():
    ref_tile = _he_tile(0)
    ref = fit_reference(ref_tile)
    white = np.full((64, 64, 3), 245, np.uint8)
    out, skipped = normalize_images(np.stack([ref_tile, white]), ref)
    assert np.abs(out[0].astype(int) - ref_tile).mean() < 6
    assert skipped == 1 and np.array_equal(out[1], white)  # no stain to estimate: left as it was, counted
    with pytest.raises(ValueError, match="cannot fit Macenko"):
        fit_reference(white)


def test_the_reference_tile_is_chosen_by_tissue_then_key_not_by_order():
    keys = ["b:1", "a:2", "a:1", "c:0"]
    ratio = np.array([0.9, 1.0, 1.0, 0.5])
    assert keys[pick_reference(ratio, keys)] == "a:1"
    order = [3, 2, 1, 0]
    assert [keys[i] for i in order][pick_reference(ratio[order], [keys[i] for i in order])] == "a:1"


def test_the_stream_option_normalises_exactly_what_the_function_does(tile_table, ray_local):
    from histoweak.data.streaming import read_split_meta, read_tiles, stain_normalize_dataset
    from histoweak.train import _stain_reference

    ref = _stain_reference(str(tile_table))
    meta = read_split_meta(str(tile_table), "train", ["slide_id", "x", "y", "tissue_ratio"])
    assert ref["tile"].split(":")[0] in set(meta["slide_id"])  # a training tile
    ds = stain_normalize_dataset(read_tiles(str(tile_table), split="val", columns=["image", "slide_id", "x", "y"]), ref)
    raw = read_split_meta(str(tile_table), "val", ["image", "slide_id", "x", "y"])
    got = {(s, x, y): img for b in ds.iter_batches(batch_format="numpy", batch_size=None)
           for s, x, y, img in zip(b["slide_id"], b["x"], b["y"], b["image"])}
    expected = normalize_images(raw["image"], ref)[0]
    assert len(got) == len(expected)
    for s, x, y, img in zip(raw["slide_id"], raw["x"], raw["y"], expected):
        assert np.array_equal(got[(s, x, y)], img)
