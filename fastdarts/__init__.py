"""fastdarts: DARTS (Liu et al., 2019) with a memory-lean mixed operation.

The public API; see README.md for an example.
"""
from .architect import Architect
from .data import DATASETS, Dataset, DeviceLoader, FileDataset, FileSet, ImageSet, Loaders, StreamLoader, load_dataset
from .errors import FastDartsError
from .genotype import DARTS_V1, DARTS_V2, GENOTYPES, Genotype, derive_genotype, get_genotype
from .layout import reduction_layout
from .kernels.backend import available_backends
from .mixed_op import MIXED_OP_BACKENDS, MixedOp
from .ops import DARTS_OPS, EXTENDED_OPS, OP_SETS, OPS, PRIMITIVES, resolve_ops
from .search_loop import SearchConfig, SearchResult, search
from .supernet import SearchCell, SearchNetwork
from .eval_network import NetworkCIFAR, NetworkImageNet, build_network, count_parameters, drop_path, network_from_spec
from .model_size import count_multiply_adds, describe_size
from .evaluate import evaluate_checkpoint, load_original_darts_state_dict, load_trained
from .train_loop import TrainConfig, TrainResult, train
from .method import Option, SearchMethod, register_method, register_preset
from . import methods  # noqa: F401  (registers the methods beyond DARTS)

__version__ = "0.1.0"

__all__ = [
    "Architect", "DATASETS", "Dataset", "DeviceLoader", "FileDataset", "FileSet", "ImageSet", "Loaders",
    "StreamLoader", "load_dataset", "FastDartsError",
    "DARTS_V1", "DARTS_V2", "GENOTYPES", "Genotype", "derive_genotype", "get_genotype", "reduction_layout",
    "available_backends", "MIXED_OP_BACKENDS", "MixedOp",
    "DARTS_OPS", "EXTENDED_OPS", "OP_SETS", "OPS", "PRIMITIVES", "resolve_ops",
    "SearchConfig", "SearchResult", "search", "SearchCell", "SearchNetwork", "__version__",
    "NetworkCIFAR", "NetworkImageNet", "build_network", "network_from_spec", "count_parameters",
    "count_multiply_adds", "describe_size", "drop_path", "evaluate_checkpoint",
    "load_original_darts_state_dict", "load_trained", "TrainConfig", "TrainResult", "train",
    "Option", "SearchMethod", "register_method", "register_preset",
]
