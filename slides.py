"""
What counts as a slide, and as tissue: the whole-slide images a path names (a slide, a folder searched recursively,
or a text file of paths), and OpenMidnight's HSV tissue rule, bit for bit as OpenCV computes it. prepare_patches.py
samples with them, slide_reader.py builds eva's tissue mask with the same converter, eval_slide.py lists slides.
"""
import functools
import glob
import os

import numpy as np

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def slide_id(path):
    return os.path.splitext(os.path.basename(path))[0]  # eva's wsi_id for Camelyon16 and PANDA


def list_slides(path):
    if os.path.isdir(path):
        found = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if f.lower().endswith(SLIDE_EXTENSIONS) and os.path.isfile(f)]
        return sorted(found)
    if not os.path.exists(path):
        raise SystemExit(f"input {path!r} does not exist: give a slide, a folder of slides or a text file of paths")
    if path.lower().endswith(SLIDE_EXTENSIONS):
        return [path]
    with open(path, errors="replace") as f:  # a text file of slide paths, one per line
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


@functools.lru_cache(maxsize=8)
def _hsv_tables(hsv_min):
    """OpenCV's uint8 RGB -> HSV (its color_hsv code) divides through fixed-point tables with 12 fractional bits,
    rounded half to even (np.rint, as cvRound). With v = max, d = max - min:
        S = (d * sdiv[v] + 2^11) >> 12,   H = (n * hdiv[d] + 2^11) >> 12, plus 180 if negative,
    n being the hue numerator of the max channel: g - b for R, b - r + 2d for G, r - g + 4d for B (-255..1275).
    Returns d_min[v], the smallest d with S >= S_min, and hue_ok[(n + 255) * 256 + d], whether H >= H_min."""
    h_min, s_min, _ = hsv_min
    q = np.arange(256, dtype=np.float64)
    sdiv = np.rint(np.divide(255 << 12, q, out=np.zeros(256), where=q > 0)).astype(np.int64)  # 0 for v = 0
    hdiv = np.rint(np.divide(180 << 12, 6 * q, out=np.zeros(256), where=q > 0)).astype(np.int64)
    S = (np.arange(256)[None, :] * sdiv[:, None] + 2048) >> 12  # [v, d]
    d_min = np.where(S >= s_min, np.arange(256), 256).min(axis=1).astype(np.int16)  # S grows with d
    H = (np.arange(-255, 5 * 255 + 1)[:, None] * hdiv[None, :] + 2048) >> 12  # [n + 255, d]
    return d_min, (np.where(H < 0, H + 180, H) >= h_min).ravel()


def tissue_fraction_map(rgb, hsv_min):
    """Per-pixel tissue test of OpenMidnight (Virchow's rule) on OpenCV's uint8 HSV, bit for bit as
    cv2.cvtColor(COLOR_RGB2HSV) + inRange (H = hue in degrees / 2, 0-180; S and V 0-255): H >= 90 (cyan through
    magenta, where H&E stains lie), S >= 8, V >= 103 by default. Two table look-ups per pixel and no division:
    this runs on every candidate patch."""
    d_min, hue_ok = _hsv_tables(tuple(hsv_min))
    rgb = np.asarray(rgb, dtype=np.uint8)
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    d = v - np.minimum(np.minimum(r, g), b)
    n = np.where(v == r, g - b, np.where(v == g, b - r + 2 * d, r - g + 4 * d))
    return (v >= hsv_min[2]) & (d >= np.take(d_min, v)) & np.take(hue_ok, (n.astype(np.int32) + 255) * 256 + d)


def tissue_fraction(rgb, hsv_min):
    return float(tissue_fraction_map(rgb, hsv_min).mean())
