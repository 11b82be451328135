from setuptools import find_packages, setup

#: console script -> the command module it runs (the same code as `python tools/<module>.py`)
COMMANDS = {
    "dsd-prune": "prune", "dsd-train-sparse": "train_sparse", "dsd-retrain-dense": "retrain_dense",
    "dsd-run": "dsd", "dsd-evaluate": "evaluate", "dsd-sensitivity": "sensitivity",
    "dsd-make-lmdb": "make_lmdb", "dsd-import-fashion-mnist": "import_fashion_mnist", "dsd-generate": "generate",
    "dsd-compress": "compress", "dsd-decode-compressed": "decode_compressed", "dsd-demo": "demo",
    "dsd-export-onnx": "export_onnx", "dsd-zoo": "zoo", "dsd-info": "info",
}

setup(
    name="dsd-caffe",
    version="0.1.0",
    description="Dense-Sparse-Dense training for Caffe models, around real pycaffe",
    packages=find_packages(include=["dsd_caffe", "dsd_caffe.*"]),
    package_data={"dsd_caffe": ["resources/*"]},
    entry_points={"console_scripts": [f"{name}=dsd_caffe.commands.{module}:main" for name, module in COMMANDS.items()]},
    python_requires=">=3.9",
    license="BSD-2-Clause",
)
