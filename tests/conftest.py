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
