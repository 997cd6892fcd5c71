"""moe_dist: an expert-parallel Mixture-of-Experts runtime for PyTorch."""
from .config import MoEConfig
from .errors import BufferOverflow, MoERuntimeError, NonFiniteRouterLogits, PeerTimeout
from .layer import MoELayer, MoEOutput, is_expert_param
from .parallel import ParallelGroups, init_distributed

__version__ = "0.1.0"
__all__ = ["BufferOverflow", "MoEConfig", "MoELayer", "MoEOutput", "MoERuntimeError", "NonFiniteRouterLogits",
           "ParallelGroups", "PeerTimeout", "init_distributed", "is_expert_param"]
