"""eval_seg.py: decoder, Dice loss and MonaiDiceScore by hand and against MONAI, the polygon fill against
scikit-image, CoNSeP's tiling, both dataset layouts, and a short end-to-end run."""
import glob
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_seg as S
import model as M
import weights as W


# -----------------------------------------------------------------------------
# decoder


def bilinear_numpy(a, out):
    """align_corners=False bilinear resize of a square 2-D array, written from the formula: source coordinate
    (i + 0.5) * in / out - 0.5, clamped at 0, neighbours clamped at the border."""
    n = a.shape[0]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0)
    lo = np.floor(src).astype(int)
    hi, t = np.minimum(lo + 1, n - 1), src - lo
    rows = a[lo] * (1 - t)[:, None] + a[hi] * t[:, None]
    return rows[:, lo] * (1 - t)[None] + rows[:, hi] * t[None]


def test_decoder_shapes():
    dec = S.ConvDecoderWithImage(48)
    out = dec(torch.randn(2, 48, 16, 16), torch.randn(2, 3, 224, 224))
    assert out.shape == (2, 5, 224, 224)
    # layer widths of eva's ConvDecoderWithImage: 48 -> 64, 64 + 3 image channels -> 32 -> 32 -> 5
    convs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(48, 64, (3, 3)), (67, 32, (3, 3)), (32, 32, (3, 3)), (32, 5, (1, 1))]


def test_decoder_forward_by_hand():
    # one channel everywhere; each 3x3 conv has a single non-zero tap, so its output is a shifted, scaled copy
    dec = S.ConvDecoderWithImage(1, n_classes=1, hidden=(1, 1, 1)).eval()
    conv1, conv2, conv3 = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d)][:3]
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        for bn in [m for m in dec.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            bn.weight.fill_(1.0)  # running mean 0, var 1: BN divides by sqrt(1 + 1e-5)
        conv1.weight[0, 0, 1, 1] = 1.0
        conv1.bias.fill_(-0.5)
        conv2.weight[0, 0, 1, 1], conv2.weight[0, 1, 1, 1] = 1.0, 2.0  # features + 2 * image channel 0
        conv3.weight[0, 0, 0, 0] = 1.0  # the top-left tap: out[i, j] = in[i - 1, j - 1], zero padding
        dec.classifier.weight.fill_(3.0)
        dec.classifier.bias.fill_(0.25)
    f = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    img = torch.randn(1, 3, 8, 8)
    out = dec(f[None, None], img)[0, 0].detach().numpy()
    s = 1 / math.sqrt(1 + 1e-5)
    up = np.repeat(np.repeat(f.numpy(), 2, 0), 2, 1)  # x2 nearest: 4x4
    a = np.maximum((up - 0.5) * s, 0)
    b = np.maximum((bilinear_numpy(a, 8) + 2 * img[0, 0].numpy()) * s, 0)
    c = np.zeros_like(b)
    c[1:, 1:] = b[:-1, :-1]
    np.testing.assert_allclose(out, 3 * np.maximum(c * s, 0) + 0.25, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# loss


def test_dice_loss_near_zero_for_confident_correct_logits():
    target = torch.randint(0, 5, (2, 16, 16))
    logits = 30.0 * F.one_hot(target, 5).permute(0, 3, 1, 2).float()
    assert S.dice_loss(logits, target) < 1e-6
    assert S.dice_loss(-logits, target) > 0.9  # confidently wrong


def test_dice_loss_by_hand_with_ignore():
    # 2 classes, 3 pixels: softmax (1/4, 3/4), (1/2, 1/2), and an ignored pixel whose logits become 0 and whose
    # target becomes background: it adds 1/2 to both softmax sums, 1/2 to background's overlap, 1 to its count
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]).T.reshape(1, 2, 1, 3).requires_grad_()
    target = torch.tensor([[[1, 0, 2]]])
    s = 1e-5
    d0 = (2 * (0.5 + 0.5) + s) / ((0.25 + 0.5 + 0.5) + 2 + s)
    d1 = (2 * 0.75 + s) / ((0.75 + 0.5 + 0.5) + 1 + s)
    loss = S.dice_loss(logits, target, ignore_index=2)
    assert loss.item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0) and torch.any(logits.grad[..., :2] != 0)  # no gradient when ignored
    d0, d1 = (2 * 0.5 + s) / (0.75 + 1 + s), (2 * 0.75 + s) / (1.25 + 1 + s)  # the first two pixels alone
    assert S.dice_loss(logits[..., :2], target[..., :2]).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_dice_loss_matches_monai():
    monai = pytest.importorskip("monai")
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 5, 12, 10, generator=g), torch.randint(0, 6, (3, 12, 10), generator=g)
    ref = monai.losses.DiceLoss(softmax=True, batch=True)  # eva's config: background in, smooth 1e-5
    # eva's wrapper around it: ignored pixels -> background target and zero logits, then a one-hot target
    keep = target != 5
    ref_loss = ref(logits * keep[:, None], F.one_hot(target * keep, 5).permute(0, 3, 1, 2))
    assert S.dice_loss(logits, target, ignore_index=5).item() == pytest.approx(ref_loss.item(), abs=1e-6)
    t = target.clamp_max(4)
    assert S.dice_loss(logits, t).item() == pytest.approx(ref(logits, F.one_hot(t, 5).permute(0, 3, 1, 2)).item(),
                                                          abs=1e-6)


# -----------------------------------------------------------------------------
# metric


def test_dice_score_by_hand():
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, 0, :2], pred[0, 0, :3] = 1, 1  # class 1: |G| 2, |P| 3, overlap 2 -> 0.8
    target[0, 3, 3], pred[0, 2, 2] = 2, 2  # class 2: no overlap -> 0; class 3, 4 absent -> NaN
    pred[1, 1, 1] = 3  # image 1: only background in the ground truth -> no valid class, image skipped
    target[2, 1, :] = 4  # image 2: class 4 all missed -> 0; a false positive of absent class 1 -> NaN, not counted
    pred[2, 0, 0] = 1
    m = S.DiceScore()
    m.update(pred[:2], target[:2])  # accumulated over batches, like a validation pass
    m.update(pred[2:], target[2:])
    score, per_class = m.compute()
    assert score == pytest.approx(((0.8 + 0.0) / 2 + 0.0) / 2)
    assert per_class[0] == pytest.approx(0.8) and per_class[1] == 0 and math.isnan(per_class[2])
    # background is not a scored class: a perfectly predicted all-background image leaves nothing to score
    empty = S.DiceScore()
    empty.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    assert empty.compute()[0] == 0.0  # nothing valid anywhere: MONAI's 0


def test_dice_score_monusac_ambiguous_quirk():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1
    target[0, 3, :] = 5  # Ambiguous
    pred = torch.zeros_like(target)
    pred[0, 0, :2], pred[0, 3, :2] = 1, 1  # class 1 right, and predicted on two Ambiguous pixels
    quirk = S.DiceScore(ignore_index=5)
    quirk.update(pred, target)
    assert quirk.compute()[0] == pytest.approx(2 * 2 / (2 + 4))  # the Ambiguous pixels count as false positives
    fixed = S.DiceScore(ignore_index=5, mask_ignored=True)
    fixed.update(pred, target)
    assert fixed.compute()[0] == pytest.approx(1.0)
    only_ambiguous = S.DiceScore(ignore_index=5)
    only_ambiguous.update(pred[:, 3:], target[:, 3:])  # no scored class in the ground truth: image skipped
    assert only_ambiguous.compute()[0] == 0.0


def test_dice_score_matches_monai():
    meandice = pytest.importorskip("monai.metrics.meandice")
    g = torch.Generator().manual_seed(1)
    for ignore in (None, 5):
        n_gt = 6 if ignore else 5
        m = S.DiceScore(ignore_index=ignore)
        # eva's MonaiDiceScore: one-hot with the dataset's class count; with an ignore index, the ignore mask comes
        # from the prediction's channel `ignore` and that channel is dropped; MONAI's DiceMetric without background
        ref = meandice.DiceMetric(include_background=False, reduction="mean", ignore_empty=True, num_classes=5)
        for _ in range(3):
            target = torch.randint(0, n_gt, (4, 9, 9), generator=g)
            target[0] = 0  # an image with no foreground
            target[1][target[1] > 1] = 0  # one with a single class
            pred = torch.randint(0, 5, (4, 9, 9), generator=g)
            m.update(pred, target)
            p, t = F.one_hot(pred, n_gt).permute(0, 3, 1, 2), F.one_hot(target, n_gt).permute(0, 3, 1, 2)
            if ignore:
                t = t * (p[:, ignore:ignore + 1] != 1)
                p, t = p[:, :ignore], t[:, :ignore]
            ref(p, t)
        assert m.compute()[0] == pytest.approx(ref.aggregate().item(), abs=1e-6)


# -----------------------------------------------------------------------------
# polygon fill


def polygons():
    rng = np.random.default_rng(0)
    for _ in range(12):  # convex: random points on a circle, sorted by angle
        a = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 9)))
        yield 15 + rng.uniform(2, 12) * np.sin(a), 15 + rng.uniform(2, 12) * np.cos(a)
    for _ in range(12):  # concave stars
        a = np.linspace(0, 2 * np.pi, 11)[:-1]
        rad = np.where(np.arange(10) % 2, 4, 11) + rng.uniform(-1, 1, 10)
        yield 14 + rad * np.sin(a), 16 + rad * np.cos(a)
    for _ in range(12):  # integer and half-integer vertices: pixel centres on edges and vertices
        n = rng.integers(3, 10)
        yield rng.integers(0, 25, n) / rng.choice([1, 2]), rng.integers(0, 25, n) / rng.choice([1, 2])
    yield np.array([2, 2, 12, 12, 2, 20, 20.]), np.array([2, 10, 10, 2, 2, 2, 10.])  # self-touching at (2, 2)
    yield np.array([2, 12, 2, 12.]), np.array([2, 12, 12, 2.])  # bow tie
    yield np.array([-5, 8, 40, 9]), np.array([-3, 30, 12, -8.])  # vertices outside the image
    yield np.array([5.5]), np.array([5.5])  # degenerate


def test_polygon_matches_scikit_image():
    draw = pytest.importorskip("skimage.draw")
    for r, c in polygons():
        for shape in ((30, 28), None):
            rr, cc = S.polygon(r, c, shape)
            ref_r, ref_c = draw.polygon(r, c, shape)
            np.testing.assert_array_equal(rr, ref_r)
            np.testing.assert_array_equal(cc, ref_c)


# -----------------------------------------------------------------------------
# geometry and datasets


def test_consep_tiles_geometry():
    # a 1000^2 image with one flat colour per 250 px tile: 16 tiles, x outer / y inner, resized to 224
    image = torch.zeros(3, 1000, 1000, dtype=torch.uint8)
    type_map = np.zeros((1000, 1000), np.int32)
    for x in range(4):
        for y in range(4):
            image[:, y * 250:(y + 1) * 250, x * 250:(x + 1) * 250] = 10 * (4 * x + y)
            type_map[y * 250:(y + 1) * 250, x * 250:(x + 1) * 250] = (4 * x + y) % 8
    tiles = S.consep_tiles(image, type_map)
    assert len(tiles) == 16
    merged = [0, 1, 2, 3, 3, 4, 4, 4]  # eva's merge: 3+4 epithelial, 5+6+7 spindle-shaped
    for k, (img, mask) in enumerate(tiles):
        assert img.shape == (3, 224, 224) and mask.shape == (224, 224)
        assert torch.all(img == 10 * k) and torch.all(mask == merged[k % 8])


def test_resize_and_crop_offsets():
    # the shorter side is already 224: no resize; the crop offset is Python's round(), half to even
    for width, left in ((301, 38), (303, 40), (224, 0)):
        image = torch.arange(width).repeat(3, 224, 1).to(torch.uint8)
        img, mask = S.resize_and_crop(image, 224, torch.arange(width).repeat(224, 1))
        assert img.shape == (3, 224, 224) and torch.equal(mask[0], torch.arange(left, left + 224))
    img, mask = S.resize_and_crop(torch.zeros(3, 300, 500, dtype=torch.uint8), 224, torch.zeros(300, 500))
    assert img.shape == (3, 224, 224) and mask.shape == (224, 224)


def test_random_resized_crop_shapes_and_seed():
    image, mask = torch.randint(0, 255, (3, 90, 140), dtype=torch.uint8), torch.randint(0, 6, (90, 140))
    torch.manual_seed(3)
    a = S.random_resized_crop(image, mask)
    torch.manual_seed(3)
    b = S.random_resized_crop(image, mask)
    assert a[0].shape == (3, 224, 224) and a[1].shape == (224, 224) and a[0].dtype == torch.uint8
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # scale and ratio 1 on a square: the whole image, resized
    sq, sq_mask = image[:, :90, :90], mask[:90, :90]
    full = S.random_resized_crop(sq, sq_mask, scale=(1, 1), ratio=(1, 1))
    assert torch.equal(full[1], S.resize(sq, (224, 224), sq_mask)[1])


def write_consep(root, n_train=2, n_test=1, size=500):
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    for split, n in (("Train", n_train), ("Test", n_test)):
        os.makedirs(os.path.join(root, split, "Images"))
        os.makedirs(os.path.join(root, split, "Labels"))
        for i in range(n):
            name = f"{split.lower()}_{i + 1}"
            Image.fromarray(rng.integers(0, 255, (size, size, 4), dtype=np.uint8)).save(
                os.path.join(root, split, "Images", name + ".png"))
            type_map = np.zeros((size, size), np.int32)
            for _ in range(12):  # square "nuclei" of types 1..7
                y, x = rng.integers(0, size - 20, 2)
                type_map[y:y + 20, x:x + 20] = rng.integers(1, 8)
            sio.savemat(os.path.join(root, split, "Labels", name + ".mat"), {"type_map": type_map})
    return root


def test_load_consep_layout(tmp_path):
    root = write_consep(str(tmp_path / "consep"))
    images, masks, names = S.load_consep(root, "train")
    assert len(images) == 8 and names[0] == "train_1.png#0"  # 2 images of 500^2 -> 4 tiles each
    assert images[0].shape == (3, 224, 224) and int(torch.stack(masks).max()) <= 4
    os.remove(os.path.join(root, "Test", "Labels", "test_1.mat"))
    with pytest.raises(SystemExit, match="missing CoNSeP label"):
        S.load_consep(root, "val")
    with pytest.raises(SystemExit, match="no CoNSeP images"):
        S.load_consep(str(tmp_path), "train")


def test_read_mat_names_scipy_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # `import scipy.io` now fails as if scipy were absent
    with pytest.raises(SystemExit, match="pip install scipy"):
        S.read_mat("train_1.mat")


MONUSAC_XML = """<?xml version="1.0"?>
<Annotations>
 <Annotation Id="1"><Attributes><Attribute Name="Lymphocyte" Id="1" Value=""/></Attributes>
  <Regions><RegionAttributeHeaders/>
   <Region Id="1"><Attributes/><Vertices>{a}</Vertices></Region>
   <Region Id="2"><Attributes/><Vertices>{b}</Vertices></Region>
  </Regions><Plots/></Annotation>
 <Annotation Id="2"><Attributes><Attribute Name="Weird cell" Id="2" Value=""/></Attributes>
  <Regions><Region Id="1"><Attributes/><Vertices>{c}</Vertices></Region></Regions></Annotation>
</Annotations>"""
POLYS = [np.array([[3.2, 4.0], [20.7, 6.5], [15.0, 18.9]]), np.array([[30.0, 2.0], [45.5, 2.0], [45.5, 12.0]]),
         np.array([[10.0, 15.0], [60.0, 15.0], [60.0, 45.0], [10.0, 45.0]])]


def write_monusac(root, shapes=((50, 70), (40, 64)), split_dirs=tuple(S.MONUSAC_DIRS.values())):
    rng = np.random.default_rng(1)
    for d in split_dirs:
        for i, (h, w) in enumerate(shapes):
            folder = os.path.join(root, d, f"TCGA-{i}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.tif"))
            verts = ["".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in p) for p in POLYS]
            with open(os.path.join(folder, f"img{i}.xml"), "w") as f:
                f.write(MONUSAC_XML.format(a=verts[0], b=verts[1], c=verts[2]))
    return root


def test_monusac_mask_and_layout(tmp_path):
    draw = pytest.importorskip("skimage.draw")
    root = write_monusac(str(tmp_path / "monusac"))
    xml = os.path.join(root, S.MONUSAC_DIRS["train"], "TCGA-0", "img0.xml")
    mask = S.monusac_mask(xml, 70, 50)
    expected = np.zeros((50, 70), np.uint8)
    for p, cls in zip(POLYS, (2, 2, 5)):  # Lymphocyte = 2; an unknown name -> Ambiguous = 5; later ones on top
        x, y = draw.polygon(p[:, 0], p[:, 1], (70, 50))  # eva's call: X as rows bounded by the width
        expected[y, x] = cls
    np.testing.assert_array_equal(mask, expected)
    images, masks, names = S.load_monusac(root, "train")
    assert [tuple(i.shape) for i in images] == [(3, 50, 70), (3, 40, 64)] and names[0].endswith("img0.tif")
    images, masks, _ = S.load_monusac(root, "val")  # validation: resized and centre-cropped to 224
    assert all(i.shape == (3, 224, 224) for i in images) and all(m.shape == (224, 224) for m in masks)
    with pytest.raises(SystemExit, match="no MoNuSAC images"):
        S.load_monusac(str(tmp_path), "train")


# -----------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w") / "vit.pth")
    torch.save(M.ViT("vit_small", img_size=56, depth=2).state_dict(), path)  # ViT-S's width, 2 blocks
    return path


HEADS_WARNING = "ignore:no config.json gives the number of attention heads"


@pytest.mark.filterwarnings(HEADS_WARNING)
def test_main_consep_end_to_end(tmp_path, tiny_weights, capsys):
    root = write_consep(str(tmp_path / "consep"), n_train=3, n_test=2, size=250)  # one tile per image
    args = ["--weights", tiny_weights, "--data", root, "--dataset", "consep", "--runs", "2", "--steps", "3",
            "--batch-size", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--size", "56"]
    res = S.main(args + ["--out", str(tmp_path / "r.json")])
    on_disk = json.loads((tmp_path / "r.json").read_text())
    runs = on_disk["decoder"]["runs"]
    # 3 tiles at batch 2: an epoch is 2 steps; step 3 starts a second epoch that is cut short and not validated
    assert [(r["steps"], r["epochs"], len(r["val_dice_per_epoch"])) for r in runs] == [(3, 1, 1)] * 2
    assert on_disk["headline"]["metric"] == "dice" and on_disk["headline"]["method"] == "decoder"
    assert on_disk["headline"]["value"] == pytest.approx(np.mean([r["dice"] for r in runs]))
    assert on_disk["headline"]["std"] == pytest.approx(np.std([r["dice"] for r in runs], ddof=1))
    assert on_disk["settings"]["samples"] == {"train": 3, "val": 2} and res["settings"]["patience"] == 200
    assert 0 <= on_disk["headline"]["value"] <= 1
    capsys.readouterr()
    again = S.main(args[:7] + ["1"] + args[8:] + ["--out", str(tmp_path / "r2.json")])  # 1 run, from the cache
    assert "features from cache" in capsys.readouterr().out
    assert again["decoder"]["runs"][0]["dice"] == pytest.approx(runs[0]["dice"], abs=1e-6)  # same seed, same run
    # another model's normalisation: the encoder's features are computed anew, from (x / 255 - 0.5) / 0.5
    cached = torch.load(glob.glob(str(tmp_path / "cache" / "*.pt"))[0], weights_only=True)
    S.main(args[:7] + ["1"] + args[8:] + ["--norm", "half", "--out", str(tmp_path / "r3.json")])
    assert "features from cache" not in capsys.readouterr().out
    half = torch.load(max(glob.glob(str(tmp_path / "cache" / "*.pt")), key=os.path.getmtime), weights_only=True)
    backbone = W.load_backbone(tiny_weights).eval()
    images = half["val"][1]
    torch.testing.assert_close(half["val"][0], S.patch_features(backbone, images.float() / 127.5 - 1, "float32"))
    assert not torch.allclose(half["val"][0], cached["val"][0])


@pytest.mark.filterwarnings(HEADS_WARNING)
def test_main_monusac_online(tmp_path, tiny_weights):
    root = write_monusac(str(tmp_path / "monusac"))
    res = S.main(["--weights", tiny_weights, "--data", root, "--dataset", "monusac", "--runs", "1", "--steps", "2",
                  "--batch-size", "2", "--workers", "0", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
                  "--out", str(tmp_path / "m.json"), "--mask-ambiguous", "--size", "56"])
    run = res["decoder"]["runs"][0]
    assert run["steps"] == 2 and run["epochs"] == 2  # 2 images at batch 2: one step per epoch, each validated
    assert res["settings"]["online_encoder"] and res["settings"]["ignore_index"] == 5


def test_main_bad_input(tmp_path, tiny_weights, capsys):
    (tmp_path / "notes.pth").write_text("not weights")
    for argv, needle in (
            (["--weights", str(tmp_path / "nope.pth"), "--data", str(tmp_path)], "nope.pth' does not exist"),
            (["--weights", str(tmp_path / "notes.pth"), "--data", str(tmp_path)],
             "notes.pth' is not a checkpoint: it starts with b'not weights'; give a torch.save file"),
            (["--weights", tiny_weights, "--data", str(tmp_path / "nope")], "nope' does not exist")):
        with pytest.raises(SystemExit):
            S.main(argv + ["--dataset", "consep"])
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and ": error: argument --" in err[-1]  # one line, not a traceback
