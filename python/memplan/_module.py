"""``memplan.from_module``: a Hugging Face config dict from a live ``torch.nn.Module``.

Torch is imported here only, so ``import memplan`` never needs it.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from memplan._errors import PlanError

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
# (role, suffixes of the parameter name inside a block)
_ROLES: List[Tuple[str, Tuple[str, ...]]] = [
    ("q", ("wq.weight", "q_proj.weight")),
    ("k", ("wk.weight", "k_proj.weight")),
    ("v", ("wv.weight", "v_proj.weight")),
    ("o", ("wo.weight", "o_proj.weight")),
    ("q_bias", ("wq.bias", "q_proj.bias")),
    ("o_bias", ("wo.bias", "o_proj.bias")),
    ("gate", ("w1.weight", "gate_proj.weight")),
    ("down", ("w2.weight", "down_proj.weight")),
    ("up", ("w3.weight", "up_proj.weight")),
    ("mlp_bias", ("w1.bias", "gate_proj.bias")),
]
_HEADS = ("n_heads", "num_heads", "num_attention_heads")
_KV_HEADS = ("n_kv_heads", "num_kv_heads", "num_key_value_heads")
_MAX_POS = ("max_seq_len", "max_position_embeddings", "max_seq_length")


def _attr(module: Any, names: Tuple[str, ...]) -> Optional[int]:
    """The first positive integer attribute of those names on the module, its submodules or
    their ``args`` / ``model_args`` / ``config``."""
    for m in module.modules():
        for holder in (m, getattr(m, "args", None), getattr(m, "model_args", None), getattr(m, "config", None)):
            if holder is None:
                continue
            for n in names:
                v = getattr(holder, n, None)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
    return None


def from_module(
    module: Any,
    *,
    num_attention_heads: Optional[int] = None,
    num_key_value_heads: Optional[int] = None,
    max_position_embeddings: Optional[int] = None,
) -> Dict[str, Any]:
    """The model part of a plan from a live ``torch.nn.Module`` (the meta device will do): a
    Hugging Face config dict, to pass as ``model=``. A Hugging Face model gives its own config;
    any other module is read as a Llama-style decoder from its parameters' names and shapes
    (an embedding, ``layers.N`` / ``h.N`` / ``blocks.N`` blocks with q/k/v/o and
    gate/up/down projections under the usual names), its head counts from the attention
    modules' attributes (``n_heads``, ``num_heads``, ``n_kv_heads``, ...) or the arguments.
    The parameter count of the result is checked against the module's. Torch is imported only
    here.

    >>> with torch.device("meta"):  # doctest: +SKIP
    ...     m = Transformer(ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8))
    >>> memplan.estimate(model=memplan.from_module(m), num_gpus=8, micro_batch_size=2)  # doctest: +SKIP
    """
    import torch  # type: ignore[import-not-found]  # noqa: F401  (optional: only this function needs it)

    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg: Dict[str, Any] = dict(config.to_dict())
        if max_position_embeddings is not None:
            cfg["max_position_embeddings"] = max_position_embeddings
        return cfg

    params = dict(module.named_parameters(remove_duplicate=False))
    if not params:
        raise PlanError("from_module: the module has no parameters", "model")
    embed = [(n, p) for n, p in params.items() if p.dim() == 2 and ("embed" in n or n.endswith("wte.weight"))]
    if not embed:
        raise PlanError(
            "from_module: no embedding found (a 2-D parameter named like tok_embeddings or embed_tokens)",
            "model",
        )
    embed_name, embed_param = embed[0]
    vocab, hidden = (int(d) for d in embed_param.shape)
    blocks: Dict[int, Dict[str, Any]] = {}
    for name, p in params.items():
        m = _BLOCK.search(name)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = p
    if not blocks:
        raise PlanError("from_module: no blocks found (parameters under layers.N, h.N or blocks.N)", "model")
    first = blocks[min(blocks)]
    found: Dict[str, Any] = {}
    for role, suffixes in _ROLES:
        for key, p in first.items():
            if key.endswith(suffixes):
                found[role] = p
                break
    missing = [r for r in ("q", "k", "v", "o", "gate", "down", "up") if r not in found]
    if missing:
        raise PlanError(
            "from_module: the first block lacks " + ", ".join(missing)
            + " (read as a Llama block: wq/wk/wv/wo or q_proj/k_proj/v_proj/o_proj, w1/w2/w3 or gate_proj/down_proj/up_proj);"
            " pass a Hugging Face model, or a config dict as model=",
            "model",
        )
    q_dim = int(found["q"].shape[0])
    kv_dim = int(found["k"].shape[0])
    heads = num_attention_heads or _attr(module, _HEADS)
    if heads is None:
        raise PlanError(
            "from_module: the number of attention heads is not an attribute of the module; pass num_attention_heads=",
            "num_attention_heads",
        )
    if q_dim % heads:
        raise PlanError(
            f"invalid num_attention_heads: got {heads}, expected a divisor of the query projection's {q_dim} rows",
            "num_attention_heads",
        )
    head_dim = q_dim // heads
    kv_heads = num_key_value_heads or _attr(module, _KV_HEADS) or kv_dim // head_dim
    output = [p for n, p in params.items() if p.dim() == 2 and n != embed_name and n.split(".")[-2] in ("output", "lm_head")]
    tied = not output or output[0] is embed_param
    max_pos = max_position_embeddings or _attr(module, _MAX_POS) or 131072
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": int(found["gate"].shape[0]),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": max_pos,
        "attention_bias": "q_bias" in found,
        "mlp_bias": "mlp_bias" in found,
    }
    name = type(module).__name__
    cfg["_name_or_path"] = name
    # The configuration must describe exactly the module's parameters.
    from memplan import estimate

    counted = sum(int(p.numel()) for p in dict(module.named_parameters()).values())
    got = estimate(model=cfg, micro_batch_size=1, seq_len=1).param_count
    if got != counted:
        raise PlanError(
            f"from_module: a Llama decoder of the shapes read ({len(blocks)} blocks, hidden {hidden}, "
            f"{heads} heads, {kv_heads} KV heads, MLP {cfg['intermediate_size']}, vocab {vocab}) has "
            f"{got:,} parameters, the module {counted:,}; its architecture is not one memplan models "
            "from shapes alone: pass a Hugging Face config dict as model=",
            "model",
        )
    return cfg
