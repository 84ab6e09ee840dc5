"""
Mutation check of the test suite: apply single-line breaks of the recipe, one at a time, to a temporary copy of the
project, run the tests that should notice, and report the breaks that no test catches. Not part of the default
test run (pytest collects test_*.py only).

    python tests/mutate.py              # every break; exit status 1 if any survives
    python tests/mutate.py --list       # the breaks, by hot spot
    python tests/mutate.py --only sinkhorn ema   # breaks whose name contains one of these words

A break is (name, file, exact text, replacement, test files). It is caught when pytest fails on the copy, and
survives when those tests pass; a replacement that does not compile, or text that is not found, is reported as a
broken break (the list is out of date), never as caught.
"""
import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCIENCE, LOSS, AUG, TRAIN, MODEL, DATA, SAFETY = (f"tests/test_{n}.py" for n in (
    "recipe_science", "loss", "augment", "train", "model", "data", "run_safety"))

BREAKS = [
    # -- loss assembly (train.py compute_losses) ------------------------------------------------------------------
    ("loss: DINO global term not doubled", "train.py", '[q_dino], args.student_temp) * 2 / n_terms',
     '[q_dino], args.student_temp) / n_terms', [SCIENCE]),
    ("loss: DINO pairs counted without the global pair", "train.py", "n_terms = 2 * args.n_local_crops + 2",
     "n_terms = 2 * args.n_local_crops", [SCIENCE]),
    ("loss: teacher views not swapped", "train.py", 't["dino_global"].chunk(2)[::-1]', 't["dino_global"].chunk(2)',
     [SCIENCE]),
    ("loss: iBOT divided by masked crops only", "train.py", 'batch["masks_weight"], g.shape[0],',
     'batch["masks_weight"], g.shape[0] // 2,', [SCIENCE]),
    ("loss: KDE weight ignored", "train.py", 'terms["kde"] = args.kde_weight * sum(', 'terms["kde"] = sum(',
     [SCIENCE]),
    ("loss: KDE on one view", "train.py", 'views = s["global_cls"].chunk(2)', 'views = s["global_cls"].chunk(2)[:1]',
     [SCIENCE]),
    ("loss: student temperature ignored in DINO", "loss.py", "lsm = F.log_softmax(s.float() / student_temp, dim=-1)",
     "lsm = F.log_softmax(s.float(), dim=-1)", [SCIENCE, LOSS]),
    ("loss: iBOT token weights dropped", "loss.py", "return -(per_token * masks_weight.float()).sum() / n_images",
     "return -per_token.sum() / n_images", [SCIENCE, LOSS]),
    ("loss: KDE sign of the spread variant", "loss.py",
     "return (torch.logsumexp(logits, dim=1) - math.log(B - 1)).mean()",
     "return -(torch.logsumexp(logits, dim=1) - math.log(B - 1)).mean()", [SCIENCE, LOSS]),
    ("loss: KDE self term kept in the spread variant", "loss.py",
     'logits = logits.masked_fill(torch.eye(B, dtype=torch.bool, device=x.device), -float("inf"))',
     "logits = logits", [SCIENCE, LOSS]),
    # -- Sinkhorn-Knopp ---------------------------------------------------------------------------------------------
    ("sinkhorn: one iteration", "loss.py", "def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):",
     "def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=1):", [LOSS, SCIENCE]),
    ("sinkhorn: no prototype normalisation", "loss.py",
     "Q /= _all_reduce(Q.sum(dim=0)).clamp_min(1e-30)", "Q = Q", [LOSS, SCIENCE]),
    ("sinkhorn: prototype sums not all-reduced", "loss.py",
     "Q /= _all_reduce(Q.sum(dim=0)).clamp_min(1e-30)", "Q /= Q.sum(dim=0).clamp_min(1e-30)", [LOSS]),
    ("sinkhorn: teacher temperature ignored", "loss.py", ".div_(teacher_temp).exp_()", ".exp_()", [LOSS, SCIENCE]),
    ("sinkhorn: rows not normalised last", "loss.py", "Q /= Q.sum(dim=1, keepdim=True).clamp_min(1e-30)",
     "Q = Q", [LOSS, SCIENCE]),
    # -- iBOT masks -------------------------------------------------------------------------------------------------
    ("masks: every crop masked", "augment.py", "n_masked = int(n_crops * sample_prob)", "n_masked = n_crops", [AUG]),
    ("masks: ratio bins not stratified", "augment.py",
     "block_mask(int(N * _uniform(generator, bins[i], bins[i + 1])), grid, generator=generator)",
     "block_mask(int(N * _uniform(generator, bins[0], bins[-1])), grid, generator=generator)", [AUG]),
    ("masks: masked crops not shuffled", "augment.py", "order = torch.randperm(n_crops, generator=generator).tolist()",
     "order = list(range(n_crops))", [AUG]),
    ("masks: min aspect", "augment.py", "min_aspect=0.3, generator=None):", "min_aspect=0.1, generator=None):",
     [AUG]),
    ("masks: token weights uniform", "augment.py",
     '"masks_weight": (1.0 / counts.clamp(min=1))', '"masks_weight": (1.0 + 0 * counts.clamp(min=1))',
     [AUG, SCIENCE]),
    ("model: pos-embed not added", "model.py",
     "x = x + self.interpolate_pos_encoding(x, H, W)", "x = x + 0 * self.interpolate_pos_encoding(x, H, W)", [MODEL]),
    # -- colour ops -------------------------------------------------------------------------------------------------
    ("colour: HED jitter removed", "augment.py",
     'x = _apply_on(x, params["hed_apply"], hed_jitter, params["hed_offsets"])', "x = x", [SCIENCE]),
    ("colour: jitter order ignored", "augment.py",
     'sel = params["jitter_apply"] & (params["jitter_order"][:, slot] == op_id)',
     'sel = params["jitter_apply"] & (slot == op_id)', [SCIENCE]),
    ("colour: blur removed", "augment.py", 'return _apply_on(x, params["blur_apply"], lambda t, s: gaussian_blur(',
     'return _apply_on(x, params["blur_apply"] & False, lambda t, s: gaussian_blur(', [SCIENCE]),
    ("colour: nominal (inverted) blur probabilities", "augment.py", "blur_probs: tuple = (0.0, 0.9, 0.5)",
     "blur_probs: tuple = (1.0, 0.1, 0.5)", [SCIENCE, AUG]),
    ("colour: HED range doubled", "augment.py", "hed_range: float = 0.05", "hed_range: float = 0.1", [SCIENCE]),
    ("colour: grayscale never", "augment.py", 'x = torch.where(params["gray"][:, None, None, None]',
     'x = torch.where(params["gray"][:, None, None, None] & False', [SCIENCE]),
    ("colour: saturation range of brightness", "augment.py",
     "_uniform(g, 1 - cfg.saturation, 1 + cfg.saturation, n=n)",
     "_uniform(g, 1 - cfg.brightness, 1 + cfg.brightness, n=n)", [SCIENCE]),
    ("colour: hue shift sign", "augment.py", "h = h + 6.0 * shift.to(x.dtype)[:, None, None]",
     "h = h - 6.0 * shift.to(x.dtype)[:, None, None]", [SCIENCE, AUG]),
    ("colour: jitter probability", "augment.py", "jitter_prob: float = 0.8", "jitter_prob: float = 1.0", [SCIENCE]),
    ("colour: HED offsets shared by the stains", "augment.py",
     '"hed_offsets": _uniform(g, -cfg.hed_range, cfg.hed_range, n=(n, 3)).float(),',
     '"hed_offsets": _uniform(g, -cfg.hed_range, cfg.hed_range, n=(n, 1)).expand(n, 3).float(),', [SCIENCE]),
    ("colour: local crop scale", "augment.py", "local_scale: tuple = (0.05, 0.32)", "local_scale: tuple = (0.05, 0.4)",
     [SCIENCE]),
    # -- schedules --------------------------------------------------------------------------------------------------
    ("schedule: linear lr scaling", "train.py", "lr = args.base_lr * math.sqrt(args.batch_size * world_size / 1024)",
     "lr = args.base_lr * args.batch_size * world_size / 1024", [TRAIN]),
    ("schedule: warmup endpoint", "train.py", "return base * step / max(warmup - 1, 1)",
     "return base * step / max(warmup, 1)", [TRAIN]),
    ("schedule: no last-layer freeze", "train.py",
     '"last_layer_lr": lr_now if step >= args.freeze_last_layer_steps else 0.0,', '"last_layer_lr": lr_now,', [TRAIN]),
    ("schedule: teacher temperature warmup skipped", "train.py", "if step < args.teacher_temp_warmup_steps else",
     "if step < 0 else", [TRAIN]),
    ("schedule: weight decay constant", "train.py",
     '"wd": cosine_schedule(step, args.weight_decay, args.weight_decay_end, args.schedule_steps),',
     '"wd": args.weight_decay,', [TRAIN]),
    ("schedule: momentum to 0.999", "train.py",
     '"momentum": cosine_schedule(step, args.momentum_teacher, 1.0, args.schedule_steps),',
     '"momentum": cosine_schedule(step, args.momentum_teacher, 0.999, args.schedule_steps),', [TRAIN]),
    ("preset: iBOT bottleneck 384", "train.py", 'default=256,\n                   help="iBOT head bottleneck',
     'default=384,\n                   help="iBOT head bottleneck', [SCIENCE]),
    ("preset: KDE weight", "train.py", '"--kde-weight", type=bounded(float, 0.0), default=0.05',
     '"--kde-weight", type=bounded(float, 0.0), default=0.01', [SCIENCE]),
    # -- EMA --------------------------------------------------------------------------------------------------------
    ("ema: momentum and its complement swapped", "train.py",
     "torch._foreach_mul_(t, m)\n    torch._foreach_add_(t, s, alpha=1 - m)",
     "torch._foreach_mul_(t, 1 - m)\n    torch._foreach_add_(t, s, alpha=m)", [TRAIN]),
    ("ema: teacher never updated", "train.py", 'ema_update(st.teacher, st.student, sched["momentum"])', "pass",
     [TRAIN]),
    # -- parameter groups -------------------------------------------------------------------------------------------
    ("groups: LayerScale decays", "train.py", 'or "norm" in name or "gamma" in name else 1.0',
     'or "norm" in name else 1.0', [TRAIN]),
    ("groups: patch-embed lr multiplier dropped", "train.py", '(args.patch_embed_lr_mult if "patch_embed" in name',
     '(1.0 if "patch_embed" in name', [TRAIN]),
    ("groups: prototypes not in the last-layer group", "train.py", 'key = (lr_mult, wd_mult, "last_layer" in name)',
     'key = (lr_mult, wd_mult, False)', [TRAIN]),
    ("groups: gradient clip ignored", "train.py",
     'norms = {f"grad_norm_{name}": nn.utils.clip_grad_norm_(getattr(st.student, name).parameters(), args.clip_grad)',
     'norms = {f"grad_norm_{name}": nn.utils.clip_grad_norm_(getattr(st.student, name).parameters(), 1e9)', [TRAIN]),
    # -- drop path --------------------------------------------------------------------------------------------------
    ("drop path: residual not rescaled", "model.py", "residual.flatten(1).to(x.dtype), alpha=b / subset)",
     "residual.flatten(1).to(x.dtype), alpha=1.0)", [MODEL]),
    ("drop path: only above 0.1", "model.py", "if self.training and self.drop_path_rate > 0:",
     "if self.training and self.drop_path_rate > 0.1:", [MODEL]),
    # -- checkpoint resume ------------------------------------------------------------------------------------------
    ("resume: optimizer state not restored", "rundir.py", 'st.opt.load_state_dict(ckpt["optimizer"])', "pass",
     [TRAIN]),
    ("resume: RNG not restored", "rundir.py", 'torch.set_rng_state(rng["cpu"])', "pass", [TRAIN]),
    ("resume: every rank takes rank 0's RNG", "rundir.py", "rng = rngs[rank] if rank < len(rngs) else rngs[0]",
     "rng = rngs[0]", [SAFETY]),
    ("resume: checkpoint.pt left on an older step", "rundir.py", 'if os.path.basename(path) != "checkpoint.pt":',
     "if False:", [SAFETY]),
    ("resume: data order restarts", "train.py", "rank, world, st.step * args.batch_size,", "rank, world, 0,",
     [TRAIN]),
    ("resume: teacher not restored", "rundir.py", 'st.teacher.load_state_dict(ckpt["teacher"])', "pass", [TRAIN]),
    ("resume: oldest checkpoint first", "rundir.py",
     'numbered = sorted(glob.glob(os.path.join(out, "checkpoint-*.pt")), reverse=True)',
     'numbered = sorted(glob.glob(os.path.join(out, "checkpoint-*.pt")))', [SAFETY]),
    ("checkpoint: pruned before the new one is in place", "rundir.py",
     "save_or_stop(ckpt, path, size, st.step)", "[os.remove(f) for f in checkpoint_files(args.out)]\n"
     "    save_or_stop(ckpt, path, size, st.step)", [SAFETY]),
    ("checkpoint: written before the step's export", "train.py",
     "            if master and (st.step % args.export_every == 0 or st.step == args.steps):\n",
     "            if master and (st.step % args.export_every == 0 or st.step == args.steps) and "
     "st.step % args.checkpoint_every:\n", [SAFETY]),
    ("resume: schedules changed silently", "rundir.py", "    if not changed or args.change_schedules:\n        return",
     "    return", [TRAIN]),
    ("health: prototypes counted per step", "train.py", "wins = step_wins if wins is None else wins + step_wins",
     "wins = step_wins", [TRAIN]),
    # -- the store at scale (data.py) ---------------------------------------------------------------------------
    ("store: an index trusted whatever the manifest", "data.py", 'info["manifest_sha1"] == manifest_sha1(root) and',
     "", [DATA]),
    ("store: every shard file kept open", "data.py", "if len(self._files) >= self.MAX_OPEN_SHARDS:", "if False:",
     [DATA]),
    ("loader: one descriptor per tensor in flight", "data.py",
     "return one_storage(batch) if torch.utils.data.get_worker_info() else batch", "return batch", [DATA]),
    ("store: index columns narrowed to 8 bits", "data.py", "cols[k].append(v.astype(smallest_uint(int(v.max()))))",
     "cols[k].append(v.astype(np.uint8))", [DATA]),
    # -- evaluation ------------------------------------------------------------------------------------------------
    ("suite: exits 0 when a task failed", "eval_suite.py", "    if failed:  # the table is written",
     "    if False:  # the table is written", ["tests/test_eval_suite.py"]),
]


def copy_project(dst):
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".md", ".txt")) or name in ("assets",):
            src = os.path.join(ROOT, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(dst, name))
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dst, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "mutate.py"))


def run_break(work, brk, timeout):
    name, path, old, new, tests = brk
    target = os.path.join(work, path)
    with open(target) as f:
        original = f.read()
    if original.count(old) != 1:
        return "broken break (text found %d times)" % original.count(old), 0.0
    with open(target, "w") as f:
        f.write(original.replace(old, new))
    t0 = time.time()
    try:
        py_compile.compile(target, doraise=True)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=work, capture_output=True, text=True, timeout=timeout)
        verdict = "caught" if proc.returncode != 0 else "SURVIVED"
    except py_compile.PyCompileError:
        verdict = "broken break (does not compile)"
    except subprocess.TimeoutExpired:
        verdict = "caught (timeout)"
    finally:
        with open(target, "w") as f:
            f.write(original)
    return verdict, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the breaks and exit")
    p.add_argument("--only", nargs="*", default=None, help="run the breaks whose name contains one of these words")
    p.add_argument("--timeout", type=int, default=900, help="seconds per break")
    args = p.parse_args(argv)
    breaks = [b for b in BREAKS if not args.only or any(w in b[0] for w in args.only)]
    if args.list:
        for b in breaks:
            print(f"{b[0]:55s} {b[1]:10s} -> {' '.join(b[4])}")
        return 0
    survivors, broken = [], []
    with tempfile.TemporaryDirectory() as work:
        copy_project(work)
        for i, brk in enumerate(breaks, 1):
            verdict, seconds = run_break(work, brk, args.timeout)
            print(f"[{i}/{len(breaks)}] {verdict:10s} {seconds:5.0f}s  {brk[0]}", flush=True)
            (survivors if verdict == "SURVIVED" else broken if verdict.startswith("broken") else []).append(brk[0])
    print(f"\n{len(breaks) - len(survivors) - len(broken)} of {len(breaks)} breaks caught; "
          f"{len(survivors)} survived{': ' + '; '.join(survivors) if survivors else ''}"
          f"{'; broken breaks: ' + '; '.join(broken) if broken else ''}")
    return 1 if survivors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
