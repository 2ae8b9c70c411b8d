"""rslad_fast: fast, faithful adversarial robustness distillation (RSLAD, Zi et al., ICCV 2021)."""

from . import ops
from .attacks import fused_kl_pgd
from .errors import UserError

__version__ = "0.1.0"

__all__ = ["ops", "fused_kl_pgd", "UserError", "__version__"]
