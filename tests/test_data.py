"""prepare_patches.py and data.py: stored pixels, coordinates, tissue test, crash safety, bad input, sampler."""
import json
import os
import pickle
import re
import resource
import signal
import shutil
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tifffile
import torch

import data
import prepare_patches as P
import slides
from pathlib import Path
from conftest import ROOT, SAMPLE_SLIDE

TISSUE = (200, 100, 180)  # an eosin-pink: hue 312 deg (OpenCV H 156), S 127, V 200: passes the HSV rule


def write_pyramid(path, tissue_from_x=256, size=1024, levels=3, mpp=0.5, seed=0):
    """A tiled pyramidal TIFF (downsample 2 per level) that OpenSlide reads as generic-tiff: white background,
    textured tissue where x >= tissue_from_x (level-0 pixels)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 240, dtype=np.uint8)
    tissue = np.array(TISSUE, dtype=np.int16) + rng.integers(-20, 20, (size, size - tissue_from_x, 3))
    img[:, tissue_from_x:] = tissue.clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            res = dict(resolution=(1e4 / (mpp * 2 ** k),) * 2, resolutionunit="CENTIMETER") if mpp else {}
            tif.write(img[::2 ** k, ::2 ** k], tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=1 if k else 0, **res)
    return img


def run_prepare(*argv):
    return P.main([str(a) for a in argv] + ["--no-qc"])


# -- the tissue test ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rgb_cube():
    """All 2^24 RGB values as a 4096 x 4096 image."""
    r, g, b = np.meshgrid(*(np.arange(256, dtype=np.uint8),) * 3, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=-1).reshape(4096, 4096, 3)


@pytest.mark.parametrize("hsv_min", [(90, 8, 103), (0, 0, 0), (30, 20, 50), (170, 0, 0), (120, 255, 255), (1, 1, 1)])
def test_tissue_test_equals_opencv_on_every_rgb_value(rgb_cube, hsv_min):
    # OpenMidnight's rule is cv2.cvtColor(RGB2HSV) + inRange; OpenCV's uint8 HSV rounds through fixed-point tables,
    # so the exact hue/saturation would disagree on ~32k colours (e.g. (0, 115, 113)); ours must not, on any value
    cv2 = pytest.importorskip("cv2")
    hsv = cv2.cvtColor(rgb_cube, cv2.COLOR_RGB2HSV)
    ref = cv2.inRange(hsv, np.array(hsv_min, dtype=np.uint8), np.array((180, 255, 255), dtype=np.uint8)) > 0
    assert np.array_equal(slides.tissue_fraction_map(rgb_cube, hsv_min), ref)
    assert slides.tissue_fraction(np.full((4, 4, 3), 240, np.uint8), (90, 8, 103)) == 0.0  # white background
    assert slides.tissue_fraction(np.tile(np.uint8(TISSUE), (4, 4, 1)), (90, 8, 103)) == 1.0


# -- stores from real and synthetic slides ------------------------------------------------------------------------

def test_sample_slide_patches_equal_read_region_and_are_tissue(tmp_path):
    assert run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "png", "--patches-per-level", 25, "--format", "png") == 0
    store = data.PatchStore(str(tmp_path / "png"))
    slide = openslide.OpenSlide(SAMPLE_SLIDE)
    assert len(store) == 25
    for i in range(len(store)):
        patch, meta = store[i]
        assert meta["slide"] == SAMPLE_SLIDE and meta["level"] == 0 and meta["mpp"] == pytest.approx(0.499)
        assert 0 <= meta["x"] <= 2220 - 224 and 0 <= meta["y"] <= 2967 - 224
        ref = np.asarray(slide.read_region((meta["x"], meta["y"]), 0, (224, 224)).convert("RGB"))
        assert patch.shape == (224, 224, 3) and patch.dtype == np.uint8 and np.array_equal(patch, ref)
        assert slides.tissue_fraction(patch, (90, 8, 103)) > 0.6
    # the default JPEG store: the same positions (same seed), pixels within JPEG error
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "jpg", "--patches-per-level", 25)
    jpg = data.PatchStore(str(tmp_path / "jpg"))
    for i in (0, 24):
        assert jpg.meta(i) == store.meta(i)
        assert np.abs(jpg[i][0].astype(int) - store[i][0]).mean() < 6


def test_levels_mode_draws_level0_positions_over_the_whole_slide(tmp_path):
    img = write_pyramid(tmp_path / "pyr.tiff", tissue_from_x=256)
    assert run_prepare(tmp_path / "pyr.tiff", "--out", tmp_path / "st", "--patches-per-level", 20, "--format",
                       "png") == 0
    store = data.PatchStore(str(tmp_path / "st"))
    slide = openslide.OpenSlide(str(tmp_path / "pyr.tiff"))
    by_level = {}
    for i in range(len(store)):
        patch, m = store[i]
        fp = 224 * 2 ** m["level"]
        assert 0 <= m["x"] <= 1024 - fp and 0 <= m["y"] <= 1024 - fp  # the whole footprint inside the slide
        ref = np.asarray(slide.read_region((m["x"], m["y"]), m["level"], (224, 224)).convert("RGB"))
        assert np.array_equal(patch, ref)
        if m["level"] == 0:  # and it is the level-0 image at those level-0 coordinates
            assert np.array_equal(patch, img[m["y"]:m["y"] + 224, m["x"]:m["x"] + 224])
        assert m["mpp"] == pytest.approx(0.5 * 2 ** m["level"])
        by_level.setdefault(m["level"], []).append(m["x"])
    assert sorted(by_level) == [0, 1, 2] and all(len(v) == 20 for v in by_level.values())
    # tissue starts at x = 256: level-0 patches lie right of ~166 (60% rule); with OpenMidnight's level-k bug the
    # level-2 positions would stay in the top-left 256 px, where the slide is blank
    assert min(by_level[0]) >= 256 - 0.4 * 224 and max(by_level[1]) > 256


def test_mpp_mode_reads_the_nearest_finer_level_and_resizes(tmp_path):
    write_pyramid(tmp_path / "pyr.tiff")
    run_prepare(tmp_path / "pyr.tiff", "--out", tmp_path / "st", "--patches-per-level", 5, "--mpp", 0.25, 0.5,
                0.75, 2.0, "--format", "png")
    store = data.PatchStore(str(tmp_path / "st"))
    got = {(store.meta(i)["mpp"], store.meta(i)["level"], store.meta(i)["size"]) for i in range(len(store))}
    # 0.5 -> level 0 as is; 0.75 -> level 0, 336 px resized; 2.0 -> level 2; 0.25 is finer than the scan
    assert got == {(0.5, 0, 224), (0.75, 0, 336), (2.0, 2, 224)}
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    assert any("finer than the scan" in p for p in report[0]["problems"])
    i = next(i for i in range(len(store)) if store.meta(i)["size"] == 336)
    m = store.meta(i)
    slide = openslide.OpenSlide(str(tmp_path / "pyr.tiff"))
    ref = slide.read_region((m["x"], m["y"]), 0, (336, 336)).convert("RGB").resize((224, 224), 3)  # BICUBIC
    assert np.array_equal(store[i][0], np.asarray(ref))


def test_bad_inputs_are_skipped_and_reported(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    shutil.copy(SAMPLE_SLIDE, d / "good.svs")
    (d / "notaslide.svs").write_text("hello")
    (d / "empty.tiff").write_bytes(b"")
    with open(SAMPLE_SLIDE, "rb") as f:
        (d / "truncated.svs").write_bytes(f.read()[:200_000])
    write_pyramid(d / "blank.tiff", tissue_from_x=1024, size=1024, levels=1)  # all background
    write_pyramid(d / "tiny.tiff", size=100, tissue_from_x=0, levels=1)  # smaller than a patch
    write_pyramid(d / "nompp.tiff", mpp=None, levels=1)
    assert run_prepare(d, "--out", tmp_path / "st", "--patches-per-level", 5) == 0
    report = {os.path.basename(r["slide"]): r for r in json.loads((tmp_path / "st" / "report.json").read_text())}
    assert len(report) == 7
    ok = {k for k, r in report.items() if r["status"] == "ok"}
    assert ok >= {"good.svs", "nompp.tiff"} and report["good.svs"]["n_patches"] == 5
    for bad in ("notaslide.svs", "empty.tiff", "blank.tiff", "tiny.tiff"):
        assert report[bad]["status"] == "skipped" and report[bad]["reason"], bad
    assert len(data.PatchStore(str(tmp_path / "st"))) == sum(r["n_patches"] for r in report.values())
    # mpp mode: the slide without mpp is skipped and says why; nothing at all -> non-zero exit
    run_prepare(d, "--out", tmp_path / "mpp", "--patches-per-level", 2, "--mpp", 0.5)
    rep = {os.path.basename(r["slide"]): r for r in json.loads((tmp_path / "mpp" / "report.json").read_text())}
    assert rep["nompp.tiff"]["status"] == "skipped" and "no mpp metadata" in rep["nompp.tiff"]["reason"]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(d / "notaslide.svs", only_bad)
    assert run_prepare(only_bad, "--out", tmp_path / "none") == 1


def store_bytes(root):
    manifest = json.loads(Path(os.path.join(root, "manifest.json")).read_text())
    return manifest["shards"], [Path(os.path.join(root, "shards", s["key"] + ".bin")).read_bytes()
                                for s in manifest["shards"]]


def test_kill_and_rerun_gives_the_same_store(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(4):
        write_pyramid(d / f"s{i}.tiff", seed=i)
    argv = [str(d), "--patches-per-level", "150"]
    assert P.main(argv + ["--out", str(tmp_path / "clean")]) == 0  # the uninterrupted run, in this process
    # killed (SIGKILL) as it starts writing the second slide's index: the first slide is finished, the second has
    # its .bin but no index; the writer is patched here, never in prepare_patches.py
    killer = tmp_path / "killed_at.py"
    killer.write_text(f"""import os, signal, sys
sys.path.insert(0, {ROOT!r})
import prepare_patches as P
real, written = P.atomic_write, []
def atomic_write(path, *args, **kwargs):
    written.append(path)
    if sum(p.endswith(".idx.npz") for p in written) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
P.atomic_write = atomic_write
P.main(sys.argv[1:])
""")
    killed = subprocess.run([sys.executable, str(killer), *argv, "--out", str(tmp_path / "killed")],
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    shards = tmp_path / "killed" / "shards"
    assert len(list(shards.glob("*.idx.npz"))) == 1 and len(list(shards.glob("*.bin"))) == 2
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="re-run the same prepare_patches.py"):
        data.PatchStore(str(tmp_path / "killed"))
    (shards / "s3-0000000000.bin.tmp").write_bytes(b"\xff" * 100)  # debris of a half-written file
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare_patches.py"), *argv, "--out", str(tmp_path / "killed")],
                   check=True, capture_output=True)
    assert store_bytes(tmp_path / "killed") == store_bytes(tmp_path / "clean")


def test_split_over_machines_then_merge(tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(3):
        write_pyramid(d / f"s{i}.tiff", seed=i, levels=1)
    run_prepare(d, "--out", tmp_path / "whole", "--patches-per-level", 4)
    for k in range(2):
        run_prepare(d, "--out", tmp_path / "parts", "--patches-per-level", 4, "--num-shards", 2, "--shard-index", k)
    assert P.main(["--merge", "--out", str(tmp_path / "parts")]) == 0
    assert store_bytes(tmp_path / "parts") == store_bytes(tmp_path / "whole")
    outcome = lambda root: [(r["key"], r["status"], r["n_patches"])  # noqa: E731
                            for r in json.loads(Path(os.path.join(root, "report.json")).read_text())]
    assert outcome(tmp_path / "parts") == outcome(tmp_path / "whole")  # the parts' reports, combined
    assert data.PatchStore(str(tmp_path / "parts")).meta(5) == data.PatchStore(str(tmp_path / "whole")).meta(5)
    # or parts written to separate stores (separate machines), merged into a new one
    run_prepare(d, "--out", tmp_path / "a", "--patches-per-level", 4, "--num-shards", 2, "--shard-index", 0)
    run_prepare(d, "--out", tmp_path / "b", "--patches-per-level", 4, "--num-shards", 2, "--shard-index", 1)
    P.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab")])
    assert store_bytes(tmp_path / "ab") == store_bytes(tmp_path / "whole")


def test_truncated_shard_is_refused(tmp_path):
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 3)
    shard = next((tmp_path / "st" / "shards").glob("*.bin"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        data.PatchStore(str(tmp_path / "st"))
    store = data.PatchStore(str(tmp_path / "st"), check_shards=False)  # as a worker opens it: the read itself
    with pytest.raises(ValueError, match="shorter than its index says"):
        store[len(store) - 1]


# -- the store at scale: one memory-mapped index, bounded descriptors ------------------------------------------------

def patches_from_the_shard_files(root):
    """Every patch's bytes and metadata read straight from the shard files, without data.py."""
    manifest = json.loads(Path(os.path.join(root, "manifest.json")).read_text())
    out = []
    for shard in manifest["shards"]:
        base = os.path.join(root, "shards", shard["key"])
        with np.load(base + ".idx.npz") as z, open(base + ".bin", "rb") as f:
            blob = f.read()
            for o, n, lv, x, y, mpp, size in zip(z["offsets"], z["lengths"], z["level"], z["x"], z["y"], z["mpp"],
                                                 z["size"]):
                out.append((blob[o:o + n], {"slide": shard["slide"], "level": int(lv), "x": int(x), "y": int(y),
                                            "mpp": float(mpp), "size": int(size)}))
    return out


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """A store of 300 slides of 3 patches each, written by prepare_patches.py's own writer (bench.py store's
    synthetic store at a small size): more shards than the descriptor limits below."""
    import bench_store
    root = str(tmp_path_factory.mktemp("many"))
    bench_store.write_synthetic_store(root, 300, 3, progress=False)
    return root


READ_UNDER_A_LIMIT = """
import json, random, resource, sys, zlib
sys.path.insert(0, {root!r})
import torch
import augment, data
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
store = data.PatchStore(sys.argv[1])
order = list(range(len(store)))
random.Random(0).shuffle(order)
crcs = {{i: zlib.crc32(store.read_bytes(i)) for i in order}}

class Crc(torch.utils.data.Dataset):
    def __len__(self):
        return len(store)
    def __getitem__(self, i):
        return i, zlib.crc32(store.read_bytes(i))

loaded = dict(torch.utils.data.DataLoader(Crc(), batch_size=None, num_workers=4, prefetch_factor=8))
cfg = augment.AugmentConfig(global_size=56, local_size=28, n_local_crops=2)
batches = iter(data.make_loader(store, 8, cfg, workers=4, on_device=True, patch_size=14))
shapes = [tuple(next(batches)["global_crops"].shape) for _ in range(4)]
try:
    data.make_loader(store, 8, cfg, workers=32, on_device=True, patch_size=14)
    too_many = None
except SystemExit as e:
    too_many = str(e)
print(json.dumps({{"in_process": crcs, "loader": loaded, "shapes": shapes, "limit": resource.getrlimit(7),
                  "too_many": too_many}}))
"""


def test_a_store_with_more_shards_than_the_descriptor_limit_is_read_completely(many_shards, tmp_path):
    # 300 shard files under RLIMIT_NOFILE 128 (soft and hard): every patch is read in a random order in one
    # process, then through a DataLoader with 4 workers, then the training loader (4 workers) gives batches
    script = tmp_path / "read.py"
    script.write_text(READ_UNDER_A_LIMIT.format(root=ROOT))
    run = subprocess.run([sys.executable, str(script), many_shards], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    import zlib
    expected = {str(i): zlib.crc32(b) for i, (b, _) in enumerate(patches_from_the_shard_files(many_shards))}
    assert len(expected) == 900 and out["in_process"] == expected and out["loader"] == expected
    assert out["shapes"] == [[16, 3, 56, 56]] * 4 and out["limit"] == [128, 128]
    # 32 workers do not fit 128 descriptors: the error names the limit and how to raise it
    assert re.fullmatch(r"the open-file limit \(RLIMIT_NOFILE, `ulimit -n`\) is 128 \(hard limit 128\); 32 loader "
                        r"workers need about \d+: raise it \(ulimit -n 4096.*lower --workers", out["too_many"])


def test_open_descriptors_stay_bounded_and_a_too_low_limit_names_itself(many_shards):
    store = data.PatchStore(many_shards)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(len(store)):
        store.read_bytes(i)
    assert len(os.listdir("/proc/self/fd")) - before <= store.MAX_OPEN_SHARDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fresh = data.PatchStore(many_shards)
    try:
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no room for one more file
        with pytest.raises(OSError, match=r"too many open files.*RLIMIT_NOFILE, `ulimit -n`\) is \d+.*ulimit -n 4096"):
            fresh.read_bytes(0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_pickled_store_is_its_path_and_reads_the_same(many_shards):
    store = data.PatchStore(many_shards)
    blob = pickle.dumps(store)
    assert len(blob) < 300 and len(pickle.dumps(data.MultiCropDataset(store))) < 1000  # no index inside
    copy = pickle.loads(blob)
    assert all(copy.read_bytes(i) == store.read_bytes(i) and copy.meta(i) == store.meta(i)
               for i in range(len(store)))
    assert isinstance(copy.index.base, np.memmap)  # mapped again from index.npy, not carried


def test_a_store_written_before_the_index_opens_with_the_same_patches(tmp_path):
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 20, "--mpp", "0.5", "1", "2")
    root = str(tmp_path / "st")
    for name in ("index.npy", "index.json"):  # a store in the layout written before index.npy
        os.remove(os.path.join(root, name))
    store = data.PatchStore(root)  # builds the index once
    assert os.path.exists(os.path.join(root, "index.json"))
    expected = patches_from_the_shard_files(root)
    assert [(store.read_bytes(i), store.meta(i)) for i in range(len(store))] == expected
    assert {m["mpp"] for _, m in expected} == {0.5, 1.0, 2.0}
    # each column at the smallest unsigned type that holds it: a small slide's coordinates fit 16 bits
    types = {name: store.index.dtype[name] for name in store.index.dtype.names}
    assert types == {"offset": np.uint32, "length": np.uint16, "level": np.uint8, "x": np.uint16, "y": np.uint16,
                     "size": np.uint16, "mpp": np.uint8}
    assert store.index.dtype.itemsize == 4 + 2 + 1 + 2 + 2 + 2 + 1  # packed


KILL_INDEX_BUILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
import data
real = data.atomic_write
def atomic_write(path, *args, **kwargs):
    if path.endswith("index.json"):  # index.npy is complete, index.json not yet written
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, *args, **kwargs)
data.atomic_write = atomic_write
data.PatchStore(sys.argv[1])
"""


def test_the_index_of_a_killed_build_or_another_manifest_is_never_trusted(tmp_path):
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 10)
    root = str(tmp_path / "st")
    expected = patches_from_the_shard_files(root)
    os.remove(os.path.join(root, "index.json"))
    np.save(os.path.join(root, "index.npy"), np.zeros(3, dtype=[("offset", np.uint8)]))  # a stale, wrong index
    script = tmp_path / "kill.py"
    script.write_text(KILL_INDEX_BUILD.format(root=ROOT))
    assert subprocess.run([sys.executable, str(script), root]).returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(root, "index.json"))  # the killed build left no index to trust
    assert [(b, m) for b, m in zip(*zip(*((data.PatchStore(root).read_bytes(i), data.PatchStore(root).meta(i))
                                          for i in range(len(expected)))))] == expected
    # an index built from another manifest (a store re-merged or resumed since) is rebuilt, not used
    manifest = os.path.join(root, "manifest.json")
    info = json.loads(Path(os.path.join(root, "index.json")).read_text())
    with open(manifest, "a") as f:
        f.write("\n")
    store = data.PatchStore(root)
    assert json.loads(Path(os.path.join(root, "index.json")).read_text())["manifest_sha1"] != info["manifest_sha1"]
    assert [(store.read_bytes(i), store.meta(i)) for i in range(len(store))] == expected
    # an index.npy cut short under a current index.json: rebuilt too
    with open(os.path.join(root, "index.npy"), "r+b") as f:
        f.truncate(100)
    assert [data.PatchStore(root).meta(i) for i in range(len(expected))] == [m for _, m in expected]


# -- sampler and loader -------------------------------------------------------------------------------------------

def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_ranks_are_disjoint_and_cover_each_epoch():
    n, B, W = 37, 4, 2
    per_rank = -(-n // (B * W)) * B  # steps to cover an epoch x B
    seen = [take(data.InfiniteSampler(n, B, r, W, seed=3), per_rank * 3) for r in range(W)]
    for epoch in range(2):
        items = [idx for r in range(W) for (e, idx, _) in seen[r] if e == epoch]
        assert sorted(items) == list(range(n))  # every patch exactly once per epoch, over all ranks
    assert [e for e, _, _ in seen[0]].count(0) + [e for e, _, _ in seen[1]].count(0) == n
    e0 = [idx for e, idx, _ in seen[0] if e == 0]
    e1 = [idx for e, idx, _ in seen[0] if e == 1]
    assert e0 != e1[:len(e0)]  # reshuffled per epoch


def test_global_batch_independent_of_world_size_and_resume_is_exact():
    one = take(data.InfiniteSampler(50, 8, 0, 1, seed=1), 40)
    two = [take(data.InfiniteSampler(50, 4, r, 2, seed=1), 20) for r in range(2)]
    for step in range(5):
        assert sorted(one[step * 8:(step + 1) * 8]) == sorted(two[0][step * 4:(step + 1) * 4] +
                                                              two[1][step * 4:(step + 1) * 4])
    full = take(data.InfiniteSampler(50, 4, 1, 2, seed=1), 30)
    assert take(data.InfiniteSampler(50, 4, 1, 2, seed=1, start=12), 18) == full[12:]


def test_loader_batches_are_seeded_by_sample_not_worker(tmp_path):
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 12)
    store = data.PatchStore(str(tmp_path / "st"))
    a = next(iter(data.make_loader(store, 3, seed=5, workers=0, on_device=True)))
    loader = data.make_loader(store, 3, seed=5, workers=2, on_device=True)
    it = iter(loader)
    b = next(it)
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])
    assert a["global_crops"].dtype == torch.uint8 and a["global_crops"].shape == (6, 3, 224, 224)
    assert a["local_crops"].shape == (24, 3, 98, 98) and "global_params" in a
    c = next(it)
    assert not torch.equal(b["index"], c["index"])
    resumed = next(iter(data.make_loader(store, 3, seed=5, workers=0, on_device=True, start=3)))
    assert torch.equal(resumed["local_crops"], c["local_crops"]) and torch.equal(resumed["masks"], c["masks"])
    # the same global batch of 6 split over two ranks: the same crops and the same masks, row for row
    whole = next(iter(data.make_loader(store, 6, seed=5, workers=0, on_device=True)))
    halves = [next(iter(data.make_loader(store, 3, seed=5, rank=r, world_size=2, workers=0, on_device=True)))
              for r in range(2)]
    for key in ("global_crops", "masks"):  # rows are [g1 of the batch; g2 of the batch]
        g1 = torch.cat([h[key][:3] for h in halves])
        g2 = torch.cat([h[key][3:] for h in halves])
        assert torch.equal(torch.cat([g1, g2]), whole[key]), key
    path_a = next(iter(data.make_loader(store, 3, seed=5, workers=0, on_device=False)))
    assert path_a["global_crops"].dtype == torch.float32


def test_a_rerun_says_what_an_earlier_run_finished(tmp_path, capsys):
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 5)
    assert "finished by an earlier run" not in capsys.readouterr().out
    run_prepare(SAMPLE_SLIDE, "--out", tmp_path / "st", "--patches-per-level", 5)
    assert "from 1/1 slides in" in (out := capsys.readouterr().out) and "1 of them finished by an earlier run" in out
    os.makedirs(tmp_path / "probe")
    (tmp_path / "probe" / "DONE").write_text("")
    assert P.main(["--demo", "--out", str(tmp_path / "st"), "--probe-out", str(tmp_path / "probe")]) == 0
    assert "the demo's data is already in" in capsys.readouterr().out
