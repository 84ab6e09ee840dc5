"""
The patch benchmarks as their downloads unpack, with the splits and labels of eva's configs (RECIPE.md §10.2), and any
image folder or CSV: every loader returns ({split: [(item, label), ...]}, class names); load_splits adds what a probe
needs (a validation split, two classes or more in each) or stops naming the layout expected.
"""
import csv
import glob
import os

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


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
