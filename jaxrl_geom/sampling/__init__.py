"""Jitted KV-cache sampler (``generate``) and sampling methods (``Greedy``, ``Sample``)."""

from jaxrl_geom.sampling.generate import GenerateOutput, generate
from jaxrl_geom.sampling.methods import Greedy, Sample, SamplingMethod

__all__ = ["GenerateOutput", "Greedy", "Sample", "SamplingMethod", "generate"]
