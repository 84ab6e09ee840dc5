"""
The benchmarks as their downloads unpack, with the splits and labels of eva's configs (RECIPE.md §10.2): the patch
sets, and any image folder or CSV (LOADERS: ({split: [(item, label), ...]}, class names); load_splits adds what a probe
needs, a validation split and two classes or more in each, or stops naming the layout expected), and the slide-level
cohorts of eval_slide.py (SLIDE_LOADERS: Camelyon16, PANDA, a CSV of slides).
"""
import csv
import glob
import os

import numpy as np

from slides import slide_id

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
EVA_SEED = 42  # eva's seed of its splits


def _images(folder):
    return sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))


def stratified_split(labels, ratios, seed=42):
    """eva's stratified split (its core/data/splitting/stratified.py), wherever a split has to be made: one
    default_rng(seed) for all classes; per class (sorted) shuffle its indices and cut floor(r n), at least 1, for
    each part in turn, the last part taking the rest when the ratios sum to exactly 1 (as eva tests it); parts of
    ratio 0 stay empty. Returns one list of indices per ratio."""
    rng, labels = np.random.default_rng(seed), np.asarray(labels)
    parts, last = [[] for _ in ratios], max(i for i, r in enumerate(ratios) if r > 0)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for p, r in enumerate(ratios):
            if r > 0:
                n = len(idx) - start if p == last and sum(ratios) == 1 else int(np.floor(r * len(idx))) or 1
                parts[p] += idx[start:start + n].tolist()
                start += n
    return parts


def split_items(items, ratios, seed):
    """stratified_split of [(item, label)] items: one list of items per ratio."""
    return [[items[i] for i in part] for part in stratified_split([lab for _, lab in items], ratios, seed)]


def load_imagefolder(root, seed):
    splits = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))]
    base = os.path.join(root, "train") if splits else root
    classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) if os.path.isdir(base) else []
    if not classes:
        raise ValueError(f"{root!r} has no class folders")
    if not splits:  # a single folder: a seeded stratified train/val/test split
        items = [(f, c) for c, name in enumerate(classes) for f in _images(os.path.join(root, name))]
        return dict(zip(("train", "val", "test"), split_items(items, (0.6, 0.2, 0.2), seed))), classes
    out = {}
    for s in splits:
        present = sorted(d for d in os.listdir(os.path.join(root, s)) if os.path.isdir(os.path.join(root, s, d)))
        missing = sorted(set(classes) - set(present))
        if missing:
            raise ValueError(f"split {s!r} of {root!r} lacks class folders {missing}: every split needs all classes")
        out[s] = [(f, c) for c, name in enumerate(classes) for f in _images(os.path.join(root, s, name))]
    return out, classes


def load_csv(path, seed):
    """path,label[,split] rows (paths relative to the CSV); listed files that do not exist are counted, named and
    left out; no split column: a seeded stratified 60/20/20 split."""
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][0].lower() in ("path", "image", "file"):
        rows = rows[1:]
    missing = [r[0] for r in rows if not os.path.exists(os.path.join(root, r[0]))]
    if missing:
        print(f"{path}: {len(missing)} of {len(rows)} listed images do not exist and are left out, e.g. "
              f"{missing[:3]}")
    rows = [r for r in rows if os.path.exists(os.path.join(root, r[0]))]
    classes = sorted({r[1] for r in rows})
    items = [(os.path.join(root, r[0]), classes.index(r[1]), r[2] if len(r) > 2 else None) for r in rows]
    if all(s is None for _, _, s in items):
        return dict(zip(("train", "val", "test"), split_items([i[:2] for i in items], (0.6, 0.2, 0.2), seed))), \
            classes
    return {s: [(p, c) for p, c, sp in items if sp == s] for s in {i[2] for i in items}}, classes


def _need(root, *parts):
    """The folders or files a layout cannot do without (a missing one would silently change the protocol)."""
    for part in parts:
        if not os.path.exists(os.path.join(root, part)):
            raise FileNotFoundError(f"{os.path.join(root, part)} is missing")


def load_bach(root, seed):
    files = sorted(glob.glob(os.path.join(root, "ICIAR2018_BACH_Challenge", "Photos", "*", "*.tif")))
    classes = ["Benign", "InSitu", "Invasive", "Normal"]
    train_ranges = [(0, 41), (59, 60), (90, 139), (169, 240), (258, 260), (273, 345), (368, 400)]  # eva's split
    train_idx = {i for a, b in train_ranges for i in range(a, b)}
    items = [(f, classes.index(os.path.basename(os.path.dirname(f)))) for f in files]
    return {"train": [it for i, it in enumerate(items) if i in train_idx],
            "val": [it for i, it in enumerate(items) if i not in train_idx]}, classes


def load_crc(root, seed):
    classes = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    _need(root, "NCT-CRC-HE-100K", "CRC-VAL-HE-7K")
    return {split: [(f, c) for c, name in enumerate(classes) for f in _images(os.path.join(root, d, name))]
            for split, d in (("train", "NCT-CRC-HE-100K"), ("val", "CRC-VAL-HE-7K"))}, classes


def load_mhist(root, seed):
    classes = ["SSA", "HP"]
    out = {"train": [], "val": []}  # eva monitors and reports MHIST's test partition as its validation split
    with open(os.path.join(root, "annotations.csv"), newline="") as f:
        for r in csv.DictReader(f):
            out["train" if r["Partition"] == "train" else "val"].append(
                (os.path.join(root, "images", r["Image Name"]), classes.index(r["Majority Vote Label"])))
    return out, classes


BREAKHIS_VAL_PATIENTS = {"18842D", "19979", "15275", "15792", "16875", "3909", "5287", "16716", "2773", "5695",
                         "16184CD", "23060CD", "21998CD", "21998EF"}


def load_breakhis(root, seed):
    classes = ["TA", "MC", "F", "DC"]
    out = {"train": [], "val": []}
    for f in sorted(glob.glob(os.path.join(root, "**", "40X", "*.png"), recursive=True)):
        fields = os.path.basename(f).split("-")
        cls = fields[0].split("_")[-1]
        if cls in classes:
            out["val" if fields[2] in BREAKHIS_VAL_PATIENTS else "train"].append((f, classes.index(cls)))
    return out, classes


def load_bracs(root, seed):
    _need(root, *(os.path.join("BRACS_RoI", "latest_version", s) for s in ("train", "val", "test")))
    return load_imagefolder(os.path.join(root, "BRACS_RoI", "latest_version"), seed)


def load_gleason(root, seed):
    classes = ["benign", "gleason_3", "gleason_4", "gleason_5"]
    _need(root, "train_validation_patches_750", os.path.join("test_patches_750", "patho_1"))
    out = {"train": [], "val": [], "test": []}
    for f in sorted(glob.glob(os.path.join(root, "train_validation_patches_750", "*", "*.jpg"))):
        core = os.path.basename(os.path.dirname(f))
        out["val" if "ZT76" in core else "train"].append((f, int(f.rsplit("_class_", 1)[1].split(".")[0])))
    for f in sorted(glob.glob(os.path.join(root, "test_patches_750", "patho_1", "*", "*.jpg"))):
        out["test"].append((f, int(f.rsplit("_class_", 1)[1].split(".")[0])))
    return out, classes


def load_pcam(root, seed):
    try:
        import h5py  # optional: only PCam's h5 files need it
    except ImportError:
        raise SystemExit("PCam is stored as HDF5: pip install h5py to evaluate on it")
    out = {}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        with h5py.File(os.path.join(root, f"camelyonpatch_level_2_split_{name}_y.h5"), "r") as f:
            labels = f["y"][:].reshape(-1).astype(int)
        x = os.path.join(root, f"camelyonpatch_level_2_split_{name}_x.h5")
        out[split] = [((x, i), int(lab)) for i, lab in enumerate(labels)]
    return out, ["no_tumor", "tumor"]


# what each dataset's folder holds, as its download unpacks (README: "Reproducing the table")
LAYOUTS = {
    "imagefolder": "ROOT/<class>/* (a seeded stratified 60/20/20 split is made) or ROOT/{train,val[,test]}/<class>/*",
    "csv": "a CSV file of path,label[,split] rows, paths relative to it",
    "bach": "ICIAR2018_BACH_Challenge/Photos/{Benign,InSitu,Invasive,Normal}/*.tif",
    "crc": "NCT-CRC-HE-100K/<9 classes: ADI BACK DEB LYM MUC MUS NORM STR TUM>/*.tif and CRC-VAL-HE-7K/<the same 9 "
           "classes>/*.tif",
    "mhist": "images/*.png and annotations.csv",
    "breakhis": "BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<type>/<patient>/40X/*.png",
    "bracs": "BRACS_RoI/latest_version/{train,val,test}/<class>/*.png",
    "gleason": "train_validation_patches_750/<core>/*_class_<k>.jpg and test_patches_750/patho_1/<core>/*.jpg",
    "pcam": "camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5",
}
LOADERS = {"imagefolder": load_imagefolder, "csv": load_csv, "bach": load_bach, "crc": load_crc, "mhist": load_mhist,
           "breakhis": load_breakhis, "bracs": load_bracs, "gleason": load_gleason, "pcam": load_pcam}


# -----------------------------------------------------------------------------
# the slide-level benchmarks (eval_slide.py): [{"id", "path", "label", "split"}] in eva's order, class names

CAMELYON16_VAL = (  # eva's Camelyon16._val_slides: PatchCamelyon's validation slides
    [f"normal_{i:03d}" for i in (10, 13, 16, 17, 19, 20, 25, 30, 31, 32, 52, 56, 57, 67, 76, 79, 85, 95, 98, 99, 101,
                                 102, 105, 106, 109, 129, 132, 137, 142, 143, 148, 152)]
    + [f"tumor_{i:03d}" for i in (1, 5, 11, 12, 13, 19, 31, 37, 43, 46, 57, 65, 69, 71, 73, 79, 80, 81, 82, 85, 97,
                                  109)])


def _mismatch(what, missing, extra, hint):
    if missing or extra:
        raise SystemExit(f"{what}: {len(missing)} missing {sorted(missing)[:20]}, {len(extra)} extra "
                         f"{sorted(extra)[:20]}; {hint}")


def load_camelyon16(root, seed=EVA_SEED):
    """training/{normal,tumor}/*.tif (label from the name; eva's 54 validation slides), testing/images/*.tif with
    labels from testing/reference.csv (id, Normal/Tumor); eva's 216 / 54 / 129 slides."""
    _need(root, "training/normal", "training/tumor", "testing/images", "testing/reference.csv")
    with open(os.path.join(root, "testing", "reference.csv"), newline="") as f:
        reference = {r[0]: r[1].lower() for r in csv.reader(f) if r}
    items = []
    for path in sorted(glob.glob(os.path.join(root, "training", "*", "*.tif"))):
        sid = slide_id(path)
        split = "val" if sid in CAMELYON16_VAL else "train"
        items.append({"id": sid, "path": path, "label": sid.split("_")[0], "split": split})
    tests = sorted(glob.glob(os.path.join(root, "testing", "images", "*.tif")))
    items += [{"id": slide_id(p), "path": p, "label": reference.get(slide_id(p)), "split": "test"} for p in tests]
    have = {it["id"] for it in items}
    _mismatch("Camelyon16 validation slides", set(CAMELYON16_VAL) - have, set(),
              "eva's split needs every one of them")
    _mismatch("Camelyon16 test images without a row in testing/reference.csv", [],
              {it["id"] for it in items if it["label"] is None}, "eva labels the test slides from it")
    bad = [it["id"] for it in items if it["label"] not in ("normal", "tumor")]
    counts = {s: sum(it["split"] == s for it in items) for s in ("train", "val", "test")}
    if bad or counts != {"train": 216, "val": 54, "test": 129}:
        raise SystemExit(f"Camelyon16 under {root}: {counts} slides (eva: 216 / 54 / 129); names that are not "
                         f"normal_*/tumor_* {bad[:10]}; in reference.csv without an image "
                         f"{sorted(set(reference) - have)[:10]}")
    for it in items:
        it["label"] = ("normal", "tumor").index(it["label"])
    return items, ["normal", "tumor"]


def load_panda(root, seed=EVA_SEED, ratios=(0.1, 0.05, 0.05)):
    """train_images/*.tiff and train_with_noisy_labels.csv (image_id, isup_grade, noise_ratio_10): eva keeps the
    slides with noise_ratio_10 != 0 and splits them with its seeded stratified split (PANDASmall's ratios)."""
    table = os.path.join(root, "train_with_noisy_labels.csv")
    _need(root, "train_images", "train_with_noisy_labels.csv")
    with open(table, newline="") as f:
        rows = {r["image_id"]: r for r in csv.DictReader(f)}
    on_disk = {slide_id(p): p for p in glob.glob(os.path.join(root, "train_images", "*.tiff"))}
    kept = sorted((i for i, r in rows.items() if float(r["noise_ratio_10"] or "nan") != 0), key=lambda i: i + ".tiff")
    _mismatch(f"PANDA slides in {root}/train_images", set(kept) - set(on_disk), set(on_disk) - set(rows),
              "eva uses all 10,616 images of train_with_noisy_labels.csv (the split depends on every kept one)")
    labels = [int(rows[i]["isup_grade"]) for i in kept]
    items = []
    for split, idx in zip(("train", "val", "test"), stratified_split(labels, ratios, seed)):
        items += [{"id": kept[i], "path": on_disk[kept[i]], "label": labels[i], "split": split} for i in idx]
    return items, [str(c) for c in range(6)]


def load_slide_csv(path, seed=EVA_SEED, need_files=True):
    """slide_path,label[,split] (a header row is optional; paths relative to the CSV). Without a split column:
    eva's seeded stratified 70 / 15 / 15 split; with train (and test) but no val: 20% of train, stratified."""
    _need(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() in ("slide_path", "path", "slide"):
        rows = rows[1:]
    base = os.path.dirname(os.path.abspath(path))
    items = [{"id": slide_id(r[0]), "path": os.path.join(base, r[0].strip()), "label": r[1].strip(),
              "split": r[2].strip() if len(r) > 2 and r[2].strip() else None} for r in rows]
    missing = [it["path"] for it in items if not os.path.exists(it["path"])]
    if need_files:
        _mismatch(f"slides listed in {path}", missing, [], "fix the paths (relative to the CSV's folder)")
    numeric = all(it["label"].lstrip("-").isdigit() for it in items)  # grades sort as numbers
    names = sorted({it["label"] for it in items}, key=int if numeric else str)
    for it in items:
        it["label"] = names.index(it["label"])
    splits = {it["split"] for it in items}
    if splits - {"train", "val", "test", None} or (None in splits and len(splits) > 1):
        raise SystemExit(f"{path}: the split column must be train, val or test on every row, "
                         f"got {sorted(map(str, splits))}")
    if splits == {None} or "val" not in splits:
        pool = [it for it in items if it["split"] in (None, "train")]
        ratios = (0.7, 0.15, 0.15) if splits == {None} else (0.8, 0.2, 0.0)
        parts = stratified_split([it["label"] for it in pool], ratios, seed)
        for split, idx in zip(("train", "val", "test"), parts):
            for i in idx:
                pool[i]["split"] = split
        items = sorted(items, key=lambda it: ("train", "val", "test").index(it["split"]))
    return items, names


SLIDE_LOADERS = {"camelyon16": load_camelyon16, "panda": load_panda, "csv": load_slide_csv}


def check_splits(splits, classes, root, layout=None):
    """A probe needs two classes or more, each present in train and val: anything else would report a
    meaningless score (one class gives balanced accuracy 1.0). `layout`: a named dataset's expected layout."""
    hint = f"expected {layout}" if layout else \
        "check the layout, or use a single folder of class folders to get a stratified split"
    if len(classes) < 2:
        raise SystemExit(f"{root!r} has {len(classes)} class ({classes}): a probe needs at least 2")
    for s, items in splits.items():
        missing = sorted(set(range(len(classes))) - {lab for _, lab in items})
        if missing and s in ("train", "val"):
            raise SystemExit(f"split {s!r} of {root!r} has no images of classes {[classes[c] for c in missing]}: "
                             f"{hint}")
        if len({lab for _, lab in items}) < 2:
            raise SystemExit(f"split {s!r} of {root!r} holds a single class: a probe needs at least 2 per split")


def load_splits(args):
    """The dataset's splits as its protocol defines them; a layout that is not the dataset's, or a split or class
    left empty, stops with the layout expected. Without a validation split, a seeded stratified 20% of train is
    one (said on screen and in the results)."""
    try:
        splits, classes = LOADERS[args.dataset](args.data, args.seed)
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"{args.data!r} is not laid out as --dataset {args.dataset} ({type(e).__name__}: {e}); "
                         f"expected {LAYOUTS[args.dataset]}") from None
    named = args.dataset not in ("imagefolder", "csv")
    if not splits.get("train"):
        raise SystemExit(f"no training images under {args.data!r} for --dataset {args.dataset}: expected "
                         f"{LAYOUTS[args.dataset]}")
    splits = {s: items for s, items in splits.items() if items}
    notes = {}
    if args.dataset == "imagefolder" and not any(os.path.isdir(os.path.join(args.data, s)) for s in
                                                 ("train", "val", "test")):
        notes["split_made_from_single_folder"] = "60/20/20"
        print(f"{args.data} has no train/val/test folders: a seeded (--seed {args.seed}) stratified 60/20/20 split")
    if "val" not in splits:  # early stopping needs one
        splits["train"], splits["val"] = split_items(splits["train"], (0.8, 0.2), args.seed)
        notes["validation_made_from_train"] = "20%"
        print(f"{args.data} has no validation split: a seeded (--seed {args.seed}) stratified 20% of train "
              f"({len(splits['val'])} images) is held out for early stopping")
    check_splits(splits, classes, args.data, LAYOUTS[args.dataset] if named else None)
    return splits, classes, notes
