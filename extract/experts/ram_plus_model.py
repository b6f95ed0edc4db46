"""RAM++ (Recognize Anything Plus, Huang et al. 2023, arXiv:2310.15200) as plain ``nn.Module``s.

Written for astrea from the paper and from reading the official code (github xinyu1205/recognize-anything,
``ram/models/ram_plus.py``, ``swin_transformer.py``, ``bert.py``, ``configs/q2l_config.json``); no code is
copied. Module and parameter names are chosen so that ``RamPlus.state_dict()`` has exactly the keys and
shapes of the official ``RAM_plus`` model, so ``ram_plus_swin_large_14m.pth`` loads with ``strict=True``:

- ``visual_encoder``: Swin Transformer v1 (Microsoft's original layout, *not* timm's or torchvision's:
  ``layers.i.downsample`` closes stage i, ``attn_mask`` and ``relative_position_index`` are persistent
  buffers), returning ``[avg-pooled token, final-stage tokens]``.
- ``image_proj``: Linear(vision_width -> 512) applied to all of those tokens.
- ``label_embed``: [num_classes * 51, 512], 51 LLM-written descriptions per tag, CLIP text embeddings.
- ``reweight_scale``: log temperature of the image-to-description softmax.
- ``wordvec_proj``: Linear(512 -> 768); ``tagging_head``: a 2-layer BERT-style decoder whose layers keep
  only cross-attention (label queries attend to image tokens; the official code deletes the
  self-attention and the embeddings, Query2Label style); ``fc``: Linear(768 -> 1) per label query.

Inference (the official ``generate_tag``): image tokens -> normalised pooled token -> softmax over each
tag's 51 descriptions (scaled by ``exp(reweight_scale)``) -> weighted description embedding per tag ->
relu(wordvec_proj) -> tagging head (cross-attention to all image tokens, pooled one included) -> fc ->
sigmoid -> per-class thresholds (strictly greater).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics, as in the official ``ram/transform.py``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RamPlusArch:
    """Hyper-parameters of one RAM++ architecture. The defaults are the released Swin-L@384 model
    (``configs/swin/config_swinL_384.json`` + ``configs/q2l_config.json`` with encoder_width 512)."""

    image_size: int = 384
    patch_size: int = 4
    swin_embed_dim: int = 192
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # image_proj output = label (CLIP text) embedding width
    head_hidden: int = 768
    head_layers: int = 2
    head_heads: int = 4
    head_intermediate: int = 3072
    num_classes: int = 4585
    descriptions_per_class: int = 51

    def __post_init__(self) -> None:
        if len(self.swin_depths) != len(self.swin_heads):
            raise ValueError(f"swin_depths {self.swin_depths} and swin_heads {self.swin_heads} differ in length")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        side = self.image_size // self.patch_size
        for i in range(len(self.swin_depths)):
            r = side // 2**i
            if r * 2**i != side or r < 1:
                raise ValueError(f"image_size={self.image_size}: stage {i} resolution is not an integer")
            w = min(self.window_size, r)
            if r % w:
                raise ValueError(f"stage {i} resolution {r} is not a multiple of window_size={self.window_size}")
        for i, (d, h) in enumerate(zip(self.stage_dims, self.swin_heads)):
            if d % h:
                raise ValueError(f"stage {i} width {d} is not divisible by swin_heads[{i}]={h}")
        if self.head_hidden % self.head_heads:
            raise ValueError(f"head_hidden={self.head_hidden} is not divisible by head_heads={self.head_heads}")
        if self.num_classes < 1 or self.descriptions_per_class < 1:
            raise ValueError("num_classes and descriptions_per_class must be >= 1")

    @property
    def stage_dims(self) -> list[int]:
        return [self.swin_embed_dim * 2**i for i in range(len(self.swin_depths))]

    @property
    def vision_width(self) -> int:
        return self.stage_dims[-1]

    @property
    def feature_side(self) -> int:
        """Side of the final-stage token map (12 for Swin-L at 384)."""
        return self.image_size // self.patch_size // 2 ** (len(self.swin_depths) - 1)

    def to_dict(self) -> dict:
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "swin_embed_dim": self.swin_embed_dim,
            "swin_depths": list(self.swin_depths),
            "swin_heads": list(self.swin_heads),
            "window_size": self.window_size,
            "mlp_ratio": self.mlp_ratio,
            "embed_dim": self.embed_dim,
            "head_hidden": self.head_hidden,
            "head_layers": self.head_layers,
            "head_heads": self.head_heads,
            "head_intermediate": self.head_intermediate,
            "num_classes": self.num_classes,
            "descriptions_per_class": self.descriptions_per_class,
        }

    def build(self) -> "RamPlus":
        """A randomly initialised model on the current default device (use ``torch.device("meta")`` as a
        context manager for a shape-only model)."""
        return RamPlus(self)


# ---------------------------------------------------------------------------------------------- Swin


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the (2w-1)^2 relative-bias table, row-major offsets."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window*window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unwindows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_windows`: [B * nW, window*window, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[nW, N, N] additive mask (0 / -100) that stops tokens of a shifted window from attending across
    the seams the cyclic shift created; -100 (not -inf) is what the released weights were trained with."""
    region = torch.zeros(h, w)
    bounds = lambda n: ((0, n - window), (n - window, n - shift), (n - shift, n))  # noqa: E731
    label = 0
    for y0, y1 in bounds(h):
        for x0, x1 in bounds(w):
            region[y0:y1, x0:x1] = label
            label += 1
    r = _windows(region.view(1, h, w, 1), window).squeeze(-1)  # nW, N
    differs = r[:, None, :] != r[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        # Registration order mirrors the official module so state_dict() iterates in the same order.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # Written out rather than through scaled_dot_product_attention: with an additive bias PyTorch
        # falls back to its math kernel, which upcasts bf16 to fp32 (measured 25% slower on an H100).
        attn = (q * d**-0.5) @ k.transpose(-2, -1) + bias.view(n, n, self.heads).permute(2, 0, 1).to(q.dtype)
        if mask is not None:
            # Windows are image-major: an extra batch axis broadcasts the [nW, N, N] mask over images.
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[:, None].to(q.dtype)).view(bw, self.heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        # A stage no larger than one window attends globally and never shifts (as the official code).
        if resolution <= window:
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Persistent like the official buffer (None when unshifted, which keeps it out of state_dict()).
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        y = self.norm1(x).view(b, r, r, c)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
        y = _unwindows(self.attn(_windows(y, w), self.attn_mask), w, r, r)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        # Channel order (even,even), (odd,even), (even,odd), (odd,odd) in (row, col): the order the
        # released reduction weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int, mlp_ratio: float, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, resolution) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Swin v1 backbone; ``forward`` returns ``[B, 1 + h*w, C]``: the mean of the final normed tokens
    followed by the tokens themselves (row-major)."""

    def __init__(self, arch: RamPlusArch):
        super().__init__()
        self.image_size = arch.image_size
        self.patch_embed = PatchEmbed(arch.patch_size, arch.swin_embed_dim)
        side = arch.image_size // arch.patch_size
        n = len(arch.swin_depths)
        self.layers = nn.ModuleList(
            SwinStage(
                arch.stage_dims[i], side // 2**i, arch.swin_depths[i], arch.swin_heads[i], arch.window_size,
                arch.mlp_ratio, merge=i < n - 1,
            )
            for i in range(n)
        )
        self.norm = nn.LayerNorm(arch.vision_width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"RAM++ Swin expects {self.image_size}x{self.image_size} input, got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


# ------------------------------------------------------------------------------------- tagging head


class CrossSelf(nn.Module):
    """Query from the label stream, key/value from the image tokens (BERT ``*.self`` naming)."""

    def __init__(self, hidden: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_dim, hidden)
        self.value = nn.Linear(kv_dim, hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, q_len, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(memory)), split(self.value(memory)))
        return out.transpose(1, 2).reshape(b, q_len, d)


class AddNorm(nn.Module):
    """Linear, residual add, LayerNorm (BERT's post-LN ``output`` block)."""

    def __init__(self, d_in: int, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815 - official key name

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttention(nn.Module):
    def __init__(self, hidden: int, kv_dim: int, heads: int):
        super().__init__()
        self.self = CrossSelf(hidden, kv_dim, heads)
        self.output = AddNorm(hidden, hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, memory), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class TaggingLayer(nn.Module):
    """One decoder layer in the official "tagging" mode: cross-attention then feed-forward, no self-attention."""

    def __init__(self, arch: RamPlusArch):
        super().__init__()
        self.crossattention = CrossAttention(arch.head_hidden, arch.embed_dim, arch.head_heads)
        self.intermediate = Intermediate(arch.head_hidden, arch.head_intermediate)
        self.output = AddNorm(arch.head_intermediate, arch.head_hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(x, memory)
        return self.output(self.intermediate(x), x)


class TaggingEncoder(nn.Module):
    def __init__(self, arch: RamPlusArch):
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(arch) for _ in range(arch.head_layers))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, memory)
        return x


class TaggingHead(nn.Module):
    def __init__(self, arch: RamPlusArch):
        super().__init__()
        self.encoder = TaggingEncoder(arch)

    def forward(self, label_queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        # The official call passes an all-ones image mask, i.e. no masking: every token is attended.
        return self.encoder(label_queries, image_embeds)


# ---------------------------------------------------------------------------------------------- RAM++


class RamPlus(nn.Module):
    def __init__(self, arch: RamPlusArch):
        super().__init__()
        self.arch = arch
        self.visual_encoder = SwinTransformer(arch)
        self.tagging_head = TaggingHead(arch)
        self.label_embed = nn.Parameter(torch.zeros(arch.num_classes * arch.descriptions_per_class, arch.embed_dim))
        # The official model uses Identity when the head is 512 wide (no parameters then).
        self.wordvec_proj = (
            nn.Linear(arch.embed_dim, arch.head_hidden) if arch.head_hidden != arch.embed_dim else nn.Identity()
        )
        self.fc = nn.Linear(arch.head_hidden, 1)
        self.image_proj = nn.Linear(arch.vision_width, arch.embed_dim)
        self.reweight_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        if self.label_embed.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init for ``--weights random`` runs. Linear layers keep torch's default init and the
        relative-position tables get the official trunc-normal(0.02); the description embeddings are
        N(0, 1) and ``fc`` is N(0, 0.25/hidden) so that random tag scores spread around the usual 0.68
        threshold and depend on the image: a random run then yields short non-empty tag lists (about
        5-10% of the tags on the tiny arch), which exercises the downstream prompt path."""
        for m in self.modules():
            if isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        self.label_embed.normal_()
        nn.init.normal_(self.fc.weight, std=0.5 * self.arch.head_hidden**-0.5)
        nn.init.zeros_(self.fc.bias)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers that are functions of the architecture only (recomputed, never trusted from a file)."""
        out: dict[str, torch.Tensor] = {}
        for name, m in self.named_modules():
            if isinstance(m, WindowAttention):
                out[f"{name}.relative_position_index"] = relative_position_index(m.window)
            if isinstance(m, SwinBlock) and m.shift:
                out[f"{name}.attn_mask"] = shifted_window_mask(m.resolution, m.resolution, m.window, m.shift)
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> image_embeds [B, 1 + h*w, embed_dim]: projected pooled token, then spatial tokens."""
        return self.image_proj(self.visual_encoder(pixels))

    def tag_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """image_embeds [B, 1 + L, E] -> per-tag logits [B, num_classes]."""
        a = self.arch
        pooled = F.normalize(image_embeds[:, 0], dim=-1)
        desc = self.label_embed.view(a.num_classes, a.descriptions_per_class, a.embed_dim)
        # Each tag's query is the mix of its descriptions that best matches this image.
        weights = torch.softmax(self.reweight_scale.exp() * torch.einsum("be,kne->bkn", pooled, desc), dim=-1)
        queries = torch.einsum("bkn,kne->bke", weights, desc)
        queries = F.relu(self.wordvec_proj(queries))
        return self.fc(self.tagging_head(queries, image_embeds)).squeeze(-1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_embeds [B, 1 + h*w, embed_dim], tag logits [B, num_classes])."""
        embeds = self.encode_image(pixels)
        return embeds, self.tag_logits(embeds)
