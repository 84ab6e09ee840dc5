"""slide_reader.py: eva's patch sampler and reader on synthetic slides and the bundled one: the patches eva
chooses, OpenSlide's pixels (through OpenSlide or from JPEG tiles decoded here), eva's resize and normalisation."""
import io

import numpy as np
import openslide
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import eval_slide as E
import prepare_patches
import slide_reader as R

TISSUE = (200, 100, 180)  # HSV saturation 127: tissue; the background (240, 240, 240) has saturation 0
NORM = R.eval_probe.NORMS["imagenet"]


def pil_jpeg(tile, **_):
    """tifffile's JPEG compressor, by Pillow (imagecodecs is not installed): YCbCr, 4:2:0, as most scanners store."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(tile).reshape(np.shape(tile)[-3:])).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def write_slide(path, tissue=None, size=1024, levels=3, mpp=0.5, seed=0, jpeg=False):
    """A tiled pyramid (downsample 2 per level) OpenSlide reads: background, textured tissue in the given level-0
    rectangles (x0, y0, x1, y1), corners on multiples of 4 so that every level holds them exactly. Lossless
    (zlib), or JPEG tiles in YCbCr in a BigTIFF."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, dtype=np.uint8)
    for x0, y0, x1, y1 in ((size // 4, 0, size, size),) if tissue is None else tissue:
        noise = rng.integers(-20, 20, (y1 - y0, x1 - x0, 3))
        img[y0:y1, x0:x1] = (np.array(TISSUE) + noise).clip(0, 255)
    tifffile.TIFF.COMPRESSORS._codecs[7] = pil_jpeg  # no public hook registers an encoder
    with tifffile.TiffWriter(path, bigtiff=jpeg) as tif:  # BigTIFF (scanners write it past 4 GB); the .svs is not
        for k in range(levels):
            res = dict(resolution=(1e4 / (mpp * 2 ** k),) * 2, resolutionunit="CENTIMETER") if mpp else {}
            form = dict(photometric="ycbcr", compression="jpeg") if jpeg else \
                dict(photometric="rgb", compression="zlib")
            tif.write(img[::2 ** k, ::2 ** k], tile=(128, 128), subfiletype=1 if k else 0, **form, **res)
    return str(path)


def eva_order(W, H, step, seed=42):
    """ForegroundGridSampler's visiting order, written out independently: x-outer, y-inner, one seeded shuffle."""
    grid = [(x, y) for x in range(0, W - step + 1, step) for y in range(0, H - step + 1, step)]
    idx = list(range(len(grid)))
    np.random.default_rng(seed).shuffle(idx)
    return [grid[i] for i in idx]


def tissue_fraction(x, y, step, rect, k=4):
    """Hand count: the fraction of a patch's mask window (level-2 pixels, downsample 4) that lies in the rectangle."""
    x0, y0, w = x // k, y // k, step // k
    ox = max(0, min(x0 + w, rect[2] // k) - max(x0, rect[0] // k))
    oy = max(0, min(y0 + w, rect[3] // k) - max(y0, rect[1] // k))
    return ox * oy / (w * w)


# -- which patches --------------------------------------------------------------------------------------------------

def test_sampler_matches_a_hand_computation(tmp_path):
    # two tissue rectangles whose left edges cut grid cells: 5/14 of a window (kept, >= 35%) in the top one,
    # 4/14 (dropped) in the bottom one
    rects = ((204, 0, 1024, 400), (268, 500, 1024, 1024))
    path = write_slide(tmp_path / "s.tif", tissue=rects)
    slide = openslide.OpenSlide(path)
    # target 0.9 mpp on a 0.5 mpp scan, 32 px patches: step int(0.9 / 0.5 * 32) = 57 px at level 0; the mask comes
    # from level 2 (57 / 4 = 14 px windows >= 3), the read from level 0 (the largest mpp <= 0.9), 57 px wide
    plan = R.plan_slide(slide, 0.9, 32, 10_000)
    assert (plan["step"], plan["level"], plan["read_size"], plan["mpp"]) == (57, 0, 57, 0.5)
    fraction = {(x, y): sum(tissue_fraction(x, y, 57, r) for r in rects) for x, y in eva_order(1024, 1024, 57)}
    expected = [(x, y) for x, y in eva_order(1024, 1024, 57) if fraction[x, y] >= 0.35]
    assert [tuple(c) for c in plan["coords"]] == expected
    assert min(fraction[c] for c in expected) == pytest.approx(5 / 14)  # the rule decided at its boundary
    assert any(0 < f < 0.35 for f in fraction.values())
    capped = R.plan_slide(slide, 0.9, 32, 25)  # the cap keeps the first 25 accepted, in eva's order
    assert [tuple(c) for c in capped["coords"]] == expected[:25]


def test_mpp_levels_and_alpha():
    class Stub:
        def __init__(self, props):
            self.properties = props
    assert R.slide_mpp(Stub({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.23"})) == pytest.approx(0.24)
    tiff = {"tiff.XResolution": "40000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "centimeter"}
    assert R.slide_mpp(Stub(tiff)) == pytest.approx((0.25 + 0.5) / 2)  # 1e4 um / (px per cm), averaged
    for props in ({}, {**tiff, "tiff.ResolutionUnit": "inch"}):
        with pytest.raises(ValueError, match="mpp"):
            R.slide_mpp(Stub(props))
    # read level: the largest mpp still <= target, else the finest; mask level: coarsest with >= 3x3 px windows
    assert R.read_level(0.25, [1, 4, 16], 0.5) == 0 and R.read_level(0.25, [1, 4, 16], 1.0) == 1
    assert R.read_level(0.5, [1, 4], 0.25) == 0
    assert R.mask_level(0.25, [1, 4, 16, 64], 0.5, 224) == 3  # 448 / 64 = 7 px
    assert R.mask_level(0.25, [1, 4, 16, 64, 256], 0.5, 224) == 3  # 448 / 256 = 1 px is too few

    class RGBA:
        def read_region(self, loc, level, size):
            a = np.zeros((2, 2, 4), np.uint8)
            a[0, 0] = (10, 20, 30, 255)
            return Image.fromarray(a, "RGBA")
    rgb = R.read_rgb(RGBA(), (0, 0), 0, (2, 2))  # transparent pixels become white, as eva's backend does
    assert rgb.tolist() == [[[10, 20, 30], [255] * 3], [[255] * 3, [255] * 3]]


def test_tissue_mask_is_opencv_saturation_above_20():
    # eva's get_mask: cv2's uint8 HSV, S > 20; every (max, min) pair, against OpenCV itself
    cv2 = pytest.importorskip("cv2")
    v, m = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    keep = m <= v
    rgb = np.stack([v[keep], m[keep], (v[keep] + m[keep]) // 2], -1).astype(np.uint8)[None]
    got = R.tissue_mask(rgb)[0]
    assert got.dtype == np.uint8 and np.array_equal(got, (cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, :, 1] > 20))
    assert R.tissue_mask(np.array([[[240, 240, 240], list(TISSUE), [0, 0, 0]]], np.uint8)).tolist() == [[0, 1, 0]]


# -- reading ---------------------------------------------------------------------------------------------------------

def eva_patch(slide, plan, x, y, size):
    """eva's path for one patch: read_region, alpha -> white, CHW uint8, torchvision's Resize (the uint8 kernel on
    this CPU, as resize_image calls it), ToDtype(scale), Normalize."""
    rgba = np.array(slide.read_region((int(x), int(y)), plan["level"], (plan["read_size"],) * 2))
    rgba[rgba[..., 3] == 0] = 255
    t = torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).contiguous()[None]
    if plan["read_size"] != size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return augment.normalize(t[0].float().mul_(1 / 255), *NORM)


@pytest.mark.parametrize("target", [0.9, 1.0, 1.05])
def test_reader_gives_the_pixels_of_one_read_region_per_patch(tmp_path, target):
    # 0.9: level 0, 57 px resized to 32; 1.0: level 1 at whole coordinates (step 64 = 32 level-1 px);
    # 1.05: level 1, step 67 -> fractional level coordinates (OpenSlide interpolates)
    path = write_slide(tmp_path / "s.tif", tissue=((200, 0, 1024, 600), (0, 800, 400, 1024)))
    slide = openslide.OpenSlide(path)
    plan = R.plan_slide(slide, target, 32, 60)
    n = len(plan["coords"])
    assert n == 60 and plan["level"] == (0 if target < 1 else 1)
    order = R.raster_order(plan)  # every patch once, row by row
    assert sorted(order) == list(range(n))
    assert [(int(plan["coords"][i][1]), int(plan["coords"][i][0])) for i in order] == \
        sorted((int(y), int(x)) for x, y in plan["coords"])
    got = torch.zeros(n, 3, 32, 32)
    items = list(R.SlideReader([(0, path)], target, 32, 60, 16, NORM))
    assert "plan" in items[0] and all(len(it["index"]) <= 16 for it in items[1:])
    for it in items[1:]:
        got[it["index"]] = it["x"]
    for i, (x, y) in enumerate(plan["coords"]):
        assert torch.equal(got[i], eva_patch(slide, plan, x, y, 32)), i
    # the resampling is an antialiased bilinear one: within one grey level of PIL's
    x, y = plan["coords"][0]
    rgb = R.read_rgb(slide, (int(x), int(y)), plan["level"], (plan["read_size"],) * 2)
    pil = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.BILINEAR)).astype(int)
    ours = R.eval_probe.resize_and_crop(torch.from_numpy(rgb).permute(2, 0, 1), 32)[0].permute(1, 2, 0)
    assert np.abs(ours.numpy().astype(int) - pil).max() <= 1


def test_fast_read_equals_openslide_pythons_read_region(tmp_path):
    path = write_slide(tmp_path / "s.tif", tissue=((100, 100, 700, 900),))
    slide = openslide.OpenSlide(path)
    # level 0, level 1 at whole and at fractional coordinates (interpolated), regions past the slide's edge
    # (transparent there, so white), a region partly off the left edge
    for loc, level, size in (((50, 60), 0, (300, 200)), ((64, 64), 1, (90, 70)), ((63, 65), 1, (90, 70)),
                             ((900, 950), 0, (200, 150)), ((1001, 999), 1, (40, 40)), ((-30, 10), 0, (80, 60))):
        rgba = np.array(slide.read_region(loc, level, size))
        rgba[rgba[..., 3] == 0] = 255
        got = R.read_rgb(slide, loc, level, size)
        assert np.array_equal(got, rgba[..., :3]), (loc, level, size)


def read_all(path, target, patch, max_patches, **kw):
    """SlideReader's patches of one slide, in the plan's order."""
    items = list(R.SlideReader([(0, path)], target, patch, max_patches, 16, NORM, **kw))
    got = torch.zeros(len(items[0]["plan"]["coords"]), 3, patch, patch)
    for it in items[1:]:
        got[it["index"]] = it["x"]
    return got


def test_jpeg_tiles_give_openslides_pixels(tmp_path, monkeypatch):
    path = write_slide(tmp_path / "j.tif", tissue=((200, 0, 1024, 600), (0, 800, 400, 1024)), jpeg=True)
    slide = openslide.OpenSlide(path)
    with Image.open(path) as im:
        assert (im.tag_v2[259], im.tag_v2[262]) == (7, 6)  # JPEG, YCbCr
    plan = R.plan_slide(slide, 0.9, 32, 60)  # level 0, 57 px patches: most straddle the 128 px tiles
    tiles = R.open_tiles(path, slide, plan)
    assert isinstance(tiles, R.JpegTiles) and plan["level"] == 0
    assert np.array_equal(tiles.region(0, 0, 1024, 1024)[..., :3], R.read_rgb(slide, (0, 0), 0, (1024, 1024)))
    got = read_all(path, 0.9, 32, 60)
    for i, (x, y) in enumerate(plan["coords"]):
        assert torch.equal(got[i], eva_patch(slide, plan, x, y, 32)), i
    # a bounded cache: 4-tile regions still right while at most two tiles stay decoded, the least recently used
    # one dropped (tiles are numbered row by row, 8 across)
    small = R.JpegTiles(path, 1024, 1024, cache_bytes=2 * 128 * 128 * 4)
    for x, y in ((100, 100), (300, 90), (120, 250)):
        assert np.array_equal(small.region(x, y, 60, 70)[..., :3], R.read_rgb(slide, (x, y), 0, (60, 70)))
        assert len(small.cache) <= 2
    small.cache.clear()
    for x, keep in ((0, [0]), (128, [0, 1]), (0, [1, 0]), (256, [0, 2])):
        small.region(x, 0, 10, 10)
        assert list(small.cache) == keep
    # the bundled slide: Aperio's RGB-coded JPEG tiles (no YCbCr), 240 px, all of them
    svs = openslide.OpenSlide(prepare_patches.SAMPLE_SLIDE)
    W, H = svs.level_dimensions[0]
    aperio = R.JpegTiles(prepare_patches.SAMPLE_SLIDE, W, H)
    assert np.array_equal(aperio.region(0, 0, W, H)[..., :3], R.read_rgb(svs, (0, 0), 0, (W, H)))
    # a tile that fails to decode later on: that patch is OpenSlide's
    broken = R.open_tiles(path, slide, plan)
    decode = R.JpegTiles.tile
    monkeypatch.setattr(R.JpegTiles, "tile", lambda self, k: decode(self, k) if k % 3 else 1 / 0)
    read = [x for _, x in R.read_patches(slide, plan, 16, 32, NORM, broken)]
    assert torch.equal(torch.cat(read), got[R.raster_order(plan)])
    for t in (tiles, small, aperio, broken):
        t.close()
    # OpenSlide reads instead: another level, lossless tiles, or a first patch that is not OpenSlide's
    assert R.open_tiles(path, slide, R.plan_slide(slide, 1.0, 32, 60)) is None
    zlib = write_slide(tmp_path / "z.tif", tissue=((200, 0, 1024, 600),))
    assert R.open_tiles(zlib, openslide.OpenSlide(zlib), plan) is None
    monkeypatch.setattr(R.JpegTiles, "tile", lambda self, k: np.full((128, 128, 4), 7, np.uint8))
    assert R.open_tiles(path, slide, plan) is None
    assert torch.equal(read_all(path, 0.9, 32, 60), got)
    # --openslide-only: the tiles are not even opened
    monkeypatch.setattr(R, "open_tiles", None)
    assert torch.equal(read_all(path, 0.9, 32, 60, jpeg_tiles=False), got)
    torch.save({}, tmp_path / "w.pth")
    assert E.get_args(["embed", "--weights", str(tmp_path / "w.pth"), "--slides", path, "--out", "o",
                       "--openslide-only"]).openslide_only


def test_resize_float_fallback_rounds_like_the_uint8_kernel(monkeypatch):
    # torchvision resizes uint8 in float on CPUs without AVX2: within one grey level of the native uint8 kernel
    x = torch.randint(0, 256, (3, 57, 57), dtype=torch.uint8)
    native, _ = R.eval_probe.resize_and_crop(x, 32)
    monkeypatch.setattr(R.eval_probe, "NATIVE_UINT8_RESIZE", False)
    fallback, _ = R.eval_probe.resize_and_crop(x, 32)
    assert fallback.dtype == torch.uint8 and (fallback.int() - native.int()).abs().max() <= 1


# -- the head ----------------------------------------------------------------------------------------------------
