"""dsd-caffe: Dense-Sparse-Dense training for Caffe models, around real pycaffe.

This file only re-exports the public names. They load lazily, so ``import dsd_caffe`` needs neither Caffe
nor numpy, and ``python3 -m dsd_caffe.build`` runs before the virtual environment exists.
"""
import importlib

__version__ = "0.1.0"

#: public name -> module that defines it. A name never equals a module's name (``dsd_caffe.evaluate`` is the
#: module; its function is ``dsd_caffe.evaluate.evaluate``).
_EXPORTS = {
    "UserError": "errors",
    "Interrupted": "errors",
    "import_caffe": "caffe_env",
    "set_device": "caffe_env",
    "build_info": "caffe_env",
    "caffe_binary": "caffe_env",
    "caffe_tool": "caffe_env",
    "make_net": "caffe_env",
    "glog_level": "caffe_env",
    "set_glog_level": "caffe_env",
    "glog_level_set": "caffe_env",
    "read_caffemodel": "fileio",
    "write_caffemodel": "fileio",
    "read_net_prototxt": "fileio",
    "write_prototxt": "fileio",
    "write_provenance": "fileio",
    "absolute_sources": "sources",
    "read_net": "sources",
    "squeezenet_v1_0": "netgen",
    "small_squeezenet": "netgen",
    "deploy": "netgen",
    "weighted_layers": "netgen",
    "detect_naming": "netgen",
    "rename_map": "netgen",
    "rename_weights": "netgen",
    "set_data_sources": "netgen",
    "DEFAULTS": "solvers",
    "Schedule": "solvers",
    "dense_solver": "solvers",
    "sparse_solver": "solvers",
    "redense_solver": "solvers",
    "epochs_to_iters": "solvers",
    "test_iters": "solvers",
    "parse_ratio": "pruning",
    "format_ratio": "pruning",
    "magnitude_mask": "pruning",
    "make_masks": "pruning",
    "apply_masks": "pruning",
    "layer_densities": "pruning",
    "SQUEEZENET_3X": "pruning",
    "MaskLayer": "masklayer",
    "read_masks": "masks",
    "release_masks": "masks",
    "sparsity_report": "masks",
    "Inputs": "phases",
    "PruneConfig": "phases",
    "train_dense": "phases",
    "prune": "phases",
    "train_sparse": "phases",
    "retrain_dense": "phases",
    "RunConfig": "pipeline",
    "results_table": "pipeline",
    "results_text": "pipeline",
    "read_curve": "caffelog",
    "weight_arrays": "masks",
    "run_dsd": "pipeline",
    "run_seeds": "pipeline",
    "paired_verdict": "verdict",
    "sensitivity_scan": "sensitivity",
    "make_lmdb": "imagedb",
    "LmdbOptions": "imagedb",
    "lmdb_info": "lmdbio",
    "check_lmdb": "lmdbio",
    "label_range": "lmdbio",
    "write_array_lmdb": "lmdbio",
    "import_fashion_mnist": "fashion_mnist",
    "read_idx": "fashion_mnist",
    "evaluate_param": "evaluate",
    "format_results": "evaluate",
    "check_weights_fit": "netcheck",
    "ZOO": "zoo",
    "load": "loading",
    "fetch": "zoo",
    "verify": "zoo",
    "git_blob_id": "zoo",
    "run_demo": "demo",
    "classify": "classifier",
    "Classifier": "classifier",
    "Preprocess": "classifier",
    "known_recipe": "classifier",
    "imagenet_classes": "classifier",
    "decode": "deepcompression",
    "decode_to_caffemodel": "deepcompression",
    "encode": "deepcompression",
    "compress": "deepcompression",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dsd_caffe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
