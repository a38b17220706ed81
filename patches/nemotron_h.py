"""Nemotron-H: every block holds one mixer (``.mixer``): Mamba-2, attention, MLP or MoE, as
``config.layer_types`` (``layers_block_type``) says; only the attention mixers (NoPE:
Mamba carries the order) get gates."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("nemotron_h",), attention="mixer", layer_kinds="layer_types")
