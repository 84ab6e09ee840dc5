"""
The t-SNE figure of the OpenMidnight post (classes separate after pathology training, not before): a labelled image
set's features, one map per model, side by side (eval_suite.py --tsne, and BACH's map with --suite).

t-SNE (van der Maaten & Hinton 2008) is the exact O(N^2) algorithm with scikit-learn's TSNE defaults: per-point
Gaussian bandwidths by binary search to perplexity 30, symmetrised P, PCA initialisation scaled to std 1e-4,
early exaggeration 12 for 250 iterations at momentum 0.5, then momentum 0.8 up to 1000, learning rate
max(N / 12 / 4, 50), delta-bar-delta gains; written in torch, chunked, for up to ~10k points.
"""
import copy
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import benchmarks
import cli
import eval_probe
from files import atomic_write

MACHINE_EPSILON = float(np.finfo(np.double).eps)
TSNE_MAX_POINTS = 10_000


def conditional_probabilities(sqdist, perplexity=30.0, rows=None, n_steps=100, tol=1e-5):
    """p_j|i for rows `rows` of a squared-distance matrix: each row's precision beta found by bisection (doubling
    or halving while unbounded) until the row's entropy is log(perplexity) within tol nats, as scikit-learn's
    _binary_search_perplexity (distances rounded to float32 as there). Returns (P rows, their entropies)."""
    d = sqdist.float().double()
    n, dev = len(d), d.device
    rows = torch.arange(n, device=dev) if rows is None else rows.to(dev)
    self_mask = torch.zeros_like(d, dtype=torch.bool)
    self_mask[torch.arange(n, device=dev), rows] = True
    beta, P = torch.ones(n, dtype=d.dtype, device=dev), torch.zeros_like(d)
    H, lo, hi = torch.zeros_like(beta), torch.full_like(beta, -math.inf), torch.full_like(beta, math.inf)
    active, target = torch.ones(n, dtype=torch.bool, device=dev), math.log(perplexity)
    for _ in range(n_steps):
        p = torch.exp(-d * beta[:, None]).masked_fill(self_mask, 0)
        s = p.sum(1)
        s = torch.where(s == 0, torch.full_like(s, 1e-8), s)  # every neighbour underflowed (scikit-learn's guard)
        entropy = torch.log(s) + beta * (d * p).sum(1) / s
        P, H = torch.where(active[:, None], p / s[:, None], P), torch.where(active, entropy, H)
        diff = entropy - target
        active &= diff.abs() > tol
        if not active.any():
            break
        up, down = active & (diff > 0), active & (diff <= 0)  # too flat: sharpen; too peaked: widen
        lo, hi = torch.where(up, beta, lo), torch.where(down, beta, hi)
        beta = torch.where(up, torch.where(hi.isinf(), beta * 2, (beta + hi) / 2), beta)
        beta = torch.where(down, torch.where(lo.isinf(), beta / 2, (beta + lo) / 2), beta)
    return P, H


def joint_probabilities(x, perplexity=30.0, chunk=1024):
    """Symmetrised affinities P = (P_cond + P_cond^T) / sum, off-diagonal entries at least machine epsilon,
    zero diagonal: scikit-learn's _joint_probabilities as a full (N, N) matrix."""
    x, n = x.double(), len(x)
    P = torch.empty(n, n, dtype=torch.float64 if n <= 4096 else torch.float32, device=x.device)
    sq = (x * x).sum(1)
    for i in range(0, n, chunk):
        d = (sq[i:i + chunk, None] + sq[None, :] - 2 * x[i:i + chunk] @ x.T).clamp_min(0)
        rows = torch.arange(i, min(i + chunk, n), device=x.device)
        d[torch.arange(len(rows), device=x.device), rows] = 0
        P[i:i + chunk] = conditional_probabilities(d, perplexity, rows)[0].to(P)
    P = P + P.T
    P = (P / P.sum().clamp_min(MACHINE_EPSILON)).clamp_min(MACHINE_EPSILON).fill_diagonal_(0)
    return P


def kl_gradient(y, P, exaggeration=1.0, chunk=None, error=True):
    """KL(P || Q) and its gradient 4 sum_j (p_ij - q_ij)(1 + |y_i - y_j|^2)^-1 (y_i - y_j) for the Student-t Q
    (one degree of freedom), by row blocks: a first pass for Q's normaliser, a second for the gradient."""
    n = len(y)
    chunk = chunk or max(1, (1 << 22) // n)
    yd = y.to(P.dtype)

    def kernel(i):
        d = ((yd[i:i + chunk, None, :] - yd[None, :, :]) ** 2).sum(-1)
        w = 1 / (1 + d)
        if len(w) == n:
            return w.fill_diagonal_(0)
        w[torch.arange(len(w), device=w.device), torch.arange(i, i + len(w), device=w.device)] = 0
        return w

    blocks = range(0, n, chunk)
    cached = [kernel(i) for i in blocks] if n * n <= (1 << 24) else None
    z = sum((cached[b] if cached else kernel(i)).sum() for b, i in enumerate(blocks))
    grad, kl = torch.empty_like(yd), torch.zeros((), dtype=P.dtype, device=P.device)
    for b, i in enumerate(blocks):
        w = cached[b] if cached else kernel(i)
        q = (w / z).clamp_min(MACHINE_EPSILON)
        p = P[i:i + chunk] * exaggeration if exaggeration != 1 else P[i:i + chunk]
        m = (p - q) * w
        grad[i:i + chunk] = 4 * (m.sum(1, keepdim=True) * yd[i:i + chunk] - m @ yd)
        if error:
            kl += (p * torch.log(p.clamp_min(MACHINE_EPSILON) / q)).sum()
    return float(kl) if error else math.nan, grad


def pca_init(x, n_components=2):
    """The first principal components (signs as scikit-learn's svd_flip on V), scaled so PC1 has std 1e-4."""
    xc = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:n_components]
    v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
    y = (xc @ v.T).float()
    return y / y[:, 0].std(unbiased=False) * 1e-4


def tsne(x, perplexity=30.0, max_iter=1000, early_exaggeration=12.0, exploration_iter=250, min_grad_norm=1e-7,
         n_iter_without_progress=300, check_every=50, progress=False):
    """2-D t-SNE of features x (N, D) -> (embedding (N, 2) float32, info with the KL history)."""
    n = len(x)
    if perplexity >= n:
        raise ValueError(f"t-SNE with perplexity {perplexity} needs more than {perplexity:g} points, got {n}")
    P = joint_probabilities(x, perplexity)
    y = pca_init(x).to(P.device)
    lr = max(n / early_exaggeration / 4, 50.0)
    update, gains = torch.zeros_like(y), torch.ones_like(y)
    history, it, bar = [(0, kl_gradient(y, P)[0])], 0, cli.progress(total=max_iter, desc="t-SNE",
                                                                      disable=not progress)
    for exaggeration, momentum, stop, patience in ((early_exaggeration, 0.5, exploration_iter, exploration_iter),
                                                   (1.0, 0.8, max_iter, n_iter_without_progress)):
        best_error, best_iter = math.inf, it
        for i in range(it, stop):
            check = (i + 1) % check_every == 0  # the KL is computed only where it is checked
            kl, grad = kl_gradient(y, P, exaggeration, error=check)
            grad = grad.float()
            inc = update * grad < 0  # delta-bar-delta: grow the gain where the step keeps its direction
            gains = torch.where(inc, gains + 0.2, gains * 0.8).clamp_min(0.01)
            grad = grad * gains
            update = momentum * update - lr * grad
            y = y + update
            bar.update()
            if check:
                history.append((i + 1, kl))
                bar.set_postfix(kl=f"{kl:.4f}")
                if kl < best_error:
                    best_error, best_iter = kl, i
                elif i - best_iter > patience:
                    break
                if float(grad.double().norm()) <= min_grad_norm:
                    break
        it = i + 1
    bar.close()
    return y.cpu(), {"kl": kl_gradient(y, P)[0], "history": history, "n_iter": it, "learning_rate": lr,
                     "perplexity": perplexity, "n": n}


# -----------------------------------------------------------------------------
# the figure (pillow): one panel per model, points coloured by class, a legend

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138),
           (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229)]


def class_colours(n):
    if n <= len(PALETTE):
        return PALETTE[:n]
    import colorsys  # many classes: evenly spaced hues, never grey
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(k / n, 0.75, 0.85)) for k in range(n)]


def draw_tsne(panels, labels, classes, out_png, size=560, radius=3):
    """panels: [(title, (N, 2) coordinates)]; every point a filled disc of its class's colour (drawn in a fixed
    shuffled order so no class hides another), text and frames in greys only."""
    colours, font = class_colours(len(classes)), ImageFont.load_default()
    legend_w, top = 40 + 8 * max(len(str(c)) for c in classes), 28
    canvas = Image.new("RGB", (len(panels) * size + legend_w, max(size, 20 * len(classes) + 20) + top), "white")
    draw = ImageDraw.Draw(canvas)
    order = np.random.default_rng(0).permutation(len(labels))
    for k, (title, yx) in enumerate(panels):
        yx = np.asarray(yx, dtype=np.float64)
        lo, extent, inner = yx.min(0), yx.max(0) - yx.min(0), size - 4 * radius - 16
        scale = inner / max(float(extent.max()), 1e-12)  # one scale for both axes, the map centred
        xy = (yx - lo) * scale + (inner - extent * scale) / 2 + 2 * radius + 8 + np.array([k * size, top])
        draw.rectangle([k * size + 2, top, (k + 1) * size - 3, top + size - 3], outline=(190, 190, 190))
        draw.text((k * size + 8, 6), title, fill=(0, 0, 0), font=font)
        for i in order:
            x0, y0 = xy[i]
            draw.ellipse([x0 - radius, y0 - radius, x0 + radius, y0 + radius], fill=colours[labels[i]])
    for c, name in enumerate(classes):
        x0, y0 = len(panels) * size + 10, top + 10 + 20 * c
        draw.rectangle([x0, y0, x0 + 12, y0 + 12], fill=colours[c])
        draw.text((x0 + 18, y0), str(name), fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    atomic_write(out_png, lambda f: canvas.save(f, format="PNG"))
    return canvas.size


def _titles(paths):
    names = [os.path.basename(p) for p in paths]
    return names if len(set(names)) == len(names) else [os.path.join(*p.split(os.sep)[-2:]) for p in paths]


def tsne_command(args):
    """--tsne OUT.png: features of every labelled image of --data (all splits; a stratified sample of
    TSNE_MAX_POINTS if more), one t-SNE per --weights, drawn side by side; OUT.json keeps the coordinates."""
    weights = args.weights if isinstance(args.weights, list) else [args.weights]
    splits, classes = benchmarks.LOADERS[args.dataset](args.data, args.seed)
    splits = {s: items for s, items in splits.items() if items}
    total = sum(len(v) for v in splits.values())
    if total == 0:
        raise SystemExit(f"no labelled images under {args.data!r} for --dataset {args.dataset}")
    if total > TSNE_MAX_POINTS:  # exact t-SNE is O(N^2): a seeded stratified sample of every split
        frac = TSNE_MAX_POINTS / total
        splits = {s: benchmarks.split_items(v, (frac, 1 - frac), args.seed)[0] for s, v in splits.items()}
    panels, infos, labels = [], [], None
    for w, title in zip(weights, _titles(weights)):
        a = copy.copy(args)
        a.weights = w
        backbone = eval_probe.load_backbone(w, arch=args.arch)
        feats, _ = eval_probe.cached_features(a, backbone, splits)
        x = torch.cat([f["x"] for f in feats.values()])
        y = torch.cat([f["y"] for f in feats.values()]).tolist()
        if panels and y != labels:
            raise ValueError("the models read different images of the dataset (unreadable files?)")
        labels = y
        emb, info = tsne(x.to(args.device), progress=True)
        panels.append((title, emb.numpy()))
        infos.append({"weights": w, **info})
    size = draw_tsne(panels, labels, classes, args.tsne)
    res = {"path": args.tsne, "size": size, "classes": classes, "labels": labels, "dataset": args.dataset,
           "features": args.features, "models": infos, "coordinates": [p[1].tolist() for p in panels]}
    eval_probe.save_results(os.path.splitext(args.tsne)[0] + ".json", res, args.force)
    print(f"t-SNE of {len(labels)} {args.dataset} images: {args.tsne} (final KL " +
          ", ".join(f"{i['kl']:.3f}" for i in infos) + ")")
    return res
