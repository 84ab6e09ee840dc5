"""eval_slide.py: the ABMIL head, eva's training loop and metric, dataset layouts, resumable embedding and bad
slides (the sampler and the reader: test_slide_reader.py)."""
import json
import math
import os

import numpy as np
import openslide
import pytest
import torch
from pathlib import Path

import benchmarks as B
import eval_slide as E
import model as M
import slide_reader as R
from test_slide_reader import write_slide

def test_abmil_invariances_and_a_hand_checked_forward():
    head = E.ABMIL(16, 3).eval()
    x = torch.randn(2, 9, 16)
    out = head(x)
    perm = x[:, torch.randperm(9)]
    padded = torch.cat([x, torch.full((2, 5, 16), float("-inf"))], 1)
    assert torch.allclose(head(perm), out, atol=1e-6) and torch.allclose(head(padded), out, atol=1e-6)
    assert [type(m).__name__ for m in head.classifier] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [m.out_features for m in head.classifier if isinstance(m, torch.nn.Linear)] == [128, 64, 3]

    tiny = E.ABMIL(2, 1, projected=2, attention=2, mlp=(2, 2))
    with torch.no_grad():
        for lin in (tiny.projector, tiny.attention_a, tiny.classifier[0], tiny.classifier[2]):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        tiny.attention_b.weight.zero_()
        tiny.attention_b.bias.zero_()  # gate sigmoid(0) = 1/2
        tiny.attention_c.weight.copy_(torch.tensor([[1.0, 0.0]]))
        tiny.attention_c.bias.zero_()
        tiny.classifier[4].weight.copy_(torch.tensor([[1.0, -1.0]]))
        tiny.classifier[4].bias.fill_(0.5)
    bag = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [float("-inf")] * 2]])
    # attention logits tanh(h_0) / 2 for rows 1 and 2, the padding row gets none; z = weighted rows;
    # logit = relu(z_0) - relu(z_1) + 0.5
    a1, a2 = math.tanh(1) / 2, math.tanh(3) / 2
    w1 = math.exp(a1) / (math.exp(a1) + math.exp(a2))
    z = (w1 * 1 + (1 - w1) * 3, w1 * 2 + (1 - w1) * 0)
    assert tiny(bag).item() == pytest.approx(z[0] - z[1] + 0.5, abs=1e-6)


def spike_bags(n, seed, N=20, D=8):
    """Bag label 1 iff one of its patches is a 'spike' (feature 0 raised by 8); bags of random length."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.full((n, N, D), float("-inf"))
    for i in range(n):
        k = int(torch.randint(4, N + 1, (1,), generator=g))
        b = torch.randn(k, D, generator=g)
        if y[i]:
            b[int(torch.randint(0, k, (1,), generator=g)), 0] += 8.0
        x[i, :k] = b
    return x.half(), y


def test_training_loop_learns_a_spike_and_keeps_the_best_epoch():
    train, val, test = spike_bags(128, 0), spike_bags(64, 1), spike_bags(64, 2)
    head, info = E.fit_abmil(train, val, 2, seed=0, lr=1e-2, max_epochs=40, patience=5)
    pred = E.eva_predictions(E.predict_logits(head, test[0]))
    assert E.eva_score(pred, test[1], 2) == 1.0 and info["best_val_score"] == 1.0
    # the returned head is the best validation epoch's: its score is the recorded best
    assert E.eva_score(E.eva_predictions(E.predict_logits(head, val[0])), val[1], 2) == info["best_val_score"]


def test_eva_schedule_and_strict_improvement_early_stopping():
    select = E.BestOnValidation(patience=3)
    flags, stops = [], []
    for s in (0.5, 0.6, 0.6, 0.55, 0.6, 0.7, 0.7):
        flags.append(select.update(s))
        stops.append(select.stop)
    # ties are no improvement (min_delta 0, strict); 3 epochs in a row without one end training
    assert flags == [True, True, False, False, False, True, False] and stops.index(True) == 4
    assert select.best == 0.7

    g = torch.Generator().manual_seed(0)
    shuffled = (spike_bags(64, 3)[0], torch.randint(0, 2, (64,), generator=g))  # nothing to learn
    _, info = E.fit_abmil(shuffled, (spike_bags(32, 4)[0], torch.randint(0, 2, (32,), generator=g)), 2, seed=1,
                          lr=1e-3, max_epochs=40, patience=6)
    h = info["history"]
    assert [e["lr"] for e in h[:7]] == pytest.approx([1e-3 / 3] * 5 + [1e-3] * 2)  # ConstantLR: /3 for 5 epochs
    running = -1.0
    for e in h:  # an epoch is the best iff strictly above every earlier one
        assert e["best"] == (e["val"] > running)
        running = max(running, e["val"])
    assert len(h) < 40 and not any(e["best"] for e in h[-6:]) and h[-7]["best"]  # stopped after 6 without one
    assert info["best_epoch"] == len(h) - 7 and info["best_val_score"] == h[-7]["val"]


def test_eva_binary_threshold_rule_and_scores():
    # a batch entirely inside [0, 1] is taken as probabilities (no sigmoid): 0.3 -> 0; with a negative value
    # in the batch the sigmoid is applied first: 0.3 -> 1
    assert E.eva_predictions(torch.tensor([0.3, 0.7])).tolist() == [0, 1]
    assert E.eva_predictions(torch.tensor([0.3, -0.2])).tolist() == [1, 0]
    assert E.eva_predictions(torch.tensor([0.3, 0.7, 0.3, -0.2]), batch_size=2).tolist() == [0, 1, 1, 0]
    # balanced accuracy: TPR 2/3, TNR 1/2; no positives at all: TPR 0/0 counts as 0
    assert E.eva_score([1, 1, 0, 0, 1], [1, 1, 1, 0, 0], 2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert E.eva_score([0, 0], [0, 0], 2) == 0.5
    # macro accuracy over classes present in target or prediction: class 2 predicted but absent counts as 0
    assert E.eva_score([0, 2, 1, 1], [0, 0, 1, 1], 4) == pytest.approx((0.5 + 1 + 0) / 3)


# -- dataset layouts -----------------------------------------------------------------------------------------------

def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_camelyon16_layout(tmp_path):
    for i in range(1, 160):
        touch(tmp_path / f"training/normal/normal_{i:03d}.tif")
    for i in range(1, 112):
        touch(tmp_path / f"training/tumor/tumor_{i:03d}.tif")
    rows = []
    for i in range(1, 130):
        touch(tmp_path / f"testing/images/test_{i:03d}.tif")
        rows.append(f"test_{i:03d},{'Tumor' if i % 3 == 0 else 'Normal'},Macro,Primary\n")
    (tmp_path / "testing/reference.csv").write_text("".join(rows))
    items, classes = B.load_camelyon16(str(tmp_path))
    by = {s: [it for it in items if it["split"] == s] for s in ("train", "val", "test")}
    assert classes == ["normal", "tumor"] and {s: len(v) for s, v in by.items()} == {"train": 216, "val": 54,
                                                                                     "test": 129}
    assert [it["id"] for it in by["val"]] == sorted(B.CAMELYON16_VAL)  # eva's sorted file order
    assert {it["label"] for it in by["val"] if it["id"].startswith("tumor")} == {1}
    assert next(it for it in by["test"] if it["id"] == "test_003")["label"] == 1
    os.remove(tmp_path / "training/tumor/tumor_046.tif")
    with pytest.raises(SystemExit, match="tumor_046"):
        B.load_camelyon16(str(tmp_path))
    touch(tmp_path / "training/tumor/tumor_046.tif")
    touch(tmp_path / "testing/images/test_200.tif")
    with pytest.raises(SystemExit, match="test_200"):
        B.load_camelyon16(str(tmp_path))


def test_panda_layout_and_eva_split(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["image_id,data_provider,isup_grade,gleason_score,noise_ratio_10\n"]
    for i in range(120):
        lines.append(f"{i:032x},karolinska,{i % 6},3+3,{int(rng.random() < 0.8)}\n")
        touch(tmp_path / f"train_images/{i:032x}.tiff")
    (tmp_path / "train_with_noisy_labels.csv").write_text("".join(lines))
    items, classes = B.load_panda(str(tmp_path))
    kept = [ln.split(",") for ln in lines[1:] if ln.strip().split(",")[4] != "0"]
    assert classes == list("012345") and {it["id"] for it in items} <= {r[0] for r in kept}
    for c in range(6):  # per class floor(r n) or 1 for train, val, test (PANDASmall: 0.1 / 0.05 / 0.05)
        n = sum(int(r[2]) == c for r in kept)
        got = [sum(it["split"] == s and it["label"] == c for it in items) for s in ("train", "val", "test")]
        assert got == [int(math.floor(r * n)) or 1 for r in (0.1, 0.05, 0.05)]
    assert items == B.load_panda(str(tmp_path))[0]  # seeded
    missing = kept[0][0]
    os.remove(tmp_path / f"train_images/{missing}.tiff")
    touch(tmp_path / "train_images/not_in_the_csv.tiff")
    with pytest.raises(SystemExit, match=f"{missing}.*not_in_the_csv"):
        B.load_panda(str(tmp_path))


def test_csv_layout(tmp_path):
    for i in range(20):
        touch(tmp_path / f"s{i}.svs")
    (tmp_path / "a.csv").write_text("slide_path,label\n" + "".join(f"s{i}.svs,{'ab'[i % 2]}\n" for i in range(20)))
    items, classes = B.load_slide_csv(str(tmp_path / "a.csv"))
    assert classes == ["a", "b"] and sorted(it["id"] for it in items) == sorted(f"s{i}" for i in range(20))
    assert [sum(it["split"] == s for it in items) for s in ("train", "val", "test")] == [14, 2, 4]  # 7+1+2 per class
    (tmp_path / "b.csv").write_text("".join(f"s{i}.svs,{i % 2},{'train' if i < 16 else 'test'}\n" for i in range(20)))
    items, _ = B.load_slide_csv(str(tmp_path / "b.csv"))
    assert [sum(it["split"] == s for it in items) for s in ("train", "val", "test")] == [12, 4, 4]
    (tmp_path / "c.csv").write_text("s1.svs,a\nmissing.svs,b\n")
    with pytest.raises(SystemExit, match="missing.svs"):
        B.load_slide_csv(str(tmp_path / "c.csv"))


# -- embed: resumable, bad slides reported, and the one-shot contract ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vits.pth"
    torch.save(M.ViT("vit_small", img_size=28, num_register_tokens=0).state_dict(), path)
    return str(path)


def embed_argv(weights, slides, out, *extra):
    return ["embed", "--weights", weights, "--slides", str(slides), "--out", str(out), "--mpp", "0.5", "--patch",
            "28", "--max-patches", "12", "--batch-size", "5", "--workers", "0", "--device", "cpu", *extra]


def test_embed_kill_and_rerun_gives_the_same_files(tmp_path, tiny_weights):
    d = tmp_path / "slides"
    d.mkdir()
    write_slide(d / "one.tif", size=256, levels=2, seed=1)
    write_slide(d / "two.tif", size=256, levels=2, seed=2, tissue=((0, 0, 128, 256),))
    out = tmp_path / "emb"
    E.main(embed_argv(tiny_weights, d, out))
    first = {f: (out / f).read_bytes() for f in ("one.pt", "two.pt", "manifest.csv")}
    obj = torch.load(out / "one.pt", weights_only=True)
    assert obj["features"].dtype == torch.float16 and obj["features"].shape == (12, 384)
    slide = openslide.OpenSlide(str(d / "one.tif"))
    assert obj["coords"].tolist() == R.plan_slide(slide, 0.5, 28, 12)["coords"].tolist()
    assert (out / "manifest.csv").read_text().splitlines()[1].startswith(f"one,{d / 'one.tif'},12,0.5")
    # a kill: one slide's file never written, a half-written temp file left behind; the rerun reads in a worker
    # process this time, which must not change a byte
    os.remove(out / "two.pt")
    (out / ".two.pt.tmp999").write_bytes(first["two.pt"][:100])
    report = E.main(embed_argv(tiny_weights, d, out)[:-4] + ["--workers", "1", "--device", "cpu"])
    assert {r["slide_id"]: r.get("note") for r in report} == {"one": "finished by an earlier run", "two": None}
    assert {f: (out / f).read_bytes() for f in first} == first
    with pytest.raises(SystemExit, match="other settings"):
        E.main(embed_argv(tiny_weights, d, out, "--max-patches", "7"))


def test_bad_slides_are_skipped_with_a_reason(tmp_path, tiny_weights):
    d = tmp_path / "slides"
    d.mkdir()
    write_slide(d / "good.tif", size=256, levels=1)
    write_slide(d / "blank.tif", size=256, levels=1, tissue=())
    write_slide(d / "nompp.tif", size=256, levels=1, mpp=None)
    write_slide(d / "tiny.tif", size=16, levels=1, tissue=((0, 0, 16, 16),))
    (d / "garbage.svs").write_text("not a slide")
    report = {r["slide_id"]: r for r in E.main(embed_argv(tiny_weights, d, tmp_path / "emb"))}
    assert report["good"]["status"] == "ok" and report["good"]["n_patches"] == 12
    reasons = {k: r.get("reason", "") for k, r in report.items() if r["status"] == "skipped"}
    assert set(reasons) == {"blank", "nompp", "tiny", "garbage"}
    assert "no tissue" in reasons["blank"] and "mpp" in reasons["nompp"] and "smaller than a patch" in reasons["tiny"]
    assert "OpenSlide" in reasons["garbage"]
    saved = json.loads((tmp_path / "emb" / "report.json").read_text())
    assert {r["slide_id"] for r in saved} == set(report) and sorted(os.listdir(tmp_path / "emb")) == [
        "good.pt", "manifest.csv", "report.json"]


def test_one_shot_contract_embeds_then_probes(tmp_path, tiny_weights):
    d = tmp_path / "cohort"
    d.mkdir()
    rows = []
    for i in range(12):  # label 1: tissue on the left; 0: on the right
        write_slide(d / f"s{i}.tif", size=128, levels=1, seed=i,
                    tissue=((0, 0, 64, 128),) if i % 2 else ((64, 0, 128, 128),))
        rows.append(f"s{i}.tif,{i % 2},{'train' if i < 6 else 'val' if i < 9 else 'test'}\n")
    (d / "labels.csv").write_text("".join(rows))
    out = tmp_path / "res" / "results.json"
    argv = ["--weights", tiny_weights, "--data", str(d / "labels.csv"), "--dataset", "csv", "--out", str(out),
            "--runs", "2", "--device", "cpu", "--patch", "28", "--max-patches", "4", "--workers", "0",
            "--max-epochs", "3"]
    res = E.main(argv)
    assert set(res["headline"]) == {"metric", "value", "std", "method", "split"} and res["headline"]["split"] == "test"
    assert len(res["abmil"]["runs"]) == 2 and res["settings"]["n"] == {"train": 6, "val": 3, "test": 3}
    assert json.loads(Path(out).read_text())["headline"] == res["headline"]
    caches = os.listdir(tmp_path / "res" / "slide_embeddings")
    assert len(caches) == 1 and caches[0].startswith("csv-")
    assert len(E.main(argv + ["--runs", "1", "--force"])["abmil"]["runs"]) == 1  # a rerun reuses the cache
