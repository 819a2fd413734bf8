"""fastdarts: DARTS (Liu et al., 2019) with a memory-lean mixed operation.

The public API; see README.md for an example.
"""
from .architect import Architect
from .data import DATASETS, Dataset, DeviceLoader, ImageSet, load_dataset
from .errors import FastDartsError
from .genotype import DARTS_V1, DARTS_V2, GENOTYPES, Genotype, derive_genotype, get_genotype
from .layout import reduction_layout
from .mixed_op import MIXED_OP_BACKENDS, MixedOp
from .ops import DARTS_OPS, EXTENDED_OPS, OP_SETS, OPS, PRIMITIVES, resolve_ops
from .search_loop import SearchConfig, SearchResult, search
from .supernet import SearchCell, SearchNetwork

__version__ = "0.1.0"

__all__ = [
    "Architect", "DATASETS", "Dataset", "DeviceLoader", "ImageSet", "load_dataset", "FastDartsError",
    "DARTS_V1", "DARTS_V2", "GENOTYPES", "Genotype", "derive_genotype", "get_genotype", "reduction_layout",
    "MIXED_OP_BACKENDS", "MixedOp", "DARTS_OPS", "EXTENDED_OPS", "OP_SETS", "OPS", "PRIMITIVES", "resolve_ops",
    "SearchConfig", "SearchResult", "search", "SearchCell", "SearchNetwork", "__version__",
]
