"""Text generation for every captioning family: greedy, beam search and nucleus sampling, batched.

A family hands over a stepwise decoder (BLIP's `StepDecoder`): `start_tokens(prompt)` gives the
prefix, `decoder(tokens, real)` feeds new tokens and returns next-token logits from its key/value
cache, `reorder(index)` keeps and repeats rows for beam search, and `eos_token_id` / `pad_token_id`; an
optional `max_length` caps the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass
class GenerationConfig:
    method: Literal["greedy", "beam", "nucleus"] = "beam"
    max_new_tokens: int = 20
    min_new_tokens: int = 5  # end-of-text is not allowed before this many tokens
    num_beams: int = 3
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL's rule)
    length_penalty: float = 1.0  # beams are ranked by log-probability / length ** length_penalty
    seed: int | None = None


def _adjust(
    logits: torch.Tensor, sequences: torch.Tensor, generated: int, cfg: GenerationConfig, eos: int
) -> torch.Tensor:
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        seen = logits.gather(1, sequences)
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        logits = logits.scatter(1, sequences, seen)
    if generated < cfg.min_new_tokens:
        logits[:, eos] = float("-inf")
    return logits


def _nucleus(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability reaches top_p."""
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, choice).squeeze(1)


def _new_token_budget(decoder: Any, prefix_length: int, cfg: GenerationConfig) -> int:
    """max_new_tokens, cut so that the sequence fits the decoder's positions (when it has a limit)."""
    limit = getattr(decoder, "max_length", None)
    return cfg.max_new_tokens if limit is None else max(0, min(cfg.max_new_tokens, limit - prefix_length))


def _trim(rows: torch.Tensor, eos: int) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def generate(decoder: Any, prompt: torch.Tensor, cfg: GenerationConfig) -> list[list[int]]:
    """Token ids generated after `prompt` [B, P] for each row, end-of-text and padding removed."""
    if cfg.method == "beam":
        return _beam_search(decoder, prompt, cfg)
    eos, pad = decoder.eos_token_id, decoder.pad_token_id
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(cfg.seed)
    sequences = decoder.start_tokens(prompt)
    logits = decoder(sequences, torch.ones_like(sequences))
    finished = torch.zeros(len(sequences), dtype=torch.bool, device=prompt.device)
    new = []
    for step in range(_new_token_budget(decoder, sequences.shape[1], cfg)):
        logits = _adjust(logits, sequences, step, cfg, eos) / cfg.temperature
        token = logits.argmax(dim=-1) if cfg.method == "greedy" else _nucleus(logits, cfg.top_p, generator)
        token = token.masked_fill(finished, pad)
        new.append(token)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= token == eos
        if finished.all():
            break
        logits = decoder(token[:, None], (~finished).long()[:, None])
    return _trim(torch.stack(new, dim=1), eos) if new else [[] for _ in range(len(prompt))]


def _beam_search(decoder: Any, prompt: torch.Tensor, cfg: GenerationConfig) -> list[list[int]]:
    """Keep the `num_beams` best partial captions per image. A beam that ends stays in the running with
    its score frozen (it only extends with padding, at no cost); at the end beams are ranked by
    log-probability over length ** length_penalty."""
    eos, pad, k = decoder.eos_token_id, decoder.pad_token_id, cfg.num_beams
    batch = prompt.shape[0]
    rows = torch.arange(batch, device=prompt.device).repeat_interleave(k)
    decoder.reorder(rows)
    sequences = decoder.start_tokens(prompt[rows])
    logits = decoder(sequences, torch.ones_like(sequences))
    scores = torch.full((batch, k), float("-inf"), device=prompt.device)
    scores[:, 0] = 0.0  # the k copies start identical: only one may expand at the first step
    scores = scores.view(-1)
    finished = torch.zeros(batch * k, dtype=torch.bool, device=prompt.device)
    lengths = torch.zeros(batch * k, device=prompt.device)
    new = torch.empty(batch * k, 0, dtype=torch.long, device=prompt.device)
    for step in range(_new_token_budget(decoder, sequences.shape[1], cfg)):
        logprobs = _adjust(logits, sequences, step, cfg, eos).log_softmax(dim=-1)
        logprobs[finished] = float("-inf")
        logprobs[finished, pad] = 0.0
        vocab = logprobs.shape[1]
        candidates = (scores[:, None] + logprobs).view(batch, k * vocab)
        top_scores, top = candidates.topk(k, dim=1)
        beam = (top // vocab + torch.arange(batch, device=prompt.device)[:, None] * k).view(-1)
        token = (top % vocab).view(-1)
        scores = top_scores.view(-1)
        was_finished = finished[beam]
        sequences = torch.cat([sequences[beam], token[:, None]], dim=1)
        new = torch.cat([new[beam], token[:, None]], dim=1)
        lengths = lengths[beam] + (~was_finished).float()
        finished = was_finished | (token == eos)
        decoder.reorder(beam)
        if finished.all():
            break
        logits = decoder(token[:, None], (~finished).long()[:, None])
    ranked = (scores / lengths.clamp(min=1) ** cfg.length_penalty).view(batch, k)
    best = ranked.argmax(dim=1) + torch.arange(batch, device=prompt.device) * k
    return _trim(new[best], eos)
