"""`diffae`: a small DDPM noise-prediction U-Net whose reconstruction is a partial DDIM round trip.

Training (`training_losses`) is plain DDPM: noise an image in [-1, 1] to a random step t
and regress the noise. Detection (`forward`) noises the input to step `t0` and denoises it
with `ddim_steps` deterministic DDIM steps (eta 0): small defects are drowned by the noise
and redrawn as defect-free texture, while the image's layout survives.

The forward noise is a fixed (1, C, S, S) buffer drawn once from a CPU `torch.Generator`
seeded with `seed`, then moved with the model. So the same input gives the same output on
every call, and a patch's reconstruction does not depend on its position in the batch or
on the batch size used when tiling; the graph has no random ops, so it compiles and exports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defectae.errors import DefectaeError
from defectae.models.blocks import require_multiple, require_positive_int
from defectae.models.registry import register


def beta_schedule(kind: str, timesteps: int) -> torch.Tensor:
    """DDPM betas (float64): linear (Ho et al., rescaled to `timesteps`) or cosine (Nichol & Dhariwal)."""
    if kind == "linear":
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    s = 0.008
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) float timesteps -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between."""

    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Noise predictor eps(x_t, t): `len(mults)` levels, `blocks` ResBlocks per level."""

    def __init__(
        self,
        in_channels: int,
        base: int,
        mults: list[int],
        blocks: int,
        groups: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.base = base
        temb = 4 * base
        self.temb = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = nn.Conv2d(in_channels, base, 3, 1, 1)
        widths = [base * m for m in mults]

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c, skip_widths = base, []
        for i, w in enumerate(widths):
            for _ in range(blocks):
                self.down.append(ResBlock(c, w, temb, groups, dropout))
                c = w
                skip_widths.append(c)
            last = i == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, 1))
        self.mid = nn.ModuleList([ResBlock(c, c, temb, groups, dropout) for _ in range(2)])

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(blocks):
                self.up.append(ResBlock(c + skip_widths.pop(), w, temb, groups, dropout))
                c = w
            self.upsample.append(
                nn.Identity()
                if i == 0
                else nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)
                )
            )
        self.blocks = blocks
        self.out = nn.Sequential(
            nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, 1, 1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(timestep_embedding(t, self.base))  # (B, 4 * base)
        h = self.stem(x)
        skips = []
        for level, sample in enumerate(self.downsample):
            for block in self.down[level * self.blocks : (level + 1) * self.blocks]:
                h = block(h, temb)
                skips.append(h)
            h = sample(h)
        for block in self.mid:
            h = block(h, temb)
        for level, sample in enumerate(self.upsample):
            for block in self.up[level * self.blocks : (level + 1) * self.blocks]:
                h = block(torch.cat([h, skips.pop()], 1), temb)
            h = sample(h)
        return self.out(h)  # (B, C, H, W) predicted noise


class DiffAE(nn.Module):
    def __init__(
        self,
        in_channels: int,
        input_size: int,
        unet: UNet,
        timesteps: int,
        schedule: str,
        t0: int,
        ddim_steps: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.timesteps = timesteps
        alphas_cumprod = torch.cumprod(1 - beta_schedule(schedule, timesteps), 0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # DDIM plan as constants: (t, abar_t, abar_prev); the last step lands on abar = 1 (clean).
        steps = torch.linspace(t0, 0, ddim_steps).round().long().tolist()
        abar = alphas_cumprod.tolist()
        self.plan = [
            (t, abar[t], abar[steps[i + 1]] if i + 1 < len(steps) else 1.0)
            for i, t in enumerate(steps)
        ]
        self.abar_t0 = abar[t0]
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((1, in_channels, input_size, input_size), generator=g)
        self.register_buffer("noise", noise, persistent=False)

    def training_losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """DDPM objective: MSE between the true and predicted noise at a uniformly drawn step."""
        x0 = x * 2 - 1
        t = torch.randint(0, self.timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x0)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(self.unet(x_t, t), noise)
        return {"total": loss, "noise_mse": loss}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Noise to t0 with the fixed noise, then DDIM (eta 0) back to a clean image in [0, 1]."""
        x0 = x * 2 - 1
        h = math.sqrt(self.abar_t0) * x0 + math.sqrt(1 - self.abar_t0) * self.noise
        for t, a, a_prev in self.plan:
            eps = self.unet(h, x.new_full((x.shape[0],), float(t)))
            x0_pred = ((h - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
            h = math.sqrt(a_prev) * x0_pred + math.sqrt(1 - a_prev) * eps
        return {"recon": ((h + 1) / 2).clamp(0, 1)}


@register("diffae", "DDPM U-Net noise predictor; recon = noise to t0, DDIM back")
def build_diffae(
    in_channels: int,
    input_size: int,
    base_channels: int = 32,
    channel_mults: list[int] | tuple[int, ...] = (1, 2, 4),
    blocks_per_level: int = 2,
    groups: int = 8,
    dropout: float = 0.0,
    timesteps: int = 1000,
    schedule: str = "linear",
    t0: int = 250,
    ddim_steps: int = 10,
    seed: int = 0,
) -> nn.Module:
    """Build `diffae`; input_size must be a multiple of 2^(levels - 1)."""
    if not isinstance(channel_mults, (list, tuple)) or not channel_mults:
        raise DefectaeError(
            f"model.args.channel_mults {channel_mults!r}: expected a list like [1, 2, 4]"
        )
    mults = [require_positive_int(m, "model.args.channel_mults entry") for m in channel_mults]
    sizes = {
        "base_channels": base_channels,
        "blocks_per_level": blocks_per_level,
        "groups": groups,
        "timesteps": timesteps,
        "t0": t0,
        "ddim_steps": ddim_steps,
    }
    for key, value in sizes.items():
        require_positive_int(value, f"model.args.{key}")
    require_multiple(input_size, 2 ** (len(mults) - 1), "diffae")
    if schedule not in ("linear", "cosine"):
        raise DefectaeError(f"model.args.schedule '{schedule}': expected 'linear' or 'cosine'")
    if not t0 < timesteps:
        raise DefectaeError(
            f"model.args.t0 {t0}: expected less than model.args.timesteps ({timesteps})"
        )
    if ddim_steps > t0 + 1:
        raise DefectaeError(
            f"model.args.ddim_steps {ddim_steps}: expected at most t0 + 1 ({t0 + 1})"
        )
    if not isinstance(seed, int) or seed < 0:
        raise DefectaeError(f"model.args.seed {seed!r}: expected a non-negative integer")
    if base_channels % 2 or any((base_channels * m) % groups for m in mults):
        raise DefectaeError(
            f"model.args.base_channels {base_channels}: expected an even multiple of model.args.groups {groups}"
        )
    if not 0.0 <= dropout < 1.0:
        raise DefectaeError(f"model.args.dropout {dropout}: expected a value in [0, 1)")
    unet = UNet(in_channels, base_channels, mults, blocks_per_level, groups, dropout)
    return DiffAE(in_channels, input_size, unet, timesteps, schedule, t0, ddim_steps, seed)
