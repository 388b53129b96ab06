from setuptools import find_packages, setup

setup(
    name="dico-scale",
    version="0.1.0",
    description="Distributed DiCO (Direct CLIP-based Optimization) trainer for image captioners on DeepSpeed",
    python_requires=">=3.10",
    # The kernels' sources live in kernels/src/ and ship as dico_scale.kernels. kernels/ itself has no __init__.py, so
    # from the repository root it is at most an empty namespace portion, which never shadows an installed package
    # (transformers imports Hugging Face's `kernels`).
    packages=find_packages(include=["dico_scale", "dico_scale.*"]) + ["dico_scale.kernels"],
    package_dir={"dico_scale.kernels": "kernels/src"},
    install_requires=[
        # Compatible ranges for your own environment; `make install` pins exact versions from requirements.lock, and
        # `make test-floor` runs the suite on each range's lowest release.
        # torch 2.11 / triton 3.6 is the lent GPU machine's image; 2.14.1 the newest this project's machines can test.
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",  # the torchvision built for your torch (open_clip imports it)
        # 0.19.8 is the first whose ds_to_universal converts frozen parameters (an elastic resume needs them); older
        # ones fail ZeRO-3 here too (0.19.0-0.19.1: its parameter trace, 0.19.2: activation checkpointing)
        "deepspeed>=0.19.8,<0.20",
        # 5.24 renamed the models' `past_key_values` to `cache`, which we pass (5.20-5.23 ignore it: generation ran
        # without its cache and failed); 5.40 drops the old name
        "transformers>=5.24,<5.40",
        "tokenizers>=0.23.1",  # dico_scale.models.tiny trains the tiny models' BPE (transformers 5.24 needs 0.23.1)
        "safetensors>=0.8",  # the DiCO reference's and Hugging Face folders' weights, safetensors exports
        "open_clip_torch>=3.3,<4",
        "webdataset>=1.0.2,<2",
        "omegaconf>=2.3,<3",
        "mlflow>=3.9,<4",  # 3.0-3.8 import a pool class SQLAlchemy 2.1 dropped
        "pycocoevalcap>=1.2",
        "triton>=3.6",  # pinned by torch; the kernels in kernels/src/ (interpreted on the CPU in tests)
        # LoRA adapters (captioner.lora.*): injection, disabling for the DiCO reference, merging; 0.17 imports
        # transformers 4's HybridCache, gone in 5
        "peft>=0.18,<1",
        # SmolVLM's processor spells numbers out (transformers refuses to build it without); 0.5.0 is Python 2 and
        # 0.5.1-0.5.4 do not build
        "num2words>=0.5.5",
        "tqdm>=4.60",
        "psutil>=5.9",  # the demo and compare wait for their runs' ranks after a Ctrl-C (DeepSpeed needs it too)
        "matplotlib>=3.8.4",  # dico_scale.compare draws its figure (3.8.0-3.8.3 refuse numpy 2)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2", "pytest-xdist>=3.5"],  # xdist: the single-process tests on every core
        # peers the kernel benchmark compares against (pure Python + Triton; need a GPU to run)
        "bench": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
    },
)
