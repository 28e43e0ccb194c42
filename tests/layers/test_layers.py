import math

import pytest
import torch
import torch.nn.functional as F

from vlp.layers import Attention, AttentionPool, QuickGELU, TransformerBlock, make_activation, resize_pos_embed
from vlp.towers import TextConfig, TextTransformer, VisionConfig, VisionTransformer


def naive_attention(attn: Attention, x, context=None, mask=None):
    """Attention written out by hand: softmax(q k^T / sqrt(d)) v per head."""
    dim = attn.out_proj.in_features
    if context is None:
        q, k, v = attn.qkv_proj(x).split(dim, dim=-1)
    else:
        q = attn.q_proj(x)
        k, v = attn.kv_proj(context).split(dim, dim=-1)
    heads = attn.num_heads
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def test_attention_matches_naive_with_causal_and_padding_masks():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), naive_attention(attn, x, mask=causal))
    key_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()[:, None, None, :]
    torch.testing.assert_close(attn(x, attn_mask=key_mask), naive_attention(attn, x, mask=key_mask))
    torch.testing.assert_close(attn(x, attn_mask=key_mask, is_causal=True),
                               naive_attention(attn, x, mask=key_mask & causal))


def test_cross_attention_reads_a_context_of_another_width():
    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=48)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 48)
    torch.testing.assert_close(attn(x, ctx), naive_attention(attn, x, context=ctx))


def test_activations():
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(make_activation("gelu")(x), F.gelu(x))
    torch.testing.assert_close(make_activation("gelu_tanh")(x), F.gelu(x, approximate="tanh"))
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="unknown activation"):
        make_activation("relu")


def test_causal_text_tower_does_not_look_ahead():
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4))
    ids = torch.randint(0, 50, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 50
    a, b = tower.forward_features(ids), tower.forward_features(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("pool, eot_token_id, causal", [
    ("eot", None, True), ("eot", 49, True), ("argmax", None, True), ("first", None, True), ("last", None, True),
    ("eot", None, False),
])
def test_text_encode_skips_padding_and_equals_the_full_forward(pool, eot_token_id, causal):
    """`encode` stops a causal tower at the batch's last pooled token; its pooled output is unchanged."""
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, context_length=16, width=32, layers=2, heads=4, pool=pool,
                     eot_token_id=eot_token_id, causal=causal)
    tower = TextTransformer(cfg).eval()
    lengths = [3, 7, 5]
    ids = torch.zeros(3, 16, dtype=torch.long)
    mask = torch.zeros(3, 16, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.randint(1, 48, (length - 1,))
        ids[row, length - 1] = 49  # end of text: the largest id, as in CLIP's vocabulary
        mask[row, :length] = 1
    seen = []
    handle = tower.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    pooled, _ = tower(ids, mask)
    torch.testing.assert_close(tower.encode(ids, mask), pooled, atol=1e-6, rtol=1e-5)
    handle.remove()
    skips = causal and pool != "last"
    assert seen == [16, (1 if pool == "first" else max(lengths)) if skips else 16]


def test_bidirectional_padding_mask_hides_pads_and_pools():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4, causal=False, mask_padding=True)
    tower = TextTransformer(cfg)
    ids = torch.randint(1, 50, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    other = ids.clone()
    other[0, 5:] = 0
    pooled_a, tokens_a = tower(ids, mask)
    _pooled_b, tokens_b = tower(other, mask)
    torch.testing.assert_close(tokens_a[:, :5], tokens_b[:, :5])
    torch.testing.assert_close(pooled_a, tokens_a[:, 4])  # eot = last real token
    tower.cfg.pool = "first"
    torch.testing.assert_close(tower(ids, mask)[0], tokens_a[:, 0])
    tower.cfg.pool = "last"
    torch.testing.assert_close(tower(ids, mask)[0], tokens_a[:, -1])


def test_text_tower_cross_attends_to_image_tokens():
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=4,
                                       cross_attention_width=48))
    ids = torch.randint(0, 50, (2, 8))
    image_a, image_b = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    pooled_a, _ = tower(ids, image_tokens=image_a)
    pooled_b, _ = tower(ids, image_tokens=image_b)
    assert pooled_a.shape == (2, 32)
    assert not torch.allclose(pooled_a, pooled_b)
    with pytest.raises(ValueError, match="needs a context"):
        tower(ids)


@pytest.mark.parametrize("pool, class_token", [("cls", True), ("mean", True), ("mean", False), ("map", False)])
def test_vision_tower_pools(pool, class_token):
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, pool=pool, class_token=class_token)
    tower = VisionTransformer(cfg)
    pooled, tokens = tower(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 16 + class_token, 32)
    assert pooled.shape == (3, 32)
    if pool == "cls":
        torch.testing.assert_close(pooled, tokens[:, 0])
    if pool == "mean":
        torch.testing.assert_close(pooled, tokens[:, int(class_token):].mean(1))


def test_vision_tower_runs_at_another_resolution_by_resizing_positions():
    tower = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4))
    _pooled, tokens = tower(torch.randn(1, 3, 48, 48))
    assert tokens.shape == (1, 1 + 36, 32)
    table = torch.randn(1 + 16, 8)
    resized = resize_pos_embed(table, (6, 6), num_prefix=1)
    assert resized.shape == (37, 8)
    torch.testing.assert_close(resized[0], table[0])  # the class token row is kept
    assert resize_pos_embed(table, (4, 4), num_prefix=1) is table
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        tower(torch.randn(1, 3, 30, 30))


def test_convolutional_stem_makes_the_patch_grid_and_each_token_sees_only_its_neighbourhood():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4, stem_channels=[8, 16, 16])
    tower = VisionTransformer(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    stem = tower.patch_embed(images)
    assert stem.shape == (2, 16, 32)
    changed = images.clone()
    changed[:, :, 24:, 24:] += 1.0  # the last patch's pixels
    moved = (tower.patch_embed(changed) - stem).abs().amax(dim=(0, 2)).view(4, 4)
    # 3x3 kernels of stride 2 reach a few pixels past a patch: the corner and its neighbours move, the rest not.
    assert moved[3, 3] > 0 and moved[:2].abs().max() == 0 and moved[:, :2].abs().max() == 0
    pooled, tokens = tower(images)
    assert tokens.shape == (2, 17, 32) and pooled.shape == (2, 32)
    with pytest.raises(ValueError, match="makes patches of 4, not patch_size 8"):
        VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4, stem_channels=[8, 16])


def test_attention_pool_returns_one_row_per_query_and_respects_mask():
    torch.manual_seed(0)
    pool = AttentionPool(32, 4, num_queries=3)
    tokens = torch.randn(2, 10, 32)
    assert pool(tokens).shape == (2, 3, 32)
    mask = torch.zeros(2, 1, 1, 10, dtype=torch.bool)
    mask[..., :4] = True
    changed = tokens.clone()
    changed[:, 4:] = 0
    torch.testing.assert_close(pool(tokens, mask), pool(changed, mask))


def test_block_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4)
    tower = VisionTransformer(cfg)
    images = torch.randn(2, 3, 16, 16)
    tower(images)[0].sum().backward()
    plain = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    tower.cfg.grad_checkpointing = True
    tower(images)[0].sum().backward()
    for a, p in zip(plain, tower.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_block_shapes():
    block = TransformerBlock(32, 4, mlp_ratio=2.0, act="quick_gelu", context_dim=16)
    out = block(torch.randn(2, 5, 32), context=torch.randn(2, 3, 16), is_causal=True)
    assert out.shape == (2, 5, 32)
    assert block.mlp.fc1.out_features == 64
