"""eval_suite.py: the results table on a tiny fake benchmark root (resume, failures, absent data), the PCam
10-shot protocol, the exact t-SNE against scikit-learn, and the figure."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import eval_probe as E
import eval_suite as S
import tsne as T
import model as M

pytestmark = pytest.mark.filterwarnings("ignore:no config.json")  # the tiny test ViT's head count is inferred
BACH_CLASSES = {"Benign": (200, 80, 120), "InSitu": (90, 60, 180), "Invasive": (60, 160, 90), "Normal": (220, 200, 90)}


def noisy_image(colour, rng, size=(40, 48)):
    return Image.fromarray(np.clip(np.array(colour) + rng.integers(-25, 25, (*size, 3)), 0, 255).astype(np.uint8))


def tiny_vit(path, seed):
    torch.manual_seed(seed)
    m = M.ViT(embed_dim=64, depth=2, num_heads=1, img_size=56, num_register_tokens=4, layerscale_init=1.0)
    torch.save(m.state_dict(), path)
    return str(path)


@pytest.fixture
def weights(tmp_path):
    return tiny_vit(tmp_path / "vit_tiny.pth", 0)


@pytest.fixture
def suite_root(tmp_path):
    """eva's BACH layout (8 tinted photos per class), PCam's six h5 files, and stand-ins for a slide and a
    segmentation dataset whose scripts the test replaces."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    root = tmp_path / "bench"
    for name, colour in BACH_CLASSES.items():
        d = root / "bach" / "ICIAR2018_BACH_Challenge" / "Photos" / name
        os.makedirs(d)
        for i in range(8):
            noisy_image(colour, rng).save(d / f"{name[:2].lower()}{i:03d}.tif")
    os.makedirs(root / "pcam")
    for split, n in (("train", 40), ("valid", 12), ("test", 12)):
        y = np.arange(n) % 2
        x = np.stack([np.asarray(noisy_image((200, 90, 140) if c else (120, 90, 200), rng, (96, 96))) for c in y])
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(root / "pcam" / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = y.reshape(-1, 1, 1, 1).astype(np.uint8)
    for fake in ("camelyon16", "consep"):
        os.makedirs(root / fake)
        (root / fake / "placeholder.txt").write_text("data the replaced script never reads")
    return root


def test_results_table_runs_present_tasks_resumes_and_reports_failures(weights, suite_root, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    calls, real = [], S.run_task

    def runner(task, argv):  # eval_probe's real tasks; stand-ins for the slide and segmentation scripts
        calls.append(task.key)
        if task.module == "eval_probe":
            return real(task, argv)
        if task.key == "consep":
            raise RuntimeError("decoder exploded")
        return {"settings": {"argv": argv}, "headline": {"metric": "balanced_accuracy", "value": 0.75, "std": 0.0,
                                                         "method": "abmil", "split": "test"}}

    monkeypatch.setattr(S, "run_task", runner)
    monkeypatch.setitem(E.PATIENCE, "bach", 20)  # eva's 1250 checks only make the test slower
    out = tmp_path / "out"
    argv = ["--weights", weights, "--suite", str(suite_root), "--out", str(out), "--quick", "--size", "56",
            "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--tasks", "pcam10", "bach", "bracs", "camelyon16", "consep"]
    with pytest.raises(SystemExit, match=r"^1 of 4 tasks failed \(consep\): their errors are in .*results.md"):
        S.main(argv)  # the table is written, and the exit status says a task failed
    summary = json.loads((out / "results.json").read_text())
    assert calls == ["pcam10", "bach", "camelyon16", "consep"]  # bracs/ is absent: skipped, not run
    status = {k: r["status"] for k, r in summary["tasks"].items()}
    assert status == {**dict.fromkeys(S.KEYS, "absent"), "pcam10": "ok", "bach": "ok", "pcam": "skipped",
                      "camelyon16": "ok", "consep": "failed"}

    # PCam 10-shot: 10 train images per class embedded, validation every 10 epochs, stopped at a check after at
    # least the 125 patience checks
    pcam10 = summary["tasks"]["pcam10"]["results"]
    assert pcam10["settings"]["n"]["train"] == 20 and pcam10["headline"]["split"] == "test"
    run = pcam10["few_shot_10"]["runs"][0]
    assert run["epochs"] % 10 == 0 and run["epochs"] >= 1260
    assert summary["tasks"]["bach"]["results"]["headline"]["method"] == "linear"

    saved = json.loads((out / "results.json").read_text())
    assert "decoder exploded" in saved["tasks"]["consep"]["error"]
    assert saved["row"]["camelyon16"] == 0.75 and os.path.exists(out / "tsne_bach.png")

    # the markdown table: this model's row in the column order, failed and absent cells, the published rows
    lines = (out / "results.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| Model"))
    assert [c.strip() for c in header.strip("|").split("|")][1:14] == [t.header for t in S.COLUMNS]
    ours = [c.strip() for c in lines[lines.index(header) + 2].strip("|").split("|")]
    cells = dict(zip(S.KEYS, ours[1:14]))
    assert float(cells["bach"]) == pytest.approx(summary["row"]["bach"], abs=5e-4)
    assert cells["camelyon16"] == "0.750" and cells["consep"].startswith("failed") and cells["bracs"] == ""
    expected_avg = np.mean([summary["row"][k] for k in ("pcam10", "bach", "camelyon16")])
    assert ours[14] == f"{expected_avg:.3f} (3/13)"
    post = next(line for line in lines if line.startswith("| OpenMidnight ["))  # the post's row, whole
    assert "| 0.790 | 0.916 |" in post and "| 0.775 (13/13) |" in post and post.endswith("| 12K |")
    assert lines.index(post) < next(i for i, line in enumerate(lines) if line.startswith("The same columns in kaiko"))
    assert any(line.startswith("| Midnight-12k [") and "0.803" in line for line in lines)  # the README block

    calls.clear()  # a rerun does only what failed
    with pytest.raises(SystemExit, match="1 of 4 tasks failed"):
        S.main(argv)
    assert calls == ["consep"]
    calls.clear()  # new weights (a newer file) make the cached results stale
    st = os.stat(weights)
    os.utime(weights, (st.st_atime, st.st_mtime + 10))
    again = S.main(argv[:-5] + ["camelyon16"])
    assert calls == ["camelyon16"] and again["tasks"]["bach"]["status"] == "skipped"  # stale, left out


def test_unknown_task_and_extra_weights_are_refused(weights, tmp_path, capsys):
    with pytest.raises(SystemExit):
        S.main(["--weights", weights, "--suite", str(tmp_path), "--tasks", "imagenet"])
    assert "invalid choice: 'imagenet' (choose from 'pcam10', 'bach', 'bracs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two checkpoints only make sense for a side-by-side t-SNE
        S.main(["--weights", weights, weights, "--suite", str(tmp_path)])
    assert "two only for a side-by-side --tsne" in capsys.readouterr().err


def test_every_column_argv_parses_with_its_script(weights, tmp_path):
    # the suite calls each script through the evaluation-script contract: its get_args must take what we pass
    args = S.get_args(["--weights", weights, "--suite", str(tmp_path), "--norm", "half", "--device", "cpu"])
    for task in S.COLUMNS:
        script = pytest.importorskip(task.module)
        os.makedirs(tmp_path / task.folder, exist_ok=True)  # --data must exist
        proto, runtime = S.task_argv(task, args, task.runs)
        parsed = script.get_args(proto + runtime + ["--out", str(tmp_path / "r.json")])
        assert parsed.dataset == task.argv[1] and parsed.data.endswith(os.sep + task.folder)
        assert parsed.norm == "half"  # the model's normalisation reaches every protocol
        assert getattr(parsed, task.runs_flag.lstrip("-").replace("-", "_")) == task.runs


def test_published_rows_are_the_posts_table_and_their_averages_recompute():
    # the post's OpenMidnight row, typed here from the post's table (not from eval_suite), and its average
    om = S.PUBLISHED["OpenMidnight"]
    assert [om["values"][k] for k in S.KEYS] == [0.790, 0.916, 0.661, 0.873, 0.961, 0.817, 0.844, 0.938, 0.946,
                                                 0.652, 0.631, 0.655, 0.390]
    assert om["average"] == 0.775 and "sophont.med/blog/openmidnight" in om["source"]
    assert len(S.PUBLISHED) == 18 and all(r["source"] == S.OM_POST for r in S.PUBLISHED.values())
    # every row's printed average is the mean of its 13 printed values, to the rounding of both (3 decimals each:
    # at most 0.0005 + 0.0005), but for Hibou-L's, which the post prints 0.0013 low (a footnote says so)
    for name, row in {**S.PUBLISHED, **S.MIDNIGHT_README_ROWS}.items():
        values = [row["values"][k] for k in S.KEYS]
        assert None not in values and len(values) == 13, name
        gap = abs(np.mean(values) - row["average"])
        assert gap <= 1e-3 + 1e-9 or (name == "Hibou-L" and round(gap, 4) == 0.0013), (name, gap)
    assert any("Hibou-L" in note and "0.740" in note for note in S.FOOTNOTES)
    assert any("swaps two numbers" in note for note in S.FOOTNOTES)


def test_linear_head_checks_every_n_epochs_with_min_delta():
    x, y = torch.randn(40, 8), torch.arange(40) % 2
    # min_delta 2 > any balanced accuracy: no check is progress, so training stops after exactly `patience`
    # checks, one every 4 one-batch epochs
    _, info = E.train_linear((x, y), (x, y), 2, patience=3, check_every=4, min_delta=2.0)
    assert info["epochs"] == 12 and info["steps"] == 12


def test_balanced_sample_draws_n_per_class_like_evas_sampler():
    labels = np.random.default_rng(1).permutation([0] * 30 + [1] * 25)
    rng = np.random.default_rng(42)
    first, second = E.balanced_sample(labels, 10, rng), E.balanced_sample(labels, 10, rng)
    assert len(set(first)) == 20 and np.bincount(labels[first]).tolist() == [10, 10]
    assert set(first) != set(second)  # one generator, successive draws: upstream eva's per-run sets
    assert np.array_equal(first, E.balanced_sample(labels, 10, np.random.default_rng(42)))


def test_few_shot_embeds_only_the_drawn_images(weights, tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in (("a", (200, 60, 60)), ("b", (60, 60, 200))):
        os.makedirs(tmp_path / "data" / name)
        for i in range(12):
            noisy_image(colour, rng).save(tmp_path / "data" / name / f"{i}.png")
    base = ["--weights", weights, "--data", str(tmp_path / "data"), "--size", "56", "--workers", "0", "--no-linear",
            "--few-shot", "3", "--few-shot-draws", "3", "--max-steps", "20", "--cache-dir", str(tmp_path / "c")]
    same = E.main(base + ["--few-shot-draw", "same", "--out", str(tmp_path / "same.json")])
    assert same["settings"]["n"]["train"] == 6  # one draw of 3 per class serves all 3 heads
    per_run = E.main(base + ["--few-shot-draw", "per-run", "--out", str(tmp_path / "per_run.json")])
    assert per_run["settings"]["n"]["train"] > 6  # three draws: their union is embedded
    assert same["headline"]["method"] == "few_shot_3" and len(same["few_shot_3"]["runs"]) == 3


def clusters(n_per, dim=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, (3, dim))
    x = np.concatenate([c + rng.normal(0, 1, (n_per, dim)) for c in centres]).astype(np.float32)
    return x, np.repeat(np.arange(3), n_per)


def test_affinities_and_gradient_equal_scikit_learns():
    tsne_mod = pytest.importorskip("sklearn.manifold._t_sne")
    from scipy.spatial.distance import squareform
    x, _ = clusters(30)
    sq = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    P = T.joint_probabilities(torch.from_numpy(x), 30.0)
    assert np.allclose(P.numpy(), squareform(tsne_mod._joint_probabilities(sq, 30.0, 0)), rtol=1e-6, atol=0)
    # each point's conditional distribution has entropy log(perplexity) (the binary search's target)
    cond, _ = T.conditional_probabilities(torch.from_numpy(sq), 30.0)
    entropy = -(cond * torch.log(cond.clamp_min(1e-300))).sum(1)
    assert torch.allclose(entropy, torch.full_like(entropy, np.log(30.0)), atol=1e-4)
    y = torch.randn(len(x), 2, generator=torch.Generator().manual_seed(0))
    kl, grad = T.kl_gradient(y, P, chunk=7)  # row blocks must not change the result
    kl_ref, grad_ref = tsne_mod._kl_divergence(y.double().numpy().ravel(), squareform(P.numpy(), checks=False),
                                               1, len(x), 2)
    assert kl == pytest.approx(kl_ref, rel=1e-10) and np.allclose(grad.numpy().ravel(), grad_ref, atol=1e-14)


def test_tsne_separates_clusters_and_decreases_kl_like_scikit_learn():
    TSNE = pytest.importorskip("sklearn.manifold").TSNE
    torch.set_num_threads(1)
    x, labels = clusters(35)
    emb, info = T.tsne(torch.from_numpy(x))
    d = torch.cdist(emb, emb).fill_diagonal_(float("inf"))
    votes = labels[d.topk(5, largest=False).indices.numpy()]
    knn = np.mean([np.bincount(v).argmax() == lab for v, lab in zip(votes, labels)])
    assert knn >= 0.99  # three well-separated blobs stay apart in the map
    history = dict(info["history"])
    assert info["kl"] < history[0] and history[1000] < history[300]  # the objective goes down after exaggeration
    reference = TSNE(method="exact", init="pca", perplexity=30, random_state=0).fit(x).kl_divergence_
    assert info["kl"] == pytest.approx(reference, rel=0.15)


def test_tsne_command_draws_two_models_one_colour_per_class(weights, tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for name, colour in (("a", (200, 60, 60)), ("b", (60, 60, 200)), ("c", (60, 180, 60))):
        os.makedirs(tmp_path / "data" / name)
        for i in range(12):
            noisy_image(colour, rng).save(tmp_path / "data" / name / f"{i}.png")
    os.makedirs(tmp_path / "other")
    other = tiny_vit(tmp_path / "other" / "vit_tiny.pth", 1)
    png = tmp_path / "maps" / "tsne.png"
    res = S.main(["--weights", weights, other, "--data", str(tmp_path / "data"), "--tsne", str(png),
                  "--size", "56", "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    assert len(res["models"]) == 2 and len(res["coordinates"][1]) == 36
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(img, axis=0, return_counts=True)
    coloured = {tuple(c) for c, n in zip(colours, counts) if len(set(c)) > 1 and n >= 20}  # text/frames are grey
    assert coloured == set(T.PALETTE[:3])
    assert json.loads((tmp_path / "maps" / "tsne.json").read_text())["classes"] == ["a", "b", "c"]
