"""train.py: steps run, schedules, parameter groups, exact resume, DDP equivalence, exports, signals, guards."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import augment
import data
import loss as L
import model as M
import weights as W
import train
from pathlib import Path
from conftest import ROOT, tiny_train_args


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_a_few_steps_run_the_loss_moves_and_the_export_loads(small_store, tmp_path):
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 5))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:  # the logged loss is the optimised one: the sum of the logged terms (rounded to 5 decimals)
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(
            r["dino_local"] + r["dino_global"] + r["ibot"] + r["kde"], abs=3e-5)
    assert rows[0]["last_layer_lr"] == 0 and rows[1]["last_layer_lr"] > 0  # prototypes frozen for 1 step
    for key in ("dino_local", "dino_global", "ibot", "kde", "teacher_entropy", "teacher_kl_uniform", "cls_std",
                "student_entropy", "prototypes_used",
                "grad_norm_backbone", "grad_norm_dino_head", "grad_norm_ibot_head", "skipped_steps", "images_per_s"):
        assert key in rows[-1], key
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 5 and ckpt["args"]["batch_size"] == 4
    export = torch.load(tmp_path / "teacher_backbone.pth", weights_only=True)
    hub_keys = set(M.ViT(embed_dim=128, depth=2, num_heads=2, img_size=56, num_register_tokens=4).state_dict())
    assert set(export) == hub_keys  # the DINOv2 hub layout, nothing else
    m = W.load_backbone(str(tmp_path / "teacher_backbone.pth"))
    teacher = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    assert all(torch.equal(m.state_dict()[k], teacher[k]) for k in hub_keys)
    assert os.path.exists(tmp_path / "exports" / "teacher_backbone_0000003.pth")


def test_schedules_equal_their_formulas_at_key_steps(tmp_path):
    init = tmp_path / "w.pth"
    init.write_bytes(b"")
    cfg = train.parse_args(["--preset", "openmidnight-config", "--data", "x", "--init", str(init)])
    s = lambda step: train.schedules(step, cfg, world_size=8)  # noqa: E731
    lr = 3e-4 * math.sqrt(384 / 1024)
    assert s(0)["lr"] == 0 and s(12_499)["lr"] == pytest.approx(lr) and s(12_500)["lr"] == pytest.approx(lr)
    assert s(6250)["lr"] == pytest.approx(lr * 6250 / 12_499)
    mid = 12_500 + (137_500 - 12_500) / 2
    assert s(int(mid))["lr"] == pytest.approx(1e-6 + 0.5 * (lr - 1e-6), rel=1e-6)
    assert s(137_499)["lr"] == pytest.approx(1e-6, abs=1e-9) and s(200_000)["lr"] == 1e-6
    assert s(68_750)["wd"] == pytest.approx(0.12) and s(68_750)["momentum"] == pytest.approx(0.997)
    assert s(0)["wd"] == pytest.approx(0.04) and s(137_500)["momentum"] == 1.0
    assert s(0)["teacher_temp"] == 0.04 and s(37_499)["teacher_temp"] == pytest.approx(0.07)
    assert s(18_000)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 18_000 / 37_499)
    assert s(1249)["last_layer_lr"] == 0 and s(1250)["last_layer_lr"] == s(1250)["lr"] > 0
    # the released run: schedules stretched over 10M steps -> effectively constant (RECIPE.md §8's table)
    blog = train.parse_args(["--preset", "openmidnight", "--data", "x", "--init", str(init)])
    b = train.schedules(249_999, blog, world_size=8)
    assert b["lr"] == pytest.approx(1.2231e-4, rel=1e-3) and b["wd"] == pytest.approx(0.0402, abs=1e-4)
    assert b["momentum"] == pytest.approx(0.99401, abs=1e-5) and blog.steps == 250_000


def test_parameter_groups_decay_and_lr_multipliers():
    args = train.parse_args(["--preset", "vits", "--data", "x", "--layerwise-decay", "0.9", "--n-prototypes", "32",
                             "--head-hidden", "16", "--dino-head-bottleneck", "8", "--ibot-head-bottleneck", "8"])
    student, _ = train.build_models(args)
    where = {}
    for g in train.param_groups(student, args):
        for name in g["names"]:
            where[name] = g
    no_decay = {n for n, g in where.items() if g["wd_mult"] == 0}
    assert "backbone.blocks.0.norm1.weight" in no_decay and "backbone.blocks.3.attn.qkv.bias" in no_decay
    assert "backbone.blocks.5.ls1.gamma" in no_decay and "backbone.norm.bias" in no_decay
    for decayed in ("backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens", "backbone.mask_token",
                    "backbone.patch_embed.proj.weight", "dino_head.last_layer.weight_g",
                    "ibot_head.last_layer.weight_v", "backbone.blocks.0.attn.qkv.weight"):
        assert where[decayed]["wd_mult"] == 1.0, decayed
    lr = {n: g["lr_mult"] for n, g in where.items()}
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.9 ** 12)
    assert lr["backbone.blocks.11.mlp.fc2.weight"] == pytest.approx(0.9)
    assert lr["backbone.pos_embed"] == pytest.approx(0.9 ** 13)
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.9 ** 13 * 0.2)
    assert lr["backbone.norm.weight"] == 1.0 and lr["dino_head.mlp.0.weight"] == 1.0
    assert {n for n, g in where.items() if g["last_layer"]} == {
        "dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v", "ibot_head.last_layer.weight_g",
        "ibot_head.last_layer.weight_v"}


def test_one_step_clips_each_part_and_moves_the_teacher_by_ema(small_store, tmp_path):
    # after a step: each part's gradient norm is at most --clip-grad, and teacher = m teacher + (1 - m) student
    # with the scheduled momentum, for every parameter (by hand, from copies taken before the step)
    args = train.parse_args(tiny_train_args(small_store, tmp_path, "--clip-grad", 0.01, "--momentum-teacher", 0.9,
                                            "--steps", 100))
    st = train.build_state(args, torch.device("cpu"))
    loader = data.make_loader(data.PatchStore(small_store), args.batch_size, train.augment_config(args), workers=0,
                              patch_size=args.patch_size)
    batch = train.prepare_batch(next(iter(loader)), args, torch.device("cpu"), train.augment_config(args))
    st.step = 5
    teacher_before = [p.clone() for p in st.teacher.parameters()]
    out, sched, finite = train.train_step(st, batch, args)
    assert finite and sched["momentum"] < 1
    for name in ("backbone", "dino_head", "ibot_head"):
        assert out[f"grad_norm_{name}"] > 0.01  # the raw norm, above the clip
        grads = [p.grad for p in getattr(st.student, name).parameters() if p.grad is not None]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 0.01 * (1 + 1e-5)
    m = sched["momentum"]
    for t0, t1, s in zip(teacher_before, st.teacher.parameters(), st.student.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * s, atol=1e-6)
    assert st.step == 6


def test_prototype_usage_is_counted_over_the_logging_window_and_falls_under_collapse(small_store, tmp_path,
                                                                                       monkeypatch):
    # one step has 2 x 4 = 8 teacher crops, so one step's count of winning prototypes is at most 8; over a logging
    # window of 4 steps a teacher whose outputs spread over the 256 prototypes uses far more, and a collapsed one
    # (every crop's argmax on prototype 3) uses 1, with zero entropy
    real_build, g = train.build_models, torch.Generator().manual_seed(0)
    heads = {"spread": lambda x: 5 * torch.randn(len(x), 256, generator=g),
             "collapsed": lambda x: 10 * torch.nn.functional.one_hot(torch.full((len(x),), 3), 256).float()}
    for name, head in heads.items():
        def build(args, head=head):
            student, teacher = real_build(args)
            teacher.dino_head.forward = head  # the teacher's DINO logits, forced
            return student, teacher
        monkeypatch.setattr(train, "build_models", build)
        train.main(tiny_train_args(small_store, tmp_path / name, "--steps", 8, "--log-every", 4))
    spread, collapsed = read_metrics(tmp_path / "spread"), read_metrics(tmp_path / "collapsed")
    assert [r["step"] for r in spread] == [r["step"] for r in collapsed] == [4, 8]
    assert all(r["prototypes_used"] > 20 and r["prototype_entropy"] > math.log(20) for r in spread)
    assert all(r["prototypes_used"] == 1 and r["prototype_entropy"] == 0 for r in collapsed)


def test_stop_at_step_k_and_resume_reproduces_the_uninterrupted_run(small_store, tmp_path):
    train.main(tiny_train_args(small_store, tmp_path / "a", "--steps", 5))
    train.main(tiny_train_args(small_store, tmp_path / "b", "--steps", 2, "--schedule-steps", 5))
    train.main(tiny_train_args(small_store, tmp_path / "b", "--steps", 5))  # resumes at step 2
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], (ra["step"], ra["loss"], rb["loss"])
    ta = torch.load(tmp_path / "a" / "teacher_backbone.pth", weights_only=True)
    tb = torch.load(tmp_path / "b" / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(small_store, tmp_path):
    # 3 steps on 2 processes with ZeRO-1 (AdamW moments sharded), then their consolidated checkpoint resumes in
    # one process with a plain AdamW: 5 steps equal to 5 steps of one process
    common = ["--drop-path", 0, "--kde-weight", 0, "--koleo-weight", 0, "--schedule-steps", 5]
    train.main(tiny_train_args(small_store, tmp_path / "one", "--steps", 5, *common))
    two = tiny_train_args(small_store, tmp_path / "two", "--steps", 3, "--zero", 1, *common)
    two[two.index("--batch-size") + 1] = "2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), *two], check=True, cwd=ROOT, env=env, capture_output=True)
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["step"] == 3
    train.main(tiny_train_args(small_store, tmp_path / "two", "--steps", 5, *common))
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in ("loss", "dino_local", "dino_global", "ibot"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4), (ra["step"], key)
    ta = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["student"]
    tb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["student"]
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-3


def test_sigterm_writes_a_loadable_checkpoint_and_exits_cleanly(small_store, tmp_path):
    argv = tiny_train_args(small_store, tmp_path, "--steps", 10_000, "--checkpoint-every", 10_000)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 900  # a margin for a machine whose cores are busy with other work
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 2 <= ckpt["step"] < 10_000 and set(ckpt) >= {"student", "teacher", "optimizer", "rng", "args"}


def test_non_finite_loss_skips_steps_then_aborts(small_store, tmp_path, monkeypatch):
    monkeypatch.setattr(L, "kde_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(SystemExit, match="non-finite steps in a row"):
        train.main(tiny_train_args(small_store, tmp_path, "--steps", 10, "--max-bad-steps", 3))
    assert not os.path.exists(tmp_path / "teacher_backbone.pth")


def test_bad_paths_and_flags_fail_at_start_up(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--init"):
        train.main(["--preset", "openmidnight", "--data", "x"])
    with pytest.raises(SystemExit, match="never downloaded"):
        train.main(["--preset", "vits", "--data", "x", "--init", str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit, match="--data"):
        train.main(["--preset", "vits"])
    with pytest.raises(FileNotFoundError, match="prepare_patches.py"):
        train.main(["--preset", "vits", "--data", str(tmp_path / "nostore"), "--device", "cpu",
                    "--out", str(tmp_path / "run")])


def test_patch_size_16_trains_with_a_4x4_mask_grid(small_store, tmp_path):
    # --patch-size reaches the model, the iBOT mask grid and the FLOP count: a ViT/16 on 64 px global crops has
    # 4 x 4 patch tokens, so the masks must be 16 wide
    torch.manual_seed(0)
    vit = M.ViT(embed_dim=128, depth=2, num_heads=2, patch_size=16, img_size=64, num_register_tokens=0)
    torch.save(vit.state_dict(), tmp_path / "vit16.pth")
    argv = tiny_train_args(small_store, tmp_path / "run", "--steps", 2, "--init", tmp_path / "vit16.pth",
                           "--patch-size", 16, "--global-size", 64, "--local-size", 32)
    train.main(argv)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["ibot"]) for r in rows)
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["patch_size"] == 16 and args["registers"] == 0  # taken from the checkpoint
    cfg = augment.AugmentConfig(global_size=64, local_size=32)
    loader = data.make_loader(data.PatchStore(small_store), 2, cfg, workers=0, on_device=True, patch_size=16)
    assert next(iter(loader))["masks"].shape == (4, 16)


def test_every_flag_has_help_and_the_quirk_flags_sit_together():
    parser = train.get_args_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
    quirks = next(g for g in parser._action_groups if "quirks" in (g.title or ""))
    assert {a.dest for a in quirks._group_actions} == {"random_pos_embed", "interpolate_antialias",
                                                       "interpolate_offset", "kde_variant"}


def test_device_colour_path_and_bf16_autocast_run_on_cpu(small_store, tmp_path):
    # path (b) (uint8 crops, colour ops in the step), bf16 autocast, selective recompute: GPU defaults, on CPU
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 2, "--gpu-augment", 1, "--dtype", "bfloat16",
                               "--recompute", "selective"))
    rows = read_metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_analytic_flop_count():
    import bench
    # one block, 10 tokens, D 8, MLP hidden 32: 10 (8 * 64 + 4 * 8 * 32) + 4 * 100 * 8; patch embed 2 * 9 * 588 * 8
    assert bench.vit_forward_flops(10, 8, 1, 32, "mlp", 9) == 10 * (512 + 1024) + 3200 + 2 * 9 * 588 * 8
    args = train.parse_args(["--preset", "openmidnight"])
    per_image = bench.train_flops_per_image(args)
    assert 5.0e12 < per_image < 5.3e12  # ~5.1 TFLOP per image with batch-subset drop path (issue #7)
    args.recompute = "full"  # one more student forward: +1/3 of the student's share (~85% of the total)
    assert 1.25 < bench.train_flops_per_image(args) / per_image < 1.3
    args.recompute, args.drop_path = "selective", 0.0
    assert bench.train_flops_per_image(args) > 1.4 * per_image  # drop path 0.4 saves ~40% of the student's blocks


def test_bench_memory_prediction_counts_the_fixed_part_and_measures_activations():
    import bench
    tiny = ["--preset", "vits", "--global-size", "56", "--local-size", "28", "--n-local-crops", "2",
            "--n-prototypes", "256", "--head-hidden", "64", "--dino-head-bottleneck", "32",
            "--ibot-head-bottleneck", "24",
            "--batch-size", "40"]
    out = {mode: bench.bench_memory(tiny + ["--recompute", mode, "--drop-path", "0.4"])
           for mode in ("none", "selective", "full")}
    student, teacher = train.build_models(train.parse_args(tiny))
    n = sum(p.numel() for p in student.parameters())
    assert out["full"]["fixed_gib"] * 2 ** 30 == 4 * (4 * n + n)  # fp32 weights, grads, 2 AdamW moments; teacher
    zero = bench.bench_memory(tiny + ["--recompute", "full", "--zero", "1", "--world-size", "4",
                                      "--measure-batches", "2", "3"])  # only its fixed part is checked
    assert zero["fixed_gib"] * 2 ** 30 == 4 * (2 * n + 2 * n / 4 + n)  # each of 4 ranks keeps 1/4 of the moments
    per_image = {mode: o["activations_gib_per_image"] * 2 ** 30 for mode, o in out.items()}
    # 'full' keeps each block's input only: 2 x 21 + 2 x 9 tokens per image, 12 blocks, D 384, and bf16 because
    # the batch-subset drop path adds in the residual stream's dtype (as DINOv2), which the bf16 patch embedding sets
    block_inputs = (2 * 21 + 2 * 9) * 12 * 384 * 2
    assert block_inputs <= per_image["full"] < 1.5 * block_inputs
    assert per_image["full"] < per_image["selective"] < 0.7 * per_image["none"]
    o = out["selective"]
    assert o["predicted_gib"] == pytest.approx(o["fixed_gib"] + o["activations_gib_constant"] +
                                               40 * o["activations_gib_per_image"])


def test_lengthening_a_run_says_what_its_schedules_would_do_and_how_to_keep_them(small_store, tmp_path, capsys):
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 4, "--warmup-steps", 1))
    with pytest.raises(SystemExit) as stop:  # --steps 6 alone would stretch the cosines from 4 to 6 steps
        train.main(tiny_train_args(small_store, tmp_path, "--steps", 6, "--warmup-steps", 1))
    msg = str(stop.value)
    assert "would change its schedules: --schedule-steps 4 -> 6" in msg and "--schedule-steps 4" in msg
    old, new = (train.schedules(4, train.parse_args(tiny_train_args(small_store, tmp_path, "--steps", n,
                                                                    "--warmup-steps", 1)), 1) for n in (4, 6))
    assert f"lr {old['lr']:.3g} -> {new['lr']:.3g}" in msg and "--change-schedules" in msg  # the jump, by hand
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 6, "--schedule-steps", 4, "--warmup-steps", 1))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["lr"] == 1e-6  # past the schedule: min lr
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 8, "--warmup-steps", 1, "--change-schedules"))
    assert read_metrics(tmp_path)[-1]["lr"] > 1e-6  # deliberately stretched to 8


@pytest.mark.parametrize("warmup", [10, 20])
def test_the_start_up_lr_is_the_peak_the_run_reaches(small_store, tmp_path, capsys, warmup):
    # a warmup as long as the run (or longer) never reaches the cosine: the printed lr is the log's largest
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 10, "--warmup-steps", warmup))
    printed = capsys.readouterr().out
    top = max(r["lr"] for r in read_metrics(tmp_path))
    assert f"lr peaks at {top:.3e} (base 0.05 x sqrt(4/1024) = {0.05 * math.sqrt(4 / 1024):.3e}" in printed
    assert ("outlasts the run" in printed) == (warmup > 10)


def test_every_flag_of_every_script_shows_help_default_and_range(monkeypatch, capsys):
    import argparse

    import cli
    import eval_hest
    import eval_probe
    import eval_seg
    import eval_slide
    import prepare_patches
    parsers = [train.get_args_parser()]

    def grab(self, args=None, namespace=None):  # each script's parser, as built by its get_args
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(cli.Parser, "parse_args", grab)
    for get_args in (prepare_patches.get_args, eval_probe.get_args, eval_seg.get_args, eval_hest.get_args,
                     eval_slide.get_args):
        with pytest.raises(SystemExit):
            get_args(["probe"] if get_args is eval_slide.get_args else [])
    subcommands = [p for parser in parsers for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   for p in a.choices.values()]
    formatter = cli.HelpFormatter("x")
    for parser in parsers + subcommands:
        for a in parser._actions:
            if not a.option_strings or a.dest == "help":
                continue
            shown = formatter._get_help_string(a)
            assert a.help, (parser.prog, a.option_strings)
            assert ("range" in shown) == bool(getattr(a.type, "range", None)), (parser.prog, a.option_strings)
            assert "default:" in shown or a.default in (None, False), (parser.prog, a.option_strings)
    assert len(parsers) == 6 and len(subcommands) == 3
    monkeypatch.undo()
    text = " ".join(train.get_args_parser().format_help().split())
    assert "[range >= 1; default: 48]" in text and "[range >= 0.0 and <= 1.0; default: 0.5]" in text
    with pytest.raises(SystemExit):
        train.parse_args(["--batch_size", "4"])
    assert "unrecognized arguments: --batch_size 4 (did you mean --batch_size -> --batch-size?)" in \
        capsys.readouterr().err


def test_redirected_output_is_plain_lines_not_a_bar(small_store, tmp_path):
    # as on a cluster: stdout and stderr are files, so no tqdm bar (one line of carriage returns) but a plain line
    # per logged step
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                          *tiny_train_args(small_store, tmp_path, "--steps", 3)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "\r" not in run.stderr and "\r" not in run.stdout
    assert [line.split(":")[0] for line in run.stdout.splitlines() if line.startswith("step ")] == \
        ["step 1/3", "step 2/3", "step 3/3"]
    assert "steps: 3/3 step in" in run.stderr  # the bar's single closing line


def wandb_offline_run(run_dir):
    """(run id, config, history rows) of an offline W&B run, read from its run-<id>.wandb file: a 7-byte header,
    then 32 KiB blocks of chunks (crc 4 bytes, length 2, type 1: whole, 2: first, 3: middle, 4: last, 0: padding)
    holding serialized wandb Record messages."""
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = Path(path).read_bytes()
    pos, pending, run_id, config, rows = 7, b"", None, {}, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:
            pos += left
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending, which = b"", rec.WhichOneof("record_type")
            if which == "run":
                run_id = rec.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif which == "history":
                rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item})
    return run_id, config, rows


def test_wandb_gets_the_metrics_records_and_a_resumed_run_continues_its_run(small_store, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from PIL import Image
    for c, colour in (("a", (200, 60, 90)), ("b", (60, 90, 200))):  # a probe set for the in-training kNN
        os.makedirs(tmp_path / "probe" / c)
        for i in range(10):
            Image.new("RGB", (30, 30), tuple(v + 3 * i for v in colour)).save(tmp_path / "probe" / c / f"{i}.png")
    out = tmp_path / "run"
    argv = ["--schedule-steps", 5, "--checkpoint-every", 3, "--wandb", "nanopath-test", "--probe-data",
            tmp_path / "probe", "--probe-every", 3, "--probe-size", 56]
    train.main(tiny_train_args(small_store, out, "--steps", 3, *argv))
    wandb.teardown()  # offline files are complete once wandb's service has stopped
    train.main(tiny_train_args(small_store, out, "--steps", 5, *argv))  # resumes at step 3
    wandb.teardown()
    run_id = (out / "wandb_id").read_text()
    runs = sorted(glob_dirs(out / "wandb", f"offline-run-*-{run_id}*"))
    assert len(runs) == 2  # two sittings of one W&B run
    logged = []
    for d in runs:
        rid, config, rows = wandb_offline_run(d)
        assert rid == run_id and config["batch_size"] == 4 and config["wandb"] == "nanopath-test"
        logged += rows
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["_step"] for r in logged] == [1, 2, 3, 4, 5]
    by_step = {}
    for r in records:  # the metrics line and the probe line of one step are one W&B row
        by_step.setdefault(r["step"], {}).update(r)
    for row in logged:
        mine = by_step[row["_step"]]
        assert row["loss"] == pytest.approx(mine["loss"]) and row["lr"] == pytest.approx(mine["lr"])
        assert ("probe.balanced_accuracy" in row) == ("probe" in mine)
    assert logged[2]["probe.balanced_accuracy"] == pytest.approx(by_step[3]["probe"]["balanced_accuracy"])


def glob_dirs(folder, pattern):
    import glob
    return [d for d in glob.glob(os.path.join(folder, pattern)) if os.path.isdir(d)]


def test_a_run_writes_a_model_folder_with_its_card_and_export_py_adds_results(small_store, tmp_path):
    import eval_suite
    import export
    run = tmp_path / "run"
    train.main(tiny_train_args(small_store, run, "--steps", 3))
    folder = run / "model"
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "pytorch_model.bin", "training.json"]
    assert os.path.samefile(folder / "pytorch_model.bin", run / "teacher_backbone.pth")  # a hard link: no copy
    config = json.loads((folder / "config.json").read_text())
    assert json.loads((run / "config.json").read_text()) == config  # timm's, everywhere
    card = (folder / "README.md").read_text()
    # the settings that differ from the openmidnight preset's, its data from the store's manifest, its arguments
    om = train.parse_args(["--preset", "openmidnight", "--data", "-", "--init", "-", "--device", "cpu"])
    assert f"| `--n-prototypes` | 256 | {om.n_prototypes} |" in card and "| `--kde-weight` |" not in card
    assert f"| `--batch-size` | 4 | {om.batch_size} |" in card and "| `--out` |" not in card  # paths are not recipe
    assert "40 patches of 1 slides" in card and "cmu_small_region.svs" in card and '"global_size": 56' in card
    assert "3 of 3 steps, global batch 4, from tiny_backbone.pth" in card and "## Results" not in card
    # a suite's results.json (its own structure) into the card, and model.safetensors
    results = {"settings": {"columns": [t._asdict() for t in eval_suite.COLUMNS], "suite": "/data/bench",
                            "quick": True}, "row": {"bach": 0.5, "mhist": 0.75}, "published": eval_suite.PUBLISHED}
    (tmp_path / "results.json").write_text(json.dumps(results))
    export.main([str(run), "--results", str(tmp_path / "results.json"), "--safetensors"])
    card = (folder / "README.md").read_text()
    assert "| this model |  | 0.500 |" in card and "| 0.625 (2/13) |" in card and "| OpenMidnight (the post) |" in card
    a, b = W.load_backbone(str(folder / "model.safetensors")), W.load_backbone(str(folder / "pytorch_model.bin"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # an export written before this change (a config.json of the heads alone) still loads
    (tmp_path / "old").mkdir()
    torch.save(b.state_dict(), tmp_path / "old" / "teacher_backbone.pth")
    (tmp_path / "old" / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    assert W.load_backbone(str(tmp_path / "old" / "teacher_backbone.pth")).num_heads == 2
