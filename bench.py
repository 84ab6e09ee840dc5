"""
Benchmarks, nanoGPT-style: each prints what it measured as JSON; nothing here is a test.

    python bench.py step  [--preset vits] [--batch-size 4] [train.py flags...]   # a training step, phase by phase
    python bench.py aug   [--patches 40]                  # CPU cost per sample of the augmentation's two halves
    python bench.py data  [--patches-per-level 1000]      # prepare_patches rate, decoded samples/s per worker
    python bench.py forward [--arch vit_small]            # 2 global + 8 local crops: one list call vs two calls
    python bench.py memory [--preset openmidnight]        # a step's device memory, predicted on a CPU
    python bench.py slide [--passes 5]                    # slide_reader.py's patch reader vs eva's, + a ViT-S
    python bench.py store --out DIR | --open STORE        # a 12,000-slide store: open, memory, descriptors, reads
    python bench.py chain --store STORE --out DIR         # sampler, manifests, checkpoint, embedding cache at scale

`python bench.py SUBCOMMAND --help` lists its flags (step and memory take every train.py flag too). On an
H100/H200: python bench.py step --preset openmidnight --batch-size 48 (random weights time the same as --init's).
On a CPU the step defaults to batch 4, and a step predicted not to fit in the machine's memory is refused.
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
import openslide
import torch
from torch.profiler import ProfilerActivity, profile

import augment
import bench_store
import data
import eval_probe
import prepare_patches
import slide_reader
import train
from model import ARCHS, ViT, autocast, swiglu_hidden

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -----------------------------------------------------------------------------
# analytic FLOPs of one training image


def vit_forward_flops(n_tokens, dim, depth, ffn_hidden, ffn, n_patches, patch_size=14, keep=1.0):
    """Matmul FLOPs (2 per multiply-add) of a ViT forward on one image of n_tokens tokens:
    per block and token 8 D^2 (qkv 6 D^2 + proj 2 D^2), the FFN (mlp 4 D h, SwiGLU 6 D h), and attention 4 n D
    (QK^T and AV); `keep` scales the block work for batch-subset drop path (each branch runs on a fraction of
    the batch); plus the patch embedding 2 n_p (3 p^2) D."""
    ffn_per_token = (6 if ffn == "swiglu" else 4) * dim * ffn_hidden
    block = n_tokens * (8 * dim * dim + ffn_per_token) + 4 * n_tokens * n_tokens * dim
    return depth * block * keep + 2 * n_patches * 3 * patch_size ** 2 * dim


def head_flops(dim, hidden, bottleneck, n_prototypes):
    return 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * n_prototypes)


def train_flops_per_image(args):
    """Student forward + backward (3x forward, 4x with --recompute full) on 2 global + n local crops with drop path,
    the teacher forward on the 2 global crops, the DINO head on the CLS tokens (2 + n student, 2 teacher) and the
    iBOT head on the masked patch tokens (expected 2 crops x mask_prob x mean ratio x grid^2 per image)."""
    a = ARCHS[args.arch]
    D, depth = a["embed_dim"], a["depth"]
    h = swiglu_hidden(D) if args.ffn == "swiglu" else 4 * D
    ng, nl = (args.global_size // args.patch_size) ** 2, (args.local_size // args.patch_size) ** 2
    extra = 1 + args.registers
    B = args.batch_size

    def keep(b):  # fraction of samples whose residual branches run, DINOv2's int(b (1 - p)) rule
        return max(int(b * (1 - args.drop_path)), 1) / b if args.drop_path > 0 else 1.0

    p = args.patch_size
    g_fwd = vit_forward_flops(ng + extra, D, depth, h, args.ffn, ng, p)
    passes = 4 if args.recompute == "full" else 3  # backward = 2 forwards; full recompute reruns the forward
    student = passes * (2 * vit_forward_flops(ng + extra, D, depth, h, args.ffn, ng, p, keep=keep(2 * B)) +
                        args.n_local_crops * vit_forward_flops(nl + extra, D, depth, h, args.ffn, nl, p,
                                                               keep=keep(args.n_local_crops * B)))
    dino = head_flops(D, args.head_hidden, args.dino_head_bottleneck, args.n_prototypes)
    ibot = head_flops(D, args.head_hidden, args.ibot_head_bottleneck, args.n_prototypes)
    masked = 2 * args.mask_prob * sum(args.mask_ratio) / 2 * ng
    heads = 3 * (dino * (2 + args.n_local_crops) + ibot * masked) + dino * 2 + ibot * masked
    return student + 2 * g_fwd + heads


# -----------------------------------------------------------------------------
# benchmarks


def synthetic_batch(args, B, cfg):
    """A batch as the loader gives it (random pixels, real iBOT masks); uint8 crops plus colour parameters when
    the colour ops run on the device."""
    g = torch.Generator().manual_seed(0)
    masks = augment.sample_masks(2 * B, args.global_size // args.patch_size, tuple(args.mask_ratio), args.mask_prob, g)
    batch = {"global_crops": torch.randn(2 * B, 3, args.global_size, args.global_size, generator=g),
             "local_crops": torch.randn(args.n_local_crops * B, 3, args.local_size, args.local_size, generator=g),
             **augment.mask_targets(masks)}
    if args.gpu_augment:
        batch["global_crops"] = torch.randint(0, 256, batch["global_crops"].shape, dtype=torch.uint8, generator=g)
        batch["local_crops"] = torch.randint(0, 256, batch["local_crops"].shape, dtype=torch.uint8, generator=g)
        batch["global_params"] = augment.draw_color_params(2 * B, 0.45, cfg, g)
        batch["local_params"] = augment.draw_color_params(args.n_local_crops * B, 0.5, cfg, g)
    return batch


def train_args(argv, name, add_own, preset):
    """bench.py's own flags (added by add_own) and train.py's, from one argv; --help lists both."""
    own_parser = argparse.ArgumentParser(add_help=False)
    add_own(own_parser)
    if {"-h", "--help"} & set(argv):
        argparse.ArgumentParser(prog=f"bench.py {name}", parents=[own_parser, train.get_args_parser(add_help=False)],
                                description=globals()[f"bench_{name}"].__doc__).print_help()
        sys.exit(0)
    own, rest = own_parser.parse_known_args(argv)
    return own, train.parse_args(rest if "--preset" in rest else ["--preset", preset, *rest])


def step_bytes_estimate(args):
    """A rough host-memory bound of an fp32 eager step without recompute, to refuse one that cannot fit: 20 bytes
    per student parameter (weights, grads, 2 AdamW moments, teacher), ~24 saved fp32 values per token, channel and
    block, and ~4 [rows, K] fp32 tensors per head row (student and teacher). Calibrated loosely on the ViT-S step."""
    a = ARCHS[args.arch]
    n_params = 12 * a["depth"] * a["embed_dim"] ** 2 + 2 * (args.head_hidden ** 2 + args.n_prototypes * 384)
    ng, nl = (args.global_size // args.patch_size) ** 2, (args.local_size // args.patch_size) ** 2
    tokens = 2 * ng + args.n_local_crops * nl
    rows = 2 * (2 + args.n_local_crops) + 4 * args.mask_prob * sum(args.mask_ratio) / 2 * ng
    per_image = 4 * (24 * tokens * a["depth"] * a["embed_dim"] + 4 * rows * args.n_prototypes)
    return 20 * n_params + args.batch_size * per_image


def available_bytes():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def bench_step(argv):
    """A training step on a synthetic batch, timed from the outside: the batch's move to the device (and colour
    ops with --gpu-augment), the forward pass (teacher, student, losses: train.compute_losses), the whole
    train.train_step; backward + optimizer + EMA is the difference. Reports images/s, MFU and peak memory."""

    def own(p):
        p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
        p.add_argument("--iters", type=int, default=5, help="timed steps (the median is reported)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--peak-tflops", type=float, default=None, help="for MFU on devices not in PEAK_TFLOPS")
    o, args = train_args(argv, "step", own, "vits")
    if o.threads:
        torch.set_num_threads(o.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        if "--batch-size" not in argv:
            args.batch_size = 4  # the presets' batches are for GPUs
        need, have = step_bytes_estimate(args), available_bytes()
        if need > 0.8 * have:
            sys.exit(f"a step at batch {args.batch_size} needs roughly {need / 2**30:.1f} GiB, and this machine has "
                     f"{have / 2**30:.1f} GiB available: lower --batch-size or --n-prototypes")
    st = train.build_state(args, device)
    B, cfg = args.batch_size, augment.AugmentConfig()
    batch = synthetic_batch(args, B, cfg)
    times = {"data_to_device_and_colour": [], "forward": [], "step": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for it in range(o.warmup + o.iters):
        sync(device)
        t0 = time.perf_counter()
        b = train.prepare_batch(batch, args, device, cfg)
        sync(device)
        t1 = time.perf_counter()
        with autocast(args.device, args.dtype):
            out = train.compute_losses(st.student_ddp, st.teacher, b, train.schedules(1000, args, 1), args,
                                       st.centers)
        sync(device)
        t2 = time.perf_counter()
        del out
        st.step = 1000  # the schedules' values do not change the cost
        train.train_step(st, b, args)
        sync(device)
        if it >= o.warmup:
            for k, v in (("data_to_device_and_colour", t1 - t0), ("forward", t2 - t1),
                         ("step", time.perf_counter() - t2)):
                times[k].append(v)
    med = {k: float(np.median(v)) for k, v in times.items()}
    step = med["step"]
    flops = train_flops_per_image(args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = o.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops * B / step / 1e12
    result = {"device": name, "arch": args.arch, "ffn": args.ffn, "batch_per_device": B, "prototypes":
              args.n_prototypes, "compile": args.compile, "recompute": args.recompute, "dtype": args.dtype,
              "s_per_step": round(step, 4), "images_per_s": round(B / step, 2),
              "phases_s": {"data_to_device_and_colour": round(med["data_to_device_and_colour"], 4),
                           "forward": round(med["forward"], 4),
                           "backward_optimizer_ema": round(step - med["forward"], 4)},
              "tflop_per_image": round(flops / 1e12, 4), "achieved_tflops": round(achieved, 2),
              "mfu": round(achieved / peak, 4) if peak else None,
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
              "peak_rss_mib": round(peak_rss_mib())}
    print(json.dumps(result))
    return result


def bench_memory(argv):
    """Device memory of a training step at the preset's batch, predicted on a CPU. The fixed part is counted:
    fp32 student weights, gradients (DDP's buckets) and AdamW's two moments (a 1/world share with --zero 1),
    and the fp32 teacher. The activations that autograd holds once the forward pass is done (the step's peak,
    before the backward pass frees them) are measured at two small batches under bf16 autocast, with the
    selective recompute the GPU default uses, and extrapolated linearly. The CUDA context, NCCL buffers,
    allocator fragmentation and the backward pass's first gradient buffers (~2 x masked tokens x K x 4 bytes,
    ~3.5 GB in the recipe) come on top."""

    def own_flags(p):
        p.add_argument("--measure-batches", type=prepare_patches.bounded(int, 2), nargs=2, default=(5, 10),
                       help="two batches (>= 2: the KDE term needs two images); multiples of 5 keep drop path "
                       "0.4's kept fraction (0.6) exact")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--world-size", type=int, default=8, help="GPUs that share AdamW's moments with --zero 1")
    argv = argv if "--recompute" in argv else ["--recompute", "selective", *argv]
    own, args = train_args(argv + ["--device", "cpu", "--dtype", "bfloat16", "--compile", "0"], "memory", own_flags,
                           "openmidnight")
    student, teacher = train.build_models(args)
    student.train()
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    del teacher  # the student stands in for it below (same outputs' sizes), which halves the host memory needed
    shards = own.world_size if args.zero else 1  # ZeRO-1 keeps 1/world of AdamW's moments on each rank
    fixed = 4 * (2 * n_student + 2 * n_student / shards + n_teacher)  # bytes: weights, grads, 2 moments; teacher
    held, sched = {}, train.schedules(1000, args, 1)
    for B in own.measure_batches:
        batch = synthetic_batch(args, B, augment.AugmentConfig())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                terms, _ = train.compute_losses(student, student, batch, sched, args, None)
            loss = sum(terms.values())
        # net bytes still allocated: the raw '[memory]' records sum to what prof.events() reports, without the
        # seconds it spends building the op tree
        held[B] = sum(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        del loss, terms
    (b1, h1), (b2, h2) = held.items()
    per_image = (h2 - h1) / (b2 - b1)
    B = args.batch_size
    gib = 2 ** 30
    out = {"arch": args.arch, "ffn": args.ffn, "prototypes": args.n_prototypes, "recompute": args.recompute,
           "zero_world_size": shards, "batch_per_device": B, "fixed_gib": fixed / gib,
           "activations_gib_per_image": per_image / gib,
           "activations_gib_constant": (h1 - b1 * per_image) / gib,
           "predicted_gib": (fixed + h1 + (B - b1) * per_image) / gib}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
    return out


def sample_patches(n, seed=0):
    """The anchors' benchmark input: 224 px level-0 tiles of the sample slide with >= 60% tissue."""
    slide = openslide.OpenSlide(prepare_patches.SAMPLE_SLIDE)
    W, H = slide.dimensions
    tiles = []
    for y in range(0, H - 223, 224):
        for x in range(0, W - 223, 224):
            tile = slide.read_region((x, y), 0, (224, 224)).convert("RGB")
            if (np.asarray(tile).min(axis=2) < 200).mean() >= 0.6:
                tiles.append(tile)
    return tiles[:n]


def bench_aug(argv):
    """CPU time per training sample of the augmentation in a loader worker: the whole pipeline (augment.multicrop,
    CPU training) and its first half alone (augment.multicrop_uint8, when the colour ops run on the device)."""
    p = argparse.ArgumentParser(prog="bench.py aug", description=bench_aug.__doc__)
    p.add_argument("--patches", type=int, default=41, help="224 px tissue tiles of the bundled slide")
    p.add_argument("--passes", type=int, default=5, help="timed passes over them (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="loader workers run 1 thread each")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tiles = sample_patches(a.patches)
    g = torch.Generator().manual_seed(0)
    out = {"patches": len(tiles), "threads": a.threads}
    for name, fn in (("path_a_ms_per_sample", augment.multicrop), ("path_b_cpu_ms_per_sample",
                                                                    augment.multicrop_uint8)):
        for t in tiles[:5]:
            fn(t, g)
        passes = []
        for _ in range(a.passes):
            t0 = time.process_time()  # CPU time of this process: what a loader worker costs
            for t in tiles:
                fn(t, g)
            passes.append((time.process_time() - t0) / len(tiles) * 1000)
        ms = float(np.median(passes))
        out[name] = round(ms, 2)
        out[name.replace("ms_per_sample", "samples_per_s_per_core")] = round(1000 / ms, 1)
    print(json.dumps(out))
    return out


def bench_data(argv):
    """prepare_patches.py on the bundled slide (a whole process, start-up included), then the loader's decode and
    crop rates per worker."""
    p = argparse.ArgumentParser(prog="bench.py data", description=bench_data.__doc__)
    p.add_argument("--patches-per-level", type=int, default=1000, help="patches prepare_patches.py writes")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        # a whole process, start-up included, as the anchors' figure (~250 accepted positions/s per core)
        cmd = [sys.executable, os.path.join(HERE, "prepare_patches.py"), "--out", tmp, "--no-qc",
               "--patches-per-level", str(a.patches_per_level)]
        t0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, capture_output=True)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter() - t0
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        store = data.PatchStore(tmp)
        n = len(store)
        torch.set_num_threads(1)
        t0 = time.process_time()
        for i in range(n):
            store[i]
        decode = n / (time.process_time() - t0)
        ds = data.MultiCropDataset(store, on_device=True)
        t0 = time.process_time()
        for i in range(min(n, 200)):
            ds[(0, i, i)]
        sample_b = min(n, 200) / (time.process_time() - t0)
    out = {"prepare_patches_written": n, "prepare_wall_s": round(wall, 2), "prepare_cpu_s": round(cpu, 2),
           "patches_per_s_per_core": round(n / cpu, 1), "decoded_patches_per_s_per_worker": round(decode, 1),
           "decoded_and_cropped_samples_per_s_per_worker (path b)": round(sample_b, 1)}
    print(json.dumps(out))
    return out


def bench_forward(argv):
    """A backbone's forward pass on 2 global + 8 local crops per image: one list call against two calls."""
    p = argparse.ArgumentParser(prog="bench.py forward", description=bench_forward.__doc__)
    p.add_argument("--arch", default="vit_small", help="DINOv2 size")
    p.add_argument("--batch-size", type=int, default=8, help="images (x 2 global + 8 local crops)")
    p.add_argument("--iters", type=int, default=5, help="timed calls (the median is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    a = p.parse_args(argv)
    m = ViT(a.arch, img_size=224, ffn="swiglu" if a.arch == "vit_giant2" else "mlp").to(a.device).eval()
    g = torch.randn(2 * a.batch_size, 3, 224, 224, device=a.device)
    loc = torch.randn(8 * a.batch_size, 3, 98, 98, device=a.device)
    out = {}
    for name, fn in (("list_call_s", lambda: m.forward_features([g, loc])),
                     ("two_calls_s", lambda: (m.forward_features(g), m.forward_features(loc)))):
        with torch.no_grad(), autocast(a.device, "bfloat16" if a.device == "cuda" else "float32"):
            fn()
            ts = []
            for _ in range(a.iters):
                sync(a.device)
                t0 = time.perf_counter()
                fn()
                sync(a.device)
                ts.append(time.perf_counter() - t0)
        out[name] = round(float(np.median(ts)), 4)
    print(json.dumps({"arch": a.arch, "batch": a.batch_size, **out}))
    return out


def bench_slide(argv):
    """slide_reader.py's patch reader on the sample slide, in patches/s. Per core (this process's CPU time), given
    the slide's plan (eva's sampler, the same for all and once per slide, timed apart): our reader as SlideReader
    runs it (JPEG tiles decoded here, each once, checked against OpenSlide on the first patch, patches in raster
    order, the normalisation in place per batch), our reader through OpenSlide alone (--openslide-only: the path
    of slides not stored as JPEG tiles), and eva's path (openslide-python's read_region and np.array per patch in
    the sampler's shuffled order, the same resize and normalisation, the collate). Twice: with the whole (small)
    slide's tiles decoded in OpenSlide's cache, and as on a real slide, which is far larger than any cache (a 0.25
    um/px Camelyon16 slide decodes to tens of GB): each pass opens the slide afresh with the same cache of two rows
    of tiles for all readers. On the wall clock, from the first batch on: a ViT-S embedding the patches on the CPU
    with the reader in one worker process, and the ViT-S alone on the same batches."""
    p = argparse.ArgumentParser(prog="bench.py slide", description=bench_slide.__doc__)
    p.add_argument("--mpp", type=float, default=0.513,
                   help="0.513 on the 0.499-mpp sample reads 230 px resized to 224, as Camelyon16 at 0.25 mpp")
    p.add_argument("--max-patches", type=int, default=1000, help="patches per slide (eva's Camelyon16-small)")
    p.add_argument("--passes", type=int, default=20, help="reader passes over the slide's patches")
    p.add_argument("--model-passes", type=int, default=4, help="slide passes of the ViT-S runs")
    p.add_argument("--batch-size", type=int, default=32, help="patches per batch")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads of the ViT-S (the reader worker uses one more core)")
    a = p.parse_args(argv)
    path, norm = prepare_patches.SAMPLE_SLIDE, augment.NORMS["imagenet"]
    torch.set_num_threads(1)
    slide = openslide.OpenSlide(path)
    t0 = time.process_time()
    plan = slide_reader.plan_slide(slide, a.mpp, 224, a.max_patches)
    tile = int(slide.properties.get("openslide.level[0].tile-width", 240))
    two_rows = 2 * -(-slide.level_dimensions[plan["level"]][0] // tile) * tile * tile * 4  # bytes of decoded tiles
    out = {"patches_per_pass": len(plan["coords"]), "read_size": plan["read_size"], "cold_cache_bytes": two_rows,
           "plan_cpu_s_per_slide": round(time.process_time() - t0, 3)}

    def ours(s, tiles):  # opened (and checked) per pass when cold, kept with its decoded tiles when warm
        tiles = tiles or slide_reader.open_tiles(path, s, plan, cache_bytes=two_rows)
        for _ in slide_reader.read_patches(s, plan, a.batch_size, 224, norm, tiles):
            pass

    def ours_openslide(s, tiles):
        for _ in slide_reader.read_patches(s, plan, a.batch_size, 224, norm):
            pass

    def eva(s, tiles):  # eva's WsiDataset item: read_region, np.array, alpha -> white, to_image, ResizeAndCrop; collate
        batch, size = [], plan["read_size"]
        for x, y in plan["coords"]:
            rgba = np.array(s.read_region((int(x), int(y)), plan["level"], (size, size)))
            rgba[rgba[..., 3] == 0] = 255
            t, _ = eval_probe.resize_and_crop(torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).contiguous(), 224)
            batch.append(augment.normalize(t.float().mul_(1.0 / 255), *norm))
            if len(batch) == a.batch_size:
                torch.stack(batch)
                batch = []

    def cold():
        s = openslide.OpenSlide(path)
        s.set_cache(openslide.OpenSlideCache(two_rows))
        return s, None

    readers = (("ours", ours), ("ours_openslide", ours_openslide), ("eva", eva))
    warm = slide, slide_reader.open_tiles(path, slide, plan)
    for cache, handle in (("warm", lambda: warm), ("cold", cold)):
        seconds = dict.fromkeys(dict(readers), 0.0)
        for name, fn in readers:
            fn(*handle())  # warm-up
        for _ in range(a.passes):  # the readers in turn, so that this machine's drifts hit them alike
            for name, fn in readers:
                s = handle()
                t0 = time.process_time()
                fn(*s)
                seconds[name] += time.process_time() - t0
        for name in seconds:
            out[f"reader_{name}_{cache}_patches_per_s_per_core"] = round(a.passes * len(plan["coords"]) /
                                                                         seconds[name], 1)
        for name in ("ours", "ours_openslide"):
            out[f"reader_speedup_{name}_{cache}"] = round(seconds["eva"] / seconds[name], 2)
    torch.set_num_threads(a.threads)
    vit = ViT("vit_small", img_size=224, num_register_tokens=0).eval()
    eval_probe.embed(vit, torch.randn(2, 3, 224, 224))
    reader = slide_reader.SlideReader([(k, path) for k in range(a.model_passes)], a.mpp, 224, a.max_patches,
                                    a.batch_size, norm)
    sizes, t0 = [], None
    for it in torch.utils.data.DataLoader(reader, batch_size=None, num_workers=1, prefetch_factor=4):
        if "x" in it:
            eval_probe.embed(vit, it["x"])
            t0 = t0 or time.perf_counter()  # from the end of the first batch: the worker's start-up not counted
            sizes.append(len(it["x"]))
    both = time.perf_counter() - t0
    x = torch.randn(a.batch_size, 3, 224, 224)
    t0 = time.perf_counter()
    for k in sizes[1:]:
        eval_probe.embed(vit, x[:k])
    alone = time.perf_counter() - t0
    out.update({"threads": a.threads, "reader_plus_vits_patches_per_s": round(sum(sizes[1:]) / both, 1),
                "vits_alone_patches_per_s": round(sum(sizes[1:]) / alone, 1),
                "reader_overhead": round(both / alone - 1, 3)})
    print(json.dumps(out))
    return out


def main(argv):
    benches = {"step": bench_step, "aug": bench_aug, "data": bench_data, "forward": bench_forward,
               "memory": bench_memory, "slide": bench_slide, "store": bench_store.bench_store,
               "chain": bench_store.bench_chain}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    if argv[0] not in benches:
        sys.exit(f"unknown benchmark {argv[0]!r}; choose one of {', '.join(benches)} (python bench.py --help)")
    benches[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
