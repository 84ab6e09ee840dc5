"""The bundled demo/test slide is present, intact and readable by OpenSlide."""
import hashlib

import openslide

from conftest import SAMPLE_SLIDE

SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"  # ../shared/data/README.md


def test_sample_slide_checksum():
    with open(SAMPLE_SLIDE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256


def test_sample_slide_opens_with_expected_geometry_and_mpp():
    slide = openslide.OpenSlide(SAMPLE_SLIDE)
    assert slide.dimensions == (2220, 2967)  # (width, height) at level 0
    assert slide.level_count == 1
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.499
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == 0.499
    region = slide.read_region((1000, 1000), 0, (224, 224)).convert("RGB")
    assert region.size == (224, 224)
    slide.close()
