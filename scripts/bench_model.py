"""torchtitan's Llama of late 2024 (eager RMSNorm, complex rotary, SDPA, SwiGLU) in PyTorch
eager, at the `small` profile's shapes: the reference side of the throughput benches."""
import torch
import torch.nn as nn
import torch.nn.functional as F

H, L, NH, NKV, FF, V = 256, 4, 8, 8, 688, 2048
HD = H // NH
S = 256


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary(x, freqs):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(H), RMSNorm(H)
        self.wq = nn.Linear(H, NH * HD, bias=False)
        self.wk = nn.Linear(H, NKV * HD, bias=False)
        self.wv = nn.Linear(H, NKV * HD, bias=False)
        self.wo = nn.Linear(NH * HD, H, bias=False)
        self.w1 = nn.Linear(H, FF, bias=False)
        self.w2 = nn.Linear(FF, H, bias=False)
        self.w3 = nn.Linear(H, FF, bias=False)

    def forward(self, x, freqs):
        b, s, _ = x.shape
        n = self.attention_norm(x)
        q = self.wq(n).view(b, s, NH, HD)
        k = self.wk(n).view(b, s, NKV, HD)
        v = self.wv(n).view(b, s, NKV, HD)
        q, k = rotary(q, freqs), rotary(k, freqs)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = x + self.wo(o.transpose(1, 2).contiguous().view(b, s, -1))
        n2 = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(n2)) * self.w3(n2))


class Model(nn.Module):
    def __init__(self, seq=S):
        S = seq
        super().__init__()
        self.tok = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Block() for _ in range(L))
        self.norm = RMSNorm(H)
        self.output = nn.Linear(H, V, bias=False)
        f = 1.0 / (10000.0 ** (torch.arange(0, HD, 2).float() / HD))
        t = torch.arange(2 * S).float()
        self.register_buffer("freqs", torch.polar(torch.ones(2 * S, HD // 2), torch.outer(t, f))[:S].view(1, S, 1, HD // 2))

    def forward(self, tokens):
        h = self.tok(tokens)
        for blk in self.layers:
            h = blk(h, self.freqs)
        return self.output(self.norm(h))


