"""grin_peft: GRIN unlearning as a Hugging Face PEFT method."""

from .errors import GrinError

__all__ = ["GrinError"]
__version__ = "0.1.0"
