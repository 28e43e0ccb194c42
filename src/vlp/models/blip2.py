"""BLIP-2: a Q-Former between a frozen image encoder and a frozen language model (spec `blip2-family.md`).

- `Blip2Qformer` (stage 1, family `blip2_qformer`): the frozen image tower, a trained `ln_vision`, the
  Q-Former with its ITC projections, ITM head and ITG language-model head. Image features are one vector
  per query; a text's similarity to an image is the best over the queries.
- `Blip2` (stage 2, family `blip2`): the Q-Former's query path, a linear projection of the query outputs
  into a frozen Hugging Face language model's embedding space (a soft visual prompt), and the LM: a causal
  one reads the prompt before the text, an encoder-decoder one (T5) in its encoder.

The image tower is any vlp tower (ViT or ConvNet, trained here or converted from Hugging Face or
open_clip); `vision_feature_layer: -2` drops its last block, as BLIP-2 does. Frozen parts run without
gradients, in bf16 when their `*_precision` says so (`auto`: where the hardware has bf16 arithmetic), and are
kept in eval mode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import PositiveFloat, PositiveInt
from vlp.generation import StepDecoder
from vlp.layers import KeyValue
from vlp.models.blip import LMHead
from vlp.precision import DTYPES, Precision, default_device, resolve_precision
from vlp.towers.frozen_image import FrozenImageConfig, FrozenImageEncoder, load_image_tower
from vlp.towers.qformer import QFormer, QFormerConfig


@dataclass
class Blip2Sources:
    """Pre-trained parts a new training run starts from (`vlp.objectives.sources` reads them once; a checkpoint
    holds their weights after that, so loading one never reads these paths)."""

    # Any checkpoint vlp loads (vlp, Hugging Face, open_clip): its image tower, architecture and weights.
    image_encoder: str | None = None
    # A BERT checkpoint folder (Hugging Face) the Q-Former starts from: its sizes, embeddings, self-attention
    # and feed-forward weights (copied into the query feed-forward too); cross-attention starts fresh. Or a
    # vlp stage-1 checkpoint (blip2_qformer): its whole Q-Former (InstructBLIP takes its text side from it).
    # The Q-Former's tokenizer comes with it where the model reads instructions.
    qformer: str | None = None
    # Stage 2: a Hugging Face causal language model folder (config.json, weights, tokenizer).
    language_model: str | None = None


@dataclass
class Blip2QformerConfig:
    sources: Blip2Sources = field(default_factory=Blip2Sources)
    image: FrozenImageConfig = field(default_factory=FrozenImageConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    embed_dim: PositiveInt = 256  # the ITC projections
    init_temperature: PositiveFloat = 0.07  # learned, used as a divisor, not clamped (LAVIS)

    @property
    def text(self) -> QFormerConfig:
        """The section the tokenizer feeds: the Q-Former's text side."""
        return self.qformer


@dataclass
class Blip2QformerOutput:
    image_features: torch.Tensor  # [B, Q, E] L2-normalised, one per query
    text_features: torch.Tensor  # [B, E] L2-normalised, of [CLS]
    temperature: torch.Tensor  # scalar
    image_tokens: torch.Tensor  # [B, N, Dv] after ln_vision: what ITM cross-attends to
    query_kv: list[KeyValue]  # the queries' self-attention keys and values, reused by ITG


class Blip2Qformer(nn.Module):
    def __init__(self, cfg: Blip2QformerConfig):
        super().__init__()
        if not cfg.qformer.text_input:
            raise ValueError("stage 1 reads text: model.qformer.text_input must be true")
        self.cfg = cfg
        self.image_encoder = FrozenImageEncoder(cfg.image)
        width = cfg.qformer.width
        self.qformer = QFormer(cfg.qformer, cfg.image.vision.width)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.lm_head = LMHead(cfg.qformer)
        self.temperature = nn.Parameter(torch.tensor(cfg.init_temperature))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen tower's tokens [B, N, Dv] (before ln_vision)."""
        return self.image_encoder.tower_tokens(images)

    def _image_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[KeyValue]]:
        queries, query_kv = self.qformer.query_states(tokens)
        return F.normalize(self.vision_proj(queries), dim=-1), query_kv

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-query ITC features [B, Q, E], ln_vision tokens [B, N, Dv] for ITM and captioning)."""
        tokens = self.image_encoder(images)
        return self._image_features(tokens)[0], tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Per-query ITC features [B, Q, E]: similarity to a text is the best query's cosine."""
        return self.encode_image_tokens(images)[0]

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The text-only pass's [CLS] state, projected: [B, E]."""
        return F.normalize(self.text_proj(self.qformer.text_states(text, text_mask)[:, 0]), dim=-1)

    def _with_first(self, text: torch.Tensor, token_id: int) -> torch.Tensor:
        text = text.clone()
        text[:, 0] = token_id
        return text

    def itm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match): the ITM head on each query of the bidirectional
        pass, averaged over the queries. The text starts with [CLS]."""
        ids = self._with_first(text, self.cfg.qformer.cls_token_id)
        states = self.qformer.joint_states(image_tokens, ids, text_mask, "itm")[:, : self.cfg.qformer.num_queries]
        return self.itm_head(states).mean(dim=1)

    def lm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, query_kv: list[KeyValue]) -> torch.Tensor:
        """ITG next-token logits [B, L, V] (position i predicts token i + 1); the first token is read as [DEC]."""
        ids = self._with_first(text, self.cfg.qformer.dec_token_id)
        return self.lm_head(self.qformer.decoder_states(ids, text_mask, query_kv))

    def caption_decoder(self, image_tokens: torch.Tensor) -> StepDecoder:
        """The Q-Former as a captioner (LAVIS's stage-1 `generate`): [DEC] first, the queries' keys and
        values as a prefix every text position sees."""
        _, query_kv = self.qformer.query_states(image_tokens)
        q = self.cfg.qformer

        def step(ids: torch.Tensor, key_mask: torch.Tensor, cache: list[KeyValue] | None, state: tuple) -> tuple:
            (query_cache,) = state
            key_mask = torch.cat([key_mask.new_ones(ids.shape[0], q.num_queries), key_mask], dim=1)
            states, cache = self.qformer.decode(ids, key_mask, query_cache if cache is None else cache)
            return self.lm_head(states[:, -1]), cache

        return StepDecoder(step, state=(query_kv,), start_ids=[q.dec_token_id], eos_token_id=q.eos_token_id,
                           pad_token_id=q.pad_token_id, max_length=q.context_length)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> Blip2QformerOutput:
        tokens = self.image_encoder(image)
        image_features, query_kv = self._image_features(tokens)
        return Blip2QformerOutput(
            image_features=image_features,
            text_features=self.encode_text(text, text_mask),
            temperature=self.temperature,
            image_tokens=tokens,
            query_kv=query_kv,
        )

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> list[str]:
        """Start from a pre-trained model of another family: its image tower (a CLIP, SigLIP, BLIP or CoCa
        checkpoint; the blocks past `vision_feature_layer` are not used). Returns what was left as it was."""
        return load_image_tower(self.image_encoder, source)


@dataclass
class Blip2Config:
    sources: Blip2Sources = field(default_factory=Blip2Sources)
    image: FrozenImageConfig = field(default_factory=FrozenImageConfig)
    # Stage 2 keeps the Q-Former's query path only (spec §5.1).
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(text_input=False))
    # The frozen language model's Hugging Face config (`model_type` and sizes, as in its config.json): a causal
    # LM `AutoModelForCausalLM` builds (OPT, GPT-2, Llama class) or an encoder-decoder one
    # `AutoModelForSeq2SeqLM` builds (T5, Flan-T5): the soft prompt then goes to its encoder.
    language_model: dict[str, Any] = field(default_factory=dict)
    lm_precision: Precision = "auto"
    # How `vlp ask` puts a question to the language model (the paper's zero-shot VQA prompt).
    question_template: str = "Question: {} Answer:"

    def __post_init__(self) -> None:
        if "model_type" not in self.language_model and self.sources.language_model is None:
            raise ValueError("language_model must be a Hugging Face config with its model_type (a causal LM "
                             "folder's config.json; `sources.language_model: FOLDER` fills it in for training)")


@dataclass
class EncoderState:
    """An encoder-decoder LM's generation state: the encoder's output for the prefix (computed once) and the
    decoder's own key/value cache."""

    states: torch.Tensor  # [B, P, D]
    mask: torch.Tensor  # [B, P]
    past: Any = None

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.states, self.mask = self.states[index], self.mask[index]
        if self.past is not None:
            self.past.reorder_cache(index)


class LanguageModelDecoder(StepDecoder):
    """A Hugging Face LM decoding from a soft prompt on its own key/value cache (`past_key_values`);
    beam search reorders that cache in place."""

    def reorder(self, index: torch.Tensor) -> None:
        cache = self.cache
        super().reorder(index)
        if cache is not None:
            cache.reorder_cache(index)
            self.cache = cache


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config):
        super().__init__()
        from transformers import AutoConfig  # only this family needs transformers

        self.cfg = cfg
        self.image_encoder = FrozenImageEncoder(cfg.image)
        self.qformer = QFormer(cfg.qformer, cfg.image.vision.width)
        lm_config = AutoConfig.for_model(**cfg.language_model)
        self.encoder_decoder = bool(lm_config.is_encoder_decoder)
        self.language_model = freeze_language_model(language_model_class(lm_config).from_config(lm_config),
                                                    cfg.lm_precision)
        self.language_projection = nn.Linear(cfg.qformer.width, lm_config.get_text_config().hidden_size)

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        self.language_model.eval()
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.tower_tokens(images)

    def query_outputs(self, image_tokens: torch.Tensor, **_: Any) -> torch.Tensor:
        """The Q-Former's query rows [B, Q, D] for ln_vision tokens [B, N, Dv]."""
        return self.qformer.query_states(image_tokens)[0]

    def soft_prompt(self, images: torch.Tensor, **text: torch.Tensor | None) -> torch.Tensor:
        """The projected query outputs [B, Q, D_lm], in the language model's dtype. Images [B, F, 3, H, W] (video
        frames, image pairs) go through the image encoder and the Q-Former one by one, and their soft prompts
        follow each other: [B, F * Q, D_lm] (LAVIS's video path). `text` is what `query_outputs` reads besides
        the image (InstructBLIP's instruction)."""
        frames = images.shape[1] if images.dim() == 5 else 1
        queries = self.query_outputs(self.image_encoder(images.reshape(-1, *images.shape[-3:])), frames=frames, **text)
        prompt = self.language_projection(queries).to(self.language_model.dtype)
        return prompt.reshape(images.shape[0], frames * prompt.shape[1], prompt.shape[2])

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the soft prompt's mean [B, D_lm] (stage 2 has no contrastive embedding), the soft prompt [B, Q, D_lm]
        the language model reads)."""
        prompt = self.soft_prompt(images)
        return prompt.mean(dim=1), prompt

    def text_logits(
        self, prompt: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        encoder_text: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, L, V] of the text after the soft prompt [B, Q, D_lm]: position i predicts
        token i + 1. The language model runs frozen, but gradients flow through it to the prompt.

        An encoder-decoder LM reads the soft prompt (then `encoder_text`, a prefix-LM's caption start) in its
        encoder and the text in its decoder, whose first token is its start token."""
        if self.encoder_decoder:
            embeds, mask = prompt, text_mask.new_ones(prompt.shape[:2])
            if encoder_text is not None:
                embeds = torch.cat([prompt, self.language_model.get_input_embeddings()(encoder_text)], dim=1)
                mask = torch.cat([mask, encoder_mask], dim=1)
            return self.language_model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=text,
                                       decoder_attention_mask=text_mask, use_cache=False).logits
        embeds = torch.cat([prompt, self.language_model.get_input_embeddings()(text)], dim=1)
        mask = torch.cat([text_mask.new_ones(prompt.shape[:2]), text_mask], dim=1)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        return logits[:, prompt.shape[1]:]

    def _start_id(self) -> int:
        config = self.language_model.config
        return config.decoder_start_token_id if self.encoder_decoder else config.bos_token_id

    def caption_decoder(self, prompt: torch.Tensor) -> StepDecoder:
        """The language model decoding after the soft prompt, from its start token."""
        return self._decoder(prompt, None, [self._start_id()])

    @property
    def question_template(self) -> str:
        return self.cfg.question_template

    def _left_aligned(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts as the tokenizer gives them (start token, text, end token, right padding) -> the start token
        and text, end token dropped, padded on the left to the texts' width less one, so that every row's last
        column is its last token. The width depends on the mask's shape alone: rows taken from a batch (one
        question's states for its candidate answers) keep their layout."""
        lengths = mask.long().sum(dim=1) - 1
        width = mask.shape[1] - 1
        columns = torch.arange(width, device=ids.device)[None]
        first = (width - lengths)[:, None]
        real = columns >= first
        aligned = ids.gather(1, (columns - first).clamp(min=0)).masked_fill(~real, self._pad_id())
        return aligned, real.long()

    def _pad_id(self) -> int:
        config = self.language_model.config
        return config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    def _prefix_mask(self, states: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """[soft prompt; question] (left-aligned for a causal LM) -> its key mask [B, S + Lq]."""
        if self.encoder_decoder:
            real = question_mask[:, 1:]
        else:
            real = self._left_aligned(question_mask, question_mask)[1]
        return torch.cat([real.new_ones(real.shape[0], states.shape[1] - real.shape[1]), real], dim=1)

    def question_states(self, prompt: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """The language model's input embeddings [B, S + Lq, D_lm] of a soft prompt [B, S, D_lm] and the question.
        A causal LM gets its start token and the text, left-padded, and the answer follows directly; an encoder
        reads the question and its end token, and the decoder answers from its start token."""
        # The tokenizer starts texts with the decoder's start token, which the encoder does not read.
        ids = question[:, 1:] if self.encoder_decoder else self._left_aligned(question, question_mask)[0]
        return torch.cat([prompt, self.language_model.get_input_embeddings()(ids)], dim=1)

    def encode_question(self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """The soft prompt and the question as the language model reads them (`question_states`)."""
        return self.question_states(self.soft_prompt(images), question, question_mask)

    def answer_decoder_for(self, question_states: torch.Tensor, question_mask: torch.Tensor) -> StepDecoder:
        """The language model continuing after the soft prompt and question (a causal LM: no start token of
        its own)."""
        start = [self._start_id()] if self.encoder_decoder else []
        return self._decoder(question_states, self._prefix_mask(question_states, question_mask), start)

    def answer_logits(
        self, answer: torch.Tensor, answer_mask: torch.Tensor, question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits [A, La, V] of answers (tokenized with their start token, which the question's last
        position stands for) after each row's soft prompt and question."""
        prefix_mask = self._prefix_mask(question_states, question_mask)
        if self.encoder_decoder:
            return self.language_model(inputs_embeds=question_states, attention_mask=prefix_mask,
                                       decoder_input_ids=answer, decoder_attention_mask=answer_mask,
                                       use_cache=False).logits
        embeds = torch.cat([question_states, self.language_model.get_input_embeddings()(answer[:, 1:])], dim=1)
        mask = torch.cat([prefix_mask, answer_mask[:, 1:]], dim=1)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     use_cache=False).logits
        return logits[:, question_states.shape[1] - 1 :]

    def _decoder(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None, start_ids: list[int]) -> StepDecoder:
        lm = self.language_model
        # transformers renamed `past_key_values` to `cache` (5.x); both name the model's own key/value cache.
        cache_key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

        def encoder_decoder_step(inputs: torch.Tensor, key_mask: torch.Tensor, cache: Any, state: tuple) -> tuple:
            if inputs.dim() == 3:  # the prefix: through the encoder, once
                states = lm.get_encoder()(inputs_embeds=inputs, attention_mask=key_mask).last_hidden_state
                return None, EncoderState(states, key_mask)
            decoder_mask = key_mask[:, cache.mask.shape[1]:]
            out = lm(encoder_outputs=(cache.states,), attention_mask=cache.mask, decoder_input_ids=inputs,
                     decoder_attention_mask=decoder_mask, use_cache=True, **{cache_key: cache.past})
            cache.past = out[cache_key]
            return out.logits[:, -1], cache

        def step(inputs: torch.Tensor, key_mask: torch.Tensor, cache: Any, state: tuple) -> tuple:
            # Positions count real tokens only, so left padding and finished rows do not shift them.
            positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -inputs.shape[1]:]
            given = {"inputs_embeds": inputs} if inputs.dim() == 3 else {"input_ids": inputs}
            out = lm(**given, attention_mask=key_mask, position_ids=positions, use_cache=True, **{cache_key: cache})
            return out.logits[:, -1], out[cache_key]

        config = lm.config
        return LanguageModelDecoder(encoder_decoder_step if self.encoder_decoder else step, start_ids=start_ids,
                                    eos_token_id=config.eos_token_id,
                                    pad_token_id=self._pad_id(),
                                    max_length=getattr(config, "max_position_embeddings", None),
                                    prefix=prefix, prefix_mask=prefix_mask)

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
        encoder_text: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits [B, L, V] of the text given the image (see `text_logits`)."""
        return self.text_logits(self.soft_prompt(image), text, text_mask, encoder_text, encoder_mask)

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> list[str]:
        """Start from a stage-1 model (its image encoder, ln_vision, queries and the Q-Former's query path,
        spec §5.1), or take only the image tower of another family's model. Returns what was left as it was."""
        if not isinstance(source, Blip2Qformer):
            return load_image_tower(self.image_encoder, source)
        self.image_encoder.load_state_dict(source.image_encoder.state_dict())
        ours = self.qformer.state_dict()
        theirs = {k: v for k, v in source.qformer.state_dict().items() if k in ours}
        missing = sorted(set(ours) - set(theirs))
        wrong = [k for k in theirs if theirs[k].shape != ours[k].shape]
        if missing or wrong:
            raise ValueError(f"the stage-1 Q-Former does not fit model.qformer: missing {missing[:4]}, other shapes "
                             f"{wrong[:4]}")
        self.qformer.load_state_dict(theirs)
        return []


def language_model_class(config: Any) -> Any:
    """transformers' auto class for a language model config: sequence-to-sequence or causal."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM


def freeze_language_model(lm: nn.Module, precision: Precision) -> nn.Module:
    """No gradients, eval mode, in the given precision (`auto` decided for the default device)."""
    return lm.requires_grad_(False).to(DTYPES[resolve_precision(precision, default_device())]).eval()
