"""eval_probe.py: metrics by hand, probes on synthetic features, dataset layouts, checkpoints, cache, PCA, bad input."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks as B
import eval_probe as E
import model as M
import weights as W


def test_metrics_against_hand_computed_values():
    pred, target = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    m = E.metrics(pred, target, 3)
    # recalls: class 0: 1/2, class 1: 2/3, class 2: 1/1; F1 = 2tp / (n_true + n_pred): 2/4, 4/5, 2/3
    assert m["per_class_recall"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def synthetic(n_per_class, n_classes, dim, seed, separable=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randn(len(y), dim, generator=g)
    if separable:
        x[torch.arange(len(y)), y] += 6.0  # class c sits far along axis c
    return x, y


def test_linear_probe_separable_features_and_shuffled_labels():
    train, val, test = (synthetic(60, 3, 16, s) for s in (0, 1, 2))
    head, info = E.train_linear(train, val, 3, lr=1e-2, max_steps=400, patience=20)
    assert E.metrics(E.predict_linear(head, test[0]), test[1].numpy(), 3)["balanced_accuracy"] > 0.98
    assert info["best_val_balanced_accuracy"] > 0.98
    shuffled = (train[0], train[1][torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))])
    head, _ = E.train_linear(shuffled, (val[0], val[1][torch.randperm(len(val[1]))]), 3, lr=1e-2, max_steps=400,
                             patience=20)
    test_shuffled = test[1][torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(1))]
    assert abs(E.metrics(E.predict_linear(head, test[0]), test_shuffled.numpy(), 3)["balanced_accuracy"]
               - 1 / 3) < 0.12
    # two classes: one logit with BCE, as eva
    b_train, b_val = synthetic(40, 2, 8, 3), synthetic(40, 2, 8, 4)
    head, _ = E.train_linear(b_train, b_val, 2, lr=1e-2, max_steps=200, patience=20)
    assert head.weight.shape == (1, 8) and E.metrics(E.predict_linear(head, b_val[0]), b_val[1].numpy(), 2)[
        "balanced_accuracy"] > 0.95


def test_knn_weighted_vote():
    train_x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.1, 0.99], [0.05, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    assert E.knn_predict(train_x, train_y, torch.tensor([[1.0, 0.05], [0.0, 2.0]]), 2, k=3).tolist() == [0, 1]
    # one very close neighbour outweighs two distant ones: exp(0.99 / 0.07) >> 2 exp(0.1 / 0.07)
    tx = torch.tensor([[1.0, 0.0], [0.1, 0.995], [0.1, -0.995]])
    assert E.knn_predict(tx, torch.tensor([1, 0, 0]), torch.tensor([[0.99, 0.141]]), 2, k=3).tolist() == [1]
    x, y = synthetic(30, 4, 12, 0)
    xt, yt = synthetic(30, 4, 12, 1)
    assert E.metrics(E.knn_predict(x, y, xt, 4).numpy(), yt.numpy(), 4)["balanced_accuracy"] > 0.95


def test_stratified_split_is_seeded_disjoint_and_proportional():
    items = [(f"a{i}", 0) for i in range(50)] + [(f"b{i}", 1) for i in range(20)]
    tr, va, te = B.split_items(items, (0.6, 0.2, 0.2), seed=3)
    assert [sum(lab == c for _, lab in part) for part in (tr, va, te) for c in (0, 1)] == [30, 12, 10, 4, 10, 4]
    assert not ({i for i, _ in tr} & {i for i, _ in va}) and len(tr) + len(va) + len(te) == 70
    assert B.split_items(items, (0.6, 0.2, 0.2), seed=3) == [tr, va, te]


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()


def test_benchmark_layouts_give_evas_splits(tmp_path):
    bach = tmp_path / "bach"
    for c in ("Benign", "InSitu", "Invasive", "Normal"):
        for i in range(100):
            touch(bach / "ICIAR2018_BACH_Challenge" / "Photos" / c / f"{c[0]}{i:03d}.tif")
    splits, classes = B.load_bach(str(bach), 0)
    assert len(splits["train"]) == 268 and len(splits["val"]) == 132 and len(classes) == 4
    bh = tmp_path / "breakhis" / "BreaKHis_v1" / "histology_slides" / "breast"
    touch(bh / "benign/SOB/tubular_adenoma/SOB_B_TA_14-3411F/40X/SOB_B_TA-14-3411F-40-001.png")
    touch(bh / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2773/40X/SOB_M_DC-14-2773-40-001.png")
    touch(bh / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2773/100X/SOB_M_DC-14-2773-100-001.png")
    touch(bh / "malignant/SOB/lobular_carcinoma/SOB_M_LC_14-1/40X/SOB_M_LC-14-1-40-001.png")  # not a kept class
    splits, classes = B.load_breakhis(str(tmp_path / "breakhis"), 0)
    assert [(os.path.basename(p), classes[c]) for p, c in splits["train"]] == [("SOB_B_TA-14-3411F-40-001.png", "TA")]
    assert [classes[c] for _, c in splits["val"]] == ["DC"]  # patient 2773 is a validation patient
    gl = tmp_path / "gleason"
    touch(gl / "train_validation_patches_750" / "ZT76_39_A" / "ZT76_39_A_1_1_class_2.jpg")
    touch(gl / "train_validation_patches_750" / "ZT111_4_A" / "ZT111_4_A_1_1_class_0.jpg")
    touch(gl / "test_patches_750" / "patho_1" / "ZT80_38_A" / "ZT80_38_A_1_1_class_3.jpg")
    splits, _ = B.load_gleason(str(gl), 0)
    assert [c for _, c in splits["val"]] == [2] and [c for _, c in splits["train"]] == [0]
    assert [c for _, c in splits["test"]] == [3]
    mh = tmp_path / "mhist"
    os.makedirs(mh)
    (mh / "annotations.csv").write_text("Image Name,Majority Vote Label,Number of Annotators who Selected SSA "
                                        "(Out of 7),Partition\na.png,SSA,6,train\nb.png,HP,0,test\n")
    splits, classes = B.load_mhist(str(mh), 0)
    assert splits["train"][0][1] == classes.index("SSA") == 0 and splits["val"][0][1] == 1
    for d in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        touch(tmp_path / "crc" / d / "TUM" / "x.tif")
    splits, classes = B.load_crc(str(tmp_path / "crc"), 0)
    assert [classes[c] for _, c in splits["train"]] == ["TUM"] and len(splits["val"]) == 1


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of 16 small images each: reddish vs bluish noise, with one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, colour in (("red", (180, 60, 90)), ("blue", (70, 60, 170))):
        os.makedirs(root / name)
        for i in range(16):
            arr = np.clip(np.array(colour) + rng.integers(-30, 30, (40, 52, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    (root / "red" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture
def hub_weights(tmp_path):
    torch.manual_seed(0)
    m = M.ViT("vit_small", img_size=56, num_register_tokens=4, layerscale_init=1.0)
    path = tmp_path / "vits_hub.pth"
    torch.save(m.state_dict(), path)
    return path, m


def test_cli_end_to_end_with_cache_and_corrupt_image(image_folder, hub_weights, tmp_path, monkeypatch):
    path, _ = hub_weights
    argv = ["--weights", str(path), "--data", str(image_folder), "--size", "56", "--knn", "--runs", "2",
            "--max-steps", "60", "--out", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache"),
            "--workers", "0", "--few-shot", "3", "--few-shot-draws", "2"]
    res = E.main(argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"]["reported_split"] == "test" and saved["settings"]["classes"] == ["blue", "red"]
    for method in ("linear", "knn", "few_shot_3"):
        assert 0 <= saved[method]["balanced_accuracy"] <= 1
    assert res["linear"]["balanced_accuracy"] > 0.9  # colour is easy even for random features
    assert sum(saved["settings"]["unreadable"].values()) == 1  # the corrupt file: reported and skipped
    assert len(os.listdir(tmp_path / "cache")) == 3  # one file per split

    def no_extraction(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(E, "extract_features", no_extraction)
    again = E.main(argv + ["--no-linear", "--out", str(tmp_path / "knn.json")])  # other settings: another file
    assert again["knn"] == res["knn"]


def test_a_split_shared_by_two_tasks_is_embedded_once(image_folder, hub_weights, tmp_path, monkeypatch):
    # as PCam and PCam 10-shot: the few-shot task embeds only its drawn train images, and reuses val and test
    path, _ = hub_weights
    argv = ["--weights", str(path), "--data", str(image_folder), "--size", "56", "--max-steps", "20",
            "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--out", str(tmp_path / "r.json")]
    E.main(argv)
    embedded, extract = [], E.extract_features
    monkeypatch.setattr(E, "extract_features", lambda m, items, *a, **k: embedded.append(items) or extract(
        m, items, *a, **k))
    E.main(argv + ["--no-linear", "--few-shot", "2", "--few-shot-draws", "1", "--few-shot-draw", "same", "--out",
                   str(tmp_path / "few.json")])
    assert len(embedded) == 1 and len(embedded[0]) == 4  # 2 shots x 2 classes of train; val and test from cache


def test_every_checkpoint_layout_gives_the_same_features(image_folder, hub_weights, tmp_path):
    path, m = hub_weights
    items = [(str(image_folder / "red" / f"{i}.png"), 0) for i in range(3)]
    ref, _, _ = E.extract_features(m, items, size=56)
    sd = m.state_dict()
    chunked = {f"backbone.{k}" if not k.startswith("blocks.") else
               f"backbone.blocks.{int(k.split('.')[1]) // 4}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    layouts = {
        "openmidnight.pth": {"teacher": {**chunked, **{f"dino_head.{k}": v for k, v in
                                                       M.DINOHead(384, 10, 16, 8).state_dict().items()}}},
        "our_checkpoint.pt": {"student": {f"backbone.{k}": v * 0 for k, v in sd.items()}, "step": 3,
                              "teacher": {f"backbone.{k}": v for k, v in sd.items()}},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        feats, _, _ = E.extract_features(W.load_backbone(str(tmp_path / name)), items, size=56)
        assert torch.allclose(feats, ref, atol=1e-5), name


def test_pca_figure_size(image_folder, hub_weights, tmp_path):
    _, m = hub_weights
    items = [(str(image_folder / "blue" / f"{i}.png"), 1) for i in range(3)]
    size = E.pca_figure(m, items, str(tmp_path / "pca.png"), size=56)
    img = Image.open(tmp_path / "pca.png")
    assert size == img.size == (112, 168) and img.mode == "RGB"
    right = np.asarray(img)[:, 56:]
    assert right.std() > 0  # a map was drawn, not a blank panel


def test_clear_errors_for_bad_layouts_and_wrong_arch(image_folder, hub_weights, tmp_path):
    path, _ = hub_weights
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no class folders"):
        E.main(["--weights", str(path), "--data", str(tmp_path / "empty")])
    split = tmp_path / "split"
    for s, classes in (("train", ("a", "b")), ("val", ("a",))):
        for c in classes:
            os.makedirs(split / s / c)
    with pytest.raises(SystemExit, match=r"lacks class folders \['b'\]"):
        E.main(["--weights", str(path), "--data", str(split)])
    with pytest.raises(ValueError, match="vit_small"):
        E.main(["--weights", str(path), "--data", str(image_folder), "--arch", "vit_base", "--size", "56",
                "--cache-dir", str(tmp_path / "c"), "--workers", "0"])


def test_results_of_two_runs_settings_or_actions_never_overwrite_each_other(image_folder, tmp_path, monkeypatch,
                                                                            capsys):
    # two runs' exports share the name teacher_backbone.pth; each gets its own default file, as does a PCA-only
    # look; an explicit --out holding another run's result is refused unless --force
    monkeypatch.chdir(tmp_path)  # the default folder is runs/eval under the working directory
    for i, run in enumerate(("run_a", "run_b")):
        torch.manual_seed(i)
        os.makedirs(tmp_path / run)
        torch.save(M.ViT("vit_small", img_size=56, depth=2, num_register_tokens=4, layerscale_init=1.0).state_dict(),
                   tmp_path / run / "teacher_backbone.pth")
    common = ["--data", str(image_folder), "--size", "56", "--workers", "0", "--cache-dir", str(tmp_path / "c")]
    probe = ["--knn", "--no-linear"]
    a = E.main(["--weights", "run_a/teacher_backbone.pth", *common, *probe])
    b = E.main(["--weights", "run_b/teacher_backbone.pth", *common, *probe])
    pca = E.main(["--weights", "run_a/teacher_backbone.pth", *common, "--no-linear", "--pca", "maps.png",
                  "--pca-images", "2"])
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path / "runs") for f in fs)
    assert len(files) == 3 and all(f.startswith("runs/eval/imagefolder/") for f in files)
    assert [f.split("/")[-1].rsplit("_", 1)[0] for f in files] == [
        "run_a_teacher_backbone_knn", "run_a_teacher_backbone_pca", "run_b_teacher_backbone_knn"], files
    saved = [json.loads((tmp_path / f).read_text()) for f in files if "knn" in f]
    saved = {r["settings"]["weights"]: r for r in saved}
    assert saved["run_a/teacher_backbone.pth"]["knn"] == a["knn"] and saved["run_b/teacher_backbone.pth"]["knn"] == \
        b["knn"] and "headline" not in pca
    assert "no probe (--no-linear without --knn or --few-shot); PCA map maps.png" in capsys.readouterr().out
    out = ["--out", str(tmp_path / "mine.json")]
    E.main(["--weights", "run_a/teacher_backbone.pth", *common, *probe, *out])
    with pytest.raises(SystemExit, match=r"mine.json holds the results of other weights or settings \(weights: '.*"
                                         r"run_a/teacher_backbone.pth' -> '.*run_b/teacher_backbone.pth'\).*--force"):
        E.main(["--weights", "run_b/teacher_backbone.pth", *common, *probe, *out])
    E.main(["--weights", "run_b/teacher_backbone.pth", *common, *probe, *out, "--force"])
    assert json.loads((tmp_path / "mine.json").read_text())["knn"] == b["knn"]


def test_layout_errors_name_the_expected_layout_and_bad_paths_one_line(hub_weights, tmp_path, capsys):
    path, _ = hub_weights
    for c in ("ADI", "TUM"):  # CRC-100K without its validation archive
        os.makedirs(tmp_path / "crc" / "NCT-CRC-HE-100K" / c)
    with pytest.raises(SystemExit, match=r"crc.*CRC-VAL-HE-7K is missing.*expected NCT-CRC-HE-100K/<9 classes: ADI "
                                         r"BACK DEB LYM MUC MUS NORM STR TUM>/\*\.tif and CRC-VAL-HE-7K/<the same 9"):
        E.main(["--weights", str(path), "--data", str(tmp_path / "crc"), "--dataset", "crc"])
    for split, classes in (("NCT-CRC-HE-100K", ("ADI", "TUM")), ("CRC-VAL-HE-7K", ("ADI",))):
        for c in classes:
            os.makedirs(tmp_path / "crc" / split / c, exist_ok=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "crc" / split / c / "x.tif")
    with pytest.raises(SystemExit) as stop:  # a class missing from validation: the layout, not the imagefolder hint
        E.main(["--weights", str(path), "--data", str(tmp_path / "crc"), "--dataset", "crc"])
    assert re.search(r"has no images of classes \['BACK', .*'STR'\]: expected NCT-CRC-HE-100K/<9", str(stop.value))
    assert "single folder" not in str(stop.value)
    (tmp_path / "notes.pth").write_text("some notes")
    for argv, needle in ((["--weights", str(tmp_path / "notes.pth"), "--data", str(tmp_path)],
                          "notes.pth' is not a checkpoint: it starts with b'some notes'; give a torch.save file"),
                         (["--weights", str(path), "--data", str(tmp_path / "nowhere")], "nowhere' does not exist")):
        with pytest.raises(SystemExit):
            E.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and "Traceback" not in "".join(err)


def test_made_validation_split_is_said_and_a_one_class_probe_warns(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for s in ("train", "test"):  # no validation folder
        for c in ("a", "b"):
            os.makedirs(tmp_path / "d" / s / c)
            for i in range(10):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "d" / s / c / f"{i}.png")
    torch.manual_seed(0)
    m = M.ViT("vit_small", img_size=28, depth=1, num_register_tokens=0, layerscale_init=1.0)
    with torch.no_grad():
        m.norm.weight.zero_()  # every feature constant (the norm's bias): no head can tell the classes apart
    torch.save(m.state_dict(), tmp_path / "flat.pth")
    res = E.main(["--weights", str(tmp_path / "flat.pth"), "--data", str(tmp_path / "d"), "--size", "28", "--workers",
                  "0", "--runs", "2", "--max-steps", "20", "--out", str(tmp_path / "r.json"), "--cache-dir",
                  str(tmp_path / "c")])
    printed = capsys.readouterr().out
    assert "has no validation split: a seeded (--seed 0) stratified 20% of train (4 images) is held out" in printed
    assert res["settings"]["validation_made_from_train"] and res["settings"]["n"]["val"] == 4
    assert "warning: 2 of 2 linear heads predict one class for every test image" in printed
    assert all(r["one_class"] for r in res["linear"]["runs"])
