"""Annotations in and out: hand-made polygons rasterised against counts done by hand, readers on files written here,
and masks traced to QuPath GeoJSON and painted back bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from histoweak.slides.annotations import (
    Annotation, mask_to_geojson, rasterize, read_annotations, read_asap_xml, read_geojson, read_imagescope_xml,
    write_mask,
)
from histoweak.slides.reader import MaskReader


def rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# -- rasterize: pixel counts by hand ------------------------------------------------------------


def test_rectangle_covers_exactly_the_pixels_inside_it():
    mask = rasterize([Annotation("t", rect(1, 2, 6, 5))], (8, 10), {"t": 1})
    expected = np.zeros((8, 10), np.uint8)
    expected[2:5, 1:6] = 1  # rows 2..4, columns 1..5: 3 x 5
    assert mask.dtype == np.uint8 and mask.shape == (8, 10)
    np.testing.assert_array_equal(mask, expected)
    # corners on pixel centres: the centres 0.5..3.5 lie on the left/top edges or inside, 4.5 on the right/bottom
    assert rasterize([Annotation("t", rect(0.5, 0.5, 4.5, 4.5))], (6, 6), {"t": 1}).sum() == 4 * 4


def test_triangle_leaves_pixels_whose_centres_lie_on_its_hypotenuse():
    # Hypotenuse x + y = 10: row r holds the centres (c + .5, r + .5) with c + r + 1 < 10, i.e. 9 - r pixels;
    # the centres with c + r + 1 == 10 lie on a right edge and stay out: 9 + 8 + ... + 1 = 45.
    mask = rasterize([Annotation("t", [(0, 0), (10, 0), (0, 10)])], (12, 12), {"t": 1})
    assert mask.sum() == 45
    assert [int(mask[r].sum()) for r in range(10)] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]


def test_polygon_with_a_hole():
    ann = Annotation("t", rect(0, 0, 8, 8), holes=(rect(2, 2, 5, 6),))
    mask = rasterize([ann], (10, 10), {"t": 3})
    assert (mask == 3).sum() == 64 - 3 * 4
    assert (mask[2:6, 2:5] == 0).all() and mask[1, 1] == 3


def test_later_annotations_paint_over_earlier_ones_unless_ordered_by_class():
    a, b = Annotation("a", rect(0, 0, 6, 6)), Annotation("b", rect(4, 4, 10, 10))
    mask = rasterize([a, b], (10, 10), {"a": 1, "b": 2})
    assert (mask == 2).sum() == 36 and (mask == 1).sum() == 36 - 4
    mask = rasterize([a, b], (10, 10), {"a": 1, "b": 2}, order=["b", "a"])
    assert (mask == 1).sum() == 36 and (mask == 2).sum() == 36 - 4


def test_polygons_sharing_an_edge_split_its_pixels_without_gap_or_overlap():
    mask = rasterize([Annotation("a", rect(0, 0, 3, 4)), Annotation("b", rect(3, 0, 6, 4))], (4, 6), {"a": 1, "b": 2})
    assert (mask == 1).sum() == 12 and (mask == 2).sum() == 12


def test_downsample_divides_coordinates_and_samples_pixel_centres():
    # At downsample 2 mask pixel c has its centre at level-0 x = 2c + 1.
    full = rasterize([Annotation("t", rect(0, 0, 8, 6))], (5, 6), {"t": 1}, downsample=2)
    assert full.sum() == 4 * 3 and (full[:3, :4] == 1).all()
    # (1, 1)-(5, 5): centres 1 and 3 are in (1 on the left/top edge), 5 is on the right/bottom edge: 2 x 2.
    edge = rasterize([Annotation("t", rect(1, 1, 5, 5))], (4, 4), {"t": 1}, downsample=2)
    assert edge.sum() == 4 and (edge[:2, :2] == 1).all()


def test_polygon_partly_outside_the_mask_is_clipped():
    mask = rasterize([Annotation("t", rect(-5, -5, 3, 2))], (4, 4), {"t": 1})
    assert mask.sum() == 3 * 2 and (mask[:2, :3] == 1).all()


def test_unknown_class_names_the_file_the_class_and_the_valid_names(tmp_path):
    anns = [Annotation("tumor", rect(0, 0, 2, 2)), Annotation("Stroma ", rect(0, 0, 2, 2)), Annotation(None, rect(0, 0, 1, 1))]
    with pytest.raises(ValueError) as info:
        rasterize(anns, (4, 4), {"tumor": 1, "stroma": 2}, source=tmp_path / "slide7.geojson")
    msg = str(info.value)
    assert str(tmp_path / "slide7.geojson") in msg
    assert "'Stroma '" in msg and "(unclassified)" in msg and "['stroma', 'tumor']" in msg


def test_degenerate_polygons_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="2 distinct vertices"):
        Annotation("t", [(0, 0), (1, 1), (0, 0)])
    with pytest.raises(ValueError, match="downsample must be > 0"):
        rasterize([], (2, 2), {}, downsample=0)
    with pytest.raises(ValueError, match="integers 0..255"):
        rasterize([], (2, 2), {"t": 256})


# -- readers ----------------------------------------------------------------------------------------


def feature(geometry, properties):
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def ring(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]  # closed, as GeoJSON writes rings


def test_qupath_feature_collection_with_holes_and_multipolygons(tmp_path):
    qupath = {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}
    doc = {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": [ring(0, 0, 8, 8), ring(2, 2, 4, 4)]}, qupath),
        feature({"type": "MultiPolygon", "coordinates": [[ring(10, 0, 12, 2)], [ring(10, 4, 13, 6)]]},
                {"classification": {"name": "Stroma"}}),
        feature({"type": "Point", "coordinates": [1, 1]}, qupath),  # no area: skipped
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, qupath),
        feature({"type": "Polygon", "coordinates": [ring(20, 0, 21, 1)]}, {"name": "Annotation 3"}),
        feature({"type": "Polygon", "coordinates": [ring(22, 0, 23, 1)]}, {}),
    ]}
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(doc))
    anns = read_geojson(path)
    assert [a.class_name for a in anns] == ["Tumor", "Stroma", "Stroma", "Annotation 3", None]
    assert anns[0].exterior.shape == (4, 2) and len(anns[0].holes) == 1  # closing vertex dropped
    mask = rasterize(anns, (8, 24), {"Tumor": 1, "Stroma": 2, "Annotation 3": 3, None: 4})
    assert (mask == 1).sum() == 64 - 4 and (mask == 2).sum() == 4 + 6 and (mask == 3).sum() == 1
    assert (mask == 4).sum() == 1


def test_bare_feature_list_and_single_feature(tmp_path):
    old = tmp_path / "old.json"  # QuPath 0.2's "Export objects": a list of features, class in "classification"
    old.write_text(json.dumps([feature({"type": "Polygon", "coordinates": [ring(0, 0, 3, 2)]},
                                       {"classification": {"name": "Necrosis", "colorRGB": -3670016}})]))
    one = tmp_path / "one.geojson"
    one.write_text(json.dumps(feature({"type": "Polygon", "coordinates": [ring(1, 1, 2, 3)]}, {"class": "Tumor"})))
    assert [a.class_name for a in read_geojson(old)] == ["Necrosis"]
    assert [a.class_name for a in read_annotations(one)] == ["Tumor"]
    assert rasterize(read_geojson(old), (4, 4), {"Necrosis": 1}).sum() == 6


def test_geojson_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.geojson: cannot read GeoJSON"):
        read_geojson(bad)
    odd = tmp_path / "odd.geojson"
    odd.write_text(json.dumps(feature({"type": "Circle", "coordinates": [0, 0]}, {})))
    with pytest.raises(ValueError, match=r"odd.geojson, feature 0: unsupported geometry type 'Circle'"):
        read_geojson(odd)


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="2" X="6" Y="6"/><Coordinate Order="0" X="2" Y="2"/>
        <Coordinate Order="3" X="2" Y="6"/><Coordinate Order="1" X="6" Y="2"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10,0" Y="0"/>
        <Coordinate Order="2" X="1.0e1" Y="10"/><Coordinate Order="3" X="0" Y="10"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="lymph node" Type="Rectangle" PartOfGroup="None">
      <Coordinates>
        <Coordinate Order="0" X="12" Y="0"/><Coordinate Order="1" X="14" Y="0"/>
        <Coordinate Order="2" X="14" Y="2"/><Coordinate Order="3" X="12" Y="2"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="a dot" Type="Dot" PartOfGroup="_1"><Coordinates><Coordinate Order="0" X="1" Y="1"/></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes/></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml_camelyon_exclusion_group_is_cut_out_when_painted_last(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(ASAP)
    anns = read_asap_xml(path)
    assert [a.class_name for a in anns] == ["_2", "_0", "lymph node"]  # group, else Name; the Dot skipped
    np.testing.assert_array_equal(anns[0].exterior, [[2, 2], [6, 2], [6, 6], [2, 6]])  # sorted by Order
    assert anns[1].exterior[:, 0].max() == 10  # decimal comma and exponent read
    camelyon = {"_0": 1, "_1": 1, "_2": 0, "lymph node": 2}
    in_file_order = rasterize(anns, (10, 16), camelyon)  # the exclusion comes first in the file: painted over
    assert (in_file_order == 1).sum() == 100
    mask = rasterize(anns, (10, 16), camelyon, order=["_0", "_1", "_2"])
    assert (mask == 1).sum() == 100 - 16 and (mask[2:6, 2:6] == 0).all() and (mask == 2).sum() == 4
    assert [a.class_name for a in read_annotations(path)] == ["_2", "_0", "lymph node"]


IMAGESCOPE = """<?xml version="1.0" encoding="UTF-8"?>
<Annotations MicronsPerPixel="0.467000">
  <Annotation Id="1" Name="" ReadOnly="0" LineColor="65280">
    <Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>
    <Regions>
      <RegionAttributeHeaders/>
      <Region Id="1" Type="0" Text="" NegativeROA="0">
        <Attributes><Attribute Name="1" Id="0" Value="Benign"/></Attributes>
        <Vertices><Vertex X="0" Y="0" Z="0"/><Vertex X="4" Y="0" Z="0"/><Vertex X="4" Y="4" Z="0"/><Vertex X="0" Y="4" Z="0"/></Vertices>
      </Region>
      <Region Id="2" Type="0" Text="Carcinoma in situ" NegativeROA="0">
        <Attributes/>
        <Vertices><Vertex X="5" Y="0"/><Vertex X="9" Y="0"/><Vertex X="9" Y="2"/><Vertex X="5" Y="2"/></Vertices>
      </Region>
      <Region Id="3" Type="4" Text="ruler"><Attributes/><Vertices><Vertex X="0" Y="0"/><Vertex X="3" Y="3"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_xml_as_bach_part_b_writes_it(tmp_path):
    path = tmp_path / "A01.xml"
    path.write_text(IMAGESCOPE)
    anns = read_imagescope_xml(path)
    assert [a.class_name for a in anns] == ["Benign", "Carcinoma in situ"]  # Attribute Value, else Text; ruler skipped
    assert [a.class_name for a in read_annotations(path)] == ["Benign", "Carcinoma in situ"]
    mask = rasterize(anns, (4, 10), {"Benign": 1, "Carcinoma in situ": 2})
    assert (mask == 1).sum() == 16 and (mask == 2).sum() == 8


def test_xml_errors_name_the_file(tmp_path):
    other = tmp_path / "other.xml"
    other.write_text("<Slide/>")
    with pytest.raises(ValueError, match="other.xml: root element <Slide> is neither ASAP"):
        read_annotations(other)
    with pytest.raises(ValueError, match="other.xml: root element is <Slide>, expected <ASAP_Annotations>"):
        read_asap_xml(other)
    broken = tmp_path / "broken.xml"
    broken.write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(ValueError, match="broken.xml: cannot read XML"):
        read_asap_xml(broken)


# -- mask_to_geojson: traced back bit for bit ---------------------------------------------------------


def hand_mask() -> np.ndarray:
    m = np.zeros((12, 14), np.uint8)
    m[1:9, 1:9] = 1          # a square of class 1 ...
    m[3:6, 3:7] = 0          # ... with a hole ...
    m[4, 4] = 2              # ... holding a pixel of class 2
    m[0:3, 10:13] = 2        # class 2 touching the top border
    m[9, 9] = 3              # two class-3 pixels touching only at a corner: two regions
    m[10, 10] = 3
    m[10:12, 0:4] = 1        # a second class-1 region in the bottom-left corner
    m[6, 12] = 1
    m[7, 13] = 1             # diagonal neighbour of the previous pixel
    return m


def round_trip(mask, names, downsample, tmp_path):
    path = tmp_path / "pred.geojson"
    path.write_text(json.dumps(mask_to_geojson(mask, names, downsample)))
    return rasterize(read_geojson(path), mask.shape, {n: i for i, n in enumerate(names)}, downsample, source=path)


@pytest.mark.parametrize("downsample", [1, 4, 2.5, 0.5])
def test_mask_to_geojson_round_trips_holes_nesting_and_corners(tmp_path, downsample):
    mask = hand_mask()
    names = ["background", "tumor", "stroma", "necrosis"]
    np.testing.assert_array_equal(round_trip(mask, names, downsample, tmp_path), mask)


def test_mask_to_geojson_features_are_what_qupath_imports():
    mask = hand_mask()
    doc = mask_to_geojson(mask, ["background", "tumor", "stroma", "necrosis"], downsample=4)
    assert doc["type"] == "FeatureCollection"
    names = [f["properties"]["classification"]["name"] for f in doc["features"]]
    # one polygon per 4-connected region: class 1 has four (square, corner block, two diagonal pixels)
    assert names.count("tumor") == 4 and names.count("stroma") == 2 and names.count("necrosis") == 2
    assert "background" not in names
    for f in doc["features"]:
        assert f["properties"]["objectType"] == "annotation"
        assert len(f["properties"]["classification"]["color"]) == 3
        assert f["geometry"]["type"] == "Polygon"
        for r in f["geometry"]["coordinates"]:
            assert r[0] == r[-1] and all(v % 4 == 0 for p in r for v in p)  # closed, level-0 = mask x 4
    square = next(f for f in doc["features"] if f["properties"]["classification"]["name"] == "tumor"
                  and len(f["geometry"]["coordinates"]) == 2)
    exterior, hole = square["geometry"]["coordinates"]
    assert sorted(map(tuple, exterior[:-1])) == [(4, 4), (4, 36), (36, 4), (36, 36)]  # 4 corners, collinear dropped
    assert len(hole) - 1 == 4


def test_min_area_drops_small_regions_in_level0_pixels():
    mask = hand_mask()
    names = ["bg", "tumor", "stroma", "necrosis"]

    def kept(min_area):
        doc = mask_to_geojson(mask, names, downsample=2, min_area=min_area)
        return [f["properties"]["classification"]["name"] for f in doc["features"]]

    assert len(kept(4)) == 8  # a single pixel covers 2 x 2 = 4 level-0 px^2: everything stays
    # above 4 the single pixels go (two of class 1, the one of class 2 in the hole, both of class 3)
    assert kept(4.5) == ["tumor", "tumor", "stroma"]
    assert kept(12 * 4) == ["tumor"]  # then the 3x3 stroma square (36) and the 2x4 corner block (32)


def test_mask_to_geojson_round_trips_random_masks(tmp_path):
    rng = np.random.default_rng(7)
    for i in range(40):
        h, w = rng.integers(1, 24, 2)
        k = int(rng.integers(2, 5))
        mask = (rng.random((h, w)) * k).astype(np.uint8)
        if i % 2:
            mask = ndi.median_filter(mask, 3)
        names = [f"class {c}" for c in range(k)]
        np.testing.assert_array_equal(round_trip(mask, names, 1 + i % 3, tmp_path), mask)


def test_mask_to_geojson_refuses_what_cannot_round_trip():
    with pytest.raises(ValueError, match=r"class index\(es\) \[3\]"):
        mask_to_geojson(np.array([[0, 3]], np.uint8), ["bg", "a"])
    with pytest.raises(ValueError, match="distinct"):
        mask_to_geojson(np.zeros((2, 2), np.uint8), ["bg", "a", "a"])
    with pytest.raises(ValueError, match="2-D integer"):
        mask_to_geojson(np.zeros((2, 2), np.float32), ["bg"])
    assert mask_to_geojson(np.zeros((3, 3), np.uint8), ["bg", "a"])["features"] == []


# -- write_mask --------------------------------------------------------------------------------------


def test_write_mask_is_a_pyramid_the_mask_reader_reads(tmp_path):
    mask = np.zeros((600, 520), np.uint8)
    mask[100:300, 50:400] = 2
    mask[350:, :] = 3
    path = write_mask(tmp_path / "A01.tiff", mask, mpp=0.467 * 8)
    reader = MaskReader(path, (520 * 8, 600 * 8))  # the slide is 8x larger: a downsample-8 mask
    assert reader.downsample == 8
    full, ds = reader.read(8)
    np.testing.assert_array_equal(full, mask)
    coarse, cds = reader.read(16)
    assert cds > 8 and set(np.unique(coarse)) == {0, 2, 3}
    with pytest.raises(ValueError, match="bad.tiff: a mask must be"):
        write_mask(tmp_path / "bad.tiff", mask.astype(np.int32))
