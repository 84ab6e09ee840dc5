"""loss.py against loop-based computations, Sinkhorn marginals, distributed equality, dtypes and KDE direction."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loss as L


def loop_sinkhorn(z, temp, n_iter):
    """DINOv2's multiplicative algorithm, written with explicit loops over prototypes and samples (float64)."""
    z = z.double()
    b, K = z.shape
    Q = [[math.exp(z[i, k].item() / temp) for i in range(b)] for k in range(K)]  # K x b
    total = sum(map(sum, Q))
    Q = [[q / total for q in row] for row in Q]
    for _ in range(n_iter):
        Q = [[q / sum(row) / K for q in row] for row in Q]
        col = [sum(Q[k][i] for k in range(K)) for i in range(b)]
        Q = [[Q[k][i] / col[i] / b for i in range(b)] for k in range(K)]
    return torch.tensor([[Q[k][i] * b for k in range(K)] for i in range(b)], dtype=torch.float64)


def test_sinkhorn_matches_the_loop_definition():
    z = torch.randn(6, 9)
    ref = loop_sinkhorn(z, 0.5, 3)
    assert torch.allclose(L.sinkhorn_knopp(z, 0.5, 3).double(), ref, atol=1e-6)


def test_sinkhorn_marginals_after_enough_iterations():
    z = torch.randn(32, 64) * 0.5
    Q = L.sinkhorn_knopp(z, 0.1, n_iterations=200)
    assert torch.allclose(Q.sum(dim=1), torch.ones(32), atol=1e-5)  # each sample is a distribution
    # every prototype gets 1/K of the total mass (32 samples): column sums of the (b, K) matrix = b / K
    assert torch.allclose(Q.sum(dim=0), torch.full((64,), 32 / 64), atol=1e-4)


def test_sinkhorn_is_finite_for_huge_logits_and_many_prototypes():
    z = torch.randn(8, 131072) * 1e4
    Q = L.sinkhorn_knopp(z, 0.04)
    assert torch.isfinite(Q).all() and torch.allclose(Q.sum(1), torch.ones(8), atol=1e-4)


def test_softmax_center_and_center_update():
    z, c = torch.randn(5, 7), torch.randn(1, 7)
    p = L.softmax_center(z, c, 0.04)
    e = torch.exp((z - c) / 0.04)
    assert torch.allclose(p, e / e.sum(1, keepdim=True), atol=1e-6)
    new = L.update_center(c, z, momentum=0.9)
    assert torch.allclose(new, 0.9 * c + 0.1 * z.mean(0, keepdim=True), atol=1e-6)


def loop_cross_entropy(t, s, temp):
    """-sum_k t_k log softmax(s / temp)_k for one row, by hand."""
    logits = [v / temp for v in s.tolist()]
    m = max(logits)
    log_z = m + math.log(sum(math.exp(v - m) for v in logits))
    return -sum(tk * (v - log_z) for tk, v in zip(t.tolist(), logits))


def test_dino_loss_equals_the_sum_over_crop_pairs():
    B, K = 4, 11
    students = [torch.randn(B, K) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(B, K), -1) for _ in range(2)]
    ref = sum(sum(loop_cross_entropy(t[i], s[i], 0.1) for i in range(B)) / B for s in students for t in teachers)
    assert L.dino_loss(students, teachers, 0.1).item() == pytest.approx(ref, rel=1e-5)


def test_ibot_loss_weights_each_masked_image_equally():
    K = 9
    masks = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # 3 images, one unmasked
    counts = masks.sum(1)
    weights = torch.cat([torch.full((int(c),), 1.0 / int(c)) for c in counts if c > 0])
    s, t = torch.randn(4, K), torch.softmax(torch.randn(4, K), -1)
    # by hand: image 0 = mean CE of its 3 tokens, image 2 = CE of its token, image 1 = 0; divided by 3 images
    ce = [loop_cross_entropy(t[j], s[j], 0.1) for j in range(4)]
    ref = (sum(ce[:3]) / 3 + ce[3]) / 3
    assert L.ibot_loss(s, t, weights, n_images=3).item() == pytest.approx(ref, rel=1e-5)
    # zero-weight padding rows change nothing
    s_pad, t_pad = torch.cat([s, torch.randn(2, K)]), torch.cat([t, torch.zeros(2, K)])
    w_pad = torch.cat([weights, torch.zeros(2)])
    assert L.ibot_loss(s_pad, t_pad, w_pad, 3).item() == pytest.approx(ref, rel=1e-5)


def loop_kde(x, kappa, variant):
    u = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in x.double().tolist()]
    B = len(u)
    cos = [[sum(a * b for a, b in zip(u[i], u[j])) for j in range(B)] for i in range(B)]
    if variant == "spread":
        return sum(math.log(sum(math.exp(kappa * cos[i][j]) for j in range(B) if j != i) / (B - 1))
                   for i in range(B)) / B
    return -sum(math.log(sum(math.exp(kappa * cos[i][j]) for j in range(B)) + 1e-9) for i in range(B)) / B


@pytest.mark.parametrize("variant", ["spread", "openmidnight"])
def test_kde_matches_its_formula(variant):
    x = torch.randn(7, 5)
    assert L.kde_loss(x, 5.0, variant).item() == pytest.approx(loop_kde(x, 5.0, variant), rel=1e-5)


def test_kde_identical_versus_orthogonal_vectors():
    B, kappa = 4, 5.0
    same = torch.ones(B, 8)
    ortho = torch.eye(B, 8)
    # identical: every cosine is 1 -> spread = kappa; openmidnight = -log(B e^kappa)
    assert L.kde_loss(same, kappa).item() == pytest.approx(kappa, abs=1e-5)
    assert L.kde_loss(same, kappa, "openmidnight").item() == pytest.approx(-math.log(B * math.exp(kappa)), abs=1e-5)
    # orthogonal: off-diagonal cosines are 0 -> spread = log(1) = 0; openmidnight = -log(e^kappa + B - 1)
    assert L.kde_loss(ortho, kappa).item() == pytest.approx(0.0, abs=1e-6)
    assert L.kde_loss(ortho, kappa, "openmidnight").item() == pytest.approx(-math.log(math.exp(kappa) + B - 1),
                                                                            abs=1e-5)


def mean_pairwise_cos(x):
    u = torch.nn.functional.normalize(x, dim=-1)
    B = x.shape[0]
    return ((u @ u.T).sum() - B) / (B * (B - 1))


@pytest.mark.parametrize("variant,direction", [("spread", -1), ("openmidnight", +1)])
def test_kde_gradient_step_direction(variant, direction):
    torch.manual_seed(0)
    x = (torch.randn(32, 16) + 0.5).requires_grad_()  # somewhat clustered start
    before = mean_pairwise_cos(x).item()
    L.kde_loss(x, 5.0, variant).backward()
    with torch.no_grad():
        after = mean_pairwise_cos(x - 0.05 * x.grad).item()
    assert (after - before) * direction > 0


def test_koleo_matches_nearest_neighbour_formula_and_is_finite_on_duplicates():
    x = torch.randn(6, 4)
    u = torch.nn.functional.normalize(x, dim=-1)
    ref = 0.0
    for i in range(6):
        d = min((u[i] - u[j]).norm().item() for j in range(6) if j != i)
        ref -= math.log(d + 1e-8) / 6
    assert L.koleo_loss(x).item() == pytest.approx(ref, rel=1e-4)
    dup = torch.cat([x[:3], x[:3]])
    assert torch.isfinite(L.koleo_loss(dup))


def test_losses_are_float32_and_finite_under_bf16_autocast():
    torch.manual_seed(0)
    w = torch.randn(16, 257, requires_grad=True)
    feats = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = feats @ w  # bf16 under autocast
        assert logits.dtype == torch.bfloat16
        t = L.sinkhorn_knopp(logits.detach(), 0.04)
        total = (L.dino_loss([logits], [t]) + L.ibot_loss(logits, t, torch.full((8,), 0.25), 4)
                 + L.kde_loss(logits, 5.0) + L.koleo_loss(logits))
    assert t.dtype == torch.float32 and total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_collapse_signals_on_collapsed_uniform_and_healthy_logits():
    K, B = 16, 8
    collapsed = torch.zeros(B, K)
    collapsed[:, 3] = 50.0  # every sample picks prototype 3 with certainty
    uniform = torch.zeros(B, K)  # flat outputs: nothing learned
    healthy = torch.zeros(B, K)
    healthy[torch.arange(B), torch.arange(B) * 2] = 50.0  # each sample confident, on its own prototype
    sig = {name: {k: v.float() for k, v in L.collapse_signals(z, z, 0.07, 0.1).items()}
           for name, z in (("collapsed", collapsed), ("uniform", uniform), ("healthy", healthy))}
    # by hand: a one-hot softmax has entropy 0; the flat one log K; KL(mean || uniform) = log K for one shared
    # prototype, 0 for flat outputs, log(K / B) for B distinct one-hot prototypes
    assert sig["collapsed"]["teacher_entropy"] == pytest.approx(0.0, abs=1e-4)
    assert sig["collapsed"]["teacher_kl_uniform"] == pytest.approx(math.log(K), abs=1e-4)
    assert int((sig["collapsed"]["prototype_wins"] > 0).sum()) == 1 and sig["collapsed"]["prototype_wins"][3] == B
    assert sig["uniform"]["teacher_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert sig["uniform"]["student_entropy"] == pytest.approx(math.log(K), rel=1e-5)
    assert sig["uniform"]["teacher_kl_uniform"] == pytest.approx(0.0, abs=1e-6)
    assert sig["healthy"]["teacher_entropy"] == pytest.approx(0.0, abs=1e-4)
    assert sig["healthy"]["teacher_kl_uniform"] == pytest.approx(math.log(K / B), abs=1e-4)
    assert int((sig["healthy"]["prototype_wins"] > 0).sum()) == B
    # the temperatures are the networks' own: a student logit gap of 1 at T_s = 0.1 is a softmax of gap 10
    two = torch.tensor([[1.0, 0.0]])
    p = torch.softmax(torch.tensor([10.0, 0.0]), 0)
    entropy = L.collapse_signals(two, two, 1.0, 0.1)["student_entropy"].item()
    assert entropy == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)


# -- distributed: 2 gloo processes on halves == 1 process on the whole --------------------------------------------

def _worker(rank, init_file, z_cls, z_patch, n_valid_per_rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    half = z_cls.shape[0] // 2
    q_cls = L.sinkhorn_knopp(z_cls[rank * half:(rank + 1) * half], 0.07)
    # masked tokens: each rank has its own count
    start = sum(n_valid_per_rank[:rank])
    q_patch = L.sinkhorn_knopp(z_patch[start:start + n_valid_per_rank[rank]], 0.07)
    center = L.update_center(torch.zeros(1, z_cls.shape[1]), z_cls[rank * half:(rank + 1) * half])
    torch.save({"cls": q_cls, "patch": q_patch, "center": center}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_sinkhorn_on_two_halves_equals_single_process(tmp_path):
    torch.manual_seed(0)
    z_cls, z_patch = torch.randn(8, 50), torch.randn(13, 50)
    n_valid = [9, 4]
    mp.spawn(_worker, args=(str(tmp_path / "init"), z_cls, z_patch, n_valid, str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert torch.allclose(torch.cat([r0["cls"], r1["cls"]]), L.sinkhorn_knopp(z_cls, 0.07), atol=1e-6)
    assert torch.allclose(torch.cat([r0["patch"], r1["patch"]]), L.sinkhorn_knopp(z_patch, 0.07), atol=1e-6)
    single_center = L.update_center(torch.zeros(1, 50), z_cls)
    assert torch.allclose(r0["center"], single_center, atol=1e-6) and torch.allclose(r1["center"], single_center,
                                                                                      atol=1e-6)
