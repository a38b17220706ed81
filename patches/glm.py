"""GLM and GLM-4: partial rotary (half of each head) on interleaved channel pairs."""

from .spec import ArchSpec

SPEC = ArchSpec(model_types=("glm", "glm4"), rope_layout="interleaved", partial_rotary=True)
