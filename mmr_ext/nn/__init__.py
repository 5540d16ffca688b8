"""The network as analysed: parsing into a chain of affine blocks, layer adapters, Normalize, the model zoo."""
from .chain import AffineBlock, Chain, activation_mask, parse_model
from .layers import Normalize
from .zoo import MODELS, build_model
