"""The audit's attack and quantization-mode names: light, so the command line can list them before torch loads."""

ATTACKS = ("quantization", "relearning", "paraphrase", "jailbreak", "membership")
MODES = ("8bit", "nf4", "fp4")
