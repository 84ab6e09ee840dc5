import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the scripts are flat files at the repo root, not a package
SAMPLE_SLIDE = os.path.join(ROOT, "assets", "cmu_small_region.svs")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(2)  # the suite's budget is 2 cores


@pytest.fixture(scope="session")
def sample_patch():
    """A 224 px level-0 patch of tissue from the bundled slide, as a PIL image."""
    import openslide
    with openslide.OpenSlide(SAMPLE_SLIDE) as slide:
        return slide.read_region((1000, 1200), 0, (224, 224)).convert("RGB")


@pytest.fixture(scope="session")
def small_store(tmp_path_factory):
    """A 40-patch store from the bundled slide, shared by the training and loader tests; beside its patches, the
    random tiny ViT that tiny_train_args starts from (tiny_backbone.pth + config.json)."""
    import json

    import torch

    import model
    import prepare_patches
    out = str(tmp_path_factory.mktemp("store"))
    assert prepare_patches.main([SAMPLE_SLIDE, "--out", out, "--patches-per-level", "40", "--no-qc"]) == 0
    torch.manual_seed(0)
    vit = model.ViT(embed_dim=128, depth=2, num_heads=2, img_size=56, num_register_tokens=4, layerscale_init=1.0)
    torch.save(vit.state_dict(), os.path.join(out, "tiny_backbone.pth"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"num_attention_heads": 2}, f)
    return out


def tiny_train_args(store, out, *extra):
    """A 2-block, 128-wide ViT (the store's tiny_backbone.pth) on 56/28 px crops with small heads: a training step
    and a checkpoint take a fraction of a second on CPU."""
    return ["--preset", "vits", "--data", store, "--out", str(out), "--init", os.path.join(store, "tiny_backbone.pth"),
            "--global-size", "56", "--local-size", "28", "--n-local-crops", "2", "--batch-size", "4",
            "--n-prototypes", "256", "--head-hidden", "64", "--dino-head-bottleneck", "32",
            "--ibot-head-bottleneck", "24", "--workers", "0", "--log-every", "1", "--warmup-steps", "2",
            "--freeze-last-layer-steps", "1", "--teacher-temp-warmup-steps", "3", "--device", "cpu",
            "--base-lr", "0.05", "--checkpoint-every", "2", "--export-every", "3", *map(str, extra)]
