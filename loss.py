"""
The objectives of the recipe: DINO on CLS tokens and iBOT on masked patch tokens (teacher targets by
Sinkhorn-Knopp or by centering), the KDE regulariser that OpenMidnight uses instead of KoLeo, and KoLeo itself.
Each is a short function on logits / features; which crops feed which term is wired in train.py.

Every exp / softmax / log-softmax / Sinkhorn step runs in float32 even under bf16 autocast, and no function holds
more than a few [rows, K] float32 tensors at once (K = 131,072 prototypes in the recipe). Sums over the batch are
all-reduced when torch.distributed is initialised, so 8 ranks of 48 give the targets of one batch of 384.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed():
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t, op=None):
    if _distributed():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _world_size():
    return dist.get_world_size() if _distributed() else 1


def _no_autocast(x):
    return torch.autocast(device_type=x.device.type, enabled=False)


# -----------------------------------------------------------------------------
# teacher targets


@torch.no_grad()
def sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3):
    """Teacher assignment probabilities by Sinkhorn-Knopp, as DINOv2 (Caron et al. 2020, SwAV; DINOv2 §3):
    Q = exp(z / T), then alternately make every prototype's total mass 1/K (a sum over the *global* batch,
    all-reduced) and every sample's mass 1/B; finally each sample's row sums to 1.

    teacher_logits: (b, K) on this rank (b may differ between ranks, as the masked-token counts do).
    Before exp, each prototype's max over the global batch is subtracted: a per-prototype factor is undone by
    the prototype normalisation that comes first, so this is exact, and logits of any magnitude stay finite
    (1e4 / 0.04 overflows a plain exp). DINOv2's initial total-mass normalisation and the constants 1/K, 1/B
    cancel in the next normalisation and are left out. Returns (b, K) float32."""
    with _no_autocast(teacher_logits):
        L = teacher_logits.float()
        m = L.max(dim=0).values if len(L) else L.new_full(L.shape[1:], -float("inf"))  # a rank may have 0 rows
        m = _all_reduce(m, dist.ReduceOp.MAX if _distributed() else None)
        Q = torch.sub(L, torch.where(torch.isfinite(m), m, torch.zeros_like(m))).div_(teacher_temp).exp_()  # (b, K)
        for _ in range(n_iterations):
            Q /= _all_reduce(Q.sum(dim=0)).clamp_min(1e-30)  # prototypes: over the global batch (0/0 guarded)
            Q /= Q.sum(dim=1, keepdim=True).clamp_min(1e-30)  # samples: each row sums to 1
        return Q


@torch.no_grad()
def softmax_center(teacher_logits, center, teacher_temp):
    """DINO's original targets (Caron et al. 2021): softmax((z - c) / T) with an EMA centre c (DINOv2's
    `centering: centering` option)."""
    with _no_autocast(teacher_logits):
        return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center, teacher_logits, momentum=0.9):
    """c <- m c + (1 - m) mean(z) over the global batch (sum all-reduced, divided by rows x world size).
    For DINOv2's iBOT centre (the mean over a rank's masked tokens, averaged over ranks) pass
    teacher_logits.mean(0, keepdim=True)."""
    batch_center = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
    batch_center = batch_center / (teacher_logits.shape[0] * _world_size())
    return center * momentum + batch_center * (1 - momentum)


# -----------------------------------------------------------------------------
# DINO and iBOT cross-entropies


def dino_loss(student_logits_list, teacher_probs_list, student_temp=0.1):
    """-sum over (student crop s, teacher crop t) of mean_rows sum_k t_k log_softmax(s / T_s)_k  (DINOv2's DINOLoss).
    Since the pairs share the student's log-softmax, sum_t mean(t . lsm) = mean((sum_t t) . lsm): the teacher
    targets are summed once, and only two [B, K] float32 tensors live at a time (no crops x crops x B x K).
    Normalising by the number of pairs is the caller's (train.py: / 18 in the recipe)."""
    teacher_sum = teacher_probs_list[0].float()
    for t in teacher_probs_list[1:]:
        teacher_sum = teacher_sum + t.float()
    total = 0.0
    for s in student_logits_list:
        with _no_autocast(s):
            lsm = F.log_softmax(s.float() / student_temp, dim=-1)
            total = total - (teacher_sum * lsm).sum(dim=-1).mean()
    return total


def ibot_loss(student_masked_logits, teacher_masked_probs, masks_weight, n_images, student_temp=0.1):
    """iBOT masked-image-modelling term (Zhou et al. 2022) as DINOv2's forward_masked:
    -(1 / n_images) sum_j w_j sum_k q_jk log_softmax(s_j / T_s)_k over masked tokens j, where w_j = 1 / (number of
    masked tokens of j's image), so each masked image weighs the same, and n_images counts every global crop
    (masked or not). Padding rows carry w_j = 0."""
    with _no_autocast(student_masked_logits):
        lsm = F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)
        per_token = (teacher_masked_probs.float() * lsm).sum(dim=-1)  # (M,)
        return -(per_token * masks_weight.float()).sum() / n_images


# -----------------------------------------------------------------------------
# regularisers on the student's backbone CLS tokens of one global crop


def kde_loss(x, kappa=5.0, variant="spread"):
    """KDE regulariser with a von Mises-Fisher kernel exp(kappa cos(x_i, x_j)) on L2-normalised rows of x (B, D).

    "spread" (default): mean_i log( 1/(B-1) sum_{j != i} exp(kappa cos(x_i, x_j)) ), the log of a leave-one-out
      kernel density at each sample, i.e. minus an entropy estimate. Minimising it spreads the embeddings over the
      sphere, which is what replacing KoLeo (also an entropy estimator) should do; it equals Wang & Isola's
      uniformity loss with t = kappa / 2 up to the self-term.
    "openmidnight": -mean_i log( sum_j exp(kappa cos(x_i, x_j)) + 1e-9 ), self-term included, exactly what
      OpenMidnight's released model minimised (RECIPE.md §4.5). It is an entropy *estimate*, and minimising it
      pulls embeddings together: kept only to reproduce that run.
    Float32 regardless of autocast (OpenMidnight's fp16 version overflows for B > ~440)."""
    with _no_autocast(x):
        u = F.normalize(x.float(), dim=-1)
        logits = kappa * (u @ u.T)  # (B, B)
        if variant == "openmidnight":
            return -torch.log(torch.exp(logits).sum(dim=1) + 1e-9).mean()
        if variant != "spread":
            raise ValueError(f"kde variant must be 'spread' or 'openmidnight', got {variant!r}")
        B = x.shape[0]
        logits = logits.masked_fill(torch.eye(B, dtype=torch.bool, device=x.device), -float("inf"))
        return (torch.logsumexp(logits, dim=1) - math.log(B - 1)).mean()


def koleo_loss(x, eps=1e-8):
    """KoLeo (Sablayrolles et al. 2019; DINOv2): -mean_i log(||u_i - u_nn(i)|| + eps) on L2-normalised rows,
    nn(i) the nearest other row. Finite on duplicate rows thanks to eps."""
    with _no_autocast(x):
        u = F.normalize(x.float(), eps=eps, dim=-1)
        dots = u @ u.T
        dots.fill_diagonal_(-1.0)  # never pick yourself
        nn_idx = dots.argmax(dim=1)
        dist_nn = F.pairwise_distance(u, u[nn_idx], p=2, eps=eps)
        return -torch.log(dist_nn + eps).mean()


# -----------------------------------------------------------------------------
# collapse signals


def _entropy(logits, temp):
    """Mean per-row entropy of softmax(logits / temp), and the row-mean distribution."""
    logp = F.log_softmax(logits.float() / temp, dim=-1)
    p = logp.exp()
    return -(p * logp).sum(dim=-1).mean(), p.mean(dim=0)


@torch.no_grad()
def collapse_signals(teacher_logits, student_logits, teacher_temp, student_temp):
    """Signals that move when training collapses or learns nothing, under both centerings. Sinkhorn-Knopp targets
    are balanced by construction (their batch mean is uniform), so these read the networks' own outputs instead:
    - teacher_entropy: mean entropy of softmax(teacher logits / T_t) *before* Sinkhorn-Knopp or centering;
      -> 0 when each sample picks one prototype with certainty, -> log K when the outputs are flat;
    - teacher_kl_uniform: KL(batch mean of those softmaxes || uniform); -> log K when every sample picks the same
      prototype (collapse), small when samples spread over the prototypes;
    - prototype_wins: (K,) how many samples have each prototype as the teacher's argmax (train.py sums it over the
      global batch and the steps since its last log line, and logs how many prototypes won at least once: 1 under
      collapse);
    - student_entropy: the same entropy for softmax(student logits / T_s); stuck at log K = nothing learned."""
    with _no_autocast(teacher_logits):
        t_entropy, t_mean = _entropy(teacher_logits, teacher_temp)
        s_entropy, _ = _entropy(student_logits, student_temp)
        K = teacher_logits.shape[-1]
        kl = (t_mean * torch.log(t_mean.clamp_min(1e-30) * K)).sum()
        wins = torch.bincount(teacher_logits.argmax(dim=-1), minlength=K)
    return {"teacher_entropy": t_entropy, "teacher_kl_uniform": kl, "student_entropy": s_entropy,
            "prototype_wins": wins}  # tensors: no device sync here
