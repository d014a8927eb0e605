"""A small plain-PyTorch MAE with the official key names, for the conversion tests.

The modules and parameter names are those of facebookresearch/mae ``models_mae.py`` with timm's
``PatchEmbed`` / ``Block`` (``Attention(qkv, proj)``, ``Mlp(fc1, fc2)``, exact GELU, LayerNorm eps
1e-6); the sin-cos tables follow ``util/pos_embed.py`` (numpy, float32). ``VisionTransformer`` holds
the encoder under timm's names (without ``head``), so a timm-layout export loads into it with
``strict=True``; ``MaskedAutoencoderViT`` adds the decoder under MAE's names.

The forward pass mirrors ``colormae_jax.models.mae.MAE`` instead of MAE's shuffle/unshuffle: explicit
visible / masked index tensors, the encoder sees ``[cls, visible patches in the given order]``, the
decoder ``[cls, visible..., mask tokens at the masked positions...]`` and predicts the mask slots only.
Attention is permutation-equivariant, so this is the official computation with the tokens reordered.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """MAE's util/pos_embed.py: [grid*grid (+1), embed_dim]; the first half embeds the column."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.
        omega = 1. / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


def mmpretrain_sincos_pos_embed(grid_size: int, embed_dims: int) -> torch.Tensor:
    """mmpretrain's build_2d_sincos_position_embedding(..., cls_token=True): [1, 1+N, D], float32.

    ``torch.meshgrid(grid_w, grid_h)`` with indexing='ij' makes its first half embed the *row*.
    """
    grid_w, grid_h = torch.meshgrid(torch.arange(grid_size, dtype=torch.float32),
                                    torch.arange(grid_size, dtype=torch.float32), indexing='ij')
    omega = 1. / (10000. ** (torch.arange(embed_dims // 4, dtype=torch.float32) / (embed_dims // 4)))
    out_w = torch.einsum('m,d->md', grid_w.flatten(), omega)
    out_h = torch.einsum('m,d->md', grid_h.flatten(), omega)
    pe = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, embed_dims), pe], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # [B, C, H, W] -> [B, N, D], row-major over the patch grid
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class VisionTransformer(nn.Module):
    """The encoder, under timm's VisionTransformer names (cls_token, pos_embed, patch_embed.proj,
    blocks.N, norm), with MAE's fixed sin-cos ``pos_embed``."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 32,
                 depth: int = 2, num_heads: int = 2, mlp_ratio: float = 4.):
        super().__init__()
        self.patch = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid, cls_token=True)).float()[None],
            requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward_encoder(self, imgs: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """imgs [B, C, H, W]; visible [B, V] or None (all patches) -> [B, 1+V, D] after the final norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        if visible is not None:
            x = _gather(x, visible)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with the official key names (encoder as above, then decoder_embed, mask_token,
    decoder_pos_embed, decoder_blocks.N, decoder_norm, decoder_pred)."""

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 32,
                 depth: int = 2, num_heads: int = 2, decoder_embed_dim: int = 32, decoder_depth: int = 1,
                 decoder_num_heads: int = 2, mlp_ratio: float = 4., norm_pix_loss: bool = True):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        grid = img_size // patch_size
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(get_2d_sincos_pos_embed(decoder_embed_dim, grid, cls_token=True)).float()[None],
            requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.norm_pix_loss = norm_pix_loss

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """MAE's patchify: [B, 3, H, W] -> [B, N, p*p*3], pixels in (p, q, c) order."""
        p = self.patch
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], imgs.shape[1], h, p, w, p)
        return torch.einsum('nchpwq->nhwpqc', x).reshape(imgs.shape[0], h * w, p * p * imgs.shape[1])

    def forward_decoder(self, latent: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed[:, 1:, :].expand(x.shape[0], -1, -1)
        mask = self.mask_token + _gather(pos, masked)
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], x[:, 1:] + _gather(pos, visible), mask], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x[:, -masked.shape[1]:]))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        target = _gather(self.patchify(imgs), masked)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1.e-6) ** .5
        return ((pred - target) ** 2).mean(dim=-1).mean()

    def forward(self, imgs, visible, masked):
        """-> (loss, predictions of the masked patches [B, M, p*p*3], encoder output [B, 1+V, D])."""
        latent = self.forward_encoder(imgs, visible)
        pred = self.forward_decoder(latent, visible, masked)
        return self.forward_loss(imgs, pred, masked), pred, latent


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every learnable tensor (biases, norms and tokens included); the sin-cos
    tables (requires_grad=False) are kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if name.endswith('norm1.weight') or name.endswith('norm2.weight') or name.endswith('norm.weight'):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2 and 'token' not in name:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model
