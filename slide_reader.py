"""
The patches of a whole-slide image as eva reads them, fast: which patches (eva's mpp, levels, tissue mask and
ForegroundGridSampler) and their pixels (OpenSlide's, or the same pixels from JPEG tiles decoded here), resized and
normalised as eva's ResizeAndCrop does. eval_slide.py embeds them; the bags feed its ABMIL probe.

    slide = openslide.OpenSlide(path)
    plan = plan_slide(slide, target_mpp=0.25, patch=224, max_patches=1000)
    for index, x in read_patches(slide, plan, 64, 224, eval_probe.NORMS["imagenet"], open_tiles(path, slide, plan)):
        ...  # x: (<= 64, 3, 224, 224) float32, the patches plan["coords"][index] in raster order
"""
import ctypes
import io
import sys

import numpy as np
import torch
from PIL import Image

import eval_probe
from slides import tissue_fraction_map

SEED = 42  # eva's sampler seed (eval_slide uses it as eva does: split seed and global seed too)
MIN_FOREGROUND = 0.35  # ForegroundGridSampler's min_foreground_ratio
SATURATION = 20  # get_mask's threshold: a pixel is tissue if its HSV saturation is > 20
TILE_CACHE = 256 << 20  # bytes of decoded tiles that each reader process keeps per slide


# -----------------------------------------------------------------------------
# which patches: eva's mpp, levels, tissue mask and ForegroundGridSampler


def slide_mpp(slide):
    """Level-0 microns per pixel as eva's OpenSlide backend reads it: the mean of openslide.mpp-x/y, else
    tiff.X/YResolution in the tiff.ResolutionUnit; raises ValueError if neither is there (never guessed)."""
    p = slide.properties
    if p.get("openslide.mpp-x") and p.get("openslide.mpp-y"):
        return (float(p["openslide.mpp-x"]) + float(p["openslide.mpp-y"])) / 2.0
    to_um = {"meter": 1e6, "decimeter": 1e5, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1,
             "nanometer": 1e-3}
    if p.get("tiff.XResolution") and p.get("tiff.YResolution") and p.get("tiff.ResolutionUnit"):
        unit = p["tiff.ResolutionUnit"]
        if unit not in to_um:  # "inch" is usually a 72-dpi placeholder: eva refuses it too
            raise ValueError(f"no mpp: tiff.ResolutionUnit {unit!r} is not a length unit eva accepts")
        return (to_um[unit] / float(p["tiff.XResolution"]) + to_um[unit] / float(p["tiff.YResolution"])) / 2.0
    raise ValueError("no mpp in the metadata (openslide.mpp-x/y or tiff.XResolution): the slide is skipped")


def read_level(mpp0, downsamples, target):
    """The level eva reads: the largest mpp still <= target, else the finest level."""
    mpps = mpp0 * np.array(downsamples)
    below = np.where(mpps > target, 0, mpps)
    return int(np.argmin(mpps) if below.max() == 0 else np.argmax(below))


def mask_level(mpp0, downsamples, target, patch):
    """The coarsest level where a patch still covers >= 3 x 3 mask pixels (eva's get_mask_level)."""
    for k, level_mpp in reversed(list(enumerate(mpp0 * np.array(downsamples)))):
        if int(target / level_mpp * patch) ** 2 >= 9:
            return k
    raise ValueError("no level keeps a patch >= 3x3 pixels for the tissue mask")


def read_rgb(slide, location, level, size):
    """read_region as eva's backend post-processes it, as an (h, w, 3) uint8 RGB array: transparent pixels
    (outside the scan) white. OpenSlide's premultiplied ARGB (bytes B, G, R, A) is read straight into memory and
    reordered by numpy, skipping openslide-python's conversion and PIL's copy; a region with partly transparent
    pixels (which need un-premultiplying) takes openslide-python's own path."""
    from openslide import lowlevel
    (w, h), osr = size, getattr(slide, "_osr", None)
    if osr is not None and hasattr(lowlevel, "_read_region") and sys.byteorder == "little" and w * h > 0:
        argb = np.empty((h, w), np.uint32)
        lowlevel._read_region(osr, argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)), *location, level, w, h)
        bgra = argb.view(np.uint8).reshape(h, w, 4)
        alpha = bgra[..., 3]
        if alpha.min() == 255:  # the usual case: all inside the scan
            return bgra[..., [2, 1, 0]]
        if ((alpha == 0) | (alpha == 255)).all():
            rgb = bgra[..., [2, 1, 0]]
            rgb[alpha == 0] = 255
            return rgb
    rgba = np.array(slide.read_region(location, level, size))
    rgba[rgba[..., 3] == 0] = 255
    return np.ascontiguousarray(rgba[..., :3])


def tissue_mask(rgb, threshold=SATURATION):
    """eva's get_mask: OpenCV's uint8 HSV saturation above the threshold (prepare_patches' exact OpenCV rule with
    S >= threshold + 1 and no hue or value bound), as uint8."""
    return tissue_fraction_map(rgb, (0, threshold + 1, 0)).astype(np.uint8)


def plan_slide(slide, target_mpp, patch, max_patches, seed=SEED):
    """eva's ForegroundGridSampler on one slide: a level-0 grid of step int(target / mpp0 * patch), listed x-outer
    and y-inner, shuffled by default_rng(seed); walk it and keep a patch if >= 35% of its mask window is tissue,
    until max_patches. Returns the coordinates in that order and how eva reads them (level, read size)."""
    mpp0 = slide_mpp(slide)
    (W0, H0), ds = slide.level_dimensions[0], slide.level_downsamples
    step = int(target_mpp / mpp0 * patch)
    if step > W0 or step > H0:
        raise ValueError(f"slide ({W0}x{H0} px) smaller than a patch ({step} px at level 0)")
    k = mask_level(mpp0, ds, target_mpp, patch)
    mask = tissue_mask(read_rgb(slide, (0, 0), k, slide.level_dimensions[k]))
    sx, sy = W0 / slide.level_dimensions[k][0], H0 / slide.level_dimensions[k][1]
    grid = [(x, y) for x in range(0, W0 - step + 1, step) for y in range(0, H0 - step + 1, step)]
    order = list(range(len(grid)))
    np.random.default_rng(seed).shuffle(order)
    w, h = int(step / sx), int(step / sy)
    coords = []
    for i in order:
        if len(coords) >= max_patches:
            break
        x, y = grid[i]
        window = mask[int(y / sy):int(y / sy) + h, int(x / sx):int(x / sx) + w]
        if window.size and window.sum() / window.size >= MIN_FOREGROUND:
            coords.append(grid[i])
    level = read_level(mpp0, ds, target_mpp)
    return {"coords": np.array(coords, dtype=np.int64).reshape(-1, 2), "mpp": mpp0, "level": level, "step": step,
            "read_size": int(target_mpp / (mpp0 * ds[level]) * patch), "downsample": float(ds[level])}


# -----------------------------------------------------------------------------
# reading: OpenSlide's pixels in raster order, eva's resize (a uint8 tensor through torchvision's Resize)


def raster_order(plan):
    """The plan's patches in raster order: neighbouring patches share tiles, so each tile is decoded about once
    (eva's shuffled order decodes a tile for every patch that touches it on a real slide, far larger than any
    cache)."""
    return sorted(range(len(plan["coords"])), key=lambda i: (int(plan["coords"][i][1]), int(plan["coords"][i][0])))


class JpegTiles:
    """Level 0 of a tiled JPEG TIFF (Aperio .svs, Camelyon16's and PANDA's TIFFs) decoded here: each tile once by
    Pillow's libjpeg-turbo, kept decoded, patches cropped from it in numpy. OpenSlide decodes the same tiles, then
    composites every pixel through cairo: 20-35 ns a pixel on our 2-core machine even for tiles in its cache.
    open_tiles checks a slide's first patch against OpenSlide's read_region before anything is read this way."""

    def __init__(self, path, width, height, cache_bytes=TILE_CACHE):
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # only the TIFF's tags are read here
        try:
            with Image.open(path) as im:
                for k in range(getattr(im, "n_frames", 1)):
                    im.seek(k)
                    tags = dict(im.tag_v2)
                    if im.size == (width, height) and 322 in tags:  # the tiled directory of level 0
                        break
                else:
                    raise ValueError("no tiled directory of level 0's size")
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        # tags 259 compression (7: JPEG), 277 samples, 258 bits, 284 planar (1: interleaved), 262 photometric
        # (2: RGB, 6: YCbCr)
        if (tags.get(259), tags.get(277), tuple(tags.get(258, ())), tags.get(284, 1)) != (7, 3, (8, 8, 8), 1) \
                or tags.get(262) not in (2, 6):
            raise ValueError("level 0 is not 8-bit RGB JPEG tiles")
        self.tile_w, self.tile_h = tags[322], tags[323]
        self.across = -(-width // self.tile_w)  # tiles per row
        self.offsets, self.counts = tags[324], tags[325]
        # tiles are abbreviated JPEG streams: the shared tables (tag 347) go in after their SOI marker; an Adobe
        # APP14 marker with transform 0 tells libjpeg that RGB-photometric tiles hold RGB, not YCbCr, as libtiff does
        tables = bytes(tags.get(347, b"\xff\xd8\xff\xd9"))[2:-2]
        rgb = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" if tags[262] == 2 else b""
        self.header, self.file, self.cache, self.cache_bytes = rgb + tables, open(path, "rb"), {}, cache_bytes

    def tile(self, k):
        if k in self.cache:
            self.cache[k] = self.cache.pop(k)  # the newest again: the cache drops the least recently used
        else:
            self.file.seek(self.offsets[k])
            data = self.file.read(self.counts[k])
            with Image.open(io.BytesIO(data[:2] + self.header + data[2:])) as im:
                if (im.mode, im.size) != ("RGB", (self.tile_w, self.tile_h)):
                    raise ValueError(f"tile {k} decodes to {im.mode} {im.size}")
                t = np.frombuffer(im.tobytes("raw", "RGBX"), np.uint8).reshape(self.tile_h, self.tile_w, 4)
            while self.cache and (len(self.cache) + 1) * t.nbytes > self.cache_bytes:
                del self.cache[next(iter(self.cache))]
            self.cache[k] = t
        return self.cache[k]

    def region(self, x, y, w, h):
        """The (h, w, 4) RGBX pixels at level-0 (x, y) (X: a fourth byte, which makes torch's resize fastest); the
        region lies inside the level."""
        out = np.empty((h, w, 4), np.uint8)
        for ty in range(y // self.tile_h, (y + h - 1) // self.tile_h + 1):
            for tx in range(x // self.tile_w, (x + w - 1) // self.tile_w + 1):
                x0, y0 = max(x, tx * self.tile_w), max(y, ty * self.tile_h)
                x1, y1 = min(x + w, (tx + 1) * self.tile_w), min(y + h, (ty + 1) * self.tile_h)
                t = self.tile(ty * self.across + tx)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = t[y0 - ty * self.tile_h:y1 - ty * self.tile_h,
                                                      x0 - tx * self.tile_w:x1 - tx * self.tile_w]
        return out

    def close(self):
        self.file.close()


def open_tiles(path, slide, plan, cache_bytes=TILE_CACHE):
    """JpegTiles for the plan's patches, or None: OpenSlide reads them when they are not level-0 patches inside the
    slide, the slide is not stored as JPEG tiles, or its first patch is not exactly OpenSlide's."""
    s, (W, H) = plan["read_size"], slide.level_dimensions[0]
    if plan["level"] != 0 or len(plan["coords"]) == 0 or (plan["coords"] < 0).any() \
            or (plan["coords"] + s > np.array([W, H])).any():
        return None
    try:
        tiles = JpegTiles(path, W, H, cache_bytes)
    except Exception:  # not a TIFF Pillow parses, not JPEG tiles: OpenSlide's formats are many
        return None
    x, y = (int(c) for c in plan["coords"][0])
    try:
        if np.array_equal(tiles.region(x, y, s, s)[..., :3], read_rgb(slide, (x, y), 0, (s, s))):
            return tiles
    except Exception:  # a tile Pillow cannot decode
        pass
    tiles.close()
    return None


def to_input(patches, size, norm):
    """(s, s, 3 or 4) uint8 RGB(X) patches -> the backbone's normalised (k, 3, size, size) float32 batch, as eva's
    ResizeAndCrop (Resize, ToDtype(scale) = x * (1/255), Normalize). Each channel is resized on its own, so a
    fourth one changes nothing; the scaling and the normalisation run in place in the batch: the same numbers as
    eva's per-patch tensors, without a fresh 600 KB tensor per patch and op (each costs page faults)."""
    x = torch.empty(len(patches), 3, size, size)
    mean, std = (torch.tensor(v)[:, None, None] for v in norm)
    for out, p in zip(x, patches):  # channels-last views: torch's uint8 resize is fastest on them
        rgb = eval_probe.resize_and_crop(torch.from_numpy(p).permute(2, 0, 1), size)[0][:3].contiguous()
        out.copy_(rgb).mul_(1.0 / 255).sub_(mean).div_(std)
    return x


class SlideReader(torch.utils.data.IterableDataset):
    """Worker processes each take whole slides (one OpenSlide handle, and JpegTiles where the slide allows, per
    worker per slide, opened there) and yield
    {"slide", "plan"} once, then {"slide", "index", "x"} batches of normalised patches; {"slide", "error"} for a
    slide that cannot be read."""

    def __init__(self, jobs, target_mpp, patch, max_patches, batch_size, norm, jpeg_tiles=True):
        self.jobs, self.target_mpp, self.patch, self.max_patches = jobs, target_mpp, patch, max_patches
        self.batch_size, self.norm, self.jpeg_tiles = batch_size, norm, jpeg_tiles

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for i, path in (self.jobs if info is None else self.jobs[info.id::info.num_workers]):
            try:
                yield from self.read_slide(i, path)
            except Exception as e:  # unreadable, corrupt tile, no mpp, too small: reported, never guessed
                yield {"slide": i, "error": f"{type(e).__name__}: {e}"}

    def read_slide(self, i, path):
        import openslide
        slide, tiles = openslide.OpenSlide(path), None
        if hasattr(openslide, "OpenSlideCache"):  # > OpenSlide's 32 MiB: tiles of the previous rows stay decoded
            slide.set_cache(openslide.OpenSlideCache(TILE_CACHE))
        try:
            plan = plan_slide(slide, self.target_mpp, self.patch, self.max_patches)
            yield {"slide": i, "plan": plan}
            tiles = open_tiles(path, slide, plan) if self.jpeg_tiles else None
            for index, x in read_patches(slide, plan, self.batch_size, self.patch, self.norm, tiles):
                yield {"slide": i, "index": index, "x": x}
        finally:
            slide.close()
            if tiles is not None:
                tiles.close()


def read_patches(slide, plan, batch_size, patch, norm, tiles=None):
    """(indices into the plan, normalised patches) in batches of at most batch_size, in raster order; from `tiles`
    (open_tiles) when given, else through OpenSlide."""
    s, buf, idx = plan["read_size"], [], []
    for j in raster_order(plan):
        x, y = (int(c) for c in plan["coords"][j])
        try:
            rgb = tiles.region(x, y, s, s) if tiles else None
        except Exception:  # a tile Pillow cannot decode (say, one missing from the scan): OpenSlide's answer
            rgb = None
        buf.append(read_rgb(slide, (x, y), plan["level"], (s, s)) if rgb is None else rgb)
        idx.append(j)
        if len(buf) == batch_size:
            yield torch.tensor(idx), to_input(buf, patch, norm)
            buf, idx = [], []
    if buf:
        yield torch.tensor(idx), to_input(buf, patch, norm)
