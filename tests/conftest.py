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
def small_store(tmp_path_factory):
    """A 40-patch store from the bundled slide, shared by the training and loader tests."""
    import prepare_patches
    out = str(tmp_path_factory.mktemp("store"))
    assert prepare_patches.main([SAMPLE_SLIDE, "--out", out, "--patches-per-level", "40", "--no-qc"]) == 0
    return out


def tiny_train_args(store, out, *extra):
    """A ViT-S on 56/28 px crops with small heads: a training step takes a fraction of a second on CPU."""
    return ["--preset", "vits", "--data", store, "--out", str(out), "--global-size", "56", "--local-size", "28",
            "--n-local-crops", "2", "--batch-size", "4", "--n-prototypes", "256", "--head-hidden", "64",
            "--head-bottleneck", "32", "--workers", "0", "--log-every", "1", "--warmup-steps", "2",
            "--freeze-last-layer-steps", "1", "--teacher-temp-warmup-steps", "3", "--device", "cpu",
            "--base-lr", "0.05", "--checkpoint-every", "2", "--export-every", "3", *map(str, extra)]
