"""The Qwen2-VL and Qwen2.5-VL vision transformers over packed images and videos.

Frames are cut into patches of temporal_patch x patch x patch pixels, ordered so that each 2x2 (merge x
merge) block of neighbouring patches is contiguous; a linear patch embedding, 2-D rotary positions (height
and width), and blocks that attend within one frame (Qwen2-VL) or within windows of merged patches with a
few full-frame blocks (Qwen2.5-VL); the merger concatenates each block's four patch vectors and projects
them to the language model's width. Outputs equal transformers' `get_image_features`/`get_video_features`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from loomserve.platform.attention.encoder import EncoderAttention, SequenceLayout
from loomserve.platform.models.layers import RMSNorm
from loomserve.platform.models.rope import apply_rotary


def patchify(frames: torch.Tensor, temporal: int, patch: int, merge: int) -> torch.Tensor:
    """[F, C, H, W] (F a multiple of `temporal`; one frame is repeated) -> [t * gh * gw, C * temporal * patch^2]
    in merge-block order, as HF's processors lay out `pixel_values`."""
    if frames.shape[0] == 1:
        frames = frames.expand(temporal, -1, -1, -1)
    f, c, h, w = frames.shape
    t, gh, gw = f // temporal, h // patch, w // patch
    x = frames.reshape(t, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, C, temporal, p, p]
    return x.reshape(t * gh * gw, c * temporal * patch * patch)


def rotary_positions(t: int, h: int, w: int, merge: int) -> torch.Tensor:
    """[t * h * w, 2] (row, column) of every patch in merge-block order."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    blocks = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(blocks).transpose(1, 2).flatten()
    cols = cols.reshape(blocks).transpose(1, 2).flatten()
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)


def window_order(t: int, h: int, w: int, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's windows: the permutation of merged patches that makes each window of `window` x `window`
    merged patches contiguous, and the window lengths (in merged patches, empty windows dropped)."""
    mh, mw = h // merge, w // merge
    index = torch.arange(t * mh * mw).reshape(t, mh, mw)
    pad_h, pad_w = window - mh % window, window - mw % window
    nh, nw = (mh + pad_h) // window, (mw + pad_w) // window
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-100)
    padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
    lengths = (padded != -100).sum(-1).flatten().tolist()
    flat = padded.flatten()
    return flat[flat != -100], [n for n in lengths if n > 0]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.attn = EncoderAttention(num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        q, k, v = self.qkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D] each
        q = apply_rotary(q.float(), cos_sin).to(x.dtype)  # rotated in float32, as transformers does
        k = apply_rotary(k.float(), cos_sin).to(x.dtype)
        return self.proj(self.attn.forward(torch.stack((q, k, v), dim=1), layout))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> act -> fc2. Qwen2.5-VL: gated (gate_proj, up_proj, down_proj), with biases."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.act = ACT2FN[act]
        if gated:
            self.gate_proj, self.up_proj = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
            self.down_proj = nn.Linear(hidden, dim)
        else:
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str, qwen2_5: bool) -> None:
        super().__init__()
        norm = (lambda: RMSNorm(dim, 1e-6)) if qwen2_5 else (lambda: nn.LayerNorm(dim, eps=1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, act, gated=qwen2_5)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, qwen2_5: bool) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6) if qwen2_5 else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))  # [N, dim] -> [N / merge^2, out_dim]


class QwenVisionTransformer(nn.Module):
    def __init__(self, config: Any, qwen2_5: bool) -> None:
        super().__init__()
        self.qwen2_5 = qwen2_5
        self.patch = config.patch_size
        self.temporal = config.temporal_patch_size
        self.merge = config.spatial_merge_size
        if qwen2_5:
            dim, mlp_hidden, out_dim = config.hidden_size, config.intermediate_size, config.out_hidden_size
            self.window = config.window_size // self.merge // self.patch
            self.full_blocks = set(config.fullatt_block_indexes)
        else:
            dim, out_dim = config.embed_dim, config.hidden_size
            mlp_hidden = int(dim * config.mlp_ratio)
        head_dim = dim // config.num_heads
        # Stored as the checkpoint's Conv3d weight [dim, C, temporal, p, p]; applied as a matmul over patches.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Module()
        self.patch_embed.proj.weight = nn.Parameter(torch.empty(dim, config.in_channels, self.temporal, self.patch,
                                                                self.patch))
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        spatial = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.blocks = nn.ModuleList(
            VisionBlock(dim, config.num_heads, mlp_hidden, config.hidden_act, qwen2_5) for _ in range(config.depth)
        )
        self.merger = PatchMerger(out_dim, dim, self.merge, qwen2_5)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, items: list[tuple[torch.Tensor, tuple[int, int, int]]]) -> list[torch.Tensor]:
        """Items of (frames [F, C, H, W], (t, gh, gw) in patches) -> per item [t * gh * gw / merge^2, out_dim]."""
        unit = self.merge * self.merge
        pixels, positions, frame_bounds, window_bounds, order = [], [], [0], [0], []
        num_merged = 0
        for frames, (t, h, w) in items:
            pixels.append(patchify(frames.to(self.dtype), self.temporal, self.patch, self.merge))
            positions.append(rotary_positions(t, h, w, self.merge))
            start = frame_bounds[-1]
            frame_bounds.extend(start + h * w * (i + 1) for i in range(t))
            if self.qwen2_5:
                index, lengths = window_order(t, h, w, self.merge, self.window)
                order.append(index + num_merged)
                for n in lengths:
                    window_bounds.append(window_bounds[-1] + n * unit)
            num_merged += t * h * w // unit
        weight = self.patch_embed.proj.weight
        x = F.linear(torch.cat(pixels), weight.view(weight.shape[0], -1))  # [N, dim]
        pos = torch.cat(positions).to(x.device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]: rows' then columns'
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [N, head_dim]
        if self.qwen2_5:
            perm = torch.cat(order).to(x.device)
            x = x.view(num_merged, unit, -1)[perm].flatten(0, 1)
            cos_sin = cos_sin.view(num_merged, unit, -1)[perm].flatten(0, 1)
        frames = SequenceLayout(frame_bounds, x.device, x.dtype)  # attention within each frame
        windows = SequenceLayout(window_bounds, x.device, x.dtype) if self.qwen2_5 else frames
        for i, block in enumerate(self.blocks):
            full = not self.qwen2_5 or i in self.full_blocks
            x = block(x, cos_sin, frames if full else windows)
        merged = self.merger(x)  # [N / merge^2, out_dim]
        if self.qwen2_5:
            merged = merged[torch.argsort(perm)]
        sizes = [t * h * w // unit for _, (t, h, w) in items]
        return list(merged.split(sizes))
