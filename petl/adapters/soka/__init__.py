"""SoKA: SVD on Kronecker Adaptation (Chong & Qu, arXiv 2506.15251) as an out-of-tree peft method.

Importing this package registers ``PetlType.SOKA`` with peft, after which ``get_peft_model``,
``PeftModel.from_pretrained`` and the rest of peft's API accept :class:`SokaConfig`.
"""
from ..registration import PetlType, register_petl_method
from .config import SokaConfig
from .grad import accumulate_gradients
from .kpsvd import KronShape, kpsvd, kpsvd_factors, kron_shape, kron_sum, rearrange, unrearrange
from .layer import SokaLayer, SokaLinear
from .matvec import kron_matvec
from .model import SokaModel

register_petl_method(PetlType.SOKA, SokaConfig, SokaModel, prefix=SokaModel.prefix)

__all__ = ["SokaConfig", "SokaModel", "SokaLayer", "SokaLinear", "accumulate_gradients", "KronShape",
           "kpsvd", "kpsvd_factors", "kron_shape", "kron_sum", "kron_matvec", "rearrange", "unrearrange"]
