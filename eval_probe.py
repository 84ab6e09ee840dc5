"""
Judge a backbone by frozen features, the way kaiko-ai's eva does (RECIPE.md §10): a linear probe with balanced
accuracy as the headline, plus DINO's weighted kNN, few-shot probes and PCA maps of patch tokens.

    python eval_probe.py --weights runs/om/teacher_backbone.pth --data BACH_ROOT --dataset bach --knn
    python eval_probe.py --weights dinov2_vitg14_reg4_pretrain.pth --data my_folder --few-shot 10 --pca maps.png

Weights: this project's checkpoints and exports, DINOv2 hub files, OpenMidnight's teacher_checkpoint.pth (one
loader, weights.load_backbone). Features are extracted once and cached on disk; re-fitting heads costs seconds.
"""
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import augment
import benchmarks
from cli import Parser, bounded, existing_path, progress
from files import atomic_write
from model import autocast
from weights import load_backbone, weights_arg

# the frozen feature of an image: CLS (DINOv2, OpenMidnight, eva), CLS + mean patch token (Midnight, Virchow2), or
# the mean patch token
FEATURES = ("cls", "cls+mean", "mean")
NORMS = augment.NORMS
# per-dataset early-stopping patience in validation checks (eva's configs, RECIPE.md §10.1)
PATIENCE = {"bach": 1250, "bracs": 167, "breakhis": 500, "crc": 7, "gleason": 42, "mhist": 278, "pcam": 3}


# torchvision resizes uint8 images in torch's native uint8 kernel on these CPUs, elsewhere in float32 then rounded
NATIVE_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
    os.uname().machine in ("aarch64", "arm64")


def resize(image, size_hw, mask=None):
    """torchvision's v2.Resize as eva runs it on a CPU: bilinear with antialias on a uint8 (3, H, W) image; nearest
    on an optional (H, W) mask."""
    if tuple(image.shape[-2:]) == tuple(size_hw):
        return image, mask
    resample = dict(size=list(size_hw), mode="bilinear", align_corners=False, antialias=True)
    if NATIVE_UINT8_RESIZE:
        image = F.interpolate(image[None], **resample)[0]
    else:
        image = F.interpolate(image[None].float(), **resample)[0].round_().to(torch.uint8)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=list(size_hw), mode="nearest")[0, 0].round().to(mask.dtype)
    return image, mask


def resize_and_crop(image, size=224, mask=None):
    """eva's ResizeAndCrop on a uint8 (3, H, W) image (and mask): the shorter side to `size`, the longer one to
    int(size * long / short), then the centre crop at round((H - size) / 2), Python's half-to-even rounding.
    The one input transform of eva's probes (patch, slide and segmentation tasks)."""
    h, w = image.shape[-2:]
    new_long = int(size * max(h, w) / min(h, w))
    image, mask = resize(image, (size, new_long) if h <= w else (new_long, size), mask)
    h, w = image.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    image = image[:, top:top + size, left:left + size]
    return image, None if mask is None else mask[top:top + size, left:left + size]


class ImageDataset(torch.utils.data.Dataset):
    """eva's ResizeAndCrop and normalisation of each image; an unreadable image comes back as None and is counted
    and skipped by the collate."""

    def __init__(self, items, size=224, mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD):
        self.items, self.size, self.mean, self.std = items, size, mean, std
        self._h5 = {}

    def load(self, item):
        if isinstance(item, tuple):  # (h5 file, index): PCam
            import h5py
            if item[0] not in self._h5:
                self._h5[item[0]] = h5py.File(item[0], "r")
            return self._h5[item[0]]["x"][item[1]]
        with Image.open(item) as im:
            return np.array(im.convert("RGB"))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            rgb = self.load(self.items[i][0])
        except Exception:
            return None, self.items[i][1], i
        image, _ = resize_and_crop(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), self.size)
        return augment.normalize(image.float().mul_(1.0 / 255), self.mean, self.std), self.items[i][1], i


def _collate(batch):
    ok = [b for b in batch if b[0] is not None]
    bad = [b[2] for b in batch if b[0] is None]
    if not ok:
        return None, None, torch.tensor([], dtype=torch.long), bad
    return torch.stack([b[0] for b in ok]), torch.tensor([b[1] for b in ok]), torch.tensor([b[2] for b in ok]), bad


def pool_features(out, features="cls"):
    """An image's frozen feature from forward_features' dict (see FEATURES)."""
    cls, mean = out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=-1)}[features]


@torch.no_grad()
def embed(backbone, x, features="cls", dtype="bfloat16"):
    """Features (B, D) float32 on the CPU of a normalised batch x (B, 3, H, W), on the backbone's device, in bf16
    autocast on a GPU unless dtype="float32" (HEST's fp32 protocol). The one feature extractor of every probe
    (patches, slides, HEST)."""
    device = next(backbone.parameters()).device
    with autocast(device, dtype if device.type == "cuda" else "float32"):
        out = backbone.forward_features(x.to(device, non_blocking=True))
    return pool_features(out, features).float().cpu()


def feature_dim(backbone, features="cls"):
    return backbone.embed_dim * (2 if features == "cls+mean" else 1)


def extract_features(backbone, items, size=224, features="cls", device="cpu", batch_size=64, workers=0,
                     norm=NORMS["imagenet"], desc=None):
    """Features of every readable item (see FEATURES), with a progress bar named `desc` if given. Returns
    (features (n, D), labels (n,), indices of unreadable items)."""
    backbone.eval().to(device)
    loader = torch.utils.data.DataLoader(ImageDataset(items, size, *norm), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    feats, labels, bad = [], [], []
    for x, y, _, b in progress(loader, disable=desc is None, desc=desc, unit="batch", leave=False):
        bad += b
        if x is not None:
            feats.append(embed(backbone, x, features))
            labels.append(y)
    return (torch.cat(feats) if feats else torch.zeros(0, feature_dim(backbone, features)),
            torch.cat(labels) if labels else torch.zeros(0).long(), bad)


# settings that change no number: where things go and how fast, and notes derived from the others
RUN_TIME = ("out", "force", "device", "workers", "batch_size", "cache_dir", "cache", "missing_tasks")


def identity(settings):
    """What a result is of: every setting that can change a number, paths made absolute."""
    return {k: os.path.abspath(v) if k in ("weights", "data", "emb", "labels") and isinstance(v, str) else v
            for k, v in settings.items() if k not in RUN_TIME}


def save_results(path, results, force=False):
    """Every evaluation's JSON: {"settings": {...}, <method>: {<metric>: mean, <metric>_std, "runs": [...]}, ...,
    "headline": {"metric", "value", "std", "method"}}, written atomically. A file that holds the results of other
    weights or settings (a different run's) is not replaced unless force."""
    if os.path.exists(path) and not force:
        try:
            with open(path) as f:
                old = identity(json.load(f).get("settings", {}))
        except ValueError:
            old = {}
        new = identity(json.loads(json.dumps(results.get("settings", {}))))  # as it would read back
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if old and diff:
            raise SystemExit(f"{path} holds the results of other weights or settings (" + "; ".join(
                f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:3]) + "): give another --out, or --force "
                "to replace them")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))


# -----------------------------------------------------------------------------
# metrics and heads


def metrics(pred, target, n_classes):
    """Balanced accuracy (mean per-class recall over classes present in target), accuracy, macro F1, per-class
    recall."""
    pred, target = np.asarray(pred), np.asarray(target)
    recall, f1 = [], []
    for c in range(n_classes):
        tp = int(((pred == c) & (target == c)).sum())
        n_true, n_pred = int((target == c).sum()), int((pred == c).sum())
        recall.append(tp / n_true if n_true else float("nan"))
        f1.append(2 * tp / (n_true + n_pred) if n_true + n_pred else float("nan"))
    present = [r for r in recall if not math.isnan(r)]
    return {"balanced_accuracy": float(np.mean(present)) if present else float("nan"),
            "accuracy": float((pred == target).mean()) if len(target) else float("nan"),
            "macro_f1": float(np.nanmean(f1)) if not all(map(math.isnan, f1)) else float("nan"),
            "per_class_recall": recall}


def knn_predict(train_x, train_y, test_x, n_classes, k=20, temperature=0.07):
    """DINO's weighted kNN: cosine similarity, the k nearest training samples vote with weight exp(sim / T)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    preds = []
    for chunk in test_x.split(1024):
        sim, idx = (chunk @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(chunk), n_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def train_linear(train, val, n_classes, lr=3e-4, weight_decay=0.01, batch_size=256, max_steps=12_500,
                 patience=100, seed=0, device="cpu", check_every=1, min_delta=0.0):
    """eva's head: one linear layer (BCE with one logit for 2 classes), AdamW, lr x 1/3 for the first 5 epochs
    (torch's ConstantLR, eva's default), a validation check every `check_every` epochs, early stopping on
    validation balanced accuracy after `patience` checks that do not beat the best by more than `min_delta`
    (Lightning's EarlyStopping); returns the head of the best check (strictly better, as ModelCheckpoint)."""
    g = torch.Generator().manual_seed(seed)
    (xt, yt), (xv, yv) = train, val
    xt, yt, xv = xt.to(device), yt.to(device), xv.to(device)
    binary = n_classes == 2
    head = torch.nn.Linear(xt.shape[1], 1 if binary else n_classes).to(device)
    with torch.no_grad():  # seeded init, PyTorch's default distribution
        bound = 1 / math.sqrt(xt.shape[1])
        head.weight.copy_(torch.rand(head.weight.shape, generator=g) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=g) * 2 * bound - bound)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, bad_checks, step, epoch, stop_best = -1.0, None, 0, 0, 0, -1.0
    while step < max_steps and bad_checks < patience:
        for group in opt.param_groups:
            group["lr"] = lr / 3 if epoch < 5 else lr
        perm = torch.randperm(len(xt), generator=g).to(device)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            logits = head(xt[idx])
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], yt[idx].float()) if binary else \
                F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= max_steps:
                break
        epoch += 1
        if epoch % check_every and (step < max_steps or best_state is not None):
            continue
        score = metrics(predict_linear(head, xv), yv.numpy(), n_classes)["balanced_accuracy"]
        if score > best:
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
        if score - min_delta > stop_best:
            stop_best, bad_checks = score, 0
        else:
            bad_checks += 1
    head.load_state_dict(best_state)
    return head, {"best_val_balanced_accuracy": best, "steps": step, "epochs": epoch}


@torch.no_grad()
def predict_linear(head, x):
    logits = head(x.to(head.weight.device)).cpu()
    return (logits[:, 0] > 0).long().numpy() if logits.shape[1] == 1 else logits.argmax(1).numpy()


def balanced_sample(labels, n, rng):
    """eva's BalancedSampler: n indices per class without replacement (classes in order of first appearance, the
    generator's draws in eva's order), shuffled. Successive calls on one generator give eva's per-run draws."""
    by_class = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(int(lab), []).append(i)
    picked = []
    for idx in by_class.values():
        picked.extend(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist())
    rng.shuffle(picked)
    return np.array(picked, dtype=np.int64)


# -----------------------------------------------------------------------------
# PCA feature maps


@torch.no_grad()
def pca_figure(backbone, items, out_png, size=448, device="cpu", threshold=0.0):
    """Each image beside an RGB map of its patch tokens' first three principal components (fitted on the
    foreground tokens of all images); background is found, as in DINOv2's demo, by thresholding the first
    component of a PCA on all tokens (its sign chosen so that the border is background)."""
    ds = ImageDataset(items, size)
    imgs = [ds[i] for i in range(len(ds))]
    imgs = [im for im in imgs if im[0] is not None]
    x = torch.stack([im[0] for im in imgs])
    backbone.eval().to(device)
    tokens = backbone.forward_features(x.to(device))["x_norm_patchtokens"].float().cpu()  # (n, N, D)
    n, N, D = tokens.shape
    G = int(math.sqrt(N))
    flat = tokens.reshape(-1, D)
    first = _pca(flat, 1)[:, 0].reshape(n, G, G)
    border = torch.cat([first[:, 0], first[:, -1], first[:, :, 0], first[:, :, -1]], dim=1).mean()
    if border > first.mean():
        first = -first
    fg = (first > threshold).reshape(-1)
    if fg.sum() < 3:
        fg = torch.ones_like(fg)
    comps = torch.zeros(n * N, 3)
    comps[fg] = _pca(flat[fg], 3)
    lo, hi = comps[fg].min(0).values, comps[fg].max(0).values
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * fg[:, None]
    rgb = (rgb.reshape(n, G, G, 3) * 255).byte().numpy()
    mean, std = torch.tensor(augment.IMAGENET_MEAN)[:, None, None], torch.tensor(augment.IMAGENET_STD)[:, None, None]
    canvas = Image.new("RGB", (2 * size, n * size))
    for i in range(n):
        shown = ((x[i] * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(shown), (0, i * size))
        canvas.paste(Image.fromarray(rgb[i]).resize((size, size), Image.NEAREST), (size, i * size))
    canvas.save(out_png)
    return canvas.size


def _pca(x, k):
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    return x @ v[:k].T


# -----------------------------------------------------------------------------
# glue used by train.py


def quick_knn(backbone, folder, size=224, device="cpu", seed=0):
    """kNN balanced accuracy of a backbone on a small labelled image folder (train.py's in-training probe)."""
    splits, classes = benchmarks.load_imagefolder(folder, seed)
    was_training = backbone.training
    train_x, train_y, _ = extract_features(backbone, splits["train"] + splits["val"], size, device=device)
    test_x, test_y, _ = extract_features(backbone, splits.get("test") or splits["val"], size, device=device)
    backbone.train(was_training)
    pred = knn_predict(train_x, train_y, test_x, len(classes))
    return {**metrics(pred.numpy(), test_y.numpy(), len(classes)), "n_test": len(test_y)}


def training_probe(backbone, args, step, log, baseline=None):
    """train.py's probe: quick_knn of the teacher's backbone at --probe-size on --probe-data (and, for the demo, of
    the initial weights beside it), on rank 0 between steps; the result goes to the run's log and one line out."""
    res = quick_knn(backbone, args.probe_data, args.probe_size, args.device)
    note = ""
    if baseline is not None:
        res["initial_weights"] = quick_knn(baseline.to(args.device), args.probe_data, args.probe_size, args.device)
        note = f" (the same ViT before training: {res['initial_weights']['balanced_accuracy']:.3f})"
    log.write({"step": step, "probe": res})
    tqdm.write(f"step {step}: teacher kNN balanced accuracy {res['balanced_accuracy']:.3f} on {res['n_test']} "
               f"held-out images of {os.path.relpath(args.probe_data)} at {args.probe_size} px{note}")


# -----------------------------------------------------------------------------
# the command line


def add_feature_args(p, weights_nargs=None):
    """The flags that say which features an evaluation reads: the weights and how images reach them. eval_probe.py
    and eval_suite.py share them."""
    p.add_argument("--weights", required=True, nargs=weights_nargs, type=weights_arg,
                   help="checkpoint / export / hub file or model folder (local path)")
    p.add_argument("--arch", default=None, help="override the architecture inferred from the weights")
    p.add_argument("--features", default="cls", choices=FEATURES, help="cls+mean: Midnight's and Virchow2's 2D-dim")
    p.add_argument("--norm", default="imagenet", choices=sorted(NORMS),
                   help="input normalisation: imagenet; half = Midnight's 0.5/0.5; hoptimus = H-optimus-0's")
    p.add_argument("--size", type=bounded(int, 14), default=224, help="resize the shorter side, then centre-crop")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                       "feature_cache"),
                   help="feature cache, keyed by the weights, the images and the feature settings")
    p.add_argument("--batch-size", type=bounded(int, 1), default=64, help="images per forward pass")
    p.add_argument("--workers", type=bounded(int, 0), default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the forward pass and the heads (cuda, cpu, cuda:1, ...)")
    p.add_argument("--seed", type=int, default=0, help="seeds the made splits and the heads' init")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --out that holds the results of other weights or settings")


def get_args(argv=None):
    p = Parser(description=__doc__)
    add_feature_args(p)
    p.add_argument("--data", required=True, type=existing_path, help="dataset root (or CSV file for --dataset csv)")
    p.add_argument("--dataset", default="imagefolder", choices=sorted(benchmarks.LOADERS),
                   help="layout of --data (README)")
    p.add_argument("--knn", action="store_true", help="also DINO's weighted kNN (k=--k, T=0.07)")
    p.add_argument("--k", type=bounded(int, 1), default=20, help="neighbours of the kNN vote (DINO: 20)")
    p.add_argument("--few-shot", type=bounded(int, 0), default=0,
                   help="n images per class from train, repeated draws (0 = off)")
    p.add_argument("--few-shot-draws", type=bounded(int, 1), default=10,
                   help="few-shot heads fitted (eva's PCam 10-shot: 50)")
    p.add_argument("--few-shot-draw", default="per-run", choices=("per-run", "same"),
                   help="eva's BalancedSampler draws a new n-shot set per head (upstream eva), or one set shared by "
                        "every head (OpenMidnight's eva-probe)")
    p.add_argument("--few-shot-seed", type=int, default=42, help="seed of the balanced few-shot draws (eva: 42)")
    p.add_argument("--check-every", type=bounded(int, 1), default=1,
                   help="epochs between validation checks (PCam 10-shot: 10)")
    p.add_argument("--min-delta", type=bounded(float, 0.0), default=0.0,
                   help="early stopping counts a check as progress only if it beats the best by more than this")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (eva's headline)")
    p.add_argument("--runs", type=bounded(int, 1), default=5, help="linear heads averaged (eva: 5)")
    p.add_argument("--lr", type=bounded(float, 0.0), default=3e-4, help="linear head's AdamW learning rate (eva)")
    p.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.01, help="linear head's AdamW weight decay")
    p.add_argument("--max-steps", type=bounded(int, 1), default=12_500, help="linear head's steps at most (eva)")
    p.add_argument("--patience", type=bounded(int, 1), default=None,
                   help="validation checks without progress before stopping (default: eva's per dataset)")
    p.add_argument("--pca", default=None, metavar="OUT.png", help="PCA maps of patch tokens of a few images")
    p.add_argument("--pca-images", type=bounded(int, 1), default=4, help="images in the PCA figure")
    p.add_argument("--out", default=None,
                   help="results JSON (default runs/eval/<dataset>/<run>_<weights>_<methods>_<key>.json, the key "
                   "a hash of the weights file and every setting, so that no two evaluations share a file)")
    return p.parse_args(argv)


def file_key(item):
    """An item's identity for the feature cache: its path, size and modification time (an edited image is a new
    item); PCam's (h5 file, index) items use the h5 file's."""
    path = item[0] if isinstance(item, tuple) else item
    try:
        st = os.stat(path)
        return [str(item), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(item)]


def cache_key(*parts):
    """16 hex digits naming a cache file: a hash of everything the cached result depends on (files by file_key)."""
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def cached_features(args, backbone, splits):
    """Features per split, each cached on disk keyed by the weights file, the split's items and the feature
    settings: a split shared by two tasks (PCam's val and test, by PCam and PCam 10-shot) is embedded once."""
    setting = [file_key(os.path.abspath(args.weights)), args.arch, args.dataset, args.features, args.norm, args.size]
    norm = NORMS[args.norm]
    feats, paths = {}, {}
    for split, items in splits.items():
        key = cache_key(*setting, [file_key(i) for i, _ in items])
        paths[split] = path = os.path.join(args.cache_dir, key + ".pt")
        if os.path.exists(path):
            print(f"{split}: features from cache {path}")
            feats[split] = torch.load(path, weights_only=True)
            continue
        x, y, bad = extract_features(backbone, items, args.size, args.features, args.device, args.batch_size,
                                     args.workers, norm, desc=f"features of {args.dataset} {split}")
        feats[split] = {"x": x, "y": y, "unreadable": [str(items[i][0]) for i in bad]}
        if bad:
            print(f"{split}: skipped {len(bad)} unreadable images, e.g. {items[bad[0]][0]}")
        os.makedirs(args.cache_dir, exist_ok=True)
        atomic_write(path, lambda f: torch.save(feats[split], f))
    return feats, paths


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    splits, classes, notes = benchmarks.load_splits(args)
    draws = []  # few-shot sets as positions in the train items, drawn from the labels before any image is read
    if args.few_shot:
        rng = np.random.default_rng(args.few_shot_seed)
        labels = [lab for _, lab in splits["train"]]
        draws = [balanced_sample(labels, args.few_shot, rng)
                 for _ in range(1 if args.few_shot_draw == "same" else args.few_shot_draws)]
        if args.no_linear and not args.knn:  # only the drawn images need features (eva-probe embeds just these)
            keep = sorted(set(np.concatenate(draws).tolist()))
            splits["train"] = [splits["train"][i] for i in keep]
            draws = [np.searchsorted(keep, d) for d in draws]
    backbone = load_backbone(args.weights, arch=args.arch)
    feats, cache_path = cached_features(args, backbone, splits)
    report_split = "test" if "test" in splits else "val"
    train, val, test = feats["train"], feats["val"], feats[report_split]
    patience = args.patience or PATIENCE.get(args.dataset, 100)
    results = {"settings": {**vars(args), "patience": patience, "classes": classes, "reported_split": report_split,
                            "validation_made_from_train": "validation_made_from_train" in notes,
                            "split_made_from_single_folder": "split_made_from_single_folder" in notes,
                            "cache": cache_path, "n": {s: len(f["y"]) for s, f in feats.items()},
                            "unreadable": {s: len(f["unreadable"]) for s, f in feats.items()}}}
    C = len(classes)
    fit = dict(lr=args.lr, weight_decay=args.weight_decay, max_steps=args.max_steps, patience=patience,
               device=args.device, check_every=args.check_every, min_delta=args.min_delta)

    def scored(head, info):  # a head's test metrics, and whether it gave every image one class
        pred = predict_linear(head, test["x"])
        return {**metrics(pred, test["y"].numpy(), C), **info, "one_class": len(set(pred.tolist())) == 1}

    if not args.no_linear:
        results["linear"] = summarise([scored(*train_linear((train["x"], train["y"]), (val["x"], val["y"]), C,
                                                            seed=args.seed + r, **fit)) for r in range(args.runs)])
    if args.knn:
        results["knn"] = metrics(knn_predict(train["x"], train["y"], test["x"], C, args.k).numpy(),
                                 test["y"].numpy(), C)
    if args.few_shot:
        runs, unreadable = [], set(train["unreadable"])
        readable = np.array([str(it) not in unreadable for it, _ in splits["train"]])
        row = np.cumsum(readable) - 1  # feature row of each train item (unreadable ones have none)
        for d in range(args.few_shot_draws):  # heads differ by init; the sets by --few-shot-draw
            draw = draws[d % len(draws)]
            idx = torch.from_numpy(row[draw[readable[draw]]])
            runs.append(scored(*train_linear((train["x"][idx], train["y"][idx]), (val["x"], val["y"]), C, seed=d,
                                             **fit)))
        results[f"few_shot_{args.few_shot}"] = summarise(runs)
    for m in ("linear", f"few_shot_{args.few_shot}"):
        one = sum(r["one_class"] for r in results.get(m, {}).get("runs", []))
        if one:
            print(f"warning: {one} of {len(results[m]['runs'])} {m} heads predict one class for every "
                  f"{report_split} image: the features may not separate the classes (an untrained or collapsed "
                  "model, constant images)")
    method = "linear" if "linear" in results else f"few_shot_{args.few_shot}" if args.few_shot else \
        "knn" if args.knn else None
    if method:  # the number the results table shows (the evaluation-script contract)
        results["headline"] = {"metric": "balanced_accuracy", "value": results[method]["balanced_accuracy"],
                               "std": results[method].get("balanced_accuracy_std", 0.0), "method": method,
                               "split": report_split}
    if args.pca:
        items = splits[report_split][:args.pca_images]
        results["pca"] = {"path": args.pca, "size": pca_figure(backbone, items, args.pca, device=args.device)}
    out = args.out or default_out(args)
    save_results(out, results, args.force)
    line = " | ".join(f"{m} balanced acc {results[m]['balanced_accuracy']:.4f}" for m in results
                      if isinstance(results[m], dict) and "balanced_accuracy" in results[m])
    line = line or f"no probe (--no-linear without --knn or --few-shot){'; PCA map ' + args.pca if args.pca else ''}"
    print(f"{args.dataset} ({report_split}, n={len(test['y'])}): {line} [{time.time() - t0:.0f}s, {out}]")
    return results


def default_out(args):
    """runs/eval/<dataset>/<run folder>_<weights name>_<methods>_<key>.json: the key hashes the weights file (path,
    size, modification time) and every setting, so that two runs' teacher_backbone.pth, two settings or a PCA-only
    run never share a file."""
    w = os.path.abspath(args.weights)
    name = os.path.basename(w) if os.path.isdir(w) else \
        f"{os.path.basename(os.path.dirname(w))}_{os.path.splitext(os.path.basename(w))[0]}"
    methods = ["linear"] * (not args.no_linear) + ["knn"] * args.knn + [f"fewshot{args.few_shot}"] * bool(
        args.few_shot) + ["pca"] * bool(args.pca)
    key = cache_key(file_key(w), identity(vars(args)))[:8]
    return os.path.join("runs", "eval", args.dataset, f"{name}_{'+'.join(methods) or 'none'}_{key}.json")


def summarise(runs):
    keys = ("balanced_accuracy", "accuracy", "macro_f1")
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out.update({k + "_std": float(np.std([r[k] for r in runs])) for k in keys})
    out["per_class_recall"] = np.nanmean([r["per_class_recall"] for r in runs], axis=0).tolist()
    out["runs"] = runs
    return out


if __name__ == "__main__":
    main()
