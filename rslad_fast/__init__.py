"""rslad_fast: fast, faithful adversarial robustness distillation (RSLAD, Zi et al., ICCV 2021)."""
from . import ops
from .errors import UserError

__version__ = "0.1.0"

__all__ = ["ops", "UserError", "__version__"]
