"""Greedy decoding of Llama-family models in one tight loop over the layers (issue 22 item 3).

On a small CPU model most of a token's time is spent outside the projections: transformers'
forward builds masks, cache objects, position tensors and generate's bookkeeping on every step
(about half of SmolLM2's 16 ms per token). This decoder runs the same arithmetic with a KV cache
preallocated for the whole generation, rotary tables computed once by the model's own rotary
module, and the model's own modules (embedding, projections, head) called directly, so that the
sketched projections run through the same kernels. The served model's `generate` takes it for
plain greedy decoding of one sequence (`eligible`) and falls back to transformers' otherwise.
When every projection of a layer is sketched and the CPU kernels run, each new token's layer is
one call of the C++ op `sketchtune::decode_layer` (the same arithmetic, no tensor ops around the
GEMVs); the prompt and other layers run the Python loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .layers import SketchLinear

# The model classes whose decoder layer is exactly: RMSNorm, attention (q/k/v/o, rotary, causal
# softmax), residual, RMSNorm, SiLU-gated MLP, residual.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# generate() arguments this decoder honours; any other one sends the call to transformers
ACCEPTED = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "do_sample",
            "num_beams", "pad_token_id", "eos_token_id", "use_cache"}
# generation_config fields that must keep their defaults (what greedy decoding leaves alone)
NEUTRAL = {"num_beams": 1, "do_sample": False, "repetition_penalty": 1.0,
           "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
           "begin_suppress_tokens": None, "forced_bos_token_id": None,
           "forced_eos_token_id": None, "sequence_bias": None, "min_length": 0,
           "max_time": None, "stop_strings": None, "num_return_sequences": 1,
           "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
           "cache_implementation": None, "penalty_alpha": None, "guidance_scale": None}


def supports(model: nn.Module) -> bool:
    """Whether the model's architecture is one this decoder computes exactly."""
    names = {cls.__name__ for cls in type(model).__mro__}
    config = model.config
    return (
        bool(names & set(SUPPORTED))
        and getattr(config, "hidden_act", None) == "silu"
        and getattr(config, "pretraining_tp", 1) == 1
        and not getattr(config, "use_sliding_window", False)  # Qwen2's switch
        and model.device.type == "cpu"
    )


def _within_window(model: nn.Module, total: int) -> bool:
    """Mistral attends within a sliding window: the same as full attention up to its width."""
    window = getattr(model.config, "sliding_window", None)
    mistral = any(cls.__name__ == "MistralForCausalLM" for cls in type(model).__mro__)
    return not mistral or window is None or total <= window


def eligible(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether `model.generate(*args, **kwargs)` is plain greedy decoding of one unpadded
    sequence that this decoder reproduces."""
    if not supports(model) or len(args) > 1 or set(kwargs) - ACCEPTED:
        return False
    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return False
    if ids.numel() == 0:
        return False
    if not _within_window(model, ids.shape[1] + _new_tokens(model, ids, kwargs)):
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        return False
    config = model.generation_config
    if kwargs.get("do_sample") or kwargs.get("num_beams", 1) != 1:
        return False
    if kwargs.get("use_cache", True) is False or torch.is_grad_enabled() and model.training:
        return False
    # transformers 5 leaves unset fields None, meaning their default
    return all(getattr(config, name, None) in (None, default) for name, default in NEUTRAL.items()
               if name not in kwargs)


def _new_tokens(model: nn.Module, ids: torch.Tensor, kwargs: dict[str, Any]) -> int:
    config = model.generation_config
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is None:  # transformers' default: 20 tokens in all
        new = max((config.max_length or 20) - ids.shape[1], 0)
    return new


def generate(model: nn.Module, args: tuple, kwargs: dict[str, Any], governor: Any) -> torch.Tensor:
    """`model.generate(*args, **kwargs)` for an `eligible` call, through the model's cached
    `FastDecoder`."""
    if getattr(model, "_fast_decoder", None) is None:
        model._fast_decoder = FastDecoder(model)
    ids = args[0] if args else kwargs["input_ids"]
    config = model.generation_config
    return model._fast_decoder.generate(
        ids, _new_tokens(model, ids, kwargs),
        kwargs.get("min_new_tokens", config.min_new_tokens) or 0,
        kwargs.get("eos_token_id", config.eos_token_id), governor,
    )


def _eos_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    return set(value) if isinstance(value, Iterable) else {int(value)}


class FastDecoder:
    """The decode loop for one model; `generate` returns prompt + new ids as transformers'
    greedy `generate` does (stopping at an end-of-sequence id, or after `max_new_tokens`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.layers = model.model.layers

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """transformers' Llama RMSNorm: normalise in fp32, then weight * x in x's dtype."""
        return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def _rotary(self, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0..total-1, (total, head_dim), from the model's module."""
        probe = torch.zeros(1, dtype=torch.float32)
        positions = torch.arange(total)[None]
        cos, sin = self.model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _fused_arguments(self) -> list[tuple | None]:
        """Per layer, the tensors `decode_layer` takes after x, or None where a projection is
        not sketched, a table not fp32/bf16, or the CPU kernels do not run (read afresh for
        each generation: training or a task sketch may have replaced the tables)."""
        if kernels.current_path() == "reference":
            return [None] * len(self.layers)
        arguments = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modules = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj]
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if not all(type(m) is SketchLinear and not m._forward_hooks and not
                       m._forward_pre_hooks and m.values.dtype in (torch.float32, torch.bfloat16)
                       for m in modules) or any(n.dtype != torch.float32 for n in norms):
                arguments.append(None)
                continue
            empty = torch.empty(0)
            arguments.append((
                norms[0].contiguous(), norms[1].contiguous(), self.eps,
                [m.codes.contiguous() for m in modules],
                [m.values.detach().contiguous() for m in modules], [m.bits for m in modules],
                [empty if m.bias is None else m.bias.detach().float().contiguous()
                 for m in modules],
            ))
        return arguments

    def _step(self, ids: torch.Tensor, start: int, caches: list, cos: torch.Tensor,
              sin: torch.Tensor, fused: list[tuple | None] | None = None) -> torch.Tensor:
        """Run positions start..start+T-1 of ids (1, T); returns the last position's logits.
        `fused`: `_fused_arguments`, for a single new token."""
        length = ids.shape[1]
        end = start + length
        x = self.model.model.embed_tokens(ids)  # (1, T, hidden)
        cos_t, sin_t = cos[start:end], sin[start:end]  # (T, head_dim)
        for index, (layer, (keys, values)) in enumerate(zip(self.layers, caches, strict=True)):
            attn = layer.self_attn
            if fused is not None and length == 1 and fused[index] is not None:
                x = torch.ops.sketchtune.decode_layer(
                    x.contiguous(), *fused[index], keys[0], values[0], start, cos[start],
                    sin[start], self.heads, attn.scaling,
                )
                continue
            h = self._norm(x, layer.input_layernorm)
            q = attn.q_proj(h).view(1, length, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos_t, sin_t), self._rotate(k, cos_t, sin_t)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            out = F.scaled_dot_product_attention(  # (1, heads, T, head_dim)
                q, keys[:, :, :end], values[:, :, :end], is_causal=length > 1,
                scale=attn.scaling, enable_gqa=self.kv_heads != self.heads,
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, length, -1))
            h = self._norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        x = self._norm(x[:, -1:], self.model.model.norm)
        return self.model.lm_head(x)[:, -1].float()  # (1, vocab)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                 eos_token_id: Any = None, governor: Any = None) -> torch.Tensor:
        """`governor`: the model's `serving.DecodeThreads`, told of each step as a forward
        would tell it."""
        total = ids.shape[1] + max_new_tokens
        dtype = getattr(self.model, "_compute_dtype", None) or self.model.dtype
        shape = (1, self.kv_heads, total, self.head_dim)
        caches = [(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
                  for _ in self.layers]
        cos, sin = self._rotary(total)
        fused = self._fused_arguments() if dtype == torch.float32 else None
        eos = _eos_ids(eos_token_id)
        out = [ids]
        step_ids, start = ids, 0
        for made in range(max_new_tokens):
            if governor is not None:
                governor.before(None, (step_ids,), {})
            logits = self._step(step_ids, start, caches, cos, sin, fused)
            if made < min_new_tokens and eos:
                logits[:, list(eos)] = -float("inf")
            token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
            out.append(token)
            if int(token) in eos:
                break
            start += step_ids.shape[1]
            step_ids = token
        return torch.cat(out, dim=1)
