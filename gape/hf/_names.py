"""The names the parts of gape.hf share: the attention implementation and the
submodules a patched attention layer carries."""

IMPLEMENTATION = "gape"
GATE_ATTR = "gape_gate"
ALIBI_ATTR = "gape_alibi"
