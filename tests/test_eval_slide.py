"""eval_slide.py: eva's patch sampler and reader on synthetic slides, the ABMIL head, eva's training loop and
metric, dataset layouts, resumable embedding and bad slides."""
import io
import json
import math
import os

import numpy as np
import openslide
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import eval_slide as E
import model as M
import prepare_patches

TISSUE = (200, 100, 180)  # HSV saturation 127: tissue; the background (240, 240, 240) has saturation 0
NORM = E.eval_probe.NORMS["imagenet"]


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
            form = dict(photometric="ycbcr", compression="jpeg") if jpeg else dict(photometric="rgb", compression="zlib")
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
    plan = E.plan_slide(slide, 0.9, 32, 10_000)
    assert (plan["step"], plan["level"], plan["read_size"], plan["mpp"]) == (57, 0, 57, 0.5)
    fraction = {(x, y): sum(tissue_fraction(x, y, 57, r) for r in rects) for x, y in eva_order(1024, 1024, 57)}
    expected = [(x, y) for x, y in eva_order(1024, 1024, 57) if fraction[x, y] >= 0.35]
    assert [tuple(c) for c in plan["coords"]] == expected
    assert min(fraction[c] for c in expected) == pytest.approx(5 / 14)  # the rule decided at its boundary
    assert any(0 < f < 0.35 for f in fraction.values())
    capped = E.plan_slide(slide, 0.9, 32, 25)  # the cap keeps the first 25 accepted, in eva's order
    assert [tuple(c) for c in capped["coords"]] == expected[:25]


def test_mpp_levels_and_alpha():
    class Stub:
        def __init__(self, props):
            self.properties = props
    assert E.slide_mpp(Stub({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.23"})) == pytest.approx(0.24)
    tiff = {"tiff.XResolution": "40000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "centimeter"}
    assert E.slide_mpp(Stub(tiff)) == pytest.approx((0.25 + 0.5) / 2)  # 1e4 um / (px per cm), averaged
    for props in ({}, {**tiff, "tiff.ResolutionUnit": "inch"}):
        with pytest.raises(ValueError, match="mpp"):
            E.slide_mpp(Stub(props))
    # read level: the largest mpp still <= target, else the finest; mask level: coarsest with >= 3x3 px windows
    assert E.read_level(0.25, [1, 4, 16], 0.5) == 0 and E.read_level(0.25, [1, 4, 16], 1.0) == 1
    assert E.read_level(0.5, [1, 4], 0.25) == 0
    assert E.mask_level(0.25, [1, 4, 16, 64], 0.5, 224) == 3  # 448 / 64 = 7 px
    assert E.mask_level(0.25, [1, 4, 16, 64, 256], 0.5, 224) == 3  # 448 / 256 = 1 px is too few

    class RGBA:
        def read_region(self, loc, level, size):
            a = np.zeros((2, 2, 4), np.uint8)
            a[0, 0] = (10, 20, 30, 255)
            return Image.fromarray(a, "RGBA")
    rgb = E.read_rgb(RGBA(), (0, 0), 0, (2, 2))  # transparent pixels become white, as eva's backend does
    assert rgb.tolist() == [[[10, 20, 30], [255] * 3], [[255] * 3, [255] * 3]]


def test_tissue_mask_is_opencv_saturation_above_20():
    # eva's get_mask: cv2's uint8 HSV, S > 20; every (max, min) pair, against OpenCV itself
    cv2 = pytest.importorskip("cv2")
    v, m = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    keep = m <= v
    rgb = np.stack([v[keep], m[keep], (v[keep] + m[keep]) // 2], -1).astype(np.uint8)[None]
    got = E.tissue_mask(rgb)[0]
    assert got.dtype == np.uint8 and np.array_equal(got, (cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0, :, 1] > 20))
    assert E.tissue_mask(np.array([[[240, 240, 240], list(TISSUE), [0, 0, 0]]], np.uint8)).tolist() == [[0, 1, 0]]


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
    plan = E.plan_slide(slide, target, 32, 60)
    n = len(plan["coords"])
    assert n == 60 and plan["level"] == (0 if target < 1 else 1)
    order = E.raster_order(plan)  # every patch once, row by row
    assert sorted(order) == list(range(n))
    assert [(int(plan["coords"][i][1]), int(plan["coords"][i][0])) for i in order] == \
        sorted((int(y), int(x)) for x, y in plan["coords"])
    got = torch.zeros(n, 3, 32, 32)
    items = list(E.SlideReader([(0, path)], target, 32, 60, 16, NORM))
    assert "plan" in items[0] and all(len(it["index"]) <= 16 for it in items[1:])
    for it in items[1:]:
        got[it["index"]] = it["x"]
    for i, (x, y) in enumerate(plan["coords"]):
        assert torch.equal(got[i], eva_patch(slide, plan, x, y, 32)), i
    # the resampling is an antialiased bilinear one: within one grey level of PIL's
    x, y = plan["coords"][0]
    rgb = E.read_rgb(slide, (int(x), int(y)), plan["level"], (plan["read_size"],) * 2)
    pil = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.BILINEAR)).astype(int)
    ours = E.eval_probe.resize_and_crop(torch.from_numpy(rgb).permute(2, 0, 1), 32)[0].permute(1, 2, 0)
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
        got = E.read_rgb(slide, loc, level, size)
        assert np.array_equal(got, rgba[..., :3]), (loc, level, size)


def read_all(path, target, patch, max_patches, **kw):
    """SlideReader's patches of one slide, in the plan's order."""
    items = list(E.SlideReader([(0, path)], target, patch, max_patches, 16, NORM, **kw))
    got = torch.zeros(len(items[0]["plan"]["coords"]), 3, patch, patch)
    for it in items[1:]:
        got[it["index"]] = it["x"]
    return got


def test_jpeg_tiles_give_openslides_pixels(tmp_path, monkeypatch):
    path = write_slide(tmp_path / "j.tif", tissue=((200, 0, 1024, 600), (0, 800, 400, 1024)), jpeg=True)
    slide = openslide.OpenSlide(path)
    with Image.open(path) as im:
        assert (im.tag_v2[259], im.tag_v2[262]) == (7, 6)  # JPEG, YCbCr
    plan = E.plan_slide(slide, 0.9, 32, 60)  # level 0, 57 px patches: most straddle the 128 px tiles
    tiles = E.open_tiles(path, slide, plan)
    assert isinstance(tiles, E.JpegTiles) and plan["level"] == 0
    assert np.array_equal(tiles.region(0, 0, 1024, 1024)[..., :3], E.read_rgb(slide, (0, 0), 0, (1024, 1024)))
    got = read_all(path, 0.9, 32, 60)
    for i, (x, y) in enumerate(plan["coords"]):
        assert torch.equal(got[i], eva_patch(slide, plan, x, y, 32)), i
    # a bounded cache: 4-tile regions still right while at most two tiles stay decoded, the least recently used
    # one dropped (tiles are numbered row by row, 8 across)
    small = E.JpegTiles(path, 1024, 1024, cache_bytes=2 * 128 * 128 * 4)
    for x, y in ((100, 100), (300, 90), (120, 250)):
        assert np.array_equal(small.region(x, y, 60, 70)[..., :3], E.read_rgb(slide, (x, y), 0, (60, 70)))
        assert len(small.cache) <= 2
    small.cache.clear()
    for x, keep in ((0, [0]), (128, [0, 1]), (0, [1, 0]), (256, [0, 2])):
        small.region(x, 0, 10, 10)
        assert list(small.cache) == keep
    # the bundled slide: Aperio's RGB-coded JPEG tiles (no YCbCr), 240 px, all of them
    svs = openslide.OpenSlide(prepare_patches.SAMPLE_SLIDE)
    W, H = svs.level_dimensions[0]
    aperio = E.JpegTiles(prepare_patches.SAMPLE_SLIDE, W, H)
    assert np.array_equal(aperio.region(0, 0, W, H)[..., :3], E.read_rgb(svs, (0, 0), 0, (W, H)))
    # a tile that fails to decode later on: that patch is OpenSlide's
    broken = E.open_tiles(path, slide, plan)
    decode = E.JpegTiles.tile
    monkeypatch.setattr(E.JpegTiles, "tile", lambda self, k: decode(self, k) if k % 3 else 1 / 0)
    read = [x for _, x in E.read_patches(slide, plan, 16, 32, NORM, broken)]
    assert torch.equal(torch.cat(read), got[E.raster_order(plan)])
    # OpenSlide reads instead: another level, lossless tiles, or a first patch that is not OpenSlide's
    assert E.open_tiles(path, slide, E.plan_slide(slide, 1.0, 32, 60)) is None
    zlib = write_slide(tmp_path / "z.tif", tissue=((200, 0, 1024, 600),))
    assert E.open_tiles(zlib, openslide.OpenSlide(zlib), plan) is None
    monkeypatch.setattr(E.JpegTiles, "tile", lambda self, k: np.full((128, 128, 4), 7, np.uint8))
    assert E.open_tiles(path, slide, plan) is None
    assert torch.equal(read_all(path, 0.9, 32, 60), got)
    # --openslide-only: the tiles are not even opened
    monkeypatch.setattr(E, "open_tiles", None)
    assert torch.equal(read_all(path, 0.9, 32, 60, jpeg_tiles=False), got)
    assert E.get_args(["embed", "--weights", "w", "--slides", "s", "--out", "o", "--openslide-only"]).openslide_only


def test_resize_float_fallback_rounds_like_the_uint8_kernel(monkeypatch):
    # torchvision resizes uint8 in float on CPUs without AVX2: within one grey level of the native uint8 kernel
    x = torch.randint(0, 256, (3, 57, 57), dtype=torch.uint8)
    native, _ = E.eval_probe.resize_and_crop(x, 32)
    monkeypatch.setattr(E.eval_probe, "NATIVE_UINT8_RESIZE", False)
    fallback, _ = E.eval_probe.resize_and_crop(x, 32)
    assert fallback.dtype == torch.uint8 and (fallback.int() - native.int()).abs().max() <= 1


# -- the head ----------------------------------------------------------------------------------------------------

def test_abmil_invariances_and_a_hand_checked_forward():
    head = E.ABMIL(16, 3).eval()
    x = torch.randn(2, 9, 16)
    out = head(x)
    perm = x[:, torch.randperm(9)]
    padded = torch.cat([x, torch.full((2, 5, 16), float("-inf"))], 1)
    assert torch.allclose(head(perm), out, atol=1e-6) and torch.allclose(head(padded), out, atol=1e-6)
    assert [type(m).__name__ for m in head.classifier] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in head.classifier if isinstance(m, torch.nn.Linear)] == [128, 64, 3]

    tiny = E.ABMIL(2, 1, projected=2, attention=2, mlp=(2, 2))
    with torch.no_grad():
        for lin in (tiny.projector, tiny.attention_a, tiny.classifier[0], tiny.classifier[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        tiny.attention_b.weight.zero_()
        tiny.attention_b.bias.zero_()  # gate sigmoid(0) = 1/2
        tiny.attention_c.weight.copy_(torch.tensor([[1.0, 0.0]]))
        tiny.attention_c.bias.zero_()
        tiny.classifier[4].weight.copy_(torch.tensor([[1.0, -1.0]]))
        tiny.classifier[4].bias.fill_(0.5)
    bag = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [float("-inf")] * 2]])
    # attention logits tanh(h_0) / 2 for rows 1 and 2, the padding row gets none; z = weighted rows;
    # logit = relu(z_0) - relu(z_1) + 0.5
    a1, a2 = math.tanh(1) / 2, math.tanh(3) / 2
    w1 = math.exp(a1) / (math.exp(a1) + math.exp(a2))
    z = (w1 * 1 + (1 - w1) * 3, w1 * 2 + (1 - w1) * 0)
    assert tiny(bag).item() == pytest.approx(z[0] - z[1] + 0.5, abs=1e-6)


def spike_bags(n, seed, N=20, D=8):
    """Bag label 1 iff one of its patches is a 'spike' (feature 0 raised by 8); bags of random length."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, N, D), float("-inf"))
    for i in range(n):
        k = int(torch.randint(4, N + 1, (1,), generator=g))
        b = torch.randn(k, D, generator=g)
        if y[i]:
            b[int(torch.randint(0, k, (1,), generator=g)), 0] += 8.0
        x[i, :k] = b
    return x.half(), y


def test_training_loop_learns_a_spike_and_keeps_the_best_epoch():
    train, val, test = spike_bags(128, 0), spike_bags(64, 1), spike_bags(64, 2)
    head, info = E.fit_abmil(train, val, 2, seed=0, lr=1e-2, max_epochs=40, patience=5)
    pred = E.eva_predictions(E.predict_logits(head, test[0]))
    assert E.eva_score(pred, test[1], 2) == 1.0 and info["best_val_score"] == 1.0
    # the returned head is the best validation epoch's: its score is the recorded best
    assert E.eva_score(E.eva_predictions(E.predict_logits(head, val[0])), val[1], 2) == info["best_val_score"]


def test_eva_schedule_and_strict_improvement_early_stopping():
    select = E.BestOnValidation(patience=3)
    flags, stops = [], []
    for s in (0.5, 0.6, 0.6, 0.55, 0.6, 0.7, 0.7):
        flags.append(select.update(s))
        stops.append(select.stop)
    # ties are no improvement (min_delta 0, strict); 3 epochs in a row without one end training
    assert flags == [True, True, False, False, False, True, False] and stops.index(True) == 4
    assert select.best == 0.7

    g = torch.Generator().manual_seed(0)
    shuffled = (spike_bags(64, 3)[0], torch.randint(0, 2, (64,), generator=g))  # nothing to learn
    _, info = E.fit_abmil(shuffled, (spike_bags(32, 4)[0], torch.randint(0, 2, (32,), generator=g)), 2, seed=1,
                          lr=1e-3, max_epochs=40, patience=6)
    h = info["history"]
    assert [e["lr"] for e in h[:7]] == pytest.approx([1e-3 / 3] * 5 + [1e-3] * 2)  # ConstantLR: /3 for 5 epochs
    running = -1.0
    for e in h:  # an epoch is the best iff strictly above every earlier one
        assert e["best"] == (e["val"] > running)
        running = max(running, e["val"])
    assert len(h) < 40 and not any(e["best"] for e in h[-6:]) and h[-7]["best"]  # stopped after 6 without one
    assert info["best_epoch"] == len(h) - 7 and info["best_val_score"] == h[-7]["val"]


def test_eva_binary_threshold_rule_and_scores():
    # a batch entirely inside [0, 1] is taken as probabilities (no sigmoid): 0.3 -> 0; with a negative value
    # in the batch the sigmoid is applied first: 0.3 -> 1
    assert E.eva_predictions(torch.tensor([0.3, 0.7])).tolist() == [0, 1]
    assert E.eva_predictions(torch.tensor([0.3, -0.2])).tolist() == [1, 0]
    assert E.eva_predictions(torch.tensor([0.3, 0.7, 0.3, -0.2]), batch_size=2).tolist() == [0, 1, 1, 0]
    # balanced accuracy: TPR 2/3, TNR 1/2; no positives at all: TPR 0/0 counts as 0
    assert E.eva_score([1, 1, 0, 0, 1], [1, 1, 1, 0, 0], 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert E.eva_score([0, 0], [0, 0], 2) == 0.5
    # macro accuracy over classes present in target or prediction: class 2 predicted but absent counts as 0
    assert E.eva_score([0, 2, 1, 1], [0, 0, 1, 1], 4) == pytest.approx((0.5 + 1 + 0) / 3)


# -- dataset layouts -----------------------------------------------------------------------------------------------

def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_camelyon16_layout(tmp_path):
    for i in range(1, 160):
        touch(tmp_path / f"training/normal/normal_{i:03d}.tif")
    for i in range(1, 112):
        touch(tmp_path / f"training/tumor/tumor_{i:03d}.tif")
    rows = []
    for i in range(1, 130):
        touch(tmp_path / f"testing/images/test_{i:03d}.tif")
        rows.append(f"test_{i:03d},{'Tumor' if i % 3 == 0 else 'Normal'},Macro,Primary\n")
    (tmp_path / "testing/reference.csv").write_text("".join(rows))
    items, classes = E.load_camelyon16(str(tmp_path))
    by = {s: [it for it in items if it["split"] == s] for s in ("train", "val", "test")}
    assert classes == ["normal", "tumor"] and {s: len(v) for s, v in by.items()} == {"train": 216, "val": 54,
                                                                                     "test": 129}
    assert [it["id"] for it in by["val"]] == sorted(E.CAMELYON16_VAL)  # eva's sorted file order
    assert {it["label"] for it in by["val"] if it["id"].startswith("tumor")} == {1}
    assert next(it for it in by["test"] if it["id"] == "test_003")["label"] == 1
    os.remove(tmp_path / "training/tumor/tumor_046.tif")
    with pytest.raises(SystemExit, match="tumor_046"):
        E.load_camelyon16(str(tmp_path))
    touch(tmp_path / "training/tumor/tumor_046.tif")
    touch(tmp_path / "testing/images/test_200.tif")
    with pytest.raises(SystemExit, match="test_200"):
        E.load_camelyon16(str(tmp_path))


def test_panda_layout_and_eva_split(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["image_id,data_provider,isup_grade,gleason_score,noise_ratio_10\n"]
    for i in range(120):
        lines.append(f"{i:032x},karolinska,{i % 6},3+3,{int(rng.random() < 0.8)}\n")
        touch(tmp_path / f"train_images/{i:032x}.tiff")
    (tmp_path / "train_with_noisy_labels.csv").write_text("".join(lines))
    items, classes = E.load_panda(str(tmp_path))
    kept = [ln.split(",") for ln in lines[1:] if ln.strip().split(",")[4] != "0"]
    assert classes == list("012345") and {it["id"] for it in items} <= {r[0] for r in kept}
    for c in range(6):  # per class floor(r n) or 1 for train, val, test (PANDASmall: 0.1 / 0.05 / 0.05)
        n = sum(int(r[2]) == c for r in kept)
        got = [sum(it["split"] == s and it["label"] == c for it in items) for s in ("train", "val", "test")]
        assert got == [int(math.floor(r * n)) or 1 for r in (0.1, 0.05, 0.05)]
    assert items == E.load_panda(str(tmp_path))[0]  # seeded
    missing = kept[0][0]
    os.remove(tmp_path / f"train_images/{missing}.tiff")
    touch(tmp_path / "train_images/not_in_the_csv.tiff")
    with pytest.raises(SystemExit, match=f"{missing}.*not_in_the_csv"):
        E.load_panda(str(tmp_path))


def test_csv_layout(tmp_path):
    for i in range(20):
        touch(tmp_path / f"s{i}.svs")
    (tmp_path / "a.csv").write_text("slide_path,label\n" + "".join(f"s{i}.svs,{'ab'[i % 2]}\n" for i in range(20)))
    items, classes = E.load_slide_csv(str(tmp_path / "a.csv"))
    assert classes == ["a", "b"] and sorted(it["id"] for it in items) == sorted(f"s{i}" for i in range(20))
    assert [sum(it["split"] == s for it in items) for s in ("train", "val", "test")] == [14, 2, 4]  # 7+1+2 per class
    (tmp_path / "b.csv").write_text("".join(f"s{i}.svs,{i % 2},{'train' if i < 16 else 'test'}\n" for i in range(20)))
    items, _ = E.load_slide_csv(str(tmp_path / "b.csv"))
    assert [sum(it["split"] == s for it in items) for s in ("train", "val", "test")] == [12, 4, 4]
    (tmp_path / "c.csv").write_text("s1.svs,a\nmissing.svs,b\n")
    with pytest.raises(SystemExit, match="missing.svs"):
        E.load_slide_csv(str(tmp_path / "c.csv"))


# -- embed: resumable, bad slides reported, and the one-shot contract ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vits.pth"
    torch.save(M.ViT("vit_small", img_size=28, num_register_tokens=0).state_dict(), path)
    return str(path)


def embed_argv(weights, slides, out, *extra):
    return ["embed", "--weights", weights, "--slides", str(slides), "--out", str(out), "--mpp", "0.5", "--patch",
            "28", "--max-patches", "12", "--batch-size", "5", "--workers", "0", "--device", "cpu", *extra]


def test_embed_kill_and_rerun_gives_the_same_files(tmp_path, tiny_weights):
    d = tmp_path / "slides"
    d.mkdir()
    write_slide(d / "one.tif", size=256, levels=2, seed=1)
    write_slide(d / "two.tif", size=256, levels=2, seed=2, tissue=((0, 0, 128, 256),))
    out = tmp_path / "emb"
    E.main(embed_argv(tiny_weights, d, out))
    first = {f: (out / f).read_bytes() for f in ("one.pt", "two.pt", "manifest.csv")}
    obj = torch.load(out / "one.pt", weights_only=True)
    assert obj["features"].dtype == torch.float16 and obj["features"].shape == (12, 384)
    slide = openslide.OpenSlide(str(d / "one.tif"))
    assert obj["coords"].tolist() == E.plan_slide(slide, 0.5, 28, 12)["coords"].tolist()
    assert (out / "manifest.csv").read_text().splitlines()[1].startswith(f"one,{d / 'one.tif'},12,0.5")
    # a kill: one slide's file never written, a half-written temp file left behind; the rerun reads in a worker
    # process this time, which must not change a byte
    os.remove(out / "two.pt")
    (out / ".two.pt.tmp999").write_bytes(first["two.pt"][:100])
    report = E.main(embed_argv(tiny_weights, d, out)[:-4] + ["--workers", "1", "--device", "cpu"])
    assert {r["slide_id"]: r.get("note") for r in report} == {"one": "finished by an earlier run", "two": None}
    assert {f: (out / f).read_bytes() for f in first} == first
    with pytest.raises(SystemExit, match="other settings"):
        E.main(embed_argv(tiny_weights, d, out, "--max-patches", "7"))


def test_bad_slides_are_skipped_with_a_reason(tmp_path, tiny_weights):
    d = tmp_path / "slides"
    d.mkdir()
    write_slide(d / "good.tif", size=256, levels=1)
    write_slide(d / "blank.tif", size=256, levels=1, tissue=())
    write_slide(d / "nompp.tif", size=256, levels=1, mpp=None)
    write_slide(d / "tiny.tif", size=16, levels=1, tissue=((0, 0, 16, 16),))
    (d / "garbage.svs").write_text("not a slide")
    report = {r["slide_id"]: r for r in E.main(embed_argv(tiny_weights, d, tmp_path / "emb"))}
    assert report["good"]["status"] == "ok" and report["good"]["n_patches"] == 12
    reasons = {k: r.get("reason", "") for k, r in report.items() if r["status"] == "skipped"}
    assert set(reasons) == {"blank", "nompp", "tiny", "garbage"}
    assert "no tissue" in reasons["blank"] and "mpp" in reasons["nompp"] and "smaller than a patch" in reasons["tiny"]
    assert "OpenSlide" in reasons["garbage"]
    saved = json.load(open(tmp_path / "emb" / "report.json"))
    assert {r["slide_id"] for r in saved} == set(report) and sorted(os.listdir(tmp_path / "emb")) == [
        "good.pt", "manifest.csv", "report.json"]


def test_one_shot_contract_embeds_then_probes(tmp_path, tiny_weights):
    d = tmp_path / "cohort"
    d.mkdir()
    rows = []
    for i in range(12):  # label 1: tissue on the left; 0: on the right
        write_slide(d / f"s{i}.tif", size=128, levels=1, seed=i,
                    tissue=((0, 0, 64, 128),) if i % 2 else ((64, 0, 128, 128),))
        rows.append(f"s{i}.tif,{i % 2},{'train' if i < 6 else 'val' if i < 9 else 'test'}\n")
    (d / "labels.csv").write_text("".join(rows))
    out = tmp_path / "res" / "results.json"
    argv = ["--weights", tiny_weights, "--data", str(d / "labels.csv"), "--dataset", "csv", "--out", str(out),
            "--runs", "2", "--device", "cpu", "--patch", "28", "--max-patches", "4", "--workers", "0",
            "--max-epochs", "3"]
    res = E.main(argv)
    assert set(res["headline"]) == {"metric", "value", "std", "method", "split"} and res["headline"]["split"] == "test"
    assert len(res["abmil"]["runs"]) == 2 and res["settings"]["n"] == {"train": 6, "val": 3, "test": 3}
    assert json.load(open(out))["headline"] == res["headline"]
    caches = os.listdir(tmp_path / "res" / "slide_embeddings")
    assert len(caches) == 1 and caches[0].startswith("csv-")
    assert len(E.main(argv + ["--runs", "1"])["abmil"]["runs"]) == 1  # a rerun reuses the cache
