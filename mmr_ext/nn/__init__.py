"""The network as analysed: parsing into a chain of affine blocks or a graph (max pooling, sums of
branches), layer adapters, Normalize, the model zoo."""
from .chain import AffineBlock, Chain, activation_mask, parse_model
from .graph import Graph, parse_network
from .layers import Normalize
from .zoo import MODELS, build_model
