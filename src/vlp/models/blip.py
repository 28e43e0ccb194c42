"""BLIP: the multimodal mixture of encoder-decoder (MED).

One image transformer and one BERT-style text transformer used three ways:
- unimodal text encoder: bidirectional self-attention, no cross-attention; its first token ([CLS])
  gives the ITC embedding;
- image-grounded text encoder: the same plus cross-attention to the image tokens in every layer; the
  first token is replaced by [ENC] and its output feeds the 2-way ITM head;
- image-grounded text decoder: causal self-attention, cross-attention, first token [DEC]; an MLM-style
  head predicts the next token.

The paper shares everything between encoder and decoder except the self-attention layers
(`share: all_but_self_attention`); `all` and `none` are its ablations.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import Fraction, NonNegativeInt, PositiveFloat, PositiveInt
from vlp.generation import StepDecoder
from vlp.layers import Attention, KeyValue, TransformerBlock, make_activation
from vlp.towers import BertTextConfig, BertTextTransformer, ImageTowerConfig, VisionConfig, build_image_tower


@dataclass
class BlipConfig:
    # BLIP's ViT-B/16 (kind: convnet also works: the pooled feature stands in for the class token).
    vision: ImageTowerConfig = field(
        default_factory=lambda: VisionConfig(
            image_size=384, patch_size=16, norm_eps=1e-6, ln_pre=False, patch_bias=True
        )
    )
    text: BertTextConfig = field(default_factory=BertTextConfig)
    embed_dim: PositiveInt = 256  # the ITC projections
    init_temperature: PositiveFloat = 0.07
    # The temperature is clamped into this range after every step, as BLIP does.
    min_temperature: PositiveFloat = 0.001
    max_temperature: PositiveFloat = 0.5
    # ALBEF-style momentum encoders (an EMA of the image and text encoders and projections) with
    # feature queues, for momentum distillation in ITC. BLIP: 0.995 and 57,600. None = neither.
    momentum: Fraction | None = None
    queue_size: NonNegativeInt = 0

    def __post_init__(self) -> None:
        if self.queue_size and self.momentum is None:
            raise ValueError("queue_size needs momentum: the queues hold momentum-encoder features")


class LMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the vocabulary projection."""

    def __init__(self, cfg: BertTextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.act = make_activation(cfg.act)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


@dataclass
class BlipOutput:
    image_features: torch.Tensor  # [B, E] L2-normalised ITC embeddings
    text_features: torch.Tensor  # [B, E]
    temperature: torch.Tensor  # scalar
    image_tokens: torch.Tensor  # [B, N, Dv], what the grounded text modes cross-attend to


class Blip(nn.Module):
    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        self.text = BertTextTransformer(cfg.text, cfg.vision.width, cfg.text.share == "all_but_self_attention")
        # share none: the decoder is a second text transformer of its own.
        self.text_decoder = BertTextTransformer(cfg.text, cfg.vision.width, False) if cfg.text.share == "none" else None
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.width, 2)
        self.lm_head = LMHead(cfg.text)
        self.temperature = nn.Parameter(torch.tensor(cfg.init_temperature))
        self.momentum_encoder: nn.ModuleDict | None = None
        if cfg.momentum is not None:
            self.momentum_encoder = nn.ModuleDict(
                {name: copy.deepcopy(getattr(self, name)) for name in ("visual", "vision_proj", "text", "text_proj")}
            ).requires_grad_(False)
            queue = F.normalize(torch.randn(2, cfg.queue_size, cfg.embed_dim), dim=-1)
            self.register_buffer("image_queue", queue[0].clone())  # [Q, E]
            self.register_buffer("text_queue", queue[1].clone())
            self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
            self.register_buffer("momentum_steps", torch.zeros((), dtype=torch.long))

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (ITC image embedding [B, E], normalised image tokens [B, N, Dv])."""
        pooled, tokens = self.visual(images)  # pooled: the ViT's class token
        return F.normalize(self.vision_proj(pooled), dim=-1), tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image_tokens(images)[0]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output tokens [B, N, D] before any pooling."""
        return self.visual.forward_features(images)

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """The unimodal encoder's first ([CLS]) state, projected: the ITC text embedding [B, E]."""
        return F.normalize(self.text_proj(self.text(text, text_mask, mode="text")[:, 0]), dim=-1)

    def _with_first(self, text: torch.Tensor, token_id: int) -> torch.Tensor:
        text = text.clone()
        text[:, 0] = token_id
        return text

    def itm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match) from the image-grounded encoder's [ENC] state."""
        ids = self._with_first(text, self.cfg.text.enc_token_id)
        states = self.text(ids, text_mask, mode="multimodal", context=image_tokens)
        return self.itm_head(states[:, 0])

    def decoder_states(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        ids = self._with_first(text, self.cfg.text.dec_token_id)
        return self.decoder_text(ids, text_mask, mode="decoder", context=image_tokens)

    @property
    def decoder_text(self) -> BertTextTransformer:
        """The text transformer the decoder runs on: its own under share none, else the shared one."""
        return self.text_decoder if self.text_decoder is not None else self.text

    def lm_logits(self, text: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, V]: position i predicts token i + 1; the first token is read as [DEC]."""
        return self.lm_head(self.decoder_states(text, text_mask, image_tokens))

    def caption_decoder(self, image_tokens: torch.Tensor) -> StepDecoder:
        """The image-grounded decoder, stepwise with a key/value cache, for `vlp.generation`."""
        return med_step_decoder(self.decoder_text, self.lm_head, image_tokens)

    def _objectives_using(self, name: str) -> set[str]:
        """Which objectives (itc, itm, lm) parameter `name` takes part in."""
        top, share = name.split(".")[0], self.cfg.text.share
        if top in ("vision_proj", "text_proj", "temperature"):
            return {"itc"}
        if top == "itm_head":
            return {"itm"}
        if top in ("lm_head", "text_decoder"):
            return {"lm"}
        if top != "text":
            return {"itc", "itm", "lm"}  # the image encoder
        cross = re.search(r"\.(cross_attn|norm_cross)\.", name) is not None
        if re.search(r"\.decoder_(attn|norm1)\.", name):
            return {"lm"}
        if share == "none":  # the decoder is text_decoder; this is the encoder alone
            return {"itm"} if cross else {"itc", "itm"}
        if cross:
            return {"itm", "lm"}
        if share == "all_but_self_attention" and re.search(r"\.(attn|norm1)\.", name):
            return {"itc", "itm"}
        return {"itc", "itm", "lm"}

    def freeze_unused(self, *, itc: bool, itm: bool, lm: bool) -> list[str]:
        """Stop training the parameters that only switched-off objectives use; returns their names."""
        active = {term for term, on in (("itc", itc), ("itm", itm), ("lm", lm)) if on}
        names = [n for n, p in self.named_parameters() if p.requires_grad and not self._objectives_using(n) & active]
        for name in names:
            self.get_parameter(name).requires_grad_(False)
        return names

    @torch.no_grad()
    def update_momentum_encoder(self) -> None:
        """momentum params <- m * momentum params + (1 - m) * params."""
        m = self.cfg.momentum
        for name, momentum_module in self.momentum_encoder.items():
            for ema, current in zip(momentum_module.parameters(), getattr(self, name).parameters(), strict=True):
                ema.mul_(m).add_(current.detach(), alpha=1 - m)
        self.momentum_steps += 1

    @torch.no_grad()
    def momentum_features(
        self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITC embeddings [B, E] of the image and text from the momentum encoders."""
        encoder = self.momentum_encoder
        image_features = F.normalize(encoder["vision_proj"](encoder["visual"](image)[0]), dim=-1)
        text_features = F.normalize(encoder["text_proj"](encoder["text"](text, text_mask, mode="text")[:, 0]), dim=-1)
        return image_features, text_features

    @torch.no_grad()
    def enqueue(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        """Write the global batch's momentum features over the oldest queue entries."""
        size, start = image_features.shape[0], int(self.queue_pointer)
        if self.cfg.queue_size % size:
            raise ValueError(f"queue_size {self.cfg.queue_size} is not a multiple of the global batch {size}")
        self.image_queue[start : start + size] = image_features
        self.text_queue[start : start + size] = text_features
        self.queue_pointer.fill_((start + size) % self.cfg.queue_size)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> BlipOutput:
        image_features, tokens = self.encode_image_tokens(image)
        return BlipOutput(
            image_features=image_features,
            text_features=self.encode_text(text, text_mask),
            temperature=self.temperature,
            image_tokens=tokens,
        )


def med_step_decoder(
    decoder: BertTextTransformer, lm_head: LMHead, context: torch.Tensor, context_mask: torch.Tensor | None = None
) -> StepDecoder:
    """A MED decoder for incremental generation from [DEC]: the context's cross-attention keys and values
    (image tokens, or question states) are computed once; self-attention keys and values are cached."""
    cross_kv = [layer.cross_attn.context_kv(context) for layer in decoder.layers]

    def step(ids: torch.Tensor, key_mask: torch.Tensor, cache: list[KeyValue] | None, state: tuple) -> tuple:
        cross_kv, context_mask = state
        states, cache = decoder.decode(ids, key_mask, cache, cross_kv, context_mask)
        return lm_head(states[:, -1]), cache

    cfg = decoder.cfg
    return StepDecoder(step, state=(cross_kv, context_mask), shared_state=True, start_ids=[cfg.dec_token_id],
                       eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, max_length=cfg.context_length)


@dataclass
class BlipVqaConfig:
    """BLIP for VQA: the image-grounded encoder reads the question; a separate answer decoder (not tied to
    the encoder) cross-attends to the question's states and writes the answer."""

    vision: ImageTowerConfig = field(
        default_factory=lambda: VisionConfig(
            image_size=480, patch_size=16, norm_eps=1e-6, ln_pre=False, patch_bias=True
        )
    )
    text: BertTextConfig = field(default_factory=BertTextConfig)


class BlipVqa(nn.Module):
    question_template = "{}"

    def __init__(self, cfg: BlipVqaConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        self.text = BertTextTransformer(cfg.text, cfg.vision.width, causal_self_attention=False)
        self.answer_decoder = BertTextTransformer(cfg.text, cfg.text.width, causal_self_attention=False)
        self.lm_head = LMHead(cfg.text)

    def encode_question(
        self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor
    ) -> torch.Tensor:
        """Question states [B, Lq, D] of the image-grounded encoder ([ENC] first)."""
        ids = question.clone()
        ids[:, 0] = self.cfg.text.enc_token_id
        return self.text(ids, question_mask, mode="multimodal", context=self.visual(images)[1])

    def answer_logits(
        self,
        answer: torch.Tensor,
        answer_mask: torch.Tensor,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits [A, La, V] of answers, each row given its question's states (rows aligned)."""
        ids = answer.clone()
        ids[:, 0] = self.cfg.text.dec_token_id
        states = self.answer_decoder(
            ids, answer_mask, mode="decoder", context=question_states, context_mask=question_mask
        )
        return self.lm_head(states)

    def answer_decoder_for(self, question_states: torch.Tensor, question_mask: torch.Tensor) -> StepDecoder:
        return med_step_decoder(self.answer_decoder, self.lm_head, question_states, question_mask)

    def forward(self, images: torch.Tensor, question: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        return self.encode_question(images, question, question_mask)

    @torch.no_grad()
    def init_from(self, blip: Blip) -> list[str]:
        """Start from a pre-trained BLIP as the paper does: its image encoder, its text encoder as the
        question encoder, its image-grounded decoder (self-attention, cross-attention, FFN, LM head) as
        the answer decoder. Returns the answer decoder's tensors left at their initialisation because
        their shapes differ (cross-attention keys/values when the image width is not the text width)."""
        self.visual.load_state_dict(blip.visual.state_dict())
        encoder = {k: v for k, v in blip.text.state_dict().items() if ".decoder_" not in k}
        self.text.load_state_dict(encoder)
        decoder = blip.decoder_text.state_dict()
        if blip.text_decoder is None and blip.cfg.text.share == "all_but_self_attention":
            decoder = {k: v for k, v in decoder.items() if not re.search(r"\.(attn|norm1)\.", k)}
            decoder = {
                k.replace(".decoder_attn.", ".attn.").replace(".decoder_norm1.", ".norm1."): v
                for k, v in decoder.items()
            }
        target = self.answer_decoder.state_dict()
        skipped = [k for k, v in decoder.items() if target[k].shape != v.shape]
        self.answer_decoder.load_state_dict({k: v for k, v in decoder.items() if k not in skipped}, strict=False)
        self.lm_head.load_state_dict(blip.lm_head.state_dict())
        return skipped


@dataclass
class BlipNlvrConfig:
    """BLIP for NLVR2: is a statement true of a pair of images? The image-grounded encoder gets two
    cross-attentions per layer, one per image."""

    vision: ImageTowerConfig = field(
        default_factory=lambda: VisionConfig(
            image_size=384, patch_size=16, norm_eps=1e-6, ln_pre=False, patch_bias=True
        )
    )
    text: BertTextConfig = field(default_factory=BertTextConfig)


class TwoImageLayer(TransformerBlock):
    """A MED encoder layer reading two images: each has its own cross-attention; their outputs are
    averaged in the first half of the layers and concatenated then projected (`merge`) in the second,
    before the shared residual LayerNorm, as BLIP's NLVR2 model does."""

    def __init__(self, cfg: BertTextConfig, context_width: int, concatenate: bool):
        super().__init__(cfg.width, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps,
                         context_dim=context_width, post_norm=True)
        self.cross_attn_right = Attention(cfg.width, cfg.heads, context_dim=context_width)
        self.merge = nn.Linear(2 * cfg.width, cfg.width) if concatenate else None

    def forward(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        context: tuple[torch.Tensor, torch.Tensor] | None = None,
        context_mask: torch.Tensor | None = None,
        decoder: bool = False,
        text_only: bool = False,
    ) -> torch.Tensor:
        """context: (left image tokens, right image tokens); text_only: the unimodal text layer."""
        if text_only:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, decoder=decoder, text_only=True)
        x = self.norm1(x + self.attn(x, attn_mask=attn_mask))
        left, right = self.cross_attn(x, context[0]), self.cross_attn_right(x, context[1])
        merged = self.merge(torch.cat([left, right], dim=-1)) if self.merge is not None else (left + right) / 2
        x = self.norm_cross(x + merged)
        return self.norm2(x + self.mlp(x))


class BlipNlvr(nn.Module):
    def __init__(self, cfg: BlipNlvrConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        half = cfg.text.layers // 2
        self.text = BertTextTransformer(
            cfg.text, cfg.vision.width, False, lambda index: TwoImageLayer(cfg.text, cfg.vision.width, index >= half)
        )
        width = cfg.text.width
        self.classifier = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))

    def pair_logits(
        self, left: torch.Tensor, right: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """True / false logits [B, 2] (index 1 = true) of statements about (left, right) image pairs."""
        return self(left, right, text, text_mask)

    def forward(
        self, left: torch.Tensor, right: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        tokens = self.visual(torch.cat([left, right]))[1]
        ids = text.clone()
        ids[:, 0] = self.cfg.text.enc_token_id
        states = self.text(ids, text_mask, mode="multimodal", context=tokens.chunk(2))
        return self.classifier(states[:, 0])

    @torch.no_grad()
    def init_from(self, blip: Blip) -> list[str]:
        """Start from a pre-trained BLIP: its image encoder and image-grounded encoder, both cross-attentions
        from its one, as the paper does. The merge layers and the classifier start fresh."""
        self.visual.load_state_dict(blip.visual.state_dict())
        encoder = {k: v for k, v in blip.text.state_dict().items() if ".decoder_" not in k}
        encoder.update(
            {k.replace(".cross_attn.", ".cross_attn_right."): v for k, v in encoder.items() if ".cross_attn." in k}
        )
        missing, unexpected = self.text.load_state_dict(encoder, strict=False)
        if unexpected or any(".merge." not in k for k in missing):
            raise ValueError(f"BLIP text weights do not fit: missing {missing}, unexpected {unexpected}")
        return []
