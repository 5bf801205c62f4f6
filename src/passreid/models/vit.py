"""The PASS backbone: a ViT with one class token and three part tokens (DESIGN §2).

Reads top-down: Attention -> Block -> PatchEmbed -> resize_pos_embed -> PassViT.
Parameter names are those of the official PASS code so that a published
checkpoint loads without renaming: ``cls_token``, ``part_token1..3``,
``cls_pos``, ``part1_pos..part3_pos``, ``pos_embed`` (patches only),
``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``
and ``norm.*``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from torch import Tensor, nn

NUM_PARTS = 3
"""Part tokens per image: top, middle and bottom horizontal band."""


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    The training path uses ``scaled_dot_product_attention`` (flash / memory
    efficient kernels on GPU); :meth:`attention_probs` computes the softmax
    explicitly for attention-map pictures, where the probabilities themselves
    are the point.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, D) -> q, k, v each (B, heads, T, head_dim)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def attention_probs(self, x: Tensor) -> Tensor:
        """Softmax attention of the normed input (B, T, D) -> (B, heads, T, T); rows sum to 1."""
        q, k, _ = self._qkv(x)
        logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
        return logits.softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def resize_pos_embed(
    pos_embed: Tensor,
    old_grid: tuple[int, int] | None,
    new_grid: tuple[int, int],
    mode: Literal["bicubic", "bilinear"] = "bicubic",
) -> Tensor:
    """Resample patch positional embeddings on their 2-D grid.

    Used for local crops (bicubic) and for checkpoints trained at another input
    size (bilinear, as the published fine-tuning code). ``align_corners=False``.

    Args:
        pos_embed: (1, N, D) patch positions only, no class slot, row-major grid.
        old_grid: (h, w) with h * w = N; ``None`` infers it: (s, s) when N is a
            perfect square, else height = 2 x width (person crops, hw_ratio 2).
        new_grid: (h', w') wanted.
        mode: interpolation mode.

    Returns:
        (1, h' * w', D); ``pos_embed`` itself when the grids are equal.
    """
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    if old_grid is None:
        old_grid = infer_grid(n)
    old_h, old_w = old_grid
    if old_h * old_w != n:
        raise ValueError(f"pos_embed has {n} positions, which is not the grid {old_h}x{old_w}")
    new_h, new_w = new_grid
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    grid = pos_embed.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)


def infer_grid(num_patches: int) -> tuple[int, int]:
    """(h, w) of a row-major patch grid: square if possible, else h = 2w (DESIGN §2)."""
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    width = math.isqrt(num_patches // 2)
    if 2 * width * width != num_patches:
        raise ValueError(
            f"cannot infer the patch grid of {num_patches} positions: "
            "neither square nor height = 2 x width; give the grid explicitly"
        )
    return 2 * width, width


class PassViT(nn.Module):
    """Vision Transformer with a class token and three part tokens (PASS).

    Full image: sequence ``[cls, part1, part2, part3, patches...]`` -> the four
    final-normed special tokens (B, 4, D). Local crop of band k
    (``part=k``): ``[cls, part_k, patches...]`` -> (B, 2, D). Inputs of another
    size than ``img_size`` (local crops) see the patch positions resized
    bicubically to their grid; at ``img_size`` they are used unchanged.

    Example:
        >>> model = PassViT(embed_dim=192, num_heads=3, depth=2)
        >>> model(torch.randn(2, 3, 256, 128)).shape
        torch.Size([2, 4, 192])
    """

    def __init__(
        self,
        img_size: tuple[int, int] | int = (256, 128),
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.img_size: tuple[int, int] = tuple(to_2tuple(img_size))  # type: ignore[assignment]
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.grid_size = self._grid(*self.img_size)

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part_token1 = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part_token2 = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part_token3 = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part1_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part2_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.part3_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))

        # Stochastic depth grows linearly with depth, as in DeiT/DINO.
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (
            self.cls_token,
            self.part_token1,
            self.part_token2,
            self.part_token3,
            self.cls_pos,
            self.part1_pos,
            self.part2_pos,
            self.part3_pos,
            self.pos_embed,
        ):
            trunc_normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return height // self.patch_size, width // self.patch_size

    def special_tokens(self) -> Tensor:
        """The class and part tokens with their positions added, (1, 4, D)."""
        return torch.cat(
            (
                self.cls_token + self.cls_pos,
                self.part_token1 + self.part1_pos,
                self.part_token2 + self.part2_pos,
                self.part_token3 + self.part3_pos,
            ),
            dim=1,
        )

    def prepare_tokens(self, x: Tensor, part: int | None = None) -> Tensor:
        """Images (B, C, H, W) -> input sequence (B, 4 + N, D), or (B, 2 + N, D) for ``part=k``."""
        if part is not None and part not in range(1, NUM_PARTS + 1):
            raise ValueError(f"part must be None or one of 1, 2, 3, got {part!r}")
        grid = self._grid(x.shape[-2], x.shape[-1])
        patches = self.patch_embed(x)
        pos = self.pos_embed
        if grid != self.grid_size:
            pos = resize_pos_embed(pos, self.grid_size, grid, mode="bicubic")
        patches = patches + pos
        special = self.special_tokens()
        if part is not None:
            special = torch.cat((special[:, :1], special[:, part : part + 1]), dim=1)
        special = special.expand(x.shape[0], -1, -1).to(patches.dtype)
        return torch.cat((special, patches), dim=1)

    def forward(self, x: Tensor, part: int | None = None) -> Tensor:
        """(B, C, H, W) -> final-normed special tokens (B, 4, D), or (B, 2, D) = [cls, part_k]."""
        num_special = 1 + NUM_PARTS if part is None else 2
        x = self.prepare_tokens(x, part)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, :num_special])

    def forward_attention(self, x: Tensor, part: int | None = None) -> Tensor:
        """Softmax attention of the last block, (B, heads, T, T) with T = 4 + N (or 2 + N).

        Rows sum to 1; row 0 is where the class token looks, rows 1..3 the part tokens.
        """
        if not self.blocks:
            raise ValueError("forward_attention needs a model with at least one block")
        x = self.prepare_tokens(x, part)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x))
