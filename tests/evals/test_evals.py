import pytest
import torch

from vlp.data.sources import DataError
from vlp.evals.retrieval import retrieval_metrics, zeroshot_retrieval
from vlp.evals.zeroshot import class_embeddings, classification_metrics, read_classification_data


def test_retrieval_counts_a_hit_when_any_positive_is_in_top_k():
    # 2 images, captions 0,1 -> image 0, caption 2 -> image 1
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)  # caption 1 retrieves image 1 first
    assert m["image_retrieval_recall@2"] == 1.0
    # image 0's best caption is caption 0 (its own); image 1's best is caption 1 (image 0's), then caption 2
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0


def test_zeroshot_retrieval_with_predict_functions():
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "x": [0.9, 0.1], "y": [0.1, 0.9]}

    def embed(items):
        return torch.tensor([table[i] for i in items])

    metrics, sim = zeroshot_retrieval(embed, embed, ["a", "b"], [["x"], ["y", "x"]], ks=(1,))
    assert sim.shape == (3, 2)
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@1"] == 1.0


def test_classification_metrics_and_template_averaging():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [1, 0, 2], [2, 1, 0]])
    labels = torch.tensor([0, 2, 2, 1])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.5
    assert m["acc5"] is None  # fewer than five classes: not defined (CLIP_benchmark writes NaN)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0) / 3)

    def embed(texts):
        return torch.tensor([[1.0, 0.0] if "cat" in t else [0.0, 1.0] for t in texts]) + torch.tensor(
            [[0.0, 0.1] if t.startswith("a") else [0.1, 0.0] for t in texts]
        )

    emb = class_embeddings(embed, ["cat", "dog"], ["a {}.", "the {}"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert emb[0, 0] > 0.99 and emb[1, 1] > 0.99


def test_classification_data_from_folders_and_csv(tmp_path):
    for name in ("cat", "big_dog"):
        (tmp_path / "f" / name).mkdir(parents=True)
        (tmp_path / "f" / name / "1.png").write_bytes(b"")
    paths, labels = read_classification_data(tmp_path / "f", ["big dog", "cat"])
    assert labels == [0, 1]
    (tmp_path / "d.csv").write_text("filepath,label\nx.png,cat\ny.png,1\n")
    paths, labels = read_classification_data(tmp_path / "d.csv", ["cat", "dog"])
    assert labels == [0, 1] and paths[0] == tmp_path / "x.png"
    (tmp_path / "e.csv").write_text("filepath,label\nx.png,bird\n")
    with pytest.raises(DataError, match="line 2: label 'bird'"):
        read_classification_data(tmp_path / "e.csv", ["cat"])


def test_reranking_rescores_only_the_top_k_with_the_matching_head():
    from vlp.evals.retrieval import reranked_retrieval, retrieval_metrics

    torch.manual_seed(0)
    similarity = torch.rand(12, 6)  # 12 captions, 2 per image
    text_to_image = torch.arange(6).repeat_interleave(2)
    # A head that says nothing leaves the embedding ranking as it was.
    unchanged = reranked_retrieval(similarity, text_to_image, lambda i, t: torch.zeros(len(i)), k=6)
    assert unchanged == retrieval_metrics(similarity, text_to_image)
    # A head that knows the answer puts every positive first, but only among the top k it is shown.
    calls = []

    def oracle(images, texts):
        calls.append(len(images))
        return 10.0 * (text_to_image[texts] == images).float()

    perfect = reranked_retrieval(similarity, text_to_image, oracle, k=12)
    assert perfect["image_retrieval_recall@1"] == 1.0 and perfect["text_retrieval_recall@1"] == 1.0
    assert calls == [12 * 6, 6 * 12]  # k is capped at the candidates there are
    partial = reranked_retrieval(similarity, text_to_image, oracle, k=1)
    assert (
        partial["image_retrieval_recall@1"] == retrieval_metrics(similarity, text_to_image)["image_retrieval_recall@1"]
    )


def test_classification_metrics_break_ties_as_clip_benchmark():
    """CLIP_benchmark takes acc1/acc5 from `topk` and the balanced accuracy from `argmax` (the first of
    equal logits); torch's `topk` puts another of the tied classes first here."""
    logits = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    labels = torch.tensor([0])
    assert logits.argmax(dim=1).item() == 0 and logits.topk(1).indices.item() != 0
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.0 and m["mean_per_class_recall"] == 1.0 and m["acc5"] == 1.0


def test_reranking_below_the_reported_k_keeps_the_embedding_order_past_k():
    """Re-ranking only the top 1 must leave recall@5 and @10 those of the embeddings, not of an
    arbitrary order among candidates all scored alike."""
    from vlp.evals.retrieval import reranked_retrieval, retrieval_metrics

    torch.manual_seed(1)
    similarity = torch.rand(40, 20)
    text_to_image = torch.arange(20).repeat_interleave(2)
    reranked = reranked_retrieval(similarity, text_to_image, lambda i, t: torch.zeros(len(i)), k=1)
    assert reranked == retrieval_metrics(similarity, text_to_image)


def test_caption_metrics_follow_the_standard_ptb_protocol_by_default():
    """Papers report PTB-tokenised scores; the regex tokeniser splits hyphens, apostrophes and decimals
    and drops accents, so it scores such captions differently, and says so."""
    from vlp.evals.captioning import PROTOCOLS, caption_metrics

    references = [["a man in a t-shirt holds a 3.5 inch phone", "the man's shirt is red"], ["a café by the road"]]
    candidates = ["a man in a t-shirt holding a phone", "a café on a road"]
    default = caption_metrics(references, candidates, meteor=False)
    assert default == caption_metrics(references, candidates, meteor=False, tokenizer="ptb")
    simple = caption_metrics(references, candidates, meteor=False, tokenizer="simple")
    assert simple["cider"] > default["cider"] and simple["bleu4"] != default["bleu4"]
    assert "PTB" in PROTOCOLS["ptb"] and "not the standard protocol" in PROTOCOLS["simple"]
