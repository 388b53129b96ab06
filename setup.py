from setuptools import find_packages, setup

setup(
    name="dico-scale",
    version="0.1.0",
    description="Distributed DiCO (Direct CLIP-based Optimization) trainer for image captioners on DeepSpeed",
    python_requires=">=3.10",
    # kernels/ ships as dico_scale.kernels, never as a bare `kernels` module (transformers probes that name).
    packages=find_packages(include=["dico_scale", "dico_scale.*"]) + ["dico_scale.kernels"],
    package_dir={"dico_scale.kernels": "kernels"},
    install_requires=[
        "torch==2.14.1",  # with torchvision 0.29.1: the pair open_clip imports cleanly with
        "torchvision==0.29.1",
        "deepspeed>=0.19,<0.20",
        "transformers>=5.20,<5.40",  # 5.40 drops `past_key_values`; we pass `cache`
        "open_clip_torch>=3.3,<4",
        "webdataset>=1.0.2,<2",
        "omegaconf>=2.3,<3",
        "mlflow>=3.0,<4",
        "pycocoevalcap>=1.2",
        "triton",  # pinned by torch; the kernels in kernels/ (interpreted on the CPU in tests)
        "tqdm",
        "matplotlib>=3.8",  # dico_scale.compare draws its figure
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout"],
        # peers the kernel benchmark compares against (pure Python + Triton; need a GPU to run)
        "bench": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
    },
)
