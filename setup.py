from setuptools import find_packages, setup

setup(
    name="dsd-caffe",
    version="0.1.0",
    description="Dense-Sparse-Dense training for Caffe models, around real pycaffe",
    packages=find_packages(include=["dsd_caffe", "dsd_caffe.*"]),
    package_data={"dsd_caffe": ["resources/*"]},
    python_requires=">=3.9",
    license="BSD-2-Clause",
)
