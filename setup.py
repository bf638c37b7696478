"""Install fastbeit; `kernels/` ships as the subpackage `fastbeit.kernels`."""

from setuptools import setup

setup(
    name="fastbeit",
    version="0.1.0",
    description="Fast, faithful BEiT (masked image modeling) pre-training in PyTorch and Triton",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "fastbeit",
        "fastbeit.data",
        "fastbeit.tokenizer",
        "fastbeit.kernels",
        "fastbeit.experiments",
        "fastbeit.segmentation",
    ],
    package_dir={"fastbeit.kernels": "kernels"},
    package_data={
        "fastbeit": ["assets/*.safetensors", "assets/*.json", "assets/*.png", "assets/sample/*", "assets/sample/*/*"]
    },
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
        "matplotlib",
        "scipy",  # the original geometric resize of relative position tables (a cubic spline)
        "timm",  # the original fine-tuning RandAugment; timm's BEiT is also a step-benchmark baseline
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "transformers",  # the Hugging Face interchange tests load what --to hf writes with from_pretrained
            "webdataset",  # only to check that fastbeit's shards read as standard WebDataset tars
        ],
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "fastbeit-pretrain=fastbeit.pretrain:main",
            "fastbeit-finetune=fastbeit.finetune:main",
            "fastbeit-linprobe=fastbeit.linprobe:main",
            "fastbeit-segment=fastbeit.segment:main",
            "fastbeit-convert=fastbeit.interchange:main",
        ]
    },
)
