"""
Nuclear semantic segmentation with a frozen backbone, eva's protocol (kaiko-ai/eva, as OpenMidnight ran it) on
CoNSeP and MoNuSAC: a small convolutional decoder on the last block's patch tokens plus the image, Dice loss, and
eva's MonaiDiceScore as the headline.

    python eval_seg.py --weights teacher_checkpoint.pth --data CONSEP_ROOT --dataset consep --out consep.json
    python eval_seg.py --weights teacher_checkpoint.pth --data MONUSAC_ROOT --dataset monusac --out monusac.json

Protocol (eva's online segmentation configs):
- features: the last block's output *before* the final LayerNorm (DINOv2's get_intermediate_layers(n=1,
  norm=False)) without CLS and register tokens, a (D, 16, 16) map for a 224 input, from the frozen encoder.
- decoder: eva's ConvDecoderWithImage (x2 nearest upsample, conv3x3 -> 64 + BN + ReLU, bilinear to the mask size,
  concatenated with the normalised image, two conv3x3 -> 32 + BN + ReLU, conv1x1 -> 5 classes).
- loss: MONAI's DiceLoss(softmax, batch=True, background included, smooth 1e-5) behind eva's ignore handling.
- AdamW lr 2e-3 (weight decay 0.01), batch 64, 2,000 steps, lr x 1/3 for epochs 0-4 (ConstantLR stepped per epoch),
  validation after every complete epoch (none after a cut-short last one), early stopping after `patience` epochs
  without a strict improvement (CoNSeP 200, MoNuSAC 100); a run scores its best validation Dice, the headline is
  the mean over 5 runs (std: the sample standard deviation, as eva's recorder).
- metric: per 224^2 image and foreground class, Dice = 2|P&G| / (|P| + |G|), NaN where the class is absent from
  the ground truth; the mean over an image's valid classes, then over the images with any valid class (0 if none).
- data: CoNSeP `Train/` and `Test/` (eva's train and val), `Images/*.png` and `Labels/*.mat` (`type_map`; 3+4 ->
  epithelial, 5+6+7 -> spindle-shaped), 250 px grid tiles (16 per 1000^2 image) resized to 224 (bilinear with
  antialias; masks nearest). MoNuSAC `MoNuSAC_images_and_annotations/` (train) and `MoNuSAC Testing Data and
  Annotations/` (eva's val), `**/*.tif` with XML polygons beside them: RandomResizedCrop(224) of image and mask for
  training; for validation the shorter side resized to 224 and a centre crop, so only the central square is scored.

MoNuSAC's "Ambiguous" quirk (reproduced by default): the ground truth has a sixth class, Ambiguous (5), which the
loss ignores. eva's metric builds its ignore mask from the *prediction's* channel 5, which a 5-class decoder never
predicts, and then drops channel 5. So Ambiguous pixels belong to no ground-truth class, yet a prediction of class
c there counts against class c (a false positive). `--mask-ambiguous` removes Ambiguous pixels from the predictions
too (the corrected variant; not eva's number). In both, an image whose only nuclei are Ambiguous is not scored.

CoNSeP's inputs are deterministic, so its features are computed once and cached (--cache-dir); MoNuSAC's training
crops are random, so the encoder runs at every step (its validation features are cached). The encoder runs in
float32 as in eva (Lightning's default); --precision bfloat16 is faster and not eva's number.
"""
import glob
import math
import os
import statistics
import sys
import time
from xml.etree import ElementTree

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import augment
from eval_probe import FEATURES, cache_key, file_key, resize, resize_and_crop, save_results
from cli import Parser, bounded, existing_path, progress
from files import atomic_write
from model import autocast
from weights import load_backbone, weights_arg

CLASSES = {"consep": ["background", "other", "inflammatory", "epithelial", "spindle-shaped"],
           "monusac": ["Background", "Epithelial", "Lymphocyte", "Neutrophil", "Macrophage", "Ambiguous"]}
N_CLASSES = 5  # the decoder's outputs; MoNuSAC's Ambiguous is a ground-truth-only class
IGNORE = {"consep": None, "monusac": 5}
PATIENCE = {"consep": 200, "monusac": 100}  # epochs, eva's configs
EXPECTED = {"consep": {"train": 27, "val": 14}, "monusac": {"train": 209, "val": 85}}  # images per split
MONUSAC_DIRS = {"train": "MoNuSAC_images_and_annotations", "val": "MoNuSAC Testing Data and Annotations"}
SIZE, CONSEP_TILE = 224, 250


# -----------------------------------------------------------------------------
# geometry: torchvision's transforms.v2 on uint8 (3, H, W) images and (H, W) masks (eval_probe.resize_and_crop is
# eva's ResizeAndCrop)


def random_resized_crop(image, mask, size=SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop on image and mask together, drawing from torch's global RNG in its order."""
    height, width = image.shape[-2:]
    area, log_ratio = height * width, torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,)).item()
            j = torch.randint(0, width - w + 1, size=(1,)).item()
            break
    else:  # ten misses: the central crop with the aspect ratio clamped into `ratio`
        w, h = width, height
        if width / height < min(ratio):
            h = int(round(width / min(ratio)))
        elif width / height > max(ratio):
            w = int(round(height * max(ratio)))
        i, j = (height - h) // 2, (width - w) // 2
    return resize(image[:, i:i + h, j:j + w], (size, size), mask[i:i + h, j:j + w])


def normalize(image_uint8, norm="imagenet"):
    """ToDtype(float32, scale=True) (x * (1/255)) then Normalize with the backbone's statistics (eva's configs and
    OpenMidnight: ImageNet's); the decoder sees the same normalised image."""
    return augment.normalize(image_uint8.float().mul_(1.0 / 255), *augment.NORMS[norm])


# -----------------------------------------------------------------------------
# polygon fill: the pixel set of skimage.draw.polygon


def polygon(r, c, shape=None):
    """Pixels (rr, cc) of the polygon with vertices (r, c), the set skimage.draw.polygon(r, c, shape) returns: a
    pixel centre counts if it is within 1e-12 of a vertex, or if the crossing parities of a ray to +c or to -c are
    odd (inside, or on an edge) -- O'Rourke's test, vectorised over the bounding box one edge at a time."""
    r, c = np.asarray(r, dtype=np.float64), np.asarray(c, dtype=np.float64)
    r0, r1 = int(max(0, r.min())), int(math.ceil(r.max()))
    c0, c1 = int(max(0, c.min())), int(math.ceil(c.max()))
    if shape is not None:
        r1, c1 = min(shape[0] - 1, r1), min(shape[1] - 1, c1)
    if r1 < r0 or c1 < c0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    rows = np.arange(r0, r1 + 1, dtype=np.float64)[:, None]
    cols = np.arange(c0, c1 + 1, dtype=np.float64)[None, :]
    right = np.zeros((rows.shape[0], cols.shape[1]), bool)
    left, vertex = right.copy(), right.copy()
    for i in range(len(r)):
        y0, y1 = r[i] - rows, r[i - 1] - rows  # (R, 1): the edge from vertex i-1 to i, relative to each pixel
        x0, x1 = c[i] - cols, c[i - 1] - cols  # (1, C)
        vertex |= (-1e-12 < y0) & (y0 < 1e-12) & (-1e-12 < x0) & (x0 < 1e-12)
        up, down = ((y0 > 0) != (y1 > 0))[:, 0], ((y0 < 0) != (y1 < 0))[:, 0]
        rows_hit = up | down
        if rows_hit.any():
            y0, y1 = y0[rows_hit], y1[rows_hit]
            x_cross = (x0 * y1 - x1 * y0) / (y1 - y0)  # same operations, same order as scikit-image's C
            right[rows_hit] ^= up[rows_hit, None] & (x_cross > 0)
            left[rows_hit] ^= down[rows_hit, None] & (x_cross < 0)
    rr, cc = np.nonzero(vertex | right | left)
    return rr + r0, cc + c0


# -----------------------------------------------------------------------------
# datasets as they unpack: {split: (images uint8 list of (3, H, W), masks uint8 list of (H, W), names)}


def read_mat(path):
    try:
        import scipy.io  # optional: only CoNSeP's .mat labels need it
    except ImportError:
        raise SystemExit("CoNSeP's labels are MATLAB .mat files: pip install scipy to evaluate on CoNSeP")
    return scipy.io.loadmat(path)


def read_rgb(path):
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except OSError as e:
        raise SystemExit(f"cannot read image {path!r} ({e}): re-extract the dataset archive")


def consep_tiles(image, type_map, size=SIZE, tile=CONSEP_TILE):
    """eva's GridSampler: non-overlapping tile x tile squares (x outer, y inner; a 1000^2 image gives 16), the
    type map merged to eva's 5 classes, each tile resized to `size`."""
    mask = torch.from_numpy(np.asarray(type_map).astype(np.int64))
    mask = torch.where(mask == 4, 3, mask)
    mask = torch.where(mask > 4, 4, mask)  # 3+4 epithelial, 5+6+7 spindle-shaped
    H, W = mask.shape
    out = []
    for x in range(0, W - tile + 1, tile):
        for y in range(0, H - tile + 1, tile):
            img, msk = resize_and_crop(image[:, y:y + tile, x:x + tile], size, mask[y:y + tile, x:x + tile])
            out.append((img.contiguous(), msk.to(torch.uint8)))
    return out


def load_consep(root, split, size=SIZE):
    folder = os.path.join(root, {"train": "Train", "val": "Test"}[split])
    paths = sorted(glob.glob(os.path.join(folder, "Images", "*.png")))
    if not paths:
        raise SystemExit(f"no CoNSeP images in {folder}/Images/*.png: --data must hold Train/ and Test/ as unpacked")
    images, masks, names = [], [], []
    for p in progress(paths, desc=f"CoNSeP {split}", leave=False):
        label = os.path.join(folder, "Labels", os.path.splitext(os.path.basename(p))[0] + ".mat")
        if not os.path.exists(label):
            raise SystemExit(f"missing CoNSeP label {label}: every Images/<name>.png needs Labels/<name>.mat")
        for k, (img, msk) in enumerate(consep_tiles(read_rgb(p), read_mat(label)["type_map"], size)):
            images.append(img), masks.append(msk), names.append(f"{os.path.basename(p)}#{k}")
    return images, masks, names


def monusac_mask(xml_path, width, height):
    """The semantic mask of one image from its XML: each Annotation's first Attribute names the class (unknown
    names -> Ambiguous), each Region's Vertices are filled the way eva calls skimage.draw.polygon(X, Y, (W, H)),
    later regions overwriting earlier ones."""
    classes = CLASSES["monusac"]
    mask = np.zeros((height, width), np.uint8)
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError) as e:
        raise SystemExit(f"cannot read MoNuSAC annotation {xml_path!r} ({e}): each .tif needs its .xml beside it")
    for annotation in root:
        attributes = list(annotation[0]) if len(annotation) else []
        if not attributes:
            raise ValueError(f"{xml_path}: an Annotation without a class Attribute")
        name = attributes[0].attrib.get("Name")
        cls = classes.index(name) if name in classes else classes.index("Ambiguous")
        for region in (item for child in annotation for item in child if item.tag == "Region"):
            xy = np.array([(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region[1]], dtype=np.float64)
            if len(xy):
                xs, ys = polygon(xy[:, 0], xy[:, 1], (width, height))  # X as "rows" bounded by W, as eva
                mask[ys, xs] = cls
    return mask


def load_monusac(root, split, size=SIZE):
    folder = os.path.join(root, MONUSAC_DIRS[split])
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.tif"), recursive=True))
    if not paths:
        raise SystemExit(f"no MoNuSAC images in {folder!r} (**/*.tif): --data must hold "
                         f"{MONUSAC_DIRS['train']!r} and {MONUSAC_DIRS['val']!r} as unpacked")
    images, masks, names = [], [], []
    for p in progress(paths, desc=f"MoNuSAC {split}", leave=False):
        img = read_rgb(p)
        mask = torch.from_numpy(monusac_mask(os.path.splitext(p)[0] + ".xml", img.shape[2], img.shape[1]))
        if split == "val":  # deterministic: resized and centre-cropped once
            img, mask = resize_and_crop(img, size, mask)
        images.append(img.contiguous()), masks.append(mask.contiguous()), names.append(os.path.relpath(p, root))
    return images, masks, names


LOADERS = {"consep": load_consep, "monusac": load_monusac}


# -----------------------------------------------------------------------------
# features, decoder, loss, metric


@torch.no_grad()
def patch_features(backbone, x, precision="float32"):
    """(B, D, H/p, W/p) float32: the last block's tokens without the final norm, CLS and registers dropped."""
    with autocast(x.device, precision):
        tokens = backbone.forward_features(x)["x_prenorm"][:, 1 + backbone.num_register_tokens:]
    B, _, H, W = x.shape
    return tokens.float().reshape(B, H // backbone.patch_size, W // backbone.patch_size, -1).permute(0, 3, 1, 2)


def conv_bn_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvDecoderWithImage(nn.Module):
    """eva's decoder: features (B, D, h, w) and the normalised image (B, 3, H, W) -> logits (B, classes, H, W)."""

    def __init__(self, in_features, n_classes=N_CLASSES, hidden=(64, 32, 32)):
        super().__init__()
        self.features_block = nn.Sequential(nn.Upsample(scale_factor=2), conv_bn_relu(in_features, hidden[0]))
        self.image_block = nn.Sequential(conv_bn_relu(hidden[0] + 3, hidden[1]), conv_bn_relu(hidden[1], hidden[2]))
        self.classifier = nn.Conv2d(hidden[2], n_classes, kernel_size=1)

    def forward(self, features, image):
        x = self.features_block(features)  # (B, 64, 2h, 2w)
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.image_block(torch.cat([x, image], dim=1)))


def dice_loss(logits, target, ignore_index=None, smooth=1e-5):
    """MONAI's DiceLoss(softmax=True, batch=True, include_background=True) behind eva's ignore handling: an ignored
    pixel becomes background in the target and gets zero logits (a uniform softmax, no gradient), so it still
    counts in every class's denominator and in the background's overlap."""
    if ignore_index is not None:
        keep = target != ignore_index
        target, logits = target * keep, logits * keep[:, None]
    p = logits.softmax(dim=1)
    g = F.one_hot(target.long(), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    dims = (0, 2, 3)  # batch=True: one Dice per class over the whole batch
    overlap = (p * g).sum(dims)
    return (1 - (2 * overlap + smooth) / (p.sum(dims) + g.sum(dims) + smooth)).mean()


class DiceScore:
    """eva's MonaiDiceScore(include_background=False, ignore_empty=True, reduction="mean"), accumulated over a
    validation pass: classes 1..n_classes-1 of `pred` (B, H, W) against `target` (B, H, W). Ground-truth values
    outside those classes (MoNuSAC's Ambiguous) belong to no class; `mask_ignored` also drops them from `pred`."""

    def __init__(self, n_classes=N_CLASSES, ignore_index=None, mask_ignored=False):
        self.classes, self.ignore_index, self.mask_ignored = range(1, n_classes), ignore_index, mask_ignored
        self.rows = []  # per image and class: Dice, NaN where the class is absent from the ground truth

    def update(self, pred, target):
        if self.mask_ignored and self.ignore_index is not None:
            pred = torch.where(target == self.ignore_index, -1, pred)
        rows = []
        for c in self.classes:
            p, g = pred == c, target == c
            n_true, n_pred, tp = g.sum((1, 2)), p.sum((1, 2)), (p & g).sum((1, 2))
            rows.append(torch.where(n_true > 0, 2 * tp / (n_true + n_pred).clamp_min(1), float("nan")))
        self.rows.append(torch.stack(rows, dim=1).double().cpu())  # (B, classes); MONAI's values in float32

    def compute(self):
        """(score, per-class mean over the images where the class is present)"""
        f = torch.cat(self.rows)
        valid = ~f.isnan()
        per_image = torch.where(valid, f, 0).sum(1) / valid.sum(1).clamp_min(1)
        has_any = valid.any(1)
        score = float(per_image[has_any].mean()) if has_any.any() else 0.0  # MONAI: 0 when nothing is valid
        return score, f.nanmean(0).tolist()


# -----------------------------------------------------------------------------
# data on the device, feature cache, one training run


class RandomCrops(torch.utils.data.Dataset):
    """MoNuSAC's training inputs: a fresh RandomResizedCrop of every image in every epoch."""

    def __init__(self, images, masks, size=SIZE):
        self.images, self.masks, self.size = images, masks, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img, mask = random_resized_crop(self.images[i], self.masks[i], self.size)
        return img.contiguous(), mask.long()


def cached_features(args, backbone, data, splits):
    """{split: (features (n, D, 16, 16) float32, images uint8, masks uint8)} for the deterministic splits, computed
    once and kept on disk, keyed by the weights file, the data files and the settings that change features."""
    files = [file_key(os.path.abspath(f)) for f in sorted(glob.glob(os.path.join(args.data, "**", "*"), recursive=True))
             if f.lower().endswith((".png", ".mat", ".tif", ".xml"))]
    key = cache_key(file_key(os.path.abspath(args.weights)), args.arch, args.dataset, splits, files, args.precision,
                    args.size, args.norm)
    path = os.path.join(args.cache_dir, f"seg_{args.dataset}_{key}.pt")
    if os.path.exists(path):
        print(f"features from cache {path}")
        return torch.load(path, weights_only=True), path
    out = {}
    for split in splits:
        images, masks, _ = data[split]
        feats = []
        for i in progress(range(0, len(images), args.batch_size), desc=f"features {split}", leave=False):
            x = normalize(torch.stack(images[i:i + args.batch_size]), args.norm).to(args.device)
            feats.append(patch_features(backbone, x, args.precision).cpu())
        out[split] = (torch.cat(feats), torch.stack(images), torch.stack(masks))
    os.makedirs(args.cache_dir, exist_ok=True)
    size = sum(f.numel() * 4 for f, _, _ in out.values())
    atomic_write(path, lambda f: torch.save(out, f), size_hint=size)
    return out, path


@torch.no_grad()
def validate(decoder, val, args, ignore_index):
    feats, images, masks = val
    decoder.eval()
    score = DiceScore(N_CLASSES, ignore_index, args.mask_ambiguous)
    for i in range(0, len(masks), args.batch_size):
        logits = decoder(feats[i:i + args.batch_size], normalize(images[i:i + args.batch_size], args.norm))
        score.update(logits.argmax(1), masks[i:i + args.batch_size].long())
    return score.compute()


def cached_batches(train, args, seed):
    """CoNSeP's training batches from cached features: a new shuffle every epoch, the last batch partial."""
    feats, images, masks = train
    g = torch.Generator().manual_seed(seed)

    def batches():
        for idx in torch.randperm(len(masks), generator=g).to(masks.device).split(args.batch_size):
            yield normalize(images[idx], args.norm), feats[idx], masks[idx].long()
    return batches


def online_batches(crops, backbone, args, seed):
    """MoNuSAC's training batches: fresh random crops (in `--workers` processes), the frozen encoder on each."""
    loader = torch.utils.data.DataLoader(crops, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         pin_memory=torch.device(args.device).type == "cuda")

    def batches():
        for img, mask in loader:
            x = normalize(img.to(args.device, non_blocking=True), args.norm)
            yield x, patch_features(backbone, x, args.precision), mask.to(args.device, non_blocking=True)
    return batches


def train_run(args, run, train_batches, n_train, val, dim, ignore_index, patience):
    """One decoder from scratch; returns the best validation score and its history."""
    torch.manual_seed(args.seed + run)
    decoder = ConvDecoderWithImage(dim).to(args.device)
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1 / 3, total_iters=5)  # eva's default scheduler
    n_batches = math.ceil(n_train / args.batch_size)
    best, best_epoch, per_class, wait, step, epoch, curve = -math.inf, -1, None, 0, 0, 0, []
    bar = progress(total=args.steps, desc=f"run {run}", leave=False)
    while step < args.steps and wait < patience:
        decoder.train()
        for k, (x, feats, target) in enumerate(train_batches()):
            loss = dice_loss(decoder(feats, x), target, ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step >= args.steps and k < n_batches - 1:
                break  # Lightning validates only after an epoch's last batch
        else:
            score, classes = validate(decoder, val, args, ignore_index)
            curve.append(score)
            if score > best:  # ModelCheckpoint and EarlyStopping(min_delta=0) need a strict improvement
                best, best_epoch, per_class, wait = score, epoch, classes, 0
            else:
                wait += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", dice=f"{score:.4f}", best=f"{best:.4f}")
            sched.step()
            epoch += 1
    bar.close()
    if not curve:  # --steps shorter than one epoch: eva would not validate at all; score the final decoder
        best, per_class = validate(decoder, val, args, ignore_index)
    return {"dice": best, "best_epoch": best_epoch, "per_class_dice": per_class, "epochs": epoch, "steps": step,
            "stopped_early": wait >= patience, "val_dice_per_epoch": curve}


# -----------------------------------------------------------------------------
# the command line


def get_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--weights", required=True, type=weights_arg,
                   help="backbone checkpoint / export / hub file or model folder (local path)")
    p.add_argument("--data", required=True, type=existing_path, help="dataset root as unpacked (see the layouts above)")
    p.add_argument("--dataset", required=True, choices=sorted(LOADERS), help="consep or monusac")
    p.add_argument("--out", default=None, help="results JSON (default results_seg_<dataset>.json)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --out holding other weights' or settings' results")
    p.add_argument("--runs", type=bounded(int, 1), default=5,
                   help="decoders trained from scratch and averaged (eva: 5)")
    p.add_argument("--steps", type=bounded(int, 1), default=2000,
                   help="optimizer steps per run (eva: 2000; fewer for a look)")
    p.add_argument("--batch-size", type=bounded(int, 1), default=64, help="training and feature batch (eva: 64)")
    p.add_argument("--lr", type=bounded(float, 0.0), default=2e-3, help="AdamW learning rate (eva: 2e-3)")
    p.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.01,
                   help="AdamW weight decay (eva: torch's 0.01)")
    p.add_argument("--patience", type=bounded(int, 1), default=None,
                   help=f"epochs without improvement (eva's: {PATIENCE})")
    p.add_argument("--mask-ambiguous", action="store_true",
                   help="MoNuSAC: also drop Ambiguous pixels from predictions in the metric (corrected, not eva's)")
    p.add_argument("--size", type=bounded(int, 14), default=SIZE,
                   help="input size (eva: 224; others are not eva's protocol)")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                   help="encoder precision (eva: float32; bfloat16 is faster on a GPU)")
    p.add_argument("--arch", default=None, help="override the arch inferred from the weights")
    p.add_argument("--features", default="cls", choices=FEATURES, help="ignored: segmentation uses the token map")
    p.add_argument("--norm", default="imagenet", choices=sorted(augment.NORMS),
                   help="input normalisation of the backbone (eva and OpenMidnight: imagenet)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                                       "feature_cache"), help="cached features")
    p.add_argument("--workers", type=bounded(int, 0), default=4, help="MoNuSAC crop workers (eva: 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cpu, cuda:1 ...")
    p.add_argument("--seed", type=int, default=42, help="run r seeds torch with seed + r")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    ignore_index, patience = IGNORE[args.dataset], args.patience or PATIENCE[args.dataset]
    data = {s: LOADERS[args.dataset](args.data, s, args.size) for s in ("train", "val")}
    backbone = load_backbone(args.weights, arch=args.arch).eval().to(args.device).requires_grad_(False)
    online = args.dataset == "monusac"  # random crops: the encoder runs at every step
    cache, cache_path = cached_features(args, backbone, data, ["val"] if online else ["train", "val"])
    val = tuple(t.to(args.device) for t in cache["val"])
    crops = RandomCrops(*data["train"][:2], args.size) if online else None
    train = None if online else tuple(t.to(args.device) for t in cache["train"])
    n_train = len(crops) if online else len(train[2])
    if n_train == 0 or len(val[2]) == 0:
        raise SystemExit(f"{args.data!r} holds no {args.dataset} training or validation samples")

    runs = []
    for run in range(args.runs):
        batches = online_batches(crops, backbone, args, args.seed + run) if online else \
            cached_batches(train, args, args.seed + run)
        runs.append(train_run(args, run, batches, n_train, val, backbone.embed_dim, ignore_index, patience))
        print(f"run {run}: best val Dice {runs[-1]['dice']:.4f} at epoch {runs[-1]['best_epoch']}")

    dice = [r["dice"] for r in runs]
    mean, std = float(np.mean(dice)), statistics.stdev(dice) if len(dice) > 1 else 0.0
    n_images = {s: len({name.split("#")[0] for name in data[s][2]}) for s in data}
    settings = {**vars(args), "patience": patience, "ignore_index": ignore_index, "classes": CLASSES[args.dataset],
                "metric": "MonaiDiceScore" + (" with Ambiguous masked" if args.mask_ambiguous else ""),
                "online_encoder": online, "images": n_images, "samples": {"train": n_train, "val": len(val[2])},
                "steps_per_epoch": math.ceil(n_train / args.batch_size), "cache": cache_path,
                "image_counts_as_eva": n_images == EXPECTED[args.dataset], "std": "sample (ddof=1), as eva"}
    if not settings["image_counts_as_eva"]:
        print(f"note: {n_images} images, eva expects {EXPECTED[args.dataset]}: not the full dataset")
    results = {"settings": settings,
               "decoder": {"dice": mean, "dice_std": std, "runs": runs, "per_class_dice": torch.tensor(
                   [r["per_class_dice"] for r in runs]).nanmean(0).tolist()},
               "headline": {"metric": "dice", "value": mean, "std": std, "method": "decoder", "split": "test"}}
    out = args.out or f"results_seg_{args.dataset}.json"
    save_results(out, results, args.force)
    print(f"{args.dataset} (test split, eva's validation set): MonaiDiceScore {mean:.4f} +- {std:.4f} over "
          f"{len(runs)} runs [{time.time() - t0:.0f}s, {out}]")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
