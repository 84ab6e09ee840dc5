"""
Whole-slide images -> a sharded, random-access patch store (the blog's pre-extracted variant of OpenMidnight's data).

    python prepare_patches.py SLIDES --out STORE [--patches-per-level N] [--mpp 0.25 0.5 1 2] [--workers W]

SLIDES is a slide, a folder of slides (searched recursively) or a text file of slide paths; by default the bundled
sample slide. Two sampling modes:
  levels (OpenMidnight): N patches of 224x224 read natively at every pyramid level (or --levels);
  mpp (Midnight):        N patches per target resolution, read from the nearest finer level and resized.
Positions are drawn in level-0 coordinates over the whole slide, with the patch inside it (OpenMidnight's released
list drew level-k positions as if they were level-0: RECIPE.md §7.1). Candidates come from a tissue mask of a
thumbnail; each patch is then verified at full resolution with OpenMidnight's HSV rule.

Store layout, each file written to a temp file, fsynced and renamed (files.atomic_write), in this order:
  STORE/shards/<slide key>.bin       a slide's patches, encoded (JPEG or PNG) and concatenated
  STORE/shards/<slide key>.idx.npz   per patch: offset and length in the .bin, level, x, y (level 0), mpp, read size;
                                     the slide's path and report (a .bin without it is redone, never read)
  STORE/report.json, manifest.json   every slide's outcome; the finished shards (the store exists once it is written)
  STORE/index.npy, index.json        all patches' records in one memory-mapped file, each column at its smallest
                                     type (~17 bytes a patch: 490 MB for 28.8M), and what it was built from
                                     (data.build_index; a store written before it gets it on first open)
A killed run re-run with the same command skips finished slides and ends with the same store. STORE/qc/ holds
thumbnails with the tissue mask and the sampled patches drawn on them. --num-shards parts write
manifest-part*.json and report-part*.json; --merge combines them into manifest.json, report.json and the index.
"""
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import data
from cli import Parser, bounded, progress
from files import atomic_write
from slides import list_slides, tissue_fraction, tissue_fraction_map

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE_SLIDE = os.path.join(HERE, "assets", "cmu_small_region.svs")
THUMB_MAX = 1024  # longest side of the tissue-mask thumbnail
DEMO_PROBE_PER_CLASS = 100  # the demo's probe set: 300 images, 60 of them held out
WHOLE_LEVEL_MAX = 32e6  # a level of at most this many pixels (and an integer downsample) is read once, then cut


def get_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("input", nargs="?", default=SAMPLE_SLIDE, help="slide, folder of slides, or text file of paths")
    p.add_argument("--out", default=os.path.join(HERE, "data", "sample_store"), help="patch store directory")
    p.add_argument("--patches-per-level", type=bounded(int, 1), default=200,
                   help="patches per slide and level (or per slide and target mpp); overlaps allowed")
    p.add_argument("--levels", type=bounded(int, 0), nargs="*", default=None,
                   help="levels mode: which levels (default all)")
    p.add_argument("--mpp", type=bounded(float, 1e-3), nargs="*", default=None,
                   help="mpp mode: target microns per pixel, e.g. 0.25 0.5 1 2 (slides without mpp are skipped)")
    p.add_argument("--patch-size", type=bounded(int, 8), default=224, help="patch side in pixels")
    p.add_argument("--format", choices=("jpeg", "png"), default="jpeg", help="png is lossless and ~5x larger")
    p.add_argument("--jpeg-quality", type=bounded(int, 1, 100), default=90, help="JPEG quality (1-100)")
    p.add_argument("--min-tissue", type=bounded(float, 0.0, 1.0), default=0.6,
                   help="keep a patch if more than this fraction of its pixels pass the HSV tissue test")
    p.add_argument("--hsv-min", type=bounded(int, 0, 255), nargs=3, default=(90, 8, 103), metavar=("H", "S", "V"),
                   help="tissue pixel: H >= H (OpenCV's 0-180 hue), S >= S, V >= V (0-255)")
    p.add_argument("--max-tries", type=bounded(int, 1), default=20,
                   help="candidate reads per wanted patch before giving up")
    p.add_argument("--workers", type=bounded(int, 1), default=1, help="processes over slides")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seeds the positions (with each slide's name)")
    p.add_argument("--num-shards", type=bounded(int, 1), default=1, help="split the slide list over machines")
    p.add_argument("--shard-index", type=bounded(int, 0), default=0, help="which part of the slide list this run does")
    p.add_argument("--merge", nargs="*", default=None, metavar="PART",
                   help="combine finished parts (other stores, or parts written into --out) into --out")
    p.add_argument("--no-qc", action="store_true", help="skip the QC thumbnails")
    p.add_argument("--demo", action="store_true",
                   help="the demo's data from the bundled slide: a 400-patch store in --out and a labelled probe "
                   "set in --probe-out (which magnification, 0.5, 1 or 2 um/px, a patch was read at)")
    p.add_argument("--probe-out", default=os.path.join(HERE, "data", "sample_probe"), help="the demo's probe set")
    args = p.parse_args(argv)
    if args.shard_index >= args.num_shards:
        p.error(f"--shard-index {args.shard_index} must be below --num-shards {args.num_shards}")
    return args


# -----------------------------------------------------------------------------
# one slide -> one shard


def slide_key(path):
    # stable across runs and machines that see the same path string; unique for same-named slides
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def plan_reads(slide, args):
    """The (name, source level, read size, level-0 footprint, stored mpp) of each level / target resolution."""
    mpp0 = slide.properties.get("openslide.mpp-x")
    mpp0 = float(mpp0) if mpp0 else None
    P = args.patch_size
    plans, problems = [], []
    if args.mpp:
        if mpp0 is None:
            return [], ["no mpp metadata (openslide.mpp-x): mpp mode needs it; this slide is skipped, not guessed"]
        for target in args.mpp:
            if target < mpp0 * 0.99:
                problems.append(f"{target} mpp is finer than the scan ({mpp0:.3f} mpp)")
                continue
            # the nearest level at least as sharp as the target
            level = max(k for k, ds in enumerate(slide.level_downsamples) if mpp0 * ds <= target * 1.001)
            size = int(round(P * target / (mpp0 * slide.level_downsamples[level])))
            plans.append((f"{target}mpp", level, size, P * target / mpp0, target))
    else:
        for level in (args.levels if args.levels is not None else range(slide.level_count)):
            if level >= slide.level_count:
                problems.append(f"level {level} does not exist ({slide.level_count} levels)")
                continue
            ds = slide.level_downsamples[level]
            plans.append((f"level{level}", level, P, P * ds, mpp0 * ds if mpp0 else float("nan")))
    return plans, problems


def sample_slide(path, args):
    """Sample, verify and encode one slide's patches. Returns (payloads, index arrays, report dict, qc image)."""
    import openslide  # imported here so that a broken OpenSlide install fails per slide, with its reason

    report = {"slide": path, "key": slide_key(path), "n_patches": 0, "levels": {}}
    slide = openslide.OpenSlide(path)
    W0, H0 = slide.dimensions
    plans, problems = plan_reads(slide, args)
    report["problems"] = problems
    # tissue mask on a thumbnail; candidates are drawn from it, then every patch is verified at full resolution
    ds_t = max(W0, H0) / THUMB_MAX if max(W0, H0) > THUMB_MAX else 1.0
    thumb = slide.get_thumbnail((max(1, int(W0 / ds_t)), max(1, int(H0 / ds_t)))).convert("RGB")
    mask = tissue_fraction_map(np.asarray(thumb), args.hsv_min)
    sx, sy = W0 / mask.shape[1], H0 / mask.shape[0]  # level-0 pixels per thumbnail pixel
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    # positions depend on the slide's file name, not on where it lies: every copy of a store is the same
    rng = np.random.default_rng([args.seed, int(hashlib.sha1(os.path.basename(path).encode()).hexdigest()[:12], 16)])
    payloads, rows, boxes = [], [], []
    for name, level, size, footprint, mpp in plans:
        stats = {"accepted": 0, "tries": 0}
        report["levels"][name] = stats
        if footprint > W0 or footprint > H0:
            stats["skipped"] = f"slide ({W0}x{H0}) smaller than a patch footprint ({footprint:.0f} px at level 0)"
            continue
        # candidate top-left cells: the thumbnail window under the patch is mostly tissue
        fw, fh = max(1, int(round(footprint / sx))), max(1, int(round(footprint / sy)))
        nh, nw = mask.shape[0] - fh + 1, mask.shape[1] - fw + 1
        window = (integral[fh:fh + nh, fw:fw + nw] - integral[:nh, fw:fw + nw]
                  - integral[fh:fh + nh, :nw] + integral[:nh, :nw]) / (fw * fh)
        cand_y, cand_x = np.nonzero(window >= min(0.5, args.min_tissue))
        if len(cand_x) == 0:
            stats["skipped"] = "no tissue in the thumbnail mask"
            continue
        max_x, max_y = int(W0 - footprint), int(H0 - footprint)
        # read_region costs ~0.7 ms per patch even from cached tiles; a small level is read once and sliced, which
        # gives the same pixels when level coordinates are whole numbers (OpenSlide interpolates fractional ones)
        ds = slide.level_downsamples[level]
        whole = None
        if ds == int(ds) and np.prod(slide.level_dimensions[level]) <= WHOLE_LEVEL_MAX:
            whole = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))
        while stats["accepted"] < args.patches_per_level and stats["tries"] < args.max_tries * args.patches_per_level:
            stats["tries"] += 1
            c = rng.integers(len(cand_x))
            x = min(int((cand_x[c] + rng.random()) * sx), max_x)
            y = min(int((cand_y[c] + rng.random()) * sy), max_y)
            if whole is not None:
                xk, yk = int(x // ds), int(y // ds)
                x, y = int(xk * ds), int(yk * ds)
                arr = whole[yk:yk + size, xk:xk + size]
                patch = Image.fromarray(arr)
            else:
                patch = slide.read_region((x, y), level, (size, size)).convert("RGB")
                arr = np.asarray(patch)
            if size != args.patch_size:
                patch = patch.resize((args.patch_size, args.patch_size), Image.BICUBIC)
                arr = np.asarray(patch)
            if tissue_fraction(arr, args.hsv_min) <= args.min_tissue:
                continue
            buf = io.BytesIO()
            if args.format == "jpeg":
                patch.save(buf, "JPEG", quality=args.jpeg_quality, subsampling=0)  # 4:4:4: H&E detail is in the colour
            else:
                patch.save(buf, "PNG", compress_level=1)
            payloads.append(buf.getvalue())
            rows.append((level, x, y, mpp, size))
            boxes.append((x, y, footprint))
            stats["accepted"] += 1
        stats["accept_rate"] = round(stats["accepted"] / max(stats["tries"], 1), 3)
    slide.close()
    report["n_patches"] = len(payloads)
    qc = None if args.no_qc else draw_qc(thumb, mask, boxes, sx, sy)
    return payloads, rows, report, qc


def draw_qc(thumb, mask, boxes, sx, sy):
    """The thumbnail, tissue tinted green, sampled patches outlined in red."""
    img = thumb.copy()
    tint = Image.new("RGB", img.size, (0, 200, 0))
    img = Image.composite(Image.blend(img, tint, 0.35), img, Image.fromarray(mask.astype(np.uint8) * 255))
    draw = ImageDraw.Draw(img)
    for x, y, fp in boxes:
        draw.rectangle([x / sx, y / sy, (x + fp) / sx, (y + fp) / sy], outline=(255, 0, 0))
    return img


def process_slide(job):
    """Worker: one slide -> shards/<key>.bin + .idx.npz (+ qc/<key>.jpg). Never raises: failures are reported."""
    path, args = job
    key = slide_key(path)
    idx_path = os.path.join(args.out, "shards", key + ".idx.npz")
    if os.path.exists(idx_path):  # finished by an earlier run: reuse it
        with np.load(idx_path) as z:
            return {**json.loads(str(z["report"])), "earlier_run": True}
    t0 = time.time()
    try:
        payloads, rows, report, qc = sample_slide(path, args)
    except Exception as e:  # unreadable, truncated, corrupt, not a slide: skip with the reason
        return {"slide": path, "key": key, "n_patches": 0, "status": "skipped", "reason": f"{type(e).__name__}: {e}"}
    if not payloads:
        why = [v["skipped"] for v in report["levels"].values() if "skipped" in v] + report.get("problems", [])
        report.update(status="skipped", reason="; ".join(why) or "no patch passed the tissue test "
                      f"(accept rates {[v.get('accept_rate') for v in report['levels'].values()]})")
        return report
    report.update(status="ok", seconds=round(time.time() - t0, 2))
    try:
        write_shard(args.out, key, path, payloads, rows, report, qc)
    except OSError as e:  # a full disk stops the whole run (the other slides would fail alike)
        return {"slide": path, "key": key, "n_patches": 0, "status": "write_failed", "reason": str(e)}
    return report


def write_shard(out, key, slide, payloads, rows, report, qc=None, payload_of=None):
    """One slide's part of the store, each file written atomically and the index last (a shard without its index is
    redone by the next run, never read): shards/<key>.bin, the encoded payloads concatenated; qc/<key>.jpg; then
    shards/<key>.idx.npz, per patch its payload's offset and length in the .bin, level, x, y, mpp and read size
    (rows: (level, x, y, mpp, size) per patch), with the slide's path and report. Patch i is payloads[payload_of[i]]
    (default payloads[i]; bench.py's synthetic stores let many patches share a few real JPEGs)."""
    sizes = np.array([len(p) for p in payloads], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    which = np.arange(len(payloads)) if payload_of is None else np.asarray(payload_of)
    rows = np.asarray(rows, dtype=np.float64)
    atomic_write(os.path.join(out, "shards", key + ".bin"), lambda f: [f.write(p) for p in payloads],
                 size_hint=int(sizes.sum()))
    if qc is not None:
        os.makedirs(os.path.join(out, "qc"), exist_ok=True)
        atomic_write(os.path.join(out, "qc", key + ".jpg"), lambda f: qc.save(f, "JPEG", quality=85))
    atomic_write(os.path.join(out, "shards", key + ".idx.npz"), lambda f: np.savez(
        f, offsets=starts[which], lengths=sizes[which], level=rows[:, 0].astype(np.int32),
        x=rows[:, 1].astype(np.int64), y=rows[:, 2].astype(np.int64), mpp=rows[:, 3], size=rows[:, 4].astype(np.int32),
        slide=np.array(slide), report=np.array(json.dumps(report))))


# -----------------------------------------------------------------------------
# the whole run


def write_manifest(out, reports, args, name="manifest.json", settings=None):
    shards = [{"key": r["key"], "slide": r["slide"], "n": r["n_patches"]} for r in reports if r.get("status") == "ok"]
    shards.sort(key=lambda s: s["key"])
    settings = settings or {
        "format": args.format, "patch_size": args.patch_size,
        "sampling": {"mpp": args.mpp, "levels": args.levels, "patches_per_level": args.patches_per_level,
                     "seed": args.seed, "min_tissue": args.min_tissue, "hsv_min": list(args.hsv_min)}}
    manifest = {"version": 1, **settings, "shards": shards, "n_patches": sum(s["n"] for s in shards)}
    atomic_write(os.path.join(out, name), lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def write_report(out, reports, name="report.json"):
    atomic_write(os.path.join(out, name), lambda f: f.write(json.dumps(reports, indent=1).encode()))


def prepare(args):
    """Run the sampling; returns the manifest (None when nothing was produced)."""
    os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
    slides = list_slides(args.input)
    if args.num_shards > 1:
        slides = [s for i, s in enumerate(slides) if i % args.num_shards == args.shard_index]
    reports, n_written = [], 0
    t0 = time.time()
    jobs = [(s, args) for s in slides]
    bar = progress(total=len(jobs), unit="slide", desc="slides", dynamic_ncols=True)
    pool = Pool(args.workers) if args.workers > 1 else None
    results = pool.imap_unordered(process_slide, jobs) if pool else map(process_slide, jobs)
    for rep in results:
        if rep.get("status") == "write_failed":
            if pool:
                pool.terminate()
            raise SystemExit(f"could not write the shard of {rep['slide']}: {rep['reason']}; finished slides are "
                             "kept and the same command resumes")
        reports.append(rep)
        n_written += rep["n_patches"]
        bar.set_postfix(patches=n_written, per_s=f"{n_written / max(time.time() - t0, 1e-9):.0f}")
        bar.update()
        if rep.get("status") != "ok":
            tqdm.write(f"skipped {rep['slide']}: {rep.get('reason')}")
        elif rep.get("problems"):
            tqdm.write(f"warning {rep['slide']}: {'; '.join(rep['problems'])}")
    bar.close()
    if pool:
        pool.close()
        pool.join()
    reports.sort(key=lambda r: r["key"])
    part = f"-part{args.shard_index}-of{args.num_shards}" if args.num_shards > 1 else ""
    write_report(args.out, reports, f"report{part}.json")
    manifest = write_manifest(args.out, reports, args, f"manifest{part}.json")
    if not part and not data.index_is_current(args.out):  # a finished store's last step (parts: at --merge)
        data.build_index(args.out)
    ok = sum(r.get("status") == "ok" for r in reports)
    earlier = sum(r.get("status") == "ok" and r.get("earlier_run", False) for r in reports)
    print(f"{manifest['n_patches']} patches from {ok}/{len(slides)} slides in {time.time() - t0:.1f}s ("
          f"{f'{earlier} of them finished by an earlier run, ' if earlier else ''}{len(slides) - ok} skipped, see "
          f"{os.path.join(args.out, 'report' + part + '.json')})")
    return manifest if manifest["n_patches"] else None


def merge(args):
    """Combine finished parts into args.out: part manifests written into args.out by --num-shards runs, and/or
    other store directories (their shards are hard-linked or copied in)."""
    os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
    part_files = sorted(glob.glob(os.path.join(args.out, "manifest-part*.json")))
    for store in args.merge:
        part_files += sorted(glob.glob(os.path.join(store, "manifest*.json")))
    reports, settings = {}, None
    for pf in part_files:
        src = os.path.dirname(pf)
        with open(pf) as f:
            part = json.load(f)
        report_file = os.path.join(src, os.path.basename(pf).replace("manifest", "report", 1))
        if os.path.exists(report_file):  # every slide of the part, skipped ones with their reason
            with open(report_file) as f:
                reports.update({r["key"]: r for r in json.load(f)})
        settings = settings or {k: part[k] for k in ("format", "patch_size", "sampling")}
        for shard in part["shards"]:
            for ext in (".bin", ".idx.npz"):
                a = os.path.join(src, "shards", shard["key"] + ext)
                b = os.path.join(args.out, "shards", shard["key"] + ext)
                if os.path.abspath(a) != os.path.abspath(b) and not os.path.exists(b):
                    try:
                        os.link(a, b)
                    except OSError:  # another filesystem: a copy, atomic like every write here
                        with open(a, "rb") as src_file:
                            atomic_write(b, lambda f: shutil.copyfileobj(src_file, f))
            reports.setdefault(shard["key"], {"slide": shard["slide"], "key": shard["key"]}).update(
                status="ok", n_patches=shard["n"])
    if not reports:
        raise SystemExit(f"nothing to merge: no manifest-part*.json in {args.out} and no manifest in {args.merge}")
    reports = sorted(reports.values(), key=lambda r: r["key"])
    write_report(args.out, reports)
    manifest = write_manifest(args.out, reports, args, settings=settings)
    if not data.index_is_current(args.out):
        data.build_index(args.out)
    print(f"merged {len(part_files)} parts: {manifest['n_patches']} patches from {len(manifest['shards'])} slides")
    return manifest


def prepare_demo(args):
    """The demo's data from the bundled slide: a 400-patch store (OpenMidnight's level sampling) and a labelled
    probe set, folders of PNG patches named by the resolution they were read at (0.5, 1, 2 um/px; the slide has no
    tissue labels), for the kNN probe at the end of `python train.py`."""
    if os.path.exists(os.path.join(args.probe_out, "DONE")) and os.path.exists(os.path.join(args.out,
                                                                                            "manifest.json")):
        print(f"the demo's data is already in {args.out} and {args.probe_out}: nothing to do (delete them to make "
              "it again)")
        with open(os.path.join(args.out, "manifest.json")) as f:
            return json.load(f)
    store = prepare(get_args([SAMPLE_SLIDE, "--out", args.out, "--patches-per-level", "400"]))
    tmp = args.probe_out + "-store"
    probe = prepare(get_args([SAMPLE_SLIDE, "--out", tmp, "--mpp", "0.5", "1", "2", "--no-qc", "--format", "png",
                              "--patches-per-level", str(DEMO_PROBE_PER_CLASS), "--seed", "123"]))
    for shard in probe["shards"]:
        base = os.path.join(tmp, "shards", shard["key"])
        with np.load(base + ".idx.npz") as z, open(base + ".bin", "rb") as f:
            for i, (offset, length, mpp) in enumerate(zip(z["offsets"], z["lengths"], z["mpp"])):
                folder = os.path.join(args.probe_out, f"{mpp:g}mpp")
                os.makedirs(folder, exist_ok=True)
                f.seek(int(offset))
                png = f.read(int(length))
                atomic_write(os.path.join(folder, f"{i:04d}.png"), lambda out: out.write(png))
    open(os.path.join(args.probe_out, "DONE"), "w").close()  # written last: the probe set is complete
    return store


def main(argv=None):
    args = get_args(argv)
    if args.merge is not None:
        merge(args)
        return 0
    if args.demo:
        return 0 if prepare_demo(args) else 1
    return 0 if prepare(args) else 1


if __name__ == "__main__":
    sys.exit(main())
