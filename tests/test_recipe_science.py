"""Where the recipe's numbers meet: the assembled training loss against a computation written here from the loss
definitions (RECIPE.md §4), the colour pipeline against an op-by-op recomputation with reference libraries and its
per-op statistics over many draws (§6), and the presets' values against the recipe's (§8)."""
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.color import hed2rgb, rgb2hed

import augment as A
import model as M
import train

# -- the assembled loss -------------------------------------------------------------------------------------------


def sinkhorn_reference(z, temp, n_iter=3):
    """DINOv2's sinkhorn_knopp_teacher in float64 as written there: Q = exp(z / T)^T, total mass 1, then
    alternately rows (prototypes) to 1/K and columns (samples) to 1/B, finally columns scaled to sum to 1."""
    Q = torch.exp(z.double() / temp).T  # (K, B)
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(n_iter):
        Q /= Q.sum(dim=1, keepdim=True) * K
        Q /= Q.sum(dim=0, keepdim=True) * B
    return (Q * B).T


def cross_entropy(q, s, temp):
    """-sum_k q_k log softmax(s / T)_k per row, float64."""
    return -(q * F.log_softmax(s.double() / temp, dim=-1)).sum(-1)


def tiny_models(n_prototypes=32):
    torch.manual_seed(0)
    vit = M.ViT(embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=28, num_register_tokens=1,
                layerscale_init=1.0)
    student = M.MetaArch(vit, M.DINOHead(32, n_prototypes, 24, 16), M.DINOHead(32, n_prototypes, 24, 12))
    teacher = M.MetaArch(M.ViT(embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=28,
                                   num_register_tokens=1), M.DINOHead(32, n_prototypes, 24, 16),
                             M.DINOHead(32, n_prototypes, 24, 12))
    teacher.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in student.state_dict().items()})
    return student.train(), teacher.eval()


@pytest.mark.parametrize("variant", ["spread", "openmidnight"])
def test_assembled_loss_equals_the_recipe_written_out_pair_by_pair(variant):
    B, n_local, T_t, T_s, kde_w, kappa = 3, 2, 0.05, 0.1, 0.05, 5.0
    student, teacher = tiny_models()
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(2 * B, 16, dtype=torch.bool)  # 4x4 grid per 28 px global crop
    masks[0, [1, 2, 5]] = masks[4, [0, 15]] = masks[5, 7] = True  # masked crops of different sizes, others none
    batch = {"global_crops": torch.randn(2 * B, 3, 28, 28, generator=g),
             "local_crops": torch.randn(n_local * B, 3, 14, 14, generator=g), **A.mask_targets(masks)}
    args = SimpleNamespace(centering="sinkhorn_knopp", n_local_crops=n_local, student_temp=T_s, ibot_weight=1.0,
                           kde_weight=kde_w, kde_kappa=kappa, kde_variant=variant, koleo_weight=0.0)
    terms, _ = train.compute_losses(student, teacher, batch, {"teacher_temp": T_t}, args, None)

    # the same quantities, computed view by view from the networks' parts
    with torch.no_grad():
        t_feat = teacher.backbone.forward_features(batch["global_crops"])
        t_cls = teacher.dino_head(t_feat["x_norm_clstoken"]).double()
        t_patch = teacher.ibot_head(t_feat["x_norm_patchtokens"][masks]).double()
        s_glob = student.backbone.forward_features(batch["global_crops"], masks)
        s_loc = student.backbone.forward_features(batch["local_crops"])
        s_views = list(student.dino_head(s_glob["x_norm_clstoken"]).double().split(B)) + \
            list(student.dino_head(s_loc["x_norm_clstoken"]).double().split(B))  # g1, g2, l1, l2
        s_patch = student.ibot_head(s_glob["x_norm_patchtokens"][masks]).double()
        cls = s_glob["x_norm_clstoken"].double()
    # DINO: targets by Sinkhorn-Knopp over both teacher views together; every (teacher view, student view) pair
    # except a view with itself; the mean over the 2 x (2 + n_local - 1) = 6 pairs
    q = sinkhorn_reference(t_cls, T_t).split(B)
    pairs = [(t, s) for t in range(2) for s in range(2 + n_local) if s != t]
    per_pair = {(t, s): cross_entropy(q[t], s_views[s], T_s).mean() for t, s in pairs}
    dino_global = sum(per_pair[(t, s)] for t, s in pairs if s < 2) / len(pairs)
    dino_local = sum(per_pair[(t, s)] for t, s in pairs if s >= 2) / len(pairs)
    # iBOT: per masked token CE against Sinkhorn targets over all masked tokens; each masked image weighs 1 (its
    # tokens averaged), the sum divided by the number of global crops, masked or not (2B)
    ce = cross_entropy(sinkhorn_reference(t_patch, T_t), s_patch, T_s)
    owner = masks.nonzero()[:, 0]
    ibot = sum(ce[owner == i].mean() for i in owner.unique()) / (2 * B)
    # KDE on the student's CLS tokens of each global view, x weight, summed over the two views
    kde = 0.0
    for v in cls.split(B):
        u = F.normalize(v, dim=-1)
        k = torch.exp(kappa * u @ u.T)
        if variant == "spread":  # log of the leave-one-out kernel density
            kde = kde + torch.log((k.sum(1) - k.diagonal()) / (B - 1)).mean()
        else:  # OpenMidnight's released sign, self-term included
            kde = kde - torch.log(k.sum(1) + 1e-9).mean()
    expected = {"dino_global": dino_global, "dino_local": dino_local, "ibot": ibot, "kde": kde_w * kde}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=2e-5, abs=1e-6), name
    assert sum(terms.values()).item() == pytest.approx(sum(expected.values()).item(), rel=2e-5)


# -- the colour pipeline ------------------------------------------------------------------------------------------


def reference_colour(rgb, p, cfg):
    """One crop's colour ops with reference code, in float64: skimage's rgb2hed/hed2rgb for the HED jitter,
    torchvision's documented formulas for brightness/contrast/saturation (PIL luma weights), colorsys for hue,
    a direct 2-D reflect-padded Gaussian convolution for the blur. rgb: (H, W, 3) in [0, 1]."""
    x = rgb.copy()
    if p["hed_apply"]:
        x = hed2rgb(np.clip(rgb2hed(x) + p["hed_offsets"], 0, 1))
    if p["jitter_apply"]:
        for op in p["jitter_order"]:
            f = p["jitter_factors"][op]
            luma = x @ np.array([0.299, 0.587, 0.114])
            if op == 0:
                x = np.clip(f * x, 0, 1)
            elif op == 1:
                x = np.clip(f * x + (1 - f) * luma.mean(), 0, 1)
            elif op == 2:
                x = np.clip(f * x + (1 - f) * luma[..., None], 0, 1)
            else:
                import colorsys
                hsv = np.array([colorsys.rgb_to_hsv(*px) for px in x.reshape(-1, 3)])
                hsv[:, 0] = (hsv[:, 0] + f) % 1.0
                x = np.array([colorsys.hsv_to_rgb(*px) for px in hsv]).reshape(x.shape)
    if p["gray"]:
        x = np.repeat((x @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
    if p["blur_apply"]:
        half = cfg.blur_kernel // 2
        t = np.arange(-half, half + 1)
        k = np.exp(-0.5 * (t / p["blur_sigma"]) ** 2)
        k2 = np.outer(k, k) / k.sum() ** 2
        pad = np.pad(x, ((half, half), (half, half), (0, 0)), mode="reflect")
        x = sum(k2[i, j] * pad[i:i + x.shape[0], j:j + x.shape[1]] for i in range(len(t)) for j in range(len(t)))
    return x


def test_colour_ops_of_many_crops_equal_the_reference_op_by_op(sample_patch):
    # 48 small crops with the recipe's random parameters (every op, on and off, in many orders): the worker path
    # (one sample's crops) and the device path (a batch) both equal the reference computed op by op
    cfg = A.AugmentConfig()
    g = torch.Generator().manual_seed(3)
    crops = torch.stack([torch.from_numpy(np.array(sample_patch)[y:y + 12, x:x + 12]).permute(2, 0, 1)
                         for y, x in itertools.product(range(0, 96, 16), range(0, 128, 16))])  # (48, 3, 12, 12)
    params = A.draw_color_params(len(crops), 0.5, cfg, g)
    for key in ("hed_apply", "jitter_apply", "gray", "blur_apply"):
        assert 0 < params[key].sum() < len(crops)  # the draw exercises both branches of every op
    device_path = A.color_augment(crops.double() / 255, params, cfg)
    for i in range(len(crops)):
        p = {k: v[i].numpy() for k, v in params.items()}
        p["jitter_order"] = [int(o) for o in p["jitter_order"]]
        ref = reference_colour(crops[i].permute(1, 2, 0).double().numpy() / 255, p, cfg)
        assert np.abs(device_path[i].permute(1, 2, 0).numpy() - ref).max() < 1e-6, (i, p)


def test_worker_path_crops_equal_the_reference_pipeline(sample_patch):
    # augment.multicrop (CPU training) end to end: its normalised local crops are the reference colour ops on the
    # crops and parameters that the same seed draws, normalised with ImageNet's statistics
    cfg = A.AugmentConfig()
    mean, std = np.array(A.IMAGENET_MEAN), np.array(A.IMAGENET_STD)
    for seed in range(2):
        out = A.multicrop(sample_patch, torch.Generator().manual_seed(seed), cfg)
        raw = A.multicrop_uint8(sample_patch, torch.Generator().manual_seed(seed), cfg)
        for c in range(3):
            p = {k: v[c].numpy() for k, v in raw["local_params"].items()}
            p["jitter_order"] = [int(o) for o in p["jitter_order"]]
            ref = reference_colour(raw["local_crops"][c].permute(1, 2, 0).double().numpy() / 255, p, cfg)
            got = out["local_crops"][c].permute(1, 2, 0).double().numpy() * std + mean
            assert np.abs(got - ref).max() < 1e-4, (seed, c)


def test_colour_parameters_follow_the_recipes_probabilities_and_ranges():
    # 20,000 crops: each op at its probability (binomial 4-sigma bounds), HED offsets uniform in +-0.05, all 24
    # orders of the jitter ops about equally often, blur sigma uniform in [0.1, 2]
    cfg, n = A.AugmentConfig(), 20_000
    p = A.draw_color_params(n, 0.5, cfg, torch.Generator().manual_seed(0))
    for key, prob in (("hed_apply", 0.5), ("jitter_apply", 0.8), ("gray", 0.2), ("blur_apply", 0.5)):
        assert abs(p[key].double().mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n), key
    off = p["hed_offsets"]
    assert off.abs().max() <= 0.05 and off.min() < -0.049 and off.max() > 0.049 and abs(off.mean()) < 0.002
    corr = np.corrcoef(off.T.numpy())  # one independent offset per stain (H, E, D)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.05
    orders = {tuple(o) for o in p["jitter_order"].tolist()}
    counts = np.bincount([int("".join(map(str, o)), 4) for o in p["jitter_order"].tolist()], minlength=256)
    assert len(orders) == 24 and counts[counts > 0].min() > n / 24 * 0.85
    f = p["jitter_factors"]
    for col, (lo, hi) in enumerate(((0.8, 1.2), (0.8, 1.2), (0.9, 1.1), (-0.05, 0.05))):
        assert lo <= f[:, col].min() < lo + 0.01 and hi - 0.01 < f[:, col].max() <= hi
    s = p["blur_sigma"]
    assert 0.1 <= s.min() < 0.11 and 1.99 < s.max() <= 2.0 and abs(s.mean() - 1.05) < 0.02
    # per crop kind: DINOv2's effective blur probabilities 0 / 0.9 / 0.5 (global 1, global 2, local)
    both = A.draw_color_params(2 * 5000, torch.tensor([0.0, 0.9]).repeat(5000), cfg, torch.Generator().manual_seed(1))
    blur = both["blur_apply"].view(5000, 2).double().mean(0)
    assert blur[0] == 0 and abs(blur[1] - 0.9) < 0.02


def test_multicrop_draws_the_recipes_crop_geometry_and_blur_per_crop_kind(sample_patch):
    cfg = A.AugmentConfig()
    assert (cfg.global_size, cfg.local_size, cfg.n_local_crops) == (224, 98, 8)
    assert (cfg.global_scale, cfg.local_scale, cfg.flip_prob) == ((0.32, 1.0), (0.05, 0.32), 0.5)
    assert cfg.blur_probs == (0.0, 0.9, 0.5) and cfg.blur_sigma == (0.1, 2.0) and cfg.blur_kernel == 9
    assert (cfg.hed_prob, cfg.hed_range, cfg.jitter_prob, cfg.gray_prob) == (0.5, 0.05, 0.8, 0.2)
    assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.2, 0.2, 0.1, 0.05)
    g = torch.Generator().manual_seed(0)
    draws = [A.multicrop_uint8(sample_patch, g, cfg) for _ in range(150)]
    blur_g = torch.stack([d["global_params"]["blur_apply"] for d in draws]).double().mean(0)
    blur_l = torch.cat([d["local_params"]["blur_apply"] for d in draws]).double().mean()
    assert blur_g[0] == 0 and abs(blur_g[1] - 0.9) < 0.08 and abs(blur_l - 0.5) < 0.06


# -- the presets --------------------------------------------------------------------------------------------------

def test_openmidnight_preset_resolves_to_the_recipes_numbers(tmp_path):
    a = train.parse_args(["--preset", "openmidnight"])
    expected = dict(arch="vit_giant2", ffn="swiglu", registers=4, patch_size=14, drop_path=0.4, layerscale=1e-5,
                    n_prototypes=131072, head_hidden=2048, dino_head_bottleneck=384, ibot_head_bottleneck=256,
                    centering="sinkhorn_knopp", student_temp=0.1, teacher_temp=0.07, warmup_teacher_temp=0.04,
                    teacher_temp_warmup_steps=37_500, ibot_weight=1.0, mask_ratio=(0.1, 0.45), mask_prob=0.5,
                    kde_weight=0.05, kde_kappa=5.0, kde_variant="spread", koleo_weight=0.0, steps=250_000,
                    schedule_steps=10_000_000, batch_size=48, base_lr=2e-4, min_lr=1e-6, warmup_steps=12_500,
                    weight_decay=0.04, weight_decay_end=0.2, momentum_teacher=0.994, layerwise_decay=1.0,
                    patch_embed_lr_mult=0.2, freeze_last_layer_steps=1250, clip_grad=3.0, global_size=224,
                    local_size=98, n_local_crops=8, hed_prob=0.5, hed_range=0.05, export_every=12_500,
                    interpolate_antialias=1, interpolate_offset=0.0, random_pos_embed=False)
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(a).items() if k in expected}
    assert got == expected
    c = train.parse_args(["--preset", "openmidnight-config"])
    assert (c.base_lr, c.steps, c.schedule_steps, c.export_every) == (3e-4, 137_500, 137_500, 2_500)


def test_heads_have_the_parameter_counts_of_openmidnights_config():
    # vitg14_reg4.yaml: dino.head_bottleneck_dim 384; ibot.head_bottleneck_dim keeps DINOv2's default 256;
    # hidden 2048, 3 layers, 131072 prototypes. By hand: in*h + h + h*h + h + h*b + b, then K*b (v) + K (g)
    def by_hand(d_in, h, b, K):
        return d_in * h + h + h * h + h + h * b + b + K * b + K
    args = train.parse_args(["--preset", "openmidnight"])
    with torch.device("meta"):
        dino = M.DINOHead(1536, args.n_prototypes, args.head_hidden, args.dino_head_bottleneck)
        ibot = M.DINOHead(1536, args.n_prototypes, args.head_hidden, args.ibot_head_bottleneck)
    assert sum(p.numel() for p in dino.parameters()) == by_hand(1536, 2048, 384, 131072) == 58_593_664
    assert sum(p.numel() for p in ibot.parameters()) == by_hand(1536, 2048, 256, 131072) == 41_554_176
