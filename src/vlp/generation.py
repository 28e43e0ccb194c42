"""Text generation for every captioning family: greedy, beam search and nucleus sampling, batched.

A family hands over a `StepDecoder`: `start_tokens(prompt)` gives the prefix of ids, `decoder(tokens,
real)` feeds new tokens and returns next-token logits from its key/value cache, `reorder(index)` keeps
and repeats rows for beam search, and `eos_token_id` / `pad_token_id`; `max_length` caps the whole
sequence. A decoder may start from prefix embeddings (a frozen language model reading image queries)
before the ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from vlp.config import NonNegativeInt, PositiveFloat, PositiveInt, Range
from vlp.flags import option


@dataclass
class GenerationConfig:
    method: Literal["greedy", "beam", "nucleus"] = option("beam", help="how tokens are chosen")
    max_new_tokens: PositiveInt = option(20, help="most tokens generated")
    min_new_tokens: NonNegativeInt = option(5, help="end-of-text is not allowed before this many tokens")
    num_beams: PositiveInt = option(3, flag="--beams", help="beams of beam search")
    top_p: Annotated[float, Range(min=0, max=1, exclusive_min=True)] = option(0.9, help="nucleus sampling's mass")
    temperature: PositiveFloat = option(1.0, help="sampling temperature")
    repetition_penalty: PositiveFloat = option(
        1.0, help="> 1 discourages tokens already in the sequence (CTRL's rule)")
    length_penalty: float = option(1.0, help="beams are ranked by log-probability / length ** length_penalty")
    seed: int | None = option(None, help="seed of nucleus sampling")


# step(inputs, key_mask, cache, state) -> (next-token logits [B, V] of the last input, new cache): inputs are
# ids [B, t] or embeddings [B, t, D]; key_mask [B, past + t] is 1 at real positions; state holds tensors
# the step reads (cross-attention keys and values, context masks): per row, reordered with the rows, or per
# sample and shared by its consecutive rows (`shared_state`).
Step = Callable[[torch.Tensor, torch.Tensor, Any, Any], tuple[torch.Tensor, Any]]


class StepDecoder:
    """Incremental decoding over a key/value cache, for every decoder: each new token costs one position
    rather than the whole prefix again. The model supplies `step`; the cache, the key mask, the rows'
    order and an optional prefix of embeddings are kept here."""

    def __init__(
        self,
        step: Step,
        *,
        start_ids: Sequence[int],
        eos_token_id: int,
        pad_token_id: int,
        max_length: int | None,
        state: Any = (),
        shared_state: bool = False,
        prefix: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
    ):
        """start_ids: the ids every sequence starts with ([DEC], or the start-of-text token; none when a
        prefix ends the prompt); prefix [B, P, D] with prefix_mask [B, P]: embeddings fed before them (they
        take P of max_length). shared_state: `state` holds per-sample tensors that all rows of a sample read
        alike (cross-attention keys and values of an image); while beam search keeps each sample's rows
        consecutive they are neither copied nor reordered, and `step` gets them with more rows than samples."""
        self.step, self.state, self.shared_state = step, state, shared_state
        self.sample_of_row: torch.Tensor | None = None
        self.start_ids = list(start_ids)
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.prefix = prefix
        self.prefix_mask = prefix_mask if prefix is None or prefix_mask is not None else torch.ones(
            prefix.shape[:2], dtype=torch.long, device=prefix.device)
        prefix_length = 0 if prefix is None else prefix.shape[1]
        self.max_length = None if max_length is None else max_length - prefix_length
        self.cache: Any = None
        self.key_mask: torch.Tensor | None = None

    def start_tokens(self, prompt: torch.Tensor) -> torch.Tensor:
        """The start ids, then the prompt's tokens [B, P] (may be empty)."""
        first = torch.tensor(self.start_ids, dtype=torch.long, device=prompt.device).expand(prompt.shape[0], -1)
        return torch.cat([first, prompt], dim=1)

    def __call__(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, V] after feeding `tokens` [B, t]; `real` [B, t] is 0 for padding fed after a
        row has finished."""
        if self.key_mask is None and self.prefix is not None:
            self.key_mask = self.prefix_mask
            logits, self.cache = self.step(self.prefix, self.key_mask, None, self.state)
            if not tokens.shape[1]:  # no start ids: the prefix ends the prompt (a question to a language model)
                return logits
        self.key_mask = real if self.key_mask is None else torch.cat([self.key_mask, real], dim=1)
        logits, self.cache = self.step(tokens, self.key_mask, self.cache, self.state)
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (repeats allowed), in that order."""
        self.cache, self.key_mask, self.prefix, self.prefix_mask = _take_rows(
            (self.cache, self.key_mask, self.prefix, self.prefix_mask), index
        )
        if not self.shared_state:
            self.state = _take_rows(self.state, index)
            return
        samples = _first_tensor(self.state).shape[0]
        first = torch.arange(samples, device=index.device)
        self.sample_of_row = (first if self.sample_of_row is None else self.sample_of_row)[index]
        rows = len(index)
        if rows % samples or not torch.equal(self.sample_of_row, first.repeat_interleave(rows // samples)):
            # Rows left their sample's group: each row gets its own copy of the state from here on.
            self.state, self.shared_state = _take_rows(self.state, self.sample_of_row), False


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in nested tuples and lists."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        return next((found for item in value if (found := _first_tensor(item)) is not None), None)
    return None


def _take_rows(value: Any, index: torch.Tensor) -> Any:
    """Rows `index` of every tensor in nested tuples and lists (caches, cross-attention keys and values)."""
    if torch.is_tensor(value):
        return value[index]
    if isinstance(value, (tuple, list)):
        return type(value)(_take_rows(item, index) for item in value)
    return value


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
    """Beam search as BLIP's reference (Hugging Face's `generate`) runs it, so that captions match theirs.

    Each step ranks the 2k best continuations of the k running beams. Those ending in end-of-text among
    the first k become finished hypotheses scored log-probability / new length ** length_penalty;
    the best k that do not end keep running. A row stops once k hypotheses are finished and its best
    running beam, scored at its current length, cannot beat the worst of them; at the last allowed
    position the k best continuations are finished as they are. Penalties act on log-probabilities.
    """
    eos, k = decoder.eos_token_id, cfg.num_beams
    batch, device = prompt.shape[0], prompt.device
    decoder.reorder(torch.arange(batch, device=device).repeat_interleave(k))
    sequences = decoder.start_tokens(prompt.repeat_interleave(k, dim=0))  # [B*k, P]
    logits = decoder(sequences, torch.ones_like(sequences))
    budget = _new_token_budget(decoder, sequences.shape[1], cfg)
    offsets = torch.arange(batch, device=device)[:, None] * k
    running = torch.full((batch, k), -1.0e9, device=device)
    running[:, 0] = 0.0  # the k copies start identical: only one may expand at the first step
    new = torch.empty(batch, k, 0, dtype=torch.long, device=device)
    done_tokens = torch.full((batch, k, max(budget, 1)), decoder.pad_token_id, dtype=torch.long, device=device)
    done_scores = torch.full((batch, k), -1.0e9, device=device)
    done = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    first_k = torch.arange(2 * k, device=device) < k
    for step in range(budget):
        logprobs = _adjust(logits.float().log_softmax(dim=-1), sequences, step, cfg, eos)
        vocab = logprobs.shape[1]
        total = (running.view(-1, 1) + logprobs).view(batch, k * vocab)
        top_scores, top = total.topk(2 * k, dim=1)  # [B, 2k]
        source, token = top // vocab, top % vocab
        candidates = torch.cat([new.gather(1, source[..., None].expand(-1, -1, step)), token[..., None]], dim=2)
        ends = (token == eos) | (step == budget - 1)
        # Running beams for the next step: the best k continuations that did not end.
        keep = (top_scores - 1.0e9 * ends.float()).topk(k, dim=1).indices
        running, new = (
            (top_scores - 1.0e9 * ends.float()).gather(1, keep),
            candidates.gather(1, keep[..., None].expand(-1, -1, step + 1)),
        )
        # Finished hypotheses: merge the ones that just ended among the first k, keep the best k.
        final = top_scores / (step + 1) ** cfg.length_penalty
        final = final - 1.0e9 * (~(ends & first_k)).float() - 1.0e9 * (~improvable).float()
        padded = torch.full((batch, 2 * k, done_tokens.shape[2]), decoder.pad_token_id, dtype=torch.long, device=device)
        padded[:, :, : step + 1] = candidates
        best = torch.cat([done_scores, final], dim=1).topk(k, dim=1).indices
        done_scores = torch.cat([done_scores, final], dim=1).gather(1, best)
        done_tokens = torch.cat([done_tokens, padded], dim=1).gather(1, best[..., None].expand(-1, -1, padded.shape[2]))
        done = torch.cat([done, ends & first_k], dim=1).gather(1, best)
        rows = (source.gather(1, keep) + offsets).view(-1)
        decoder.reorder(rows)
        sequences = torch.cat([sequences[rows], new[:, :, -1].reshape(-1, 1)], dim=1)
        worst = torch.where(done, done_scores.min(dim=1, keepdim=True).values, torch.tensor(-1.0e9, device=device))
        improvable &= (running[:, :1] / (step + 1) ** cfg.length_penalty > worst).any(dim=1, keepdim=True)
        if step == budget - 1 or not improvable.any():
            break
        logits = decoder(new[:, :, -1].reshape(-1, 1), torch.ones(batch * k, 1, dtype=torch.long, device=device))
    if budget == 0:
        return [[] for _ in range(batch)]
    return _trim(done_tokens[:, 0], eos)
