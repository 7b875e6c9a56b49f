"""megatron-jinpan: a 3D-parallel LLaMA trainer.

    pip install -e '.[dev]'      # editable, with test tools
"""
from setuptools import find_packages, setup

packages = find_packages(include=["megatron_jinpan", "megatron_jinpan.*"])
packages.append("megatron_jinpan.kernels")

setup(
    name="megatron-jinpan",
    version="0.1.0",
    description="Megatron-style tensor x pipeline x data parallel trainer for LLaMA",
    python_requires=">=3.10",
    packages=packages,
    # kernels/ lives at the top of the repo but imports as megatron_jinpan.kernels;
    # never as a top-level `kernels` (another PyPI package owns that name).
    package_dir={"megatron_jinpan.kernels": "kernels"},
    include_package_data=True,
    package_data={"megatron_jinpan": ["configs/**/*.yaml", "data/demo_corpus/*",
                                      "eval/tasks/*"]},  # lm-eval task templates + their utils.py
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "sentencepiece",
        "safetensors",
        "megatron-core",
        "tensorboard",
        "protobuf",
    ],
    extras_require={
        "dev": ["pytest", "transformers", "matplotlib", "triton", "nvidia-ml-py", "wheel", "setuptools>=64",
                "jinja2>=3.1", "lm-eval==0.4.13", "peft==0.21.2"],
        "eval": ["lm-eval==0.4.13", "matplotlib"],
        "lora": ["peft==0.21.2"],
        "flash": ["flash-attn"],
        "gpu": ["triton", "nvidia-ml-py"],
    },
    entry_points={"console_scripts": ["jinpan=megatron_jinpan.cli:main"]},
)
