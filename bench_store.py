"""
OpenMidnight's scale, simulated on one machine (bench.py's `store` and `chain` benchmarks): a patch store of 12,000
slides and 28.8M patches written through prepare_patches.py's own writer (real JPEG payloads, shared between patches
so that the disk cost stays small), then what opening and reading it costs; and the rest of the chain at that
scale: the sampler, the manifests and merge of 64 parts, a ViT-g checkpoint, eval_slide's embedding cache.

    python bench.py store --slides 12000 --patches-per-slide 2400 --out /data/sim_store
    python bench.py store --open /data/tcga_store       # measure an existing store (yours)
    python bench.py chain --store /data/sim_store --out /data/sim_chain

Every figure is measured in a fresh process, so that nothing loaded before counts against it.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import prepare_patches
from files import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def pss_mib(pid="self"):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def in_fresh_process(code, *args, limit_fds=None):
    """Run `code` (a Python snippet that prints one JSON line last) in a new interpreter; returns that JSON."""
    preexec = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))) if limit_fds else None
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=HERE, capture_output=True, text=True,
                         preexec_fn=preexec)
    if out.returncode:
        raise SystemExit(f"benchmark process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# a synthetic store through prepare_patches.py's writer


def real_jpegs(n=8):
    """n real JPEG payloads as prepare_patches.py encodes them: a small store of the bundled slide's patches."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare_patches.main([prepare_patches.SAMPLE_SLIDE, "--out", tmp, "--patches-per-level", str(n), "--no-qc",
                              "--levels", "0"])
        store = data.PatchStore(tmp)
        return [store.read_bytes(i) for i in range(min(n, len(store)))]


def write_synthetic_store(out, slides, per_slide, seed=0, progress=True):
    """`slides` shards of `per_slide` patches, each shard a few real JPEGs that its patches point into (at 4
    levels of a 100k x 80k px slide, as OpenMidnight's 600 per level), a manifest, a report and the index: the
    same files, written by the same functions, as prepare_patches.py."""
    jpegs, rng = real_jpegs(), np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    reports = []
    for s in tqdm(range(slides), desc="synthetic slides", unit="slide", disable=not progress):
        key, path = f"slide{s:06d}-{s:010x}", f"/data/TCGA/slide{s:06d}.svs"
        level = np.arange(per_slide) * 4 // per_slide  # 4 levels, 0.25 um/px at level 0, downsample 4 each
        rows = np.stack([level, rng.integers(0, 100_000, per_slide), rng.integers(0, 80_000, per_slide),
                         0.2525 * 4.0 ** level, np.full(per_slide, 224)], axis=1)
        report = {"slide": path, "key": key, "n_patches": per_slide, "status": "ok"}
        used = jpegs[:per_slide]  # every payload is some patch's: the .bin ends where its last patch does
        prepare_patches.write_shard(out, key, path, used, rows, report, payload_of=np.arange(per_slide) % len(used))
        reports.append(report)
    args = prepare_patches.get_args(["--out", out])
    prepare_patches.write_report(out, reports)
    prepare_patches.write_manifest(out, reports, args)
    t0 = time.perf_counter()
    data.build_index(out, progress=progress)
    return time.perf_counter() - t0


# -----------------------------------------------------------------------------
# opening and reading it

READER = """
import json, os, random, sys, time
import bench_store as B
t0 = time.perf_counter()
import data
rss0, fds0 = B.rss_mib(), B.open_fds()
t0 = time.perf_counter()
store = data.PatchStore(sys.argv[1])
t_open = time.perf_counter() - t0
rss1, fds1 = B.rss_mib(), B.open_fds()
rng, n = random.Random(0), int(sys.argv[2])
picks = [rng.randrange(len(store)) for _ in range(n)]
t0 = time.perf_counter()
for i in picks:
    store[i]
t_read = time.perf_counter() - t0
print(json.dumps({"patches": len(store), "slides": len(store.slides), "open_s": round(t_open, 3),
                  "added_rss_mib_after_open": round(rss1 - rss0, 1), "open_fds_after_open": fds1,
                  "random_reads": n, "random_read_patches_per_s": round(n / t_read, 1),
                  "open_fds_after_reads": B.open_fds(), "added_rss_mib_after_reads": round(B.rss_mib() - rss0, 1)}))
"""

CONCURRENT = """
import random, sys
import data
store = data.PatchStore(sys.argv[1])
rng = random.Random(int(sys.argv[3]))
for _ in range(int(sys.argv[2])):
    store[rng.randrange(len(store))]
print("ready", flush=True)
sys.stdin.read()
"""

LOADER = """
import json, sys, time
import augment, data, bench_store as B
store = data.PatchStore(sys.argv[1])
workers, batches = int(sys.argv[2]), int(sys.argv[3])
cfg = augment.AugmentConfig()
loader = data.make_loader(store, 32, cfg, workers=workers, on_device=True)
it, most = iter(loader), 0
next(it)
t0 = time.perf_counter()
for _ in range(batches):
    next(it)
    most = max(most, B.open_fds())
dt = time.perf_counter() - t0
print(json.dumps({"loader_workers": workers, "loader_samples_per_s": round(32 * batches / dt, 1),
                  "loader_most_open_fds_in_main_process": most}))
"""


def measure_store(root, reads=20_000, processes=4, fd_limit=256, workers=4, batches=20):
    out = {"store": root, **in_fresh_process(READER, root, reads)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT, root, str(reads), str(k)], cwd=HERE,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(processes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    pss = [pss_mib(p.pid) for p in procs]  # while all of them are alive: shared pages are split between them
    for p in procs:
        p.communicate("")
    out.update({"concurrent_readers": processes, "concurrent_reads_each": reads,
                "concurrent_pss_mib_total": round(sum(pss), 1), "concurrent_pss_mib_each": [round(x) for x in pss],
                "fd_limit": fd_limit, **in_fresh_process(LOADER, root, workers, batches, limit_fds=fd_limit)})
    return out


def bench_store(argv):
    """A synthetic store at OpenMidnight's scale (or --open an existing one): open time, added memory, open file
    descriptors, random-read rate, four readers' memory together, and a loader under a low descriptor limit."""
    p = argparse.ArgumentParser(prog="bench.py store", description=bench_store.__doc__)
    p.add_argument("--slides", type=int, default=12_000, help="slides (shards) of the synthetic store")
    p.add_argument("--patches-per-slide", type=int, default=2400, help="OpenMidnight: ~600 at each of ~4 levels")
    p.add_argument("--out", default=None, help="where the synthetic store goes (kept: ~3 GB at full size)")
    p.add_argument("--open", default=None, metavar="STORE", help="measure this existing store instead")
    p.add_argument("--reads", type=int, default=20_000, help="random reads per process")
    p.add_argument("--fd-limit", type=int, default=256, help="RLIMIT_NOFILE of the loader's process")
    p.add_argument("--workers", type=int, default=4, help="loader workers under that limit")
    a = p.parse_args(argv)
    if not a.open and not a.out:
        p.error("give --out DIR (a synthetic store is written there) or --open STORE")
    out = {}
    if not a.open:
        t0 = time.perf_counter()
        out["index_build_s"] = round(write_synthetic_store(a.out, a.slides, a.patches_per_slide), 1)
        out["write_s"] = round(time.perf_counter() - t0, 1)
        out["disk_gib"] = round(sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out)
                                    for f in fs) / 2**30, 2)
    out.update(measure_store(a.open or a.out, a.reads, fd_limit=a.fd_limit, workers=a.workers))
    print(json.dumps(out))
    return out


# -----------------------------------------------------------------------------
# the rest of the chain at the same scale

SAMPLER = """
import json, resource, sys, time
import bench_store as B
import data
n, B_, world, step = (int(a) for a in sys.argv[1:5])
rss0 = B.rss_mib()
t0 = time.perf_counter()
sampler = data.InfiniteSampler(n, B_, rank=world - 1, world_size=world)
first = next(iter(sampler))
t_epoch = time.perf_counter() - t0
rss1 = B.rss_mib()
del sampler
t0 = time.perf_counter()
resumed = next(iter(data.InfiniteSampler(n, B_, rank=world - 1, world_size=world, start=step * B_)))
print(json.dumps({"sampler_patches": n, "sampler_epoch_permutation_s": round(t_epoch, 2),
                  "sampler_added_rss_mib": round(rss1 - rss0, 1),
                  f"sampler_resume_at_step_{step}_first_sample_s": round(time.perf_counter() - t0, 2),
                  "sampler_resumed_epoch": resumed[0]}))
"""

MERGE = """
import json, resource, sys, time
import prepare_patches
t0 = time.perf_counter()
prepare_patches.main(["--merge", "--out", sys.argv[1]])
print(json.dumps({"merge_s": round(time.perf_counter() - t0, 1),
                  "merge_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""

COLOUR_PATH = """
import json, sys, time
import torch
import data
torch.set_num_threads(1)
ds = data.MultiCropDataset(data.PatchStore(sys.argv[1]), on_device=True)
n = int(sys.argv[2])
ds[(0, 0, 0)]
t0 = time.process_time()
for i in range(n):
    ds[(0, i * 997 % len(ds), i)]
print(json.dumps({"samples_per_s_per_core_device_colour_path": round(n / (time.process_time() - t0), 1)}))
"""


def vitg_checkpoint_bytes():
    """A resumable checkpoint of the openmidnight preset: fp32 student (backbone + both heads), its AdamW
    moments and the teacher, counted on the meta device."""
    import train
    args = train.parse_args(["--preset", "openmidnight", "--data", "-", "--init", "-", "--device", "cpu"])
    args.init = None
    with torch.device("meta"):
        student, _ = train.build_models(args)
    n = sum(p.numel() for p in student.parameters())
    return 16 * n, args  # fp32 weights, two moments, the teacher's weights


def checkpoint_write(folder, gib):
    """torch.save of `gib` GiB of tensors through files.atomic_write (fsynced), then train.py's read-back check
    and a full read, as a resume does."""
    tensors = {f"t{i}": torch.randn(256 * 2**20 // 4) for i in range(int(gib * 4))}  # 256 MiB each
    path = os.path.join(folder, "checkpoint-sim.pt")
    t0 = time.perf_counter()
    atomic_write(path, lambda f: torch.save({"step": 1, "tensors": tensors}, f))
    write = time.perf_counter() - t0
    tensors.clear()  # the memory back before the reads
    t0 = time.perf_counter()
    torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    check = time.perf_counter() - t0
    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # read it from the disk
    t0 = time.perf_counter()
    sum(t.sum().item() for t in torch.load(path, map_location="cpu", weights_only=True)["tensors"].values())
    read = time.perf_counter() - t0
    os.remove(path)
    return write, check, read


def fake_embeddings(emb, slides, patches, dim, settings):
    """eval_slide.py embed's per-slide files (fp16 features, level-0 coordinates, settings), as its cache holds
    them after a run over `slides` slides."""
    os.makedirs(emb, exist_ok=True)
    feats = torch.randn(patches, dim).half()
    for s in tqdm(range(slides), desc="embedding files", unit="slide"):
        sid = f"slide{s:05d}"
        obj = {"features": feats, "coords": torch.zeros(patches, 2, dtype=torch.long), "slide_id": sid,
               "path": f"/data/panda/{sid}.tiff", "mpp": 0.5, "level": 0, "read_size": 224, "step": 224,
               "settings": settings}
        atomic_write(os.path.join(emb, sid + ".pt"), lambda f: torch.save(obj, f))


EMBED_RESUME = """
import json, sys, time, types
import bench_store as B
import eval_slide
emb, n = sys.argv[1], int(sys.argv[2])
settings = json.loads(sys.argv[3])
args = types.SimpleNamespace(num_shards=1, shard_index=0)
t0 = time.perf_counter()
eval_slide.embed_slides([f"/data/panda/slide{s:05d}.tiff" for s in range(n)], emb, args, settings)
t_scan = time.perf_counter() - t0
fds = B.open_fds()
t0 = time.perf_counter()
bags = eval_slide.load_bags(emb, [f"slide{s:05d}" for s in range(n)])
print(json.dumps({"embedding_files": n, "embed_rerun_all_finished_s": round(t_scan, 1), "open_fds_after": fds,
                  "load_bags_s": round(time.perf_counter() - t0, 1), "bags_gib": round(bags.numel() * 2 / 2**30, 2),
                  "open_fds_after_load": B.open_fds(), "peak_rss_gib": round(B.rss_mib() / 1024, 2)}))
"""


def bench_chain(argv):
    """The chain around the store at OpenMidnight's scale: the sampler's epoch permutation and a resume at step
    250,000; the manifests, reports and merge of 64 parts; CPU cores to feed 8 GPUs; a ViT-g checkpoint against
    the time between checkpoints; eval_slide.py's embedding cache of 10,000 slides."""
    p = argparse.ArgumentParser(prog="bench.py chain", description=bench_chain.__doc__)
    p.add_argument("--store", required=True, help="a store (bench.py store --out's, at full size)")
    p.add_argument("--out", required=True, help="scratch folder (embedding files: ~6 GB at full size)")
    p.add_argument("--parts", type=int, default=64, help="prepare_patches.py parts merged")
    p.add_argument("--checkpoint-gib", type=float, default=4.0, help="checkpoint bytes written, then scaled")
    p.add_argument("--embeddings", type=int, default=10_000, help="slides in the embedding cache (PANDA ~10.6k)")
    p.add_argument("--samples", type=int, default=300, help="samples timed on the device colour path")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.store, "manifest.json")) as f:
        manifest = json.load(f)
    n = manifest["n_patches"]
    out = in_fresh_process(SAMPLER, n, 48, 8, 250_000)
    # 64 parts, as 64 machines of a SLURM array leave them in one shared --out, then --merge
    args = prepare_patches.get_args(["--out", a.store])
    with open(os.path.join(a.store, "report.json")) as f:
        reports = json.load(f)
    t0 = time.perf_counter()
    for k in range(a.parts):
        part = reports[k::a.parts]
        prepare_patches.write_report(a.store, part, f"report-part{k}-of{a.parts}.json")
        prepare_patches.write_manifest(a.store, part, args, f"manifest-part{k}-of{a.parts}.json")
    out["parts_written_s"] = round(time.perf_counter() - t0, 1)
    out.update(in_fresh_process(MERGE, a.store))
    for k in range(a.parts):
        for name in ("report", "manifest"):
            os.remove(os.path.join(a.store, f"{name}-part{k}-of{a.parts}.json"))
    rate = in_fresh_process(COLOUR_PATH, a.store, a.samples)["samples_per_s_per_core_device_colour_path"]
    out.update({"samples_per_s_per_core_device_colour_path": rate, "cores_to_feed_8_gpus_at_100_img_s":
                round(8 * 100 / rate, 1)})
    size, om = vitg_checkpoint_bytes()
    write, check, read = checkpoint_write(a.out, a.checkpoint_gib)
    scale = size / (a.checkpoint_gib * 2**30)
    every_s = om.checkpoint_every * om.batch_size / 40  # OpenMidnight's ~40 images/s per GPU
    out.update({"vitg_checkpoint_gb": round(size / 1e9, 1), "checkpoint_simulated_gib": a.checkpoint_gib,
                "checkpoint_write_gb_per_s": round(a.checkpoint_gib * 2**30 / write / 1e9, 2),
                "vitg_checkpoint_write_s": round(write * scale, 1), "vitg_checkpoint_read_s": round(read * scale, 1),
                "read_back_check_s": round(check, 3), "checkpoint_every": om.checkpoint_every,
                "seconds_between_checkpoints_at_40_img_s": every_s,
                "other_ranks_wait_fraction": round((write * scale + check) / every_s, 4)})
    settings = {"weights_sha1": "0" * 40, "max_patches": 200, "mpp": 0.5}
    fake_embeddings(os.path.join(a.out, "emb"), a.embeddings, 200, 1536, settings)
    out.update(in_fresh_process(EMBED_RESUME, os.path.join(a.out, "emb"), a.embeddings, json.dumps(settings)))
    print(json.dumps(out))
    return out
