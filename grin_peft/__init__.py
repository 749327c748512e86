"""grin_peft: GRIN unlearning as a Hugging Face PEFT method.

`import grin_peft` registers the "GRIN" PEFT type, so `get_peft_model`, `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM.from_pretrained` work with GRIN deltas.
"""

from .config import GrinConfig
from .errors import GrinError
from .layer import GrinLayer
from .model import GrinModel
from .registration import GRIN_PEFT_TYPE, register
from .revert import revert

register()

__all__ = ["GRIN_PEFT_TYPE", "GrinConfig", "GrinError", "GrinLayer", "GrinModel", "revert"]
__version__ = "0.1.0"
