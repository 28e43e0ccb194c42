"""The one cached step decoder: a prefix of embeddings stands for the tokens it embeds, and rows reorder."""

import torch

from vlp.generation import GenerationConfig, StepDecoder, generate
from vlp.towers import TextConfig, TextTransformer


def _decoder(tower: TextTransformer, head: torch.nn.Linear, **prefix) -> StepDecoder:
    def step(inputs, key_mask, cache, state):
        states, cache = tower.decode(inputs, key_mask, cache)
        return head(tower.ln_final(states[:, -1])), cache

    return StepDecoder(step, start_ids=[1], eos_token_id=2, pad_token_id=0, max_length=tower.cfg.context_length,
                       **prefix)


def test_a_prefix_of_embeddings_generates_what_its_tokens_generate():
    """A frozen language model reading image queries gets them as embeddings before its start token: the
    same embeddings given as tokens must decode to the same text, greedy and beam, with a padded prefix."""
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(vocab_size=30, context_length=24, width=32, layers=2, heads=2)).eval()
    head = torch.nn.Linear(32, 30)
    prefix_ids = torch.randint(3, 30, (3, 4))
    empty = prefix_ids[:, :0]
    with torch.no_grad():
        embeddings = tower.token_embedding(prefix_ids)
        for method in ("greedy", "beam"):
            cfg = GenerationConfig(method=method, max_new_tokens=6, min_new_tokens=6, num_beams=2)
            from_embeddings = generate(_decoder(tower, head, prefix=embeddings), empty, cfg)
            as_tokens = _decoder(tower, head)
            as_tokens.start_ids = []  # the prefix ids, then the start token, fed as one prompt
            prompt = torch.cat([prefix_ids, torch.ones(3, 1, dtype=torch.long)], dim=1)
            from_ids = generate(as_tokens, prompt, cfg)
            assert from_embeddings == from_ids, method
        # Masked prefix positions (a padded prefix) are never attended to: what they hold changes nothing.
        mask = torch.tensor([[0, 0, 1, 1]] * 3)
        other = embeddings.clone()
        other[:, :2] = torch.randn(3, 2, 32) * 5
        cfg = GenerationConfig(method="beam", max_new_tokens=5, min_new_tokens=5, num_beams=2)
        padded = generate(_decoder(tower, head, prefix=embeddings, prefix_mask=mask), empty, cfg)
        assert generate(_decoder(tower, head, prefix=other, prefix_mask=mask), empty, cfg) == padded
        assert generate(_decoder(tower, head, prefix=other), empty, cfg) != padded  # unmasked, they count


def test_the_prefix_counts_against_the_decoders_positions():
    tower = TextTransformer(TextConfig(vocab_size=30, context_length=8, width=32, layers=1, heads=2)).eval()
    decoder = _decoder(tower, torch.nn.Linear(32, 30), prefix=torch.zeros(1, 5, 32))
    assert decoder.max_length == 3
    with torch.no_grad():
        out = generate(decoder, torch.zeros(1, 0, dtype=torch.long), GenerationConfig(method="greedy",
                                                                                      max_new_tokens=10))
    assert len(out[0]) <= 2  # the start token and at most two new ones fit the 8 positions
