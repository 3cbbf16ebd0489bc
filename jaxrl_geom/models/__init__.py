"""Flax NNX decoder language models (llama, qwen2, qwen3) with Hugging Face interop.

``Decoder(config, rngs=...)`` is the LM, ``load_pretrained`` / ``save_pretrained``
read and write Hugging Face safetensors checkpoints, ``init_cache`` makes the KV
cache, and ``taps`` holds the LongAct q/k capture helpers.
"""

from jaxrl_geom.models.attention import Attention
from jaxrl_geom.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from jaxrl_geom.models.decoder import Decoder, DecoderLayer, KVCache, init_cache
from jaxrl_geom.models.hf_io import load_pretrained, save_pretrained
from jaxrl_geom.models.taps import (
    ChannelStats,
    channel_stats,
    collect_qk_stats,
    combine_stats,
    set_qk_capture,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "ChannelStats",
    "Decoder",
    "DecoderLayer",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "channel_stats",
    "collect_qk_stats",
    "combine_stats",
    "init_cache",
    "load_pretrained",
    "save_pretrained",
    "set_qk_capture",
]
