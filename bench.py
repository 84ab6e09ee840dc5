"""
Benchmarks, nanoGPT-style: each prints what it measured; nothing here is a test.

    python bench.py step  [--preset vits] [--batch-size 4] [train.py flags...]   # a training step, phase by phase
    python bench.py aug   [--patches 40]                  # CPU cost per sample of path (a) and of path (b)'s CPU part
    python bench.py data  [--patches-per-level 1000]      # prepare_patches rate, decoded samples/s per worker
    python bench.py forward [--arch vit_small]            # 2 global + 8 local crops: one list call vs two calls
    python bench.py memory [--preset openmidnight]        # a step's device memory, predicted on a CPU

On an H100/H200: python bench.py step --preset openmidnight --batch-size 48 (random weights time the same as
--init's; `python bench.py memory` predicts its memory on any machine; add --recompute full if it does not fit).
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
    the teacher forward on the 2 global crops, and the DINO/iBOT heads (10 CLS tokens, the masked patch tokens:
    expected 2 crops x mask_prob x mean ratio x grid^2 per image)."""
    from model import ARCHS, swiglu_hidden
    a = ARCHS[args.arch]
    D, depth = a["embed_dim"], a["depth"]
    h = swiglu_hidden(D) if args.ffn == "swiglu" else 4 * D
    ng, nl = (args.global_size // 14) ** 2, (args.local_size // 14) ** 2
    extra = 1 + args.registers
    B = args.batch_size

    def keep(b):  # fraction of samples whose residual branches run, DINOv2's int(b (1 - p)) rule
        return max(int(b * (1 - args.drop_path)), 1) / b if args.drop_path > 0 else 1.0

    g_fwd = vit_forward_flops(ng + extra, D, depth, h, args.ffn, ng)
    passes = 4 if args.recompute == "full" else 3  # backward = 2 forwards; full recompute reruns the forward
    student = passes * (2 * vit_forward_flops(ng + extra, D, depth, h, args.ffn, ng, keep=keep(2 * B)) +
                        args.n_local_crops * vit_forward_flops(nl + extra, D, depth, h, args.ffn, nl,
                                                               keep=keep(args.n_local_crops * B)))
    hf = head_flops(D, args.head_hidden, args.head_bottleneck, args.n_prototypes)
    masked = 2 * args.mask_prob * sum(args.mask_ratio) / 2 * ng
    heads = 3 * hf * (2 + args.n_local_crops + masked) + hf * (2 + masked)
    return student + 2 * g_fwd + heads


# -----------------------------------------------------------------------------
# benchmarks


def synthetic_batch(args, B, cfg):
    """A batch as the loader gives it (random pixels, real iBOT masks); uint8 crops plus colour parameters when
    the colour ops run on the device."""
    import augment
    g = torch.Generator().manual_seed(0)
    masks = augment.sample_masks(2 * B, args.global_size // 14, tuple(args.mask_ratio), args.mask_prob, g)
    batch = {"global_crops": torch.randn(2 * B, 3, args.global_size, args.global_size, generator=g),
             "local_crops": torch.randn(args.n_local_crops * B, 3, args.local_size, args.local_size, generator=g),
             **augment.mask_targets(masks)}
    if args.gpu_augment:
        batch["global_crops"] = torch.randint(0, 256, batch["global_crops"].shape, dtype=torch.uint8, generator=g)
        batch["local_crops"] = torch.randint(0, 256, batch["local_crops"].shape, dtype=torch.uint8, generator=g)
        batch["global_params"] = augment.draw_color_params(2 * B, 0.45, cfg, g)
        batch["local_params"] = augment.draw_color_params(args.n_local_crops * B, 0.5, cfg, g)
    return batch


def bench_step(argv):
    import augment
    import train
    p = argparse.ArgumentParser()
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU on devices not in PEAK_TFLOPS")
    own, rest = p.parse_known_args(argv)
    if own.threads:
        torch.set_num_threads(own.threads)
    args = train.parse_args(rest if "--preset" in rest else ["--preset", "vits", *rest], need_paths=False)
    device = torch.device(args.device)
    state = train.build_state(args, device)
    B, cfg = args.batch_size, augment.AugmentConfig()
    batch = synthetic_batch(args, B, cfg)
    times = {}
    last = [0.0]

    def mark(phase):
        sync(device)
        now = time.perf_counter()
        times.setdefault(phase, []).append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for it in range(own.warmup + own.iters):
        if it == own.warmup:
            times.clear()
        sync(device)
        last[0] = t0 = time.perf_counter()
        b = train.prepare_batch(batch, args, device, cfg)
        mark("data_to_device_and_colour")
        train.train_step(state, b, 1000, args, mark)
        times.setdefault("step", []).append(time.perf_counter() - t0)
    step = float(np.median(times["step"]))
    flops = train_flops_per_image(args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = own.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    achieved = flops * B / step / 1e12
    result = {"device": name, "arch": args.arch, "ffn": args.ffn, "batch_per_device": B, "prototypes":
              args.n_prototypes, "compile": args.compile, "recompute": args.recompute, "dtype": args.dtype,
              "s_per_step": round(step, 4),
              "images_per_s": round(B / step, 2), "phases_s": {k: round(float(np.median(v)), 4) for k, v in
                                                                times.items() if k != "step"},
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
    import augment
    import train
    from torch.profiler import ProfilerActivity, profile
    p = argparse.ArgumentParser()
    p.add_argument("--measure-batches", type=int, nargs=2, default=(5, 10),
                   help="multiples of 5 keep drop path 0.4's kept fraction (0.6) exact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--world-size", type=int, default=8, help="GPUs that share AdamW's moments with --zero 1")
    own, rest = p.parse_known_args(argv)
    if own.threads:
        torch.set_num_threads(own.threads)
    rest = rest if "--preset" in rest else ["--preset", "openmidnight", *rest]
    rest = rest if "--recompute" in rest else ["--recompute", "selective", *rest]
    args = train.parse_args(rest + ["--device", "cpu", "--dtype", "bfloat16", "--compile", "0"], need_paths=False)
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
        held[B] = sum(e.self_cpu_memory_usage for e in prof.events())  # net bytes still allocated
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
    import openslide
    import prepare_patches
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
    import augment
    p = argparse.ArgumentParser()
    p.add_argument("--patches", type=int, default=41)
    p.add_argument("--passes", type=int, default=5)
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
    import data
    p = argparse.ArgumentParser()
    p.add_argument("--patches-per-level", type=int, default=1000)
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
    from model import ViT
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    m = ViT(a.arch, img_size=224, ffn="swiglu" if a.arch == "vit_giant2" else "mlp").to(a.device).eval()
    g = torch.randn(2 * a.batch_size, 3, 224, 224, device=a.device)
    loc = torch.randn(8 * a.batch_size, 3, 98, 98, device=a.device)
    out = {}
    autocast = torch.autocast(a.device, dtype=torch.bfloat16, enabled=a.device == "cuda")
    for name, fn in (("list_call_s", lambda: m.forward_features([g, loc])),
                     ("two_calls_s", lambda: (m.forward_features(g), m.forward_features(loc)))):
        with torch.no_grad(), autocast:
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


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "step"
    benches = {"step": bench_step, "aug": bench_aug, "data": bench_data, "forward": bench_forward,
               "memory": bench_memory}
    if which not in benches:
        sys.exit(f"usage: python bench.py {{{','.join(benches)}}} [flags]")
    benches[which](sys.argv[2:])
