"""fastbone's build. `kernels/` and `backbones/` ship inside the `fastbone`
namespace (both names are taken on PyPI)."""
from setuptools import setup

setup(
    name="fastbone",
    version="0.1.0",
    description="CNN backbones on fused Triton and CUDA C++ kernels",
    python_requires=">=3.10",
    packages=["fastbone", "fastbone.ops", "fastbone.kernels", "fastbone.backbones"],
    package_dir={"fastbone.kernels": "kernels", "fastbone.backbones": "backbones"},
    install_requires=["torch>=2.11", "torchvision>=0.26", "triton>=3.6", "tqdm", "matplotlib", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "timm"]},
    entry_points={"console_scripts": ["fastbone=fastbone.cli:main"]},
)
