"""Llama and the decoders that differ from it only outside attention (as far as GAPE sees):
SmolLM2 and SmolLM3 (whose NoPE layers get the same gates: pair norms need no rotation),
Arcee (ReLU^2 MLP), Seed-OSS, BitNet (ternary weights), InternLM3, Solar Open (MoE),
Falcon-H1 (a Mamba mixer beside every attention), HyperCLOVA X, Jais 2, OLMo (q/k/v clipped
before RoPE) and nanochat (q/k normalised after RoPE without weights: pair norms keep)."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("llama", "smollm3", "arcee", "seed_oss", "bitnet", "internlm3", "solar_open", "falcon_h1",
                             "hyperclovax", "jais2", "olmo", "nanochat"))
