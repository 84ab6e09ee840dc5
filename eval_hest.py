"""
HEST-bench (Jaume et al., NeurIPS 2024) as OpenMidnight scores it: predict the log1p expression of each task's 50
most variable genes from the frozen feature of a spot's patch with a ridge probe per patient-level fold, and score
Pearson's r on the held-out patients.

    python eval_hest.py --weights teacher_checkpoint.pth --data hest-bench --dataset hest --out results_hest.json

mahmoodlab/HEST's protocol (bench/benchmark.py, trainer.py, st_dataset.py at afd42c3) with OpenMidnight's config:
- patches: 224 px at 0.5 um/px as shipped, no resize, ToTensor + ImageNet Normalize, CLS token, fp32.
- targets: log1p of the raw counts of var_50genes.json's genes, spots matched to patches by barcode.
- per fold (splits/train_i.csv -> test_i.csv): StandardScaler, PCA(256, random_state=1) fitted on the training fold,
  Ridge(alpha = 100 / (256 * 50), solver="lsqr", fit_intercept=False, max_iter=1000); here in numpy, with
  scikit-learn's choice of exact or seeded randomized PCA and LSQR's early stop, both part of HEST's numbers.
- score: Pearson's r per gene (NaN for a constant prediction or target, which HEST lets spread into the means);
  fold = mean over genes, task = mean and std (ddof 0) over folds, headline = mean over the tasks.
Layout: <root>/<TASK>/{patches/<id>.h5, adata/<id>.h5ad, var_50genes.json, splits/{train,test}_<i>.csv} (h5py).
"""
import csv
import json
import os
import sys
import time

import numpy as np
import torch

import augment
import eval_probe
from cli import Parser, bounded, existing_path, progress
from files import atomic_write
from weights import load_backbone, weights_arg

# HEST-bench's task folders, as OpenMidnight's config enables them (HCC stays off); the paper writes ccRCC and LUAD
TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "CCRCC", "LUNG", "LYMPH_IDC")
ALIASES = {"LUAD": "LUNG"}  # ccRCC upper-cases to its folder, CCRCC
LATENT_DIM, PCA_SEED = 256, 1  # BenchmarkConfig: latent_dim, seed (PCA's random_state)
RIDGE_TOL, RIDGE_MAX_ITER = 1e-4, 1000  # scikit-learn Ridge's default tol; trainer.py's max_iter


# -----------------------------------------------------------------------------
# HEST-bench's files (HDF5): patches/<id>.h5 (img, barcode) and AnnData's adata/<id>.h5ad


def _h5py():
    try:
        import h5py  # optional: only HEST-bench's .h5 / .h5ad files need it
    except ImportError:
        raise SystemExit("HEST-bench is stored as HDF5 (.h5 and .h5ad): pip install h5py to evaluate on it")
    return h5py


def _text(values):  # fixed-length bytes, variable-length bytes or str
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1).tolist()]


def _strings(node):
    """A string column of an .h5ad: a plain dataset; a categorical (a group of codes + categories since anndata 0.8,
    or codes whose `categories` attribute references __categories/<column> in 0.7); a nullable string array."""
    if isinstance(node, _h5py().Group):
        if "categories" not in node:
            return _text(node["values"][:])
        categories, codes = _text(node["categories"][:]), node["codes"][:]
    elif "categories" in node.attrs:
        categories, codes = _text(node.file[node.attrs["categories"]][:]), node[:]
    else:
        return _text(node[:])
    return [categories[c] if c >= 0 else "" for c in codes]


def _names(frame):
    """obs / var names: the column that the dataframe group's `_index` attribute names, or the `index` field of the
    compound dataset that anndata wrote before 0.7."""
    if isinstance(frame, _h5py().Dataset):
        return _text(frame["index"])
    name = frame.attrs.get("_index", "_index")
    return _strings(frame[name.decode() if isinstance(name, bytes) else name])


def _positions(names, wanted, what, path):
    where = {n: i for i, n in enumerate(names)}
    if len(where) < len(names):
        raise ValueError(f"{path}: its {what} names are not unique (HEST's adata[barcodes][:, genes] fails too)")
    missing = [w for w in wanted if w not in where]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the {len(wanted)} {what} asked for (e.g. {missing[:3]}): "
                         "patches, expression and var_50genes.json must come from the same HEST-bench task")
    return np.array([where[w] for w in wanted], dtype=np.int64)


def read_barcodes(path):
    with _h5py().File(path, "r") as f:
        return _text(f["barcode"][:])


def patch_batches(path, batch_size):
    """The uint8 (B, H, W, 3) patches of an .h5 in file order (hestcore's H5HESTDataset reads them so)."""
    with _h5py().File(path, "r") as f:
        img = f["img"]
        for start in range(0, len(img), batch_size):
            yield img[start:start + batch_size]


def read_expression(path, barcodes, genes):
    """Raw counts (len(barcodes), len(genes)) float64 of an .h5ad, rows and columns picked by name as HEST's
    adata[barcodes][:, genes]. X is a dense dataset or a CSR / CSC group (data, indices, indptr; the shape in the
    `shape` attribute, `h5sparse_shape` before anndata 0.7)."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        rows = _positions(_names(f["obs"]), barcodes, "spot (obs)", path)
        cols, inverse = np.unique(_positions(_names(f["var"]), genes, "gene (var)", path), return_inverse=True)
        X = f["X"]
        if isinstance(X, h5py.Dataset):
            return X[:, cols].astype(np.float64)[rows][:, inverse]  # h5py selects increasing, unique columns
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in X.attrs.items()}
        kind = str(attrs.get("encoding-type", attrs.get("h5sparse_format", "")))[:3]
        shape = tuple(int(s) for s in attrs.get("shape", attrs.get("h5sparse_shape", ())))
        if kind not in ("csr", "csc") or len(shape) != 2:
            raise ValueError(f"{path}: X is neither a dense matrix nor a CSR/CSC group with a shape attribute")
        out, indptr = np.zeros((shape[0], len(cols))), X["indptr"][:]
        if kind == "csc":  # read the genes' columns only; np.add.at sums repeated entries, as scipy's toarray
            for j, c in enumerate(cols):
                np.add.at(out[:, j], X["indices"][indptr[c]:indptr[c + 1]], X["data"][indptr[c]:indptr[c + 1]])
        else:
            column = np.full(shape[1], -1)
            column[cols] = np.arange(len(cols))
            j, row = column[X["indices"][:]], np.repeat(np.arange(shape[0]), np.diff(indptr))
            np.add.at(out, (row[j >= 0], j[j >= 0]), X["data"][:][j >= 0])
        return out[rows][:, inverse]


def _samples(csv_path, root):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"sample_id", "patches_path", "expr_path"} <= set(rows[0]):
        raise SystemExit(f"{csv_path} needs rows with columns sample_id, patches_path, expr_path")
    for r, key in ((r, key) for r in rows for key in ("patches_path", "expr_path")):
        r[key] = os.path.join(root, r[key])
        if not os.path.isfile(r[key]):
            raise SystemExit(f"{csv_path}: {key} {r[key]} does not exist; download the whole task folder")
    return rows


def load_task(root):
    """The genes and the folds [(train samples, test samples)] of one task folder."""
    genes_path, splits = os.path.join(root, "var_50genes.json"), os.path.join(root, "splits")
    for p in (genes_path, splits):
        if not os.path.exists(p):
            raise SystemExit(f"{root} lacks {os.path.basename(p)}: expected HEST-bench's layout (see --help)")
    with open(genes_path) as f:
        genes = json.load(f)["genes"]
    n = sum(1 for s in os.listdir(splits) if s.startswith("train_") and s.endswith(".csv"))  # HEST: len(listdir)//2
    paths = [[os.path.join(splits, f"{part}_{i}.csv") for part in ("train", "test")] for i in range(n)]
    if not n or not all(os.path.isfile(p) for fold in paths for p in fold):
        raise SystemExit(f"{splits} needs pairs train_<i>.csv, test_<i>.csv for i = 0, 1, ...")
    return genes, [tuple(_samples(p, root) for p in fold) for fold in paths]


# -----------------------------------------------------------------------------
# the probe: StandardScaler -> PCA -> ridge (LSQR) -> Pearson, scikit-learn's and scipy's numbers in numpy


def standardize(train, test):
    """StandardScaler fitted on train: mean and std (ddof 0); a constant column (its variance within the two-pass
    rounding bound of Chan, Golub & LeVeque, scikit-learn's test) keeps scale 1."""
    n, mean, var = len(train), train.mean(0), train.var(0)
    eps = np.finfo(np.float64).eps
    scale = np.where(var <= n * eps * var + (n * mean * eps) ** 2, 1.0, np.sqrt(var))
    return (train - mean) / scale, (test - mean) / scale


def pca(train, test, k=LATENT_DIM, seed=PCA_SEED):
    """Both folds' scores on train's top-k principal axes as scikit-learn's PCA(k, random_state=seed) (>= 1.5,
    svd_solver="auto") gives them: exact for a tall narrow (d <= 1000, n >= 10 d), small (n, d <= 500) or nearly
    full-rank problem, else a randomized SVD (Halko et al. 2011) whose inexact trailing axes are part of HEST's
    numbers: k + 10 Gaussian columns from RandomState(seed) (float32, as HEST's features), 4 power iterations (7 if
    k < min(n, d) / 10), train's scores its projection on the sketch (fit_transform's U * S). Axis signs are left
    as they come: the ridge's predictions do not depend on them."""
    n, d = train.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"PCA to {k} dimensions needs at least {k} training spots and features, got {n} x {d}")
    mean = train.mean(0)
    xc, tc = train - mean, test - mean
    if (d <= 1000 and n >= 10 * d) or max(n, d) <= 500 or k >= 0.8 * min(n, d):
        axes = np.linalg.eigh(xc.T @ xc)[1][:, ::-1][:, :k]
        return xc @ axes, tc @ axes
    M = xc.T if n < d else xc  # scikit-learn sketches the wider side
    q = np.random.RandomState(seed).normal(size=(M.shape[1], k + 10)).astype(np.float32).astype(np.float64)
    for _ in range(7 if k < 0.1 * min(n, d) else 4):  # QR keeps the span that scikit-learn's LU steps keep
        q = np.linalg.qr(M.T @ np.linalg.qr(M @ q)[0])[0]
    q = np.linalg.qr(M @ q)[0]
    u, s, vt = np.linalg.svd(q.T @ M, full_matrices=False)
    if n < d:  # the axes are q @ u; train's scores vt.T * s equal xc @ axes
        axes = (q @ u)[:, :k]
        return xc @ axes, tc @ axes
    return (q @ u[:, :k]) * s[:k], tc @ vt[:k].T


def ridge_lsqr(A, B, alpha, tol=RIDGE_TOL, iter_lim=RIDGE_MAX_ITER, conlim=1e8):
    """Ridge without intercept, min |A x - b|^2 + alpha |x|^2 for every column b of B, by LSQR (Paige & Saunders
    1982: Golub-Kahan bidiagonalisation, damp = sqrt(alpha)) with scipy.sparse.linalg.lsqr's stopping tests at
    atol = btol = tol, as scikit-learn's Ridge(solver="lsqr") runs it; all columns advance together and each keeps
    its x from the step at which its own test stops it. Returns (n_features, n_targets)."""
    eps, damp, G = np.finfo(np.float64).eps, np.sqrt(alpha), B.shape[1]
    x, beta = np.zeros((A.shape[1], G)), np.linalg.norm(B, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = B / np.where(beta > 0, beta, 1)
        alfa = np.linalg.norm(A.T @ u, axis=0)
        v = A.T @ u / np.where(alfa > 0, alfa, 1)
        w, rhobar, phibar, bnorm = v.copy(), alfa, beta, beta
        anorm, ddnorm, res2, xxnorm, z, sn2, cs2 = *np.zeros((6, G)), -np.ones(G)
        active = alfa * beta != 0  # else x = 0 solves it (scipy returns at once)
        for _ in range(iter_lim):
            if not active.any():
                break
            u = A @ v - alfa * u
            beta = np.linalg.norm(u, axis=0)
            on = beta > 0  # a zero beta ends the bidiagonalisation: u, v, alfa and anorm stay
            u = u / np.where(on, beta, 1)
            anorm = np.where(on, np.sqrt(anorm ** 2 + alfa ** 2 + beta ** 2 + alpha), anorm)
            v_next = A.T @ u - beta * v
            alfa_next = np.linalg.norm(v_next, axis=0)
            v, alfa = np.where(on, v_next / np.where(alfa_next > 0, alfa_next, 1), v), np.where(on, alfa_next, alfa)
            rhobar1 = np.sqrt(rhobar ** 2 + alpha)  # rotate the damping away
            psi, phibar = damp / rhobar1 * phibar, rhobar / rhobar1 * phibar
            rho = np.hypot(rhobar1, beta)  # the plane rotation of the bidiagonal
            cs, sn = rhobar1 / rho, beta / rho
            theta, rhobar, phi = sn * alfa, -cs * alfa, cs * phibar
            phibar, tau = sn * phibar, sn * phi
            x = np.where(active, x + phi / rho * w, x)
            ddnorm = ddnorm + np.linalg.norm(w / rho, axis=0) ** 2
            w = v - theta / rho * w
            rhs, gambar = phi - sn2 * rho * z, -cs2 * rho  # estimate |x| for the tests
            gamma, xnorm = np.sqrt(gambar ** 2 + theta ** 2), np.sqrt(xxnorm + (rhs / gambar) ** 2)
            cs2, sn2, z = gambar / gamma, theta / gamma, rhs / gamma
            xxnorm, res2 = xxnorm + z ** 2, res2 + psi ** 2
            rnorm, acond = np.sqrt(phibar ** 2 + res2), anorm * np.sqrt(ddnorm)
            test1, test2, test3 = rnorm / bnorm, alfa * np.abs(tau) / (anorm * rnorm + eps), 1 / (acond + eps)
            stop = (test1 <= tol + tol * anorm * xnorm / bnorm) | (test2 <= tol) | (test3 <= 1 / conlim)
            stop |= (1 + test1 / (1 + anorm * xnorm / bnorm) <= 1) | (1 + test2 <= 1) | (1 + test3 <= 1)
            active &= ~stop
    return x


def pearson(pred, target):
    """Pearson's r of each column pair, as scipy.stats.pearsonr: NaN where either column is constant, clipped to
    [-1, 1], exactly +-1 for two spots."""
    if len(pred) < 2:
        raise ValueError("Pearson's r needs at least 2 test spots")
    pm, tm = pred - pred.mean(0), target - target.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(((pm / np.linalg.norm(pm, axis=0)) * (tm / np.linalg.norm(tm, axis=0))).sum(0), -1, 1)
    r[(pred == pred[:1]).all(0) | (target == target[:1]).all(0)] = np.nan
    return np.round(r) if len(pred) == 2 else r


def probe_fold(x_train, y_train, x_test, y_test, latent_dim=LATENT_DIM):
    """Per-gene Pearson's r of HEST's probe on one fold; x: (n, D) features, y: (n, G) log1p expression."""
    a, b = pca(*standardize(x_train.astype(np.float64), x_test.astype(np.float64)), latent_dim)
    # HEST hands the PCA scores to Ridge as float32 torch.Tensors, which scikit-learn then converts to float64
    a, b = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    return pearson(b @ ridge_lsqr(a, y_train, 100 / (a.shape[1] * y_train.shape[1])), y_test)


def summarise_task(fold_r, genes):
    """fold = mean over genes, task = mean and std (ddof 0) over folds: HEST's merge_fold_results."""
    means = [float(np.mean(r)) for r in fold_r]
    per_gene = {g: [float(r[j]) for r in fold_r] for j, g in enumerate(genes)}
    return {"mean": float(np.mean(means)), "std": float(np.std(means)), "fold_means": means,
            "genes": {g: {"mean": float(np.mean(v)), "std": float(np.std(v)), "folds": v} for g, v in per_gene.items()}}


# -----------------------------------------------------------------------------
# features (cached per patch file) and the command line


def sample_features(backbone, patches_path, args):
    """(n, D) float32 features of one sample's patches in file order: ToTensor, Normalize (HEST: ImageNet's), no
    resize."""
    key = eval_probe.cache_key(eval_probe.file_key(os.path.abspath(args.weights)), args.arch, args.features,
                               args.dtype, args.norm, eval_probe.file_key(os.path.abspath(patches_path)))
    path = os.path.join(args.cache_dir, f"{os.path.basename(patches_path)}.{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    feats = []
    batches = patch_batches(patches_path, args.batch_size)
    for imgs in progress(batches, desc=f"features of {os.path.basename(patches_path)}", leave=False):
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
        feats.append(eval_probe.embed(backbone, augment.normalize(x, *augment.NORMS[args.norm]), args.features,
                                     args.dtype))
    feats = torch.cat(feats).numpy()
    os.makedirs(args.cache_dir, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, feats), size_hint=feats.nbytes)
    return feats


def fold_data(backbone, samples, genes, args, memo):
    """Features and log1p expression of a fold's samples, concatenated in the split file's order."""
    for s in samples:
        if s["patches_path"] not in memo:  # HEST's normalize=True: sc.pp.log1p only
            memo[s["patches_path"]] = (sample_features(backbone, s["patches_path"], args), np.log1p(
                read_expression(s["expr_path"], read_barcodes(s["patches_path"]), genes)))
    return (np.concatenate([memo[s["patches_path"]][i] for s in samples]) for i in (0, 1))


def get_args(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--weights", required=True, type=weights_arg,
                   help="checkpoint / export / hub file or model folder (local path)")
    p.add_argument("--data", required=True, type=existing_path, help="HEST-bench root holding the task folders")
    p.add_argument("--dataset", default="hest", choices=["hest"], help="the benchmark (HEST-bench only)")
    p.add_argument("--tasks", nargs="+", help=f"task folders (default: those of {TASKS} present; ccRCC, LUAD work)")
    p.add_argument("--out", default="results_hest.json", help="results JSON")
    p.add_argument("--force", action="store_true",
                   help="overwrite an --out holding other weights' or settings' results")
    p.add_argument("--features", default="cls", choices=eval_probe.FEATURES, help="the patch feature (HEST: cls)")
    p.add_argument("--norm", default="imagenet", choices=sorted(augment.NORMS),
                   help="input normalisation of the backbone (HEST and OpenMidnight: imagenet)")
    p.add_argument("--arch", default=None, help="override the arch inferred from the weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="GPU precision (OM: float32)")
    p.add_argument("--latent-dim", type=bounded(int, 1), default=LATENT_DIM, help="PCA dimensions (HEST: 256)")
    p.add_argument("--batch-size", type=bounded(int, 1), default=128, help="patches per forward (HEST: 128)")
    p.add_argument("--runs", type=int, default=1, help="ignored: the protocol is deterministic, one run")
    p.add_argument("--cache-dir", help="features cached per patch file", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "data", "hest_cache"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    return p.parse_args(argv)


def main(argv=None):
    args, t0 = get_args(argv), time.time()
    tasks = [ALIASES.get(t.upper(), t.upper()) for t in args.tasks or TASKS]
    missing = [t for t in tasks if not os.path.isdir(os.path.join(args.data, t))]
    if missing and (args.tasks or len(missing) == len(tasks)):
        raise SystemExit(f"{args.data} lacks the task folders {missing}: --data is HEST-bench's root holding them")
    if missing:
        print(f"note: {args.data} lacks the task folders {missing}; the headline averages the other tasks only")
    tasks = [t for t in tasks if t not in missing]
    backbone = load_backbone(args.weights, arch=args.arch).eval().to(args.device)
    results = {"settings": {**vars(args), "tasks": tasks, "missing_tasks": missing, "pca_seed": PCA_SEED,
                            "ridge": {"alpha": f"100 / ({args.latent_dim} * n_genes)", "solver": "lsqr",
                                      "tol": RIDGE_TOL, "max_iter": RIDGE_MAX_ITER, "fit_intercept": False}},
               "pearson": {"tasks": {}}}
    for task in tasks:
        genes, folds = load_task(os.path.join(args.data, task))
        memo, fold_r, info = {}, [], []
        for i, (train, test) in enumerate(folds):
            (xa, ya), (xb, yb) = (fold_data(backbone, s, genes, args, memo) for s in (train, test))
            fold_r.append(probe_fold(xa, ya, xb, yb, args.latent_dim))
            info.append({"train": [s["sample_id"] for s in train], "test": [s["sample_id"] for s in test],
                         "n_train": len(xa), "n_test": len(xb)})
            print(f"{task} fold {i}: n_train {len(xa)} n_test {len(xb)} mean r {np.mean(fold_r[-1]):.4f}")
            undefined = [g for g, r in zip(genes, fold_r[-1]) if np.isnan(r)]
            if undefined:  # HEST's np.mean turns them into a NaN fold, task and headline too
                print(f"note: r undefined (constant prediction or target) for genes {undefined}")
        res = summarise_task(fold_r, genes)
        results["pearson"]["tasks"][task] = {**res, "folds": info}
        print(f"{task}: pearson {res['mean']:.4f} +- {res['std']:.4f} over {len(folds)} folds")
    means = [results["pearson"]["tasks"][t]["mean"] for t in tasks]
    mean, std = float(np.mean(means)), float(np.std(means))
    results["pearson"].update(mean=mean, std_over_tasks=std)
    results["headline"] = {"metric": "pearson", "value": mean, "std": std, "std_over": "tasks (ddof 0)",
                           "method": f"ridge (lsqr) on PCA-{args.latent_dim} of {args.features} features",
                           "split": "test folds (patient-level hold-outs), mean over genes, folds and tasks"}
    eval_probe.save_results(args.out, results, args.force)
    print(f"HEST ({len(tasks)} tasks): pearson {mean:.4f} [{time.time() - t0:.0f}s, {args.out}]")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
