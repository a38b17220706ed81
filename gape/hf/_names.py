"""The names the parts of gape.hf share: the attention implementation, the
submodules a patched attention layer carries, the model config's GAPE entry, and
the one check that reads that entry at forward time (here, so that the attention
function does not depend on the save/load module)."""

IMPLEMENTATION = "gape"
GATE_ATTR = "gape_gate"
ALIBI_ATTR = "gape_alibi"
CONFIG_KEY = "gape"  # model.config.gape: how a saved GAPE model describes itself
LOAD_HINT = "import gape; model = gape.from_pretrained(path)"


def check_gate_missing(module) -> None:
    """Raise when an attention layer without a gate belongs to a GAPE model whose
    gates were not attached (loaded as a plain transformers model)."""
    entry = getattr(getattr(module, "config", None), CONFIG_KEY, None)
    if isinstance(entry, dict) and getattr(module, "layer_idx", None) in entry.get("layers", ()):
        raise ValueError(
            f"layer {module.layer_idx} of this GAPE model has no gate: the model was loaded without GAPE "
            f"(e.g. AutoModelForCausalLM.from_pretrained with attn_implementation='gape'), which drops the saved gates. "
            f"Load the folder with `{LOAD_HINT}` (or gape.load_model(path))"
        )
