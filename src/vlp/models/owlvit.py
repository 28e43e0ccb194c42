"""OWL-ViT and OWLv2: open-vocabulary detection from a contrastive image-text model.

The image tower's final tokens (LayerNorm on every token, no pooling) are merged with its pooled token
(`mul-ln`: each patch token times the class token, then a new LayerNorm) and every token becomes a
prediction: a box (a 3-layer MLP plus a fixed bias that puts each token's initial box on its own grid
cell) and a class embedding, scored against L2-normalised query embeddings (text through the text tower,
or a token's class embedding from an example image) with a learned per-token shift and scale. OWLv2 adds
an objectness head on the tokens without gradient. Scores are independent sigmoids, never a softmax.

The pooled token is the tower's own: the class token of a CLIP ViT (OWL-ViT exactly), the MAP head's
output of a SigLIP ViT, the global max of vlp's compact ConvNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, Fraction, PositiveFloat, PositiveInt
from vlp.geometry import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from vlp.layers import Activation, make_activation, resize_pos_embed
from vlp.towers import ImageTowerConfig, TextConfig, TextTransformer, VisionConfig, build_image_tower

BoxBias = Literal["both", "location", "size", "none"]


@dataclass
class OwlVitConfig:
    embed_dim: PositiveInt = 512  # the query space: the text projection's output, the class head's
    vision: ImageTowerConfig = field(default_factory=lambda: VisionConfig(image_size=768, patch_size=32))
    text: TextConfig = field(default_factory=lambda: TextConfig(context_length=16))
    # mul-ln: patch tokens times the pooled token, then LayerNorm (every released model); drop: patches only.
    merge_class_token: Literal["mul-ln", "drop"] = "mul-ln"
    merge_norm_eps: PositiveFloat = 1e-5  # Hugging Face's; scenic's flax LayerNorm uses 1e-6
    box_bias: BoxBias = "both"  # location (each token's grid cell) and size (one cell) priors
    head_act: Activation = "gelu"  # exact GELU as in transformers; scenic's heads use the tanh form
    normalize: bool = True  # L2-normalise class and query embeddings before their dot product
    objectness: bool = False  # OWLv2's objectness head
    prior_prob: Fraction = 0.01  # initial score of every token: the shift bias is its logit
    # random: scenic's (a near-zero projection learned from the boxes' classes); image_projection: the dual
    # encoder's image projection (`init_from`), so each token starts in the space its text queries live in.
    class_head_init: Literal["random", "image_projection"] = "random"


@dataclass
class OwlVitOutput:
    logits: torch.Tensor | None  # [B, P, Q] against the queries (None without queries)
    pred_boxes: torch.Tensor  # [B, P, 4] (cx, cy, w, h) in [0, 1] of the (padded, square) input
    class_embeddings: torch.Tensor  # [B, P, E], L2-normalised when queries were given (as transformers')
    image_features: torch.Tensor  # [B, P, D] merged tokens, row-major over the grid
    objectness_logits: torch.Tensor | None  # [B, P] (OWLv2)
    token_indices: torch.Tensor | None = None  # [B, k] the grid tokens predicting, under instance selection


def _logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x + 1e-4) - torch.log1p(-x + 1e-4)


def box_bias(grid: tuple[int, int], kind: BoxBias = "both") -> torch.Tensor:
    """[h*w, 4] logit-space bias: each token's box starts at the bottom-right corner of its own cell
    ((col+1)/w, (row+1)/h, OWL-ViT's choice, not the centre) with the size of one cell; row-major tokens."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(1, rows + 1) / rows, torch.arange(1, cols + 1) / cols, indexing="ij")
    location = _logit(torch.stack([x.flatten(), y.flatten()], dim=-1).double().clamp(0, 1))
    size = _logit(torch.tensor([1 / cols, 1 / rows], dtype=torch.float64)).expand(rows * cols, 2)
    if kind in ("size", "none"):
        location = torch.zeros_like(location)
    if kind in ("location", "none"):
        size = torch.zeros_like(size)
    return torch.cat([location, size], dim=-1).float()


class PredictorMlp(nn.Module):
    """Three linear layers with the activation between them; the last starts at zero, so a new box head
    predicts exactly the box bias. Parts named as the checkpoints name them (dense0..2)."""

    def __init__(self, width: int, out_dim: int, act: Activation):
        super().__init__()
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        self.dense2 = nn.Linear(width, out_dim)
        self.act = make_activation(act)
        nn.init.zeros_(self.dense2.weight)
        nn.init.zeros_(self.dense2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.dense1(self.act(self.dense0(x)))))


class ClassHead(nn.Module):
    """Token class embeddings, and logits against queries with a per-token (not per-query) shift and scale."""

    def __init__(self, width: int, embed_dim: int, *, normalize: bool, prior_prob: float):
        super().__init__()
        self.normalize = normalize
        self.dense0 = nn.Linear(width, embed_dim)
        self.logit_shift = nn.Linear(width, 1)
        self.logit_scale = nn.Linear(width, 1)
        # scenic's initialisation: a tiny projection, every token's score at the prior, scale ELU(0) + 1 = 1.
        nn.init.normal_(self.dense0.weight, std=1e-6)
        nn.init.zeros_(self.dense0.bias)
        nn.init.constant_(self.logit_shift.bias, math.log(prior_prob / (1 - prior_prob)))
        nn.init.zeros_(self.logit_scale.bias)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P, D] -> un-normalised class embeddings [B, P, E] (the image-conditioned query candidates)."""
        return self.dense0(features)

    def forward(
        self, features: torch.Tensor, queries: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, P, D], queries [B, Q, E] -> (logits [B, P, Q] in fp32, class embeddings [B, P, E])."""
        embeddings = self.dense0(features)
        if self.normalize:
            embeddings = embeddings / (embeddings.norm(dim=-1, keepdim=True) + 1e-6)
            queries = queries / (queries.norm(dim=-1, keepdim=True) + 1e-6)
        logits = torch.einsum("bpe,bqe->bpq", embeddings.float(), queries.float())
        shift = self.logit_shift(features).float()
        scale = F.elu(self.logit_scale(features).float()) + 1
        logits = (logits + shift) * scale
        if query_mask is not None:
            # Padding queries never score: the float32 minimum, as transformers (fp16-safe after the cast).
            logits = logits.masked_fill(~query_mask[:, None, :].bool(), torch.finfo(torch.float32).min)
        return logits, embeddings


class OwlVit(nn.Module):
    def __init__(self, cfg: OwlVitConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.vision)
        width = cfg.vision.width
        self.text = TextTransformer(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=cfg.text.width**-0.5)
        self.merge_norm = nn.LayerNorm(width, eps=cfg.merge_norm_eps) if cfg.merge_class_token == "mul-ln" else None
        self.class_head = ClassHead(width, cfg.embed_dim, normalize=cfg.normalize, prior_prob=cfg.prior_prob)
        self.box_head = PredictorMlp(width, 4, cfg.head_act)
        self.objectness_head = PredictorMlp(width, 1, cfg.head_act) if cfg.objectness else None
        self._box_bias: dict[tuple[int, int], torch.Tensor] = {}

    # -- the image side ------------------------------------------------------------------------------------

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, 3, H, W] -> (merged tokens [B, h*w, D], the grid (h, w))."""
        tokens = self.visual.forward_features(images)  # [B, prefix + h*w, D], final LayerNorm on every token
        prefix = getattr(self.visual, "num_prefix", 0)
        patches = tokens[:, prefix:]
        side = math.isqrt(patches.shape[1])
        if images.shape[-2] != images.shape[-1] or side * side != patches.shape[1]:
            raise ValueError(f"OWL-ViT reads square inputs (pad the image first), got {tuple(images.shape[-2:])}")
        grid = (side, side)
        if self.merge_norm is not None:
            pooled = self.visual.pool_tokens(tokens)  # [B, D]: CLIP's class token, SigLIP's MAP output
            patches = self.merge_norm(patches * pooled[:, None, :])
        return patches, grid

    def box_bias(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        if grid not in self._box_bias:
            self._box_bias[grid] = box_bias(grid, self.cfg.box_bias)
        return self._box_bias[grid].to(device)

    def box_predictions(
        self, features: torch.Tensor, grid: tuple[int, int], token_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features [B, P, D] -> boxes [B, P, 4] (cx, cy, w, h); `token_indices` [B, P] when the features
        are a subset of the grid's tokens (OWLv2's instance selection): the bias follows them."""
        bias = self.box_bias(grid, features.device)  # [h*w, 4]
        bias = bias[token_indices] if token_indices is not None else bias[None]
        return torch.sigmoid(self.box_head(features).float() + bias)

    def objectness_logits(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P, D] -> [B, P]; the head reads the tokens without gradient, so it never changes them."""
        if self.objectness_head is None:
            raise ValueError("this model has no objectness head (model.objectness: false)")
        return self.objectness_head(features.detach()).squeeze(-1).float()

    # -- the query side ------------------------------------------------------------------------------------

    def embed_queries(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenised queries [..., L] -> un-normalised query embeddings [..., E]."""
        shape = text.shape[:-1]
        flat = text.reshape(-1, text.shape[-1])
        # Each image's list repeats the others' class names: the tower reads every distinct query once.
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        first = torch.empty(len(unique), dtype=torch.long, device=flat.device)
        first[inverse] = torch.arange(len(flat), device=flat.device)
        unique_mask = text_mask.reshape(-1, text.shape[-1])[first] if text_mask is not None else None
        embeddings = self.text_projection(self.text.encode(unique, unique_mask))
        return embeddings[inverse].reshape(*shape, -1)

    def embed_image_query(
        self, images: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One-shot queries: images [B, 3, H, W] with one xyxy box each [B, 4] in the input's normalised
        units -> (query embeddings [B, E], the chosen token [B]).

        Among the tokens whose predicted box overlaps the given one most (IoU >= 0.8 x the best; GIoU when
        no box overlaps), the one least like the image's mean class embedding: with bipartite matching, one
        embedding per object is trained as the object's and the rest as background (scenic's rule)."""
        features, grid = self.image_features(images)
        embeddings = self.class_head.embed(features).float()  # [B, P, E]
        pred = box_cxcywh_to_xyxy(self.box_predictions(features, grid))
        chosen = []
        for b in range(images.shape[0]):
            overlap = box_iou(pred[b], boxes[b : b + 1].float())[0].squeeze(1)
            if overlap.max() <= 0:
                overlap = generalized_box_iou(pred[b], boxes[b : b + 1].float()).squeeze(1)
                threshold = 1.2 * overlap.max()  # GIoU <= 0 here: 1.2x the best is a looser bound
            else:
                threshold = 0.8 * overlap.max()
            candidates = (overlap >= threshold).nonzero().squeeze(1)
            similarity = embeddings[b, candidates] @ embeddings[b].mean(dim=0)
            chosen.append(candidates[similarity.argmin()])
        index = torch.stack(chosen)
        return embeddings[torch.arange(len(index)), index], index

    # -- detection -----------------------------------------------------------------------------------------

    def predict(
        self,
        images: torch.Tensor,
        query_embeddings: torch.Tensor | None,
        query_mask: torch.Tensor | None = None,
        *,
        top_k: int | None = None,
    ) -> OwlVitOutput:
        """`top_k`: OWLv2's instance selection in training, only the k tokens of highest objectness predict."""
        features, grid = self.image_features(images)
        objectness = self.objectness_logits(features) if self.objectness_head is not None else None
        indices = None
        if top_k is not None and objectness is not None and top_k < features.shape[1]:
            indices = objectness.topk(top_k, dim=1).indices  # [B, k]
            features = features.gather(1, indices[..., None].expand(-1, -1, features.shape[-1]))
            objectness = objectness.gather(1, indices)
        boxes = self.box_predictions(features, grid, indices)
        if query_embeddings is None:
            logits, class_embeddings = None, self.class_head.embed(features)
        else:
            logits, class_embeddings = self.class_head(features, query_embeddings, query_mask)
        return OwlVitOutput(logits, boxes, class_embeddings, features, objectness, indices)

    def detect(self, images: torch.Tensor, query_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`DetectsBoxes`: images [B, 3, S, S] against queries shared by every image, [Q, E], or [T, Q, E]
        for T prompt templates (their logits averaged) -> (boxes [B, P, 4] cxcywh, logits [B, P, Q])."""
        queries = query_embeddings if query_embeddings.dim() == 3 else query_embeddings[None]
        features, grid = self.image_features(images)
        logits = torch.stack([
            self.class_head(features, template.expand(images.shape[0], -1, -1))[0] for template in queries
        ]).mean(dim=0)
        return self.box_predictions(features, grid), logits

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        *,
        top_k: int | None = None,
    ) -> OwlVitOutput:
        """image [B, 3, S, S]; text [B, Q, L] tokenised queries per image (text_mask alike); query_mask
        [B, Q] the real queries of each image's list."""
        return self.predict(image, self.embed_queries(text, text_mask), query_mask, top_k=top_k)

    # -- starting from a dual encoder ----------------------------------------------------------------------

    def init_from(self, source: nn.Module) -> list[str]:
        """Take the towers of a CLIP / SigLIP / ALIGN-style dual encoder: the image tower whole (its position
        table enlarged linearly to this input size, the class row kept), the text tower (positions cut to
        this context) and the text projection; the image projection is dropped. Returns the tensors left at
        their initialisation (the merge norm and the heads)."""
        from vlp.models.clip import DualEncoder

        if not isinstance(source, DualEncoder):
            raise TypeError(f"OWL-ViT starts from a dual encoder's towers, not a {type(source).__name__}")
        if source.cfg.vision.kind != self.cfg.vision.kind:
            raise ConfigError(f"config key 'train.init_from': the source's image tower is a {source.cfg.vision.kind}, "
                              f"model.vision's a {self.cfg.vision.kind}")
        visual = dict(source.visual.state_dict())
        if "pos_embed" in visual and visual["pos_embed"].shape != self.visual.pos_embed.shape:
            grid = self.visual.grid
            visual["pos_embed"] = resize_pos_embed(visual["pos_embed"], (grid, grid), self.visual.num_prefix,
                                                   mode="bilinear")
        text = dict(source.text.state_dict())
        text["pos_embed"] = text["pos_embed"][: self.cfg.text.context_length]
        for name, module, state in (("visual", self.visual, visual), ("text", self.text, text)):
            mine = module.state_dict()
            wrong = [k for k in mine if k not in state or state[k].shape != mine[k].shape]
            if wrong:
                raise ConfigError(f"config key 'train.init_from': the source's {name} tower does not fit "
                                  f"model.{name}'s: {', '.join(wrong[:5])}")
            module.load_state_dict({k: state[k] for k in mine})
        self.text_projection.load_state_dict(source.text_projection.state_dict())
        taken = {f"visual.{k}" for k in self.visual.state_dict()} | {f"text.{k}" for k in self.text.state_dict()}
        taken.add("text_projection.weight")
        if self.cfg.class_head_init == "image_projection":
            projection = source.visual_projection
            weight = projection.weight if isinstance(projection, nn.Linear) else torch.eye(self.cfg.embed_dim)
            if weight.shape != self.class_head.dense0.weight.shape:
                raise ConfigError(f"config key 'model.class_head_init': the source's image projection is "
                                  f"{tuple(weight.shape)}, the class head's {tuple(self.class_head.dense0.weight.shape)}")
            with torch.no_grad():
                self.class_head.dense0.weight.copy_(weight)
                self.class_head.dense0.bias.zero_()
            taken.add("class_head.dense0.weight")
        return [k for k in self.state_dict() if k not in taken]
