"""`vitae`: a ViT encoder with a learned position embedding and a transformer or CNN decoder.

Each patch token is squeezed to `latent_dim` values (the bottleneck, returned as "z"
(B, N, latent_dim)); without it a ViT with 768-d tokens simply copies its input.
The attention blocks are written out with `scaled_dot_product_attention` rather than
`nn.TransformerEncoderLayer`, whose eval-mode fast path differs from the traced graph
and does not export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import group_count, require_multiple, require_positive_int
from defectae.models.registry import register


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d / heads)
        a = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + F.dropout(
            self.proj(a.transpose(1, 2).reshape(b, n, d)), self.dropout, self.training
        )
        return x + self.mlp(self.norm2(x))


class TransformerDecoder(nn.Module):
    """A few transformer blocks on the latent tokens, then a linear head to patch pixels."""

    def __init__(
        self,
        latent_dim: int,
        tokens: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        patch_pixels: int,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(latent_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.embed(z) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))  # (B, N, p * p * C) logits


class CnnDecoder(nn.Module):
    """Latent tokens as a (latent_dim, H/p, W/p) map, log2(p) x (2x upsample + conv + GELU)."""

    def __init__(
        self, latent_dim: int, grid: int, patch_size: int, dim: int, out_channels: int
    ) -> None:
        super().__init__()
        self.grid = grid
        layers: list[nn.Module] = [nn.Conv2d(latent_dim, dim, 3, 1, 1), nn.GELU()]
        c = dim
        for _ in range(patch_size.bit_length() - 1):
            cout = max(c // 2, 16)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c, cout, 3, 1, 1),
                nn.GroupNorm(group_count(cout, 8), cout),
                nn.GELU(),
            ]
            c = cout
        layers.append(nn.Conv2d(c, out_channels, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, d = z.shape
        grid = z.transpose(1, 2).reshape(b, d, self.grid, self.grid)  # (B, latent_dim, H/p, W/p)
        return self.net(grid)  # (B, C, H, W) logits


class ViTAE(nn.Module):
    def __init__(
        self,
        in_channels: int,
        input_size: int,
        patch_size: int,
        depth: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float,
        dropout: float,
        latent_dim: int,
        decoder: str,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
    ) -> None:
        super().__init__()
        self.p, self.c, self.grid = patch_size, in_channels, input_size // patch_size
        tokens = self.grid * self.grid
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, tokens, embed_dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(embed_dim, heads, mlp_ratio, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.to_latent = nn.Linear(embed_dim, latent_dim)
        self.transformer_decoder = decoder == "transformer"
        if self.transformer_decoder:
            self.decoder: nn.Module = TransformerDecoder(
                latent_dim,
                tokens,
                decoder_dim,
                decoder_depth,
                decoder_heads,
                mlp_ratio,
                dropout,
                patch_size * patch_size * in_channels,
            )
        else:
            self.decoder = CnnDecoder(latent_dim, self.grid, patch_size, decoder_dim, in_channels)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of the patch embedding's layout."""
        b, g, p, c = t.shape[0], self.grid, self.p, self.c
        t = t.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
        return t.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, embed_dim)
        h = self.drop(h + self.pos)
        for block in self.blocks:
            h = block(h)
        z = self.to_latent(self.norm(h))  # (B, N, latent_dim)
        y = self.decoder(z)
        if self.transformer_decoder:
            y = self.unpatchify(y)
        return {"recon": torch.sigmoid(y), "z": z}


@register("vitae", "ViT encoder (patch 16, learned positions), transformer or CNN decoder")
def build_vitae(
    in_channels: int,
    input_size: int,
    patch_size: int = 16,
    depth: int = 6,
    heads: int = 8,
    embed_dim: int = 768,
    mlp_ratio: float = 4.0,
    dropout: float = 0.0,
    latent_dim: int = 64,
    decoder: str = "transformer",
    decoder_dim: int = 256,
    decoder_depth: int = 2,
    decoder_heads: int = 8,
) -> nn.Module:
    """Build `vitae`; input_size must be a multiple of patch_size (the model sees exactly input_size)."""
    require_positive_int(patch_size, "model.args.patch_size")
    require_multiple(input_size, patch_size, "vitae")  # the patch size is the only stride
    sizes = {
        "depth": depth,
        "heads": heads,
        "embed_dim": embed_dim,
        "latent_dim": latent_dim,
        "decoder_dim": decoder_dim,
        "decoder_depth": decoder_depth,
        "decoder_heads": decoder_heads,
    }
    for key, value in sizes.items():
        require_positive_int(value, f"model.args.{key}")
    if decoder not in ("transformer", "cnn"):
        raise DefectaeError(f"model.args.decoder '{decoder}': expected 'transformer' or 'cnn'")
    if decoder == "cnn" and patch_size & (patch_size - 1):
        raise DefectaeError(
            f"model.args.patch_size {patch_size}: the cnn decoder needs a power of 2"
        )
    if embed_dim % heads:
        raise DefectaeError(
            f"model.args.embed_dim {embed_dim}: expected a multiple of model.args.heads {heads}"
        )
    if decoder == "transformer" and decoder_dim % decoder_heads:
        raise DefectaeError(
            f"model.args.decoder_dim {decoder_dim}: expected a multiple of model.args.decoder_heads {decoder_heads}"
        )
    if not 0.0 <= dropout < 1.0:
        raise DefectaeError(f"model.args.dropout {dropout}: expected a value in [0, 1)")
    return ViTAE(
        in_channels,
        input_size,
        patch_size,
        depth,
        heads,
        embed_dim,
        mlp_ratio,
        dropout,
        latent_dim,
        decoder,
        decoder_dim,
        decoder_depth,
        decoder_heads,
    )
