"""Distributed losses on two gloo processes equal one process on the same global batch.

Each case trains nothing: a small two-tower model wrapped in DDP embeds its process's slice of a
fixed global batch; the loss, averaged over processes, and the DDP-averaged gradients are compared
with one process that sees the whole batch.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import free_port
from vlp.distributed import all_reduce_mean, setup_from_environment
from vlp.losses import contrastive_loss, max_query_contrastive_loss, sigmoid_loss

GLOBAL_BATCH, WORLD = 12, 2
CASES = [("clip", None), ("clip", 4), ("siglip", None), ("siglip", 4), ("blip2", None)]
UNEVEN = 7  # rank 0's rows when a split is uneven, as when bad samples were dropped on one process


class TwoTowers(nn.Module):
    """Returns what the dual encoder returns: normalised features, the exp'd scale, the bias (SigLIP)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.image = nn.Linear(16, 8)
        self.text = nn.Linear(12, 8)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0)) if bias else None

    def forward(self, images, texts):
        image, text = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias


def _model(loss_name):
    torch.manual_seed(0)
    return TwoTowers(bias=loss_name == "siglip")


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 12, generator=g)


def _loss_and_grads(model, wrapped, images, texts, loss_name, chunk):
    image_features, text_features, scale, bias = wrapped(images, texts)
    if loss_name == "clip":
        loss = contrastive_loss(image_features, text_features, scale, chunk_size=chunk)
    elif loss_name == "blip2":  # two 4-wide query features per image, the best one counts
        loss = max_query_contrastive_loss(_queries(image_features), text_features[:, :4], 1 / scale,
                                          label_smoothing=0.1)[0]
    else:
        loss = sigmoid_loss(image_features, text_features, scale, bias, chunk_size=chunk)
    model.zero_grad()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return all_reduce_mean(loss).item(), grads


def _queries(image_features):
    return F.normalize(image_features.view(len(image_features), 2, 4), dim=-1)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    images, texts = _global_batch()
    local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    uneven = slice(0, UNEVEN) if rank == 0 else slice(UNEVEN, GLOBAL_BATCH)
    results = {}
    for case in CASES:
        model = _model(case[0])
        results[case] = _loss_and_grads(model, DistributedDataParallel(model), images[local], texts[local], *case)
        model = _model(case[0])
        results[case, "uneven"] = _loss_and_grads(
            model, DistributedDataParallel(model), images[uneven], texts[uneven], *case
        )
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


@pytest.mark.parametrize("case", CASES, ids=[f"{loss}-chunk{chunk}" for loss, chunk in CASES])
def test_two_processes_equal_one_process_on_the_global_batch(two_process_results, case):
    model = _model(case[0])
    images, texts = _global_batch()
    loss, grads = _loss_and_grads(model, model, images, texts, *case)
    distributed_loss, distributed_grads = two_process_results[case]
    assert distributed_loss == pytest.approx(loss, abs=1e-5)
    assert set(distributed_grads) == set(grads) == {n for n, _ in model.named_parameters()}
    for name, grad in grads.items():
        torch.testing.assert_close(distributed_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def _row_losses(loss_name, image, text, scale, bias):
    """Each image row's loss on the whole global batch, written out independently of vlp.losses."""
    logits = scale * image @ text.T
    if loss_name == "blip2":
        logits = scale * (_queries(image)[:, None] * text[None, :, None, :4]).sum(-1).amax(dim=-1)
        labels = torch.arange(len(image))
        return (F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
                + F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=0.1)) / 2
    if loss_name == "clip":
        labels = torch.arange(len(image))
        return (
            F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")
        ) / 2
    signs = 2 * torch.eye(len(image)) - 1
    return -F.logsigmoid(signs * (logits + bias)).sum(dim=1)


@pytest.mark.parametrize("case", CASES, ids=[f"{loss}-chunk{chunk}" for loss, chunk in CASES])
def test_uneven_local_batches_weight_each_process_equally(two_process_results, case):
    """With 7 and 5 rows, each process averages its own rows and DDP averages the processes."""
    model = _model(case[0])
    images, texts = _global_batch()
    image, text, scale, bias = model(images, texts)
    rows = _row_losses(case[0], image, text, scale, bias)
    loss = (rows[:UNEVEN].mean() + rows[UNEVEN:].mean()) / WORLD
    loss.backward()
    distributed_loss, distributed_grads = two_process_results[case, "uneven"]
    assert distributed_loss == pytest.approx(loss.item(), abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed_grads[name], p.grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_chunked_losses_equal_the_whole_matrix(loss_name):
    model = _model(loss_name)
    images, texts = _global_batch()
    loss, grads = _loss_and_grads(model, model, images, texts, loss_name, None)
    for chunk in (1, 5, 12, 100):
        chunked_loss, chunked_grads = _loss_and_grads(model, model, images, texts, loss_name, chunk)
        assert chunked_loss == pytest.approx(loss, abs=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=0)


def test_slurm_variables_without_a_rendezvous_address_say_what_is_missing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so the variables the code sets are removed afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        setup_from_environment()
    assert os.environ["RANK"] == "1" and os.environ["WORLD_SIZE"] == "4"
