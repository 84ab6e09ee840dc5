"""
Slide-level evaluation as eva does it (Camelyon16-small, PANDA-small, or any cohort): patch embeddings of up to N
foreground patches per slide, then eva's gated ABMIL head trained on the bags (kaiko-ai/eva's offline
camelyon16_small.yaml and panda_small.yaml).

    python eval_slide.py embed --weights W --slides SLIDES --out EMB [--mpp 0.25] [--max-patches 1000]
    python eval_slide.py probe --emb EMB --data CAMELYON16_ROOT --dataset camelyon16 [--runs 20] [--out r.json]
    python eval_slide.py probe --emb EMB --labels labels.csv            # slide_path,label[,split]
    python eval_slide.py --weights W --data ROOT --dataset panda --out results.json --runs 20   # both steps

embed writes EMB/<slide_id>.pt = {"features": (n, D) fp16, "coords": (n, 2) level-0 x, y, ...} per slide, then
EMB/manifest.csv (slide_id, path, n_patches, mpp: the slide's level-0 microns per pixel) and EMB/report.json
(every slide, and why a bad one was skipped). Patches are those of eva's ForegroundGridSampler, with the pixels,
resize and normalisation of eva's reader (slide_reader.py). A killed run rerun with the same command skips the
finished slides. To use the bags elsewhere:

    d = torch.load("EMB/<slide_id>.pt", weights_only=True)   # d["features"] (n, D), d["coords"] (n, 2)

eva's offline MIL protocol (camelyon16_small.yaml, panda_small.yaml), checked against eva's own code: the patches
of its ForegroundGridSampler (level-0 grid of step int(target_mpp / mpp0 x 224), one seeded shuffle, HSV saturation
> 20 tissue mask, >= 35% foreground, at most 1000 patches per slide at 0.25 um/px for Camelyon16, 200 at 0.5 um/px
for PANDA), read from eva's level and resized exactly as its ResizeAndCrop does; then its gated ABMIL head (128-d
projection and attention, MLP 128-64, no dropout) on -inf-padded bags, AdamW lr 1e-3, batches of 32 slides, lr / 3
for the first 5 epochs, at most 100 epochs, early stopping after 20 epochs without a strict improvement of
validation balanced accuracy, the best-validation head scored on the test split, 20 runs. Layouts: Camelyon16 as it
unpacks (training/{normal,tumor}, testing/images, testing/reference.csv; eva's 216/54/129 split), PANDA
(train_images/*.tiff, train_with_noisy_labels.csv; eva's noise filter and 955/477/477 split), or a CSV
slide_path,label[,split] for any cohort; missing or extra slides are listed by name. Differences from eva: features
are stored in fp16, the forward pass runs in bf16 on a GPU (--dtype float32 is eva's precision), and run r
initialises and shuffles with seed 42 + r (eva's single global seed cannot be replayed outside Lightning).
"""
import copy
import glob
import hashlib
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import benchmarks
import eval_probe
from cli import Parser, bounded, existing_path, progress
from files import atomic_write
from slide_reader import MIN_FOREGROUND, SATURATION, SEED, SlideReader
from slides import list_slides, slide_id
from weights import load_backbone, weights_arg

DATASETS = {"camelyon16": dict(mpp=0.25, max_patches=1000), "panda": dict(mpp=0.5, max_patches=200),
            "csv": dict(mpp=0.25, max_patches=1000)}  # eva's camelyon16_small.yaml, panda_small.yaml


# -----------------------------------------------------------------------------
# embed: slides -> EMB/<slide_id>.pt, resumable


def weights_sha1(path):
    if not os.path.isfile(path):
        raise SystemExit(f"no weights at {path!r}: give a local checkpoint file")
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def embed_settings(args):
    return {"weights_sha1": weights_sha1(args.weights), "arch": args.arch, "features": args.features,
            "norm": args.norm, "dtype": args.dtype if str(args.device).startswith("cuda") else "float32",
            "mpp": args.mpp, "patch": args.patch,
            "max_patches": args.max_patches,
            "sampler": f"eva ForegroundGridSampler seed {SEED}, foreground >= {MIN_FOREGROUND}, S > {SATURATION}"}


def read_meta(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # features stay on disk


def embed_slides(paths, out, args, settings=None):
    """Embed every slide of `paths` that `out` does not hold yet; returns the report, one entry per slide."""
    ids = [slide_id(p) for p in paths]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SystemExit(f"slides share the ids {dup[:10]}: rename them or embed them into separate --out folders")
    settings = settings or embed_settings(args)
    os.makedirs(out, exist_ok=True)
    report, todo = {}, []
    for path, sid in zip(paths, ids):
        if not os.path.exists(os.path.join(out, sid + ".pt")):
            todo.append((path, sid))
            continue
        old = read_meta(os.path.join(out, sid + ".pt"))
        if old["settings"] != settings:
            diff = {k: (old["settings"].get(k), v) for k, v in settings.items() if old["settings"].get(k) != v}
            raise SystemExit(f"{out} holds embeddings made with other settings ({sid}: {diff}); use a new --out")
        report[sid] = {"slide_id": sid, "path": path, "status": "ok", "n_patches": len(old["coords"]),
                       "note": "finished by an earlier run"}
    if todo:
        report.update(run_reader(todo, out, args, settings))
    report = [report[sid] for sid in sorted(report)]
    part = f"-part{args.shard_index}-of{args.num_shards}" if getattr(args, "num_shards", 1) > 1 else ""
    atomic_write(os.path.join(out, f"report{part}.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    rows = write_manifest(out, settings)
    bad = sum(r["status"] != "ok" for r in report)
    print(f"{out}: {len(rows)} slides in manifest.csv; {bad} of {len(paths)} skipped (see report{part}.json)")
    return report


def run_reader(todo, out, args, settings):
    """The forward pass in this process, fed by SlideReader workers; each slide's file is written (atomically)
    as soon as its last batch is embedded."""
    device = torch.device(args.device)
    backbone = load_backbone(args.weights, arch=args.arch).eval().to(device)
    dim = eval_probe.feature_dim(backbone, args.features)
    reader = SlideReader([(i, p) for i, (p, _) in enumerate(todo)], args.mpp, args.patch, args.max_patches,
                         args.batch_size, eval_probe.NORMS[args.norm], jpeg_tiles=not args.openslide_only)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None)
    report, pending, n_patches, t0 = {}, {}, 0, time.time()
    bar = progress(total=len(todo), unit="slide", desc="embed", dynamic_ncols=True)
    for item in loader:
        i = item["slide"]
        path, sid = todo[i]
        if "error" in item or "plan" in item and len(item["plan"]["coords"]) == 0:
            pending.pop(i, None)
            why = item.get("error") or f"no tissue: no grid patch has >= {MIN_FOREGROUND:.0%} foreground"
            report[sid] = {"slide_id": sid, "path": path, "status": "skipped", "reason": why}
            tqdm.write(f"skipped {path}: {why}")
            bar.update()
            continue
        if "plan" in item:
            n = len(item["plan"]["coords"])
            pending[i] = {**item["plan"], "features": torch.empty(n, dim, dtype=torch.float16), "done": 0,
                          "t0": time.time()}
            continue
        p = pending[i]
        p["features"][item["index"]] = eval_probe.embed(backbone, item["x"], args.features, args.dtype).half()
        p["done"] += len(item["index"])
        n_patches += len(item["index"])
        bar.set_postfix(patches_per_s=f"{n_patches / max(time.time() - t0, 1e-9):.0f}")
        if p["done"] < len(p["coords"]):
            continue
        del pending[i]
        if not torch.isfinite(p["features"]).all():  # fp16 overflow or a broken checkpoint: never stored
            raise SystemExit(f"non-finite features for {path}: check the weights, --norm and --dtype")
        obj = {"features": p["features"], "coords": torch.as_tensor(p["coords"]), "slide_id": sid, "path": path,
               **{k: p[k] for k in ("mpp", "level", "read_size", "step")}, "settings": settings}
        atomic_write(os.path.join(out, sid + ".pt"), lambda f: torch.save(obj, f))
        report[sid] = {"slide_id": sid, "path": path, "status": "ok", "n_patches": len(p["coords"]),
                       "seconds": round(time.time() - p["t0"], 2)}
        bar.update()
    bar.close()
    return report


def write_manifest(out, settings):
    """manifest.csv from the per-slide files themselves (those made with `settings`), rewritten atomically."""
    rows = []
    for f in sorted(glob.glob(os.path.join(out, "*.pt"))):
        meta = read_meta(f)
        if meta.get("settings") == settings:
            rows.append((meta["slide_id"], meta["path"], len(meta["coords"]), meta["mpp"]))
    text = "slide_id,path,n_patches,mpp\n" + "".join(f"{s},{p},{n},{m!r}\n" for s, p, n, m in rows)
    atomic_write(os.path.join(out, "manifest.csv"), lambda f: f.write(text.encode()))
    return rows


# -----------------------------------------------------------------------------
# eva's head: gated ABMIL, its training loop and its metric


class ABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018) as eva builds it: projection to 128, gated attention 128, MLP
    128 -> 128 -> 64 -> out with ReLU, no dropout. Rows that are all -inf are padding and get zero attention.
    Layers are created in eva's order, so the same torch seed gives eva's initial weights."""

    def __init__(self, in_dim, n_out, projected=128, attention=128, mlp=(128, 64)):
        super().__init__()
        self.projector = nn.Linear(in_dim, projected)
        self.attention_a = nn.Linear(projected, attention)
        self.attention_b = nn.Linear(projected, attention)
        self.attention_c = nn.Linear(attention, 1)
        layers, prev = [], projected
        for h in mlp:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.classifier = nn.Sequential(*layers, nn.Linear(prev, n_out))

    def forward(self, x):  # x (B, N, D) -> logits (B, n_out)
        pad = (x == float("-inf")).all(-1, keepdim=True)  # (B, N, 1)
        h = self.projector(x.masked_fill(pad, 0))
        a = self.attention_c(torch.tanh(self.attention_a(h)) * torch.sigmoid(self.attention_b(h)))
        a = a.masked_fill(pad, float("-inf")).softmax(dim=1)
        return self.classifier((a.transpose(1, 2) @ h).squeeze(1))


def eva_predictions(logits, batch_size=32):
    """Class predictions as eva's metrics make them from the validation/test batches (in dataset order).
    Binary (one logit): torchmetrics applies the sigmoid only when some value of the batch lies outside [0, 1],
    then thresholds at 0.5. Multiclass: argmax."""
    if logits.ndim == 2:
        return logits.argmax(1).numpy()
    out = []
    for b in logits.split(batch_size):
        p = b if ((b >= 0) & (b <= 1)).all() else b.sigmoid()
        out.append((p > 0.5).long())
    return torch.cat(out).numpy()


def eva_score(pred, target, n_classes):
    """eva's monitored and reported metric, in torchmetrics' float32 arithmetic: BinaryBalancedAccuracy
    0.5 (TPR + TNR) with 0/0 = 0, or macro MulticlassAccuracy (mean recall over the classes that occur in target
    or prediction)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    k = torch.arange(n_classes)[:, None]
    tp = ((pred == k) & (target == k)).sum(1)
    fp = ((pred == k) & (target != k)).sum(1)
    fn = ((pred != k) & (target == k)).sum(1)
    recall = torch.where(tp + fn > 0, tp.float() / (tp + fn).clamp_min(1).float(), torch.tensor(0.0))
    if n_classes == 2:  # recall of class 1 is TPR, of class 0 is TNR
        return float(0.5 * (recall[1] + recall[0]))
    w = (tp + fp + fn > 0).float()
    return float((w * recall / w.sum()).sum()) if w.sum() > 0 else 0.0


class BestOnValidation:
    """Lightning's ModelCheckpoint(save_top_k=1) and EarlyStopping(min_delta=0, patience) in mode max: an epoch is
    the new best only if strictly higher than every earlier one (the first always is); stop after `patience`
    epochs in a row without a new best."""

    def __init__(self, patience):
        self.best, self.wait, self.patience = -math.inf, 0, patience

    def update(self, score):
        if score > self.best:
            self.best, self.wait = score, 0
            return True
        self.wait += 1
        return False

    @property
    def stop(self):
        return self.wait >= self.patience


@torch.no_grad()
def predict_logits(head, bags, batch_size=32):
    head.eval()
    return torch.cat([head(b.float()).squeeze(-1).float().cpu() for b in bags.split(batch_size)])


def fit_abmil(train, val, n_classes, seed, lr=1e-3, weight_decay=0.01, batch_size=32, max_epochs=100, patience=20):
    """eva's HeadModule fit: AdamW, torch's default ConstantLR (lr / 3 for epochs 0-4, stepped per epoch), shuffled
    batches of slides, BCE on one logit for two classes (else cross-entropy), validation every epoch, the best
    validation epoch's head kept. train/val: (bags (S, N, D) with -inf padding rows, labels (S,)) on one device."""
    (xt, yt), (xv, yv) = train, val
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ABMIL(xt.shape[-1], 1 if n_classes == 2 else n_classes).to(xt.device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ConstantLR(opt)  # eva's hidden default: factor 1/3, total_iters 5
    select, best_state, history = BestOnValidation(patience), None, []
    for epoch in range(max_epochs):
        head.train()
        lr_now = opt.param_groups[0]["lr"]
        for idx in torch.randperm(len(yt), generator=g).split(batch_size):
            idx = idx.to(xt.device)
            logits = head(xt[idx].float()).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, yt[idx].float()) if n_classes == 2 else \
                F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        score = eva_score(eva_predictions(predict_logits(head, xv)), yv.cpu(), n_classes)
        improved = select.update(score)
        if improved:
            best_state, best_epoch = copy.deepcopy(head.state_dict()), epoch
        history.append({"epoch": epoch, "lr": lr_now, "val": score, "best": improved})
        if select.stop:
            break
    head.load_state_dict(best_state)
    return head, {"best_val_score": select.best, "best_epoch": best_epoch, "epochs": len(history),
                  "history": history}


# -----------------------------------------------------------------------------
# probe: bags -> ABMIL runs -> results JSON


def load_bags(emb, ids, pad_to=0):
    """(S, N, D) fp16 bags padded with -inf rows (eva's Pad2DTensor) to max(pad_to, longest bag). The files are
    first mapped for their shapes, then copied in one at a time: memory is the bags' own (10,000 PANDA slides:
    5.7 GB), not twice it."""
    shapes = [read_meta(os.path.join(emb, i + ".pt"))["features"].shape for i in ids]
    bags = torch.full((len(ids), max([pad_to] + [s[0] for s in shapes]), shapes[0][1]), float("-inf"),
                      dtype=torch.float16)
    for b, i in zip(bags, ids):
        f = read_meta(os.path.join(emb, i + ".pt"))["features"]
        b[:len(f)] = f
    return bags


def probe(emb, items, classes, args, extra_settings=None):
    device = torch.device(args.device)
    have = [it for it in items if os.path.exists(os.path.join(emb, it["id"] + ".pt"))]
    dropped = sorted({it["id"] for it in items} - {it["id"] for it in have})
    if dropped:  # eva too has no bag for a slide without foreground patches
        print(f"{len(dropped)} slides have no embeddings in {emb} (see its report.json), left out: {dropped[:10]}")
    split = {s: [it for it in have if it["split"] == s] for s in ("train", "val", "test")}
    for s in ("train", "val"):
        if not split[s]:
            raise SystemExit(f"no {s} slides with embeddings in {emb}: run embed first, or check --data / --labels")
    report_split = "test" if split["test"] else "val"
    meta = read_meta(os.path.join(emb, split["train"][0]["id"] + ".pt"))
    pad = args.pad or meta["settings"]["max_patches"]
    data = {s: (load_bags(emb, [it["id"] for it in v], pad).to(device),
                torch.tensor([it["label"] for it in v]).to(device)) for s, v in split.items() if v}
    C, runs = len(classes), []
    for r in progress(range(args.runs), desc="ABMIL runs", unit="run"):
        head, info = fit_abmil(data["train"], data["val"], C, args.seed + r, args.lr, args.weight_decay,
                               args.mil_batch_size, args.max_epochs, args.patience)
        pred = eva_predictions(predict_logits(head, data[report_split][0]))
        target = data[report_split][1].cpu().numpy()
        runs.append({**eval_probe.metrics(pred, target, C), "eva_score": eva_score(pred, target, C), **info})
    scores = [run["eva_score"] for run in runs]
    results = {"settings": {**vars(args), **(extra_settings or {}), "embeddings": emb,
                            "embedding_settings": meta["settings"], "pad_to": pad, "classes": classes,
                            "n": {s: len(v) for s, v in split.items()}, "left_out": dropped,
                            "reported_split": report_split},
               "abmil": {**eval_probe.summarise(runs), "eva_score": statistics.mean(scores),
                         "eva_score_stdev": statistics.stdev(scores) if len(scores) > 1 else 0.0},
               "headline": {"metric": "balanced_accuracy", "value": statistics.mean(scores),
                            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "method": "abmil",
                            "split": report_split}}
    if args.out:
        eval_probe.save_results(args.out, results, args.force)
    h = results["headline"]
    print(f"ABMIL {report_split} balanced accuracy {h['value']:.4f} +- {h['std']:.4f} over {args.runs} runs "
          f"(n={len(split[report_split])}) [{args.out}]")
    return results


# -----------------------------------------------------------------------------
# the command line


def get_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("embed", "probe", "run", "-h", "--help"):
        argv = ["run"] + argv  # the evaluation contract: eval_slide.py --weights W --data ROOT --dataset NAME ...
    p = Parser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    cmd = {name: sub.add_parser(name, help=h) for name, h in (
        ("embed", "slides -> EMB/<slide_id>.pt patch embeddings"), ("probe", "embeddings + labels -> ABMIL results"),
        ("run", "embed what is missing (cached next to --out), then probe (the default command)"))}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("embed", "run"):
        q = cmd[name]
        q.add_argument("--weights", required=True, type=weights_arg,
                       help="backbone checkpoint / export / hub file or model folder (local path)")
        q.add_argument("--arch", default=None, help="override the arch inferred from the weights")
        q.add_argument("--features", default="cls", choices=eval_probe.FEATURES, help="patch feature (eva: cls)")
        q.add_argument("--norm", default="imagenet", choices=sorted(eval_probe.NORMS), help="input normalisation")
        q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                       help="forward precision on a GPU (eva: float32; bfloat16 uses the tensor cores); float32 on CPU")
        q.add_argument("--mpp", type=bounded(float, 1e-3), default=0.25 if name == "embed" else None,
                       help="target microns per pixel (run: the dataset's, 0.25 Camelyon16, 0.5 PANDA)")
        q.add_argument("--patch", type=bounded(int, 14), default=224, help="patch side at the target mpp, in pixels")
        q.add_argument("--max-patches", type=bounded(int, 1), default=1000 if name == "embed" else None,
                       help="patches per slide at most (run: the dataset's, 1000 Camelyon16, 200 PANDA)")
        q.add_argument("--batch-size", type=bounded(int, 1), default=64, help="patches per forward pass")
        q.add_argument("--workers", type=bounded(int, 0), default=min(8, os.cpu_count() or 1), help="reader processes")
        q.add_argument("--openslide-only", action="store_true",
                       help="read every patch with OpenSlide's read_region, not from JPEG tiles decoded here "
                            "(the same pixels, slower; for debugging)")
    cmd["embed"].add_argument("--slides", required=True, type=existing_path,
                              help="a slide, a folder of slides or a text file of paths")
    cmd["embed"].add_argument("--out", required=True, help="embedding folder EMB")
    cmd["embed"].add_argument("--num-shards", type=bounded(int, 1), default=1,
                              help="split the slide list over machines")
    cmd["embed"].add_argument("--shard-index", type=bounded(int, 0), default=0,
                              help="which part of the slide list this run does")
    cmd["embed"].add_argument("--device", default=device, help="device of the forward pass")
    for name in ("probe", "run"):
        q = cmd[name]
        q.add_argument("--data", default=None, type=existing_path,
                       help="dataset root (Camelyon16, PANDA) or the CSV for --dataset csv")
        q.add_argument("--dataset", default=None, choices=sorted(benchmarks.SLIDE_LOADERS),
                       help="layout of --data (default csv)")
        q.add_argument("--labels", default=None, type=existing_path,
                       help="slide_path,label[,split] CSV (the same as --dataset csv)")
        q.add_argument("--runs", type=bounded(int, 1), default=20, help="ABMIL heads trained and averaged (eva: 20)")
        q.add_argument("--out", default=None, help="results JSON")
        q.add_argument("--force", action="store_true",
                       help="overwrite an --out holding other weights' or settings' results")
        q.add_argument("--device", default=device, help="device of the forward pass and the heads")
        q.add_argument("--seed", type=int, default=SEED, help="run r initialises and shuffles with seed + r")
        q.add_argument("--lr", type=bounded(float, 0.0), default=1e-3, help="AdamW learning rate (eva: 1e-3)")
        q.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.01,
                       help="AdamW weight decay (torch default)")
        q.add_argument("--mil-batch-size", type=bounded(int, 1), default=32, help="slides per batch (eva: 32)")
        q.add_argument("--max-epochs", type=bounded(int, 1), default=100, help="eva: 100")
        q.add_argument("--patience", type=bounded(int, 1), default=20, help="early-stopping epochs (eva: 20)")
        q.add_argument("--pad", type=bounded(int, 0), default=0,
                       help="pad bags to this many rows (0: the max patches)")
    cmd["probe"].add_argument("--emb", required=True, type=existing_path, help="embedding folder written by embed")
    cmd["run"].add_argument("--cache-dir", default=None, help="embedding cache (default: next to --out)")
    args = p.parse_args(argv)
    if args.command in ("probe", "run"):
        args.dataset = args.dataset or "csv"
        args.data = args.data or args.labels
        if not args.data:
            p.error("give --data ROOT (with --dataset) or --labels labels.csv")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.command == "embed":
        paths = list_slides(args.slides)
        if args.num_shards > 1:
            paths = [s for i, s in enumerate(paths) if i % args.num_shards == args.shard_index]
        return embed_slides(paths, args.out, args)
    try:
        items, classes = benchmarks.SLIDE_LOADERS[args.dataset](
            args.data, args.seed, **({"need_files": False} if args.dataset == "csv" and args.command == "probe" else {}))
    except FileNotFoundError as e:
        raise SystemExit(f"{e}: expected --dataset {args.dataset}'s layout as it unpacks (eval_slide.py's docstring)")
    if args.command == "probe":
        return probe(args.emb, items, classes, args)
    for k, v in DATASETS[args.dataset].items():
        setattr(args, k, getattr(args, k) or v)
    args.out = args.out or f"results_slide_{args.dataset}.json"
    settings = embed_settings(args)
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    cache = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "slide_embeddings",
                                           f"{args.dataset}-{key}")
    embed_slides([it["path"] for it in items], cache, args, settings)
    return probe(cache, items, classes, args, {"embedding_cache": cache})


if __name__ == "__main__":
    main()
