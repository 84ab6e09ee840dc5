"""eval_hest.py: the probe against least squares, scikit-learn and scipy; Pearson; fold/task means; HEST-bench's
file layouts (.h5 patches, .h5ad in anndata's encodings); a tiny end-to-end run."""
import csv
import json
import os

import numpy as np
import pytest
import torch

import augment
import eval_hest as H
import eval_probe as E
import model as M
import weights as W


def features(n, d, seed, spread=1.0):
    """float32 features with unequal column scales and offsets, as a backbone's (HEST stores them as float32)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.exp(spread * rng.normal(size=d)) + 3 * rng.normal(size=d)).astype(np.float32)


def test_pca_and_ridge_recover_a_planted_linear_map_and_equal_least_squares():
    x = features(700, 40, 0).astype(np.float64)
    W = np.random.default_rng(1).normal(size=(40, 6))
    y = x @ W + 0.01 * np.random.default_rng(2).normal(size=(700, 6))
    a, b = H.pca(*H.standardize(x[:500], x[500:]), k=40)  # all 40 axes: a rotation of the standardised features
    alpha = 100 / (40 * 6)
    coef = H.ridge_lsqr(a, y[:500], alpha, tol=1e-12)
    # ridge = least squares of the system stacked with sqrt(alpha) I against 0
    lsq = np.linalg.lstsq(np.vstack([a, np.sqrt(alpha) * np.eye(40)]), np.vstack([y[:500], np.zeros((40, 6))]),
                          rcond=None)[0]
    np.testing.assert_allclose(coef, lsq, rtol=1e-7, atol=1e-9)
    assert H.pearson(b @ coef, y[500:]).min() > 0.999
    assert H.probe_fold(x[:500], y[:500], x[500:], y[500:], latent_dim=40).min() > 0.999  # HEST's alpha, tol 1e-4


def test_lsqr_is_scipys_lsqr_step_by_step():
    scipy_lsqr = pytest.importorskip("scipy.sparse.linalg").lsqr
    rng = np.random.default_rng(0)
    A = rng.normal(size=(300, 20)) * np.linspace(1, 3, 20)  # well conditioned: no loss of orthogonality to amplify
    B = np.column_stack([A @ rng.normal(size=(20, 3)) + rng.normal(size=(300, 3)), np.zeros(300)])
    for iter_lim in (1, 2, 5, 1000):  # every iterate, and the run that stops at tol's test
        ref = np.column_stack([scipy_lsqr(A, B[:, j], damp=np.sqrt(0.3), atol=1e-4, btol=1e-4,
                                          iter_lim=iter_lim)[0] for j in range(4)])
        np.testing.assert_allclose(H.ridge_lsqr(A, B, 0.3, iter_lim=iter_lim), ref, rtol=1e-10, atol=1e-12)
    stopped = scipy_lsqr(A, B[:, 0], damp=np.sqrt(0.3), atol=1e-4, btol=1e-4)
    assert 2 < stopped[2] < 20  # the early stop is exercised: fewer steps than columns


@pytest.mark.parametrize("n,d,k,solver", [(500, 300, 256, "full"), (700, 520, 256, "randomized"),
                                          (600, 40, 16, "covariance_eigh")])
def test_probe_matches_scikit_learn_and_scipy(n, d, k, solver):
    # HEST: Pipeline(StandardScaler, PCA(k, random_state=1)) on float32 features; the scores go to Ridge as float32
    # torch.Tensors (scikit-learn converts them to float64); Ridge(lsqr, no intercept); scipy's pearsonr per gene
    pytest.importorskip("sklearn")
    pearsonr = pytest.importorskip("scipy.stats").pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler
    x = features(n + 200, d, 3, spread=0.3)
    x[:, 7] = 2.5  # a constant feature: scale 1
    y = np.log1p(np.random.default_rng(4).poisson(np.exp(x[:, :5].astype(np.float64) @ np.full((5, 8), 0.05))))
    y[:n // 2, 3] = 0.0  # a gene absent from half the training fold
    scaler, pca = StandardScaler(), PCA(n_components=k, random_state=1)
    a = pca.fit_transform(scaler.fit_transform(x[:n]))
    b = pca.transform(scaler.transform(x[n:]))
    assert pca._fit_svd_solver == solver and a.dtype == np.float32
    ridge = Ridge(alpha=100 / (k * 8), solver="lsqr", fit_intercept=False, max_iter=1000, random_state=1)
    pred = ridge.fit(a.astype(np.float64), y[:n]).predict(b.astype(np.float64))
    ref = np.array([pearsonr(y[n:, j], pred[:, j])[0] for j in range(8)])
    mine = H.probe_fold(x[:n], y[:n], x[n:], y[n:], latent_dim=k)
    # scikit-learn's PCA runs in float32 here, so agreement is to ~1e-6; the closed-form ridge (no LSQR early stop)
    # is off by ~1e-4 on this data, an exact PCA instead of the randomized one by ~5e-2
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5)


def test_pearson_against_corrcoef_constant_columns_and_two_spots():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    t[:, 1] += 2 * p[:, 1]
    expect = [np.corrcoef(p[:, j], t[:, j])[0, 1] for j in range(4)]
    np.testing.assert_allclose(H.pearson(p, t), expect, rtol=1e-12)
    p[:, 2], t[:, 3] = 0.7, 0.0  # constant prediction / target: NaN, as scipy.stats.pearsonr
    r = H.pearson(p, t)
    assert np.isnan(r[2]) and np.isnan(r[3]) and np.isfinite(r[:2]).all()
    assert H.pearson(np.array([[1.0], [2.0]]), np.array([[5.0], [3.0]]))[0] == -1.0


def test_fold_and_task_means_on_a_toy_task():
    folds = [np.array([0.2, 0.4, 0.6]), np.array([0.1, 0.3, 0.8])]  # fold means 0.4 and 0.4 -> std 0
    res = H.summarise_task(folds, ["A", "B", "C"])
    assert res["fold_means"] == pytest.approx([0.4, 0.4]) and res["mean"] == pytest.approx(0.4)
    assert res["std"] == pytest.approx(0.0, abs=1e-15)
    assert res["genes"]["C"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.1), "folds": [0.6, 0.8]}
    res = H.summarise_task([np.array([0.5, 0.7]), np.array([0.1, 0.1])], ["A", "B"])
    assert res["mean"] == pytest.approx(0.35) and res["std"] == pytest.approx(0.25)  # ddof 0: |0.6 - 0.1| / 2
    assert np.isnan(H.summarise_task([np.array([0.5, np.nan])], ["A", "B"])["mean"])  # HEST's np.mean spreads NaN


# -----------------------------------------------------------------------------
# HEST-bench files written by hand with h5py in anndata's encodings


def write_patches(path, imgs, barcodes):
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        f["img"] = imgs
        f["barcode"] = np.array(barcodes, dtype="S")[:, None]  # (N, 1) bytes, as HEST's patch files
        f["coords"] = np.zeros((len(imgs), 2), dtype=np.int64)


def write_h5ad(path, X, obs, var, style="new", sparse=None):
    """style new: anndata >= 0.8 (string-array, categorical group, csr/csc group with `shape`); old: 0.7 (plain
    strings, categorical codes + __categories reference, `h5sparse_*` attributes); compound: obs / var as structured
    datasets (before 0.7)."""
    h5py = pytest.importorskip("h5py")
    import scipy.sparse as sp
    s = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        if style == "compound":
            for name, idx in (("obs", obs), ("var", var)):
                f[name] = np.array([(n.encode(),) for n in idx], dtype=[("index", "S20")])
        else:
            for name, idx in (("obs", obs), ("var", var)):
                g = f.create_group(name)
                g.attrs["_index"] = "_index"
                g.create_dataset("_index", data=np.array(idx, dtype=object), dtype=s)
            region = np.array([i % 2 for i in range(len(obs))], dtype=np.int8)
            if style == "new":
                c = f["obs"].create_group("region")
                c.attrs["encoding-type"] = "categorical"
                c.create_dataset("categories", data=np.array(["stroma", "tumour"], dtype=object), dtype=s)
                c["codes"] = region
            else:
                cats = f.create_dataset("obs/__categories/region", data=np.array(["stroma", "tumour"], dtype=object),
                                        dtype=s)
                f["obs/region"] = region
                f["obs/region"].attrs["categories"] = cats.ref
        if sparse:
            m = sp.csr_matrix(X) if sparse == "csr" else sp.csc_matrix(X)
            g = f.create_group("X")
            for key in ("data", "indices", "indptr"):
                g[key] = getattr(m, key)
            if style == "new":
                g.attrs["encoding-type"], g.attrs["shape"] = f"{sparse}_matrix", X.shape
            else:
                g.attrs["h5sparse_format"], g.attrs["h5sparse_shape"] = sparse, X.shape
        else:
            f["X"] = X


EXPR = np.array([[0, 3, 0, 1], [2, 0, 0, 5], [0, 0, 7, 0], [1, 1, 1, 1], [9, 0, 4, 0]], dtype=np.float32)
OBS, VAR = [f"AAAC{i}-1" for i in range(5)], ["ACTB", "CD74", "KRT8", "MUC1"]


@pytest.mark.parametrize("sparse,style", [(None, "new"), ("csr", "new"), ("csc", "new"), ("csr", "old"),
                                          (None, "compound")])
def test_read_expression_picks_spots_and_genes_by_name(tmp_path, sparse, style):
    path = str(tmp_path / "s.h5ad")
    write_h5ad(path, EXPR, OBS, VAR, style, sparse)
    barcodes, genes = ["AAAC4-1", "AAAC0-1", "AAAC2-1"], ["MUC1", "ACTB", "KRT8"]
    got = H.read_expression(path, barcodes, genes)
    expect = EXPR[[4, 0, 2]][:, [3, 0, 2]]  # adata[barcodes][:, genes] by hand
    np.testing.assert_array_equal(got, expect)
    assert got.dtype == np.float64
    with pytest.raises(ValueError, match="lacks 1 of the 2 spot"):
        H.read_expression(path, ["AAAC4-1", "TTTT-1"], genes)


def test_string_columns_in_old_and_new_encodings(tmp_path):
    h5py = pytest.importorskip("h5py")
    for style in ("new", "old"):
        write_h5ad(str(tmp_path / f"{style}.h5ad"), EXPR, OBS, VAR, style)
        with h5py.File(tmp_path / f"{style}.h5ad", "r") as f:
            assert H._strings(f["obs/region"]) == ["stroma", "tumour"] * 2 + ["stroma"]
            assert H._names(f["var"]) == VAR


def test_patch_file_reading(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    write_patches(str(tmp_path / "p.h5"), imgs, OBS)
    assert H.read_barcodes(str(tmp_path / "p.h5")) == OBS
    batches = list(H.patch_batches(str(tmp_path / "p.h5"), 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)


# -----------------------------------------------------------------------------
# end to end


def fake_task(root, task, seed, n_spots=20, size=56):
    """3 samples, 2 folds (train 2 samples -> test 1); expression follows the patches' colour, so r is defined."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, task, "patches"))
    os.makedirs(os.path.join(root, task, "adata"))
    os.makedirs(os.path.join(root, task, "splits"))
    genes = [f"GENE{i}" for i in range(6)]
    with open(os.path.join(root, task, "var_50genes.json"), "w") as f:
        json.dump({"genes": genes}, f)
    for s in range(3):
        imgs = rng.integers(0, 256, size=(n_spots, size, size, 3), dtype=np.uint8)
        shade = rng.uniform(0.3, 1.0, size=(n_spots, 1, 1, 3))
        imgs = (imgs * shade).astype(np.uint8)
        barcodes = [f"S{s}_{i}" for i in range(n_spots)]
        write_patches(os.path.join(root, task, "patches", f"S{s}.h5"), imgs, barcodes)
        counts = rng.poisson(np.exp(3 * shade.reshape(n_spots, 3) @ rng.uniform(0, 1, size=(3, 7))))
        order = rng.permutation(n_spots)  # the .h5ad lists the spots in another order
        write_h5ad(os.path.join(root, task, "adata", f"S{s}.h5ad"), counts[order].astype(np.float32),
                   [barcodes[i] for i in order], genes + ["EXTRA"])
    for fold, test in enumerate((2, 0)):
        for part, ids in (("train", [s for s in range(3) if s != test]), ("test", [test])):
            with open(os.path.join(root, task, "splits", f"{part}_{fold}.csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["sample_id", "patches_path", "expr_path"])
                w.writerows([[f"S{s}", f"patches/S{s}.h5", f"adata/S{s}.h5ad"] for s in ids])


def test_main_on_a_tiny_hest_tree(tmp_path, capsys):
    pytest.importorskip("h5py")
    root = str(tmp_path / "bench")
    fake_task(root, "IDC", 0)
    fake_task(root, "LUNG", 1)
    m = M.ViT("vit_small", img_size=56, num_register_tokens=4, layerscale_init=1.0, depth=2)  # 2 blocks: fast
    torch.save(m.state_dict(), tmp_path / "w.pth")
    args = ["--weights", str(tmp_path / "w.pth"), "--data", root, "--dataset", "hest", "--out",
            str(tmp_path / "r.json"), "--latent-dim", "8", "--batch-size", "16", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    res = H.main(args)
    assert "lacks the task folders ['PRAD', 'PAAD', 'SKCM', 'COAD', 'READ', 'CCRCC', 'LYMPH_IDC']" in \
        capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["headline"]["metric"] == "pearson" and set(saved["pearson"]["tasks"]) == {"IDC", "LUNG"}
    task = saved["pearson"]["tasks"]["IDC"]
    assert len(task["fold_means"]) == 2 and set(task["genes"]) == {f"GENE{i}" for i in range(6)}
    assert saved["headline"]["value"] == pytest.approx(np.mean([t["mean"] for t in saved["pearson"]["tasks"].values()]))
    assert task["folds"][0] == {"train": ["S0", "S1"], "test": ["S2"], "n_train": 40, "n_test": 20}
    # fold 0 of IDC recomputed independently: features by eval_probe.embed, counts by barcode from the h5ad
    backbone = W.load_backbone(str(tmp_path / "w.pth")).eval()
    x, y = [], []
    for s in range(3):
        imgs = np.concatenate(list(H.patch_batches(os.path.join(root, "IDC", "patches", f"S{s}.h5"), 100)))
        x.append(E.embed(backbone, augment.normalize(torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255.0)).numpy())
        y.append(np.log1p(H.read_expression(os.path.join(root, "IDC", "adata", f"S{s}.h5ad"),
                                            [f"S{s}_{i}" for i in range(20)], [f"GENE{i}" for i in range(6)])))
    r = H.probe_fold(np.concatenate(x[:2]), np.concatenate(y[:2]), x[2], y[2], latent_dim=8)
    np.testing.assert_allclose([task["genes"][f"GENE{i}"]["folds"][0] for i in range(6)], r, atol=1e-6)
    # another model's normalisation reaches the encoder: (x / 255 - 0.5) / 0.5
    half = H.get_args(args + ["--norm", "half", "--cache-dir", str(tmp_path / "cache_half")])
    p0 = os.path.join(root, "IDC", "patches", "S0.h5")
    imgs = torch.from_numpy(np.concatenate(list(H.patch_batches(p0, 100)))).permute(0, 3, 1, 2)
    np.testing.assert_allclose(H.sample_features(backbone, p0, half), E.embed(backbone, imgs / 127.5 - 1).numpy(),
                               atol=1e-5)
    # features come back from the per-file cache: same numbers
    assert len(os.listdir(tmp_path / "cache")) == 6
    again = H.main(args + ["--tasks", "idc", "LUAD"])  # the paper's names reach the same folders
    assert again["headline"]["value"] == res["headline"]["value"]
    with pytest.raises(SystemExit, match="lacks the task folders"):
        H.main(args + ["--tasks", "IDC", "PRAD"])
    os.remove(os.path.join(root, "LUNG", "splits", "test_1.csv"))
    with pytest.raises(SystemExit, match="needs pairs train_<i>.csv, test_<i>.csv"):
        H.load_task(os.path.join(root, "LUNG"))
    os.remove(os.path.join(root, "IDC", "var_50genes.json"))
    with pytest.raises(SystemExit, match="lacks var_50genes.json"):
        H.load_task(os.path.join(root, "IDC"))
