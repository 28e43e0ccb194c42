import math

import torch
import torch.nn.functional as F

from vlp.losses import contrastive_loss, sigmoid_loss


def features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def naive_infonce(img, txt, scale):
    """Per-row loops: -log softmax of the matching pair, averaged over both directions."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def naive_sigmoid(img, txt, scale, bias):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += math.log(1 + math.exp(-z * logit))
    return total / n


def test_contrastive_loss_matches_naive():
    img, txt = features()
    for scale in (1.0, 14.28, 100.0):
        loss = contrastive_loss(img, txt, torch.tensor(scale))
        assert abs(loss.item() - naive_infonce(img, txt, scale)) < 1e-4


def test_sigmoid_loss_matches_naive():
    img, txt = features()
    for scale, bias in ((10.0, -10.0), (3.0, 0.5)):
        loss = sigmoid_loss(img, txt, torch.tensor(scale), torch.tensor(bias))
        assert abs(loss.item() - naive_sigmoid(img, txt, scale, bias)) < 1e-4


def test_losses_compute_in_fp32_under_bf16_features():
    img, txt = features()
    loss = contrastive_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(10.0))
    assert loss.dtype == torch.float32
    loss = sigmoid_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(10.0), torch.tensor(-10.0))
    assert loss.dtype == torch.float32


def test_perfect_alignment_gives_low_loss():
    img, _ = features()
    assert contrastive_loss(img, img, torch.tensor(100.0)) < contrastive_loss(*features(), torch.tensor(100.0))
