"""janusflow-pretrain: an open pretraining stack for JanusFlow (megatron-core + DeepSpeed).

torch is left unpinned here so a cluster's own CUDA build is kept; on a CPU-only host,
scripts/bootstrap.sh installs the CPU wheel torch==2.13.0 first so no CUDA wheels are pulled.
"""

from setuptools import find_packages, setup

setup(
    name="janusflow-pretrain",
    version="0.1.0",
    description="Pretraining stack for JanusFlow: megatron-core LLM, rectified flow, DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain*", "data_tools*", "datacontract*", "image_codecs*", "fused_kernels*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed==0.19.8",
        # megatron-core internals (layer specs, packed-sequence RoPE) are relied on: keep it pinned.
        "megatron-core==0.16.1",
        # transformers >= 5.25 imports HuggingFace's `kernels` package, hence this project's fused
        # kernels live in `fused_kernels/` (a top-level `kernels/` shadowed it and broke every model import).
        "transformers>=5.0,<6",
        "diffusers>=0.42,<0.43",
        "numpy",
        "pyarrow>=14",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "pillow",
        "tqdm",
        "tokenizers",
    ],
    # Triton is not a run dependency: CUDA builds of torch bring their own (fused_kernels/ needs it only
    # on a GPU), and on the CPU only the kernel tests run it, in its interpreter.
    extras_require={
        "gpu": ["flash-attn>=2.5", "triton"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist>=3.5", "triton"],  # make test: two xdist workers
    },
)
