"""fastmoco: fast, dependable MoCo training and fused contrastive ops.

Install with torch already present and without build isolation, so the C++/CUDA extension
(csrc/) builds against the torch you run (an isolated build would fetch its own, several GB):

    pip install torch torchvision
    pip install --no-build-isolation -e ".[dev]"

FASTMOCO_BUILD_CUDA=1 forces the CUDA part of the extension, =0 skips it; unset, it is built
when torch has CUDA and CUDA_HOME holds nvcc and lib/libcudart.so (set CUDA_HOME to the
toolkit, e.g. /usr/local/cuda, when `which nvcc` is only a wrapper).
FASTMOCO_BUILD_EXT=0 skips the extension entirely.
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit(cuda_home: str | None) -> bool:
    """nvcc and a linkable libcudart under CUDA_HOME. torch guesses CUDA_HOME from `which
    nvcc`, which can be a wrapper in /usr/local/bin with no toolkit beside it: then the
    CUDA build would compile and fail to link, so the automatic choice builds CPU only."""
    if cuda_home is None:
        return False
    libs = [os.path.join(cuda_home, d, "libcudart.so") for d in ("lib64", "lib")]
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    return os.path.exists(nvcc) and any(os.path.exists(lib) for lib in libs)


def _extensions():
    """The csrc/ extension as CppExtension or CUDAExtension; [] while csrc/ holds no sources."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp or os.environ.get("FASTMOCO_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = os.environ.get("FASTMOCO_BUILD_CUDA")
    use_cuda = (want_cuda == "1") or (
        want_cuda is None and torch.version.cuda is not None and _cuda_toolkit(CUDA_HOME)
    )
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if use_cuda and cu:
        ext = CUDAExtension(
            "fastmoco._C",
            cpp + cu,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            define_macros=[("FASTMOCO_WITH_CUDA", None)],
        )
    else:
        ext = CppExtension("fastmoco._C", cpp, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastmoco",
    version="0.1.0",
    description="Fast MoCo (Momentum Contrast) training engine and fused contrastive ops",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmoco", "fastmoco.*"]) + ["fastmoco.kernels"],
    # kernels/ lives at the top level (Triton code only) but is imported as fastmoco.kernels.
    package_dir={"fastmoco.kernels": "kernels"},
    license="MIT",
    license_files=["LICENSE"],
    install_requires=[
        # torch 2.11 on the GPU machines, 2.14 on the CPU ones: keep the floor low.
        "torch>=2.4",
        "torchvision>=0.19",
        # Triton ships for Linux only; elsewhere the ops run their torch path.
        'triton>=3.0; platform_system == "Linux"',
        "numpy",
        "pillow",
        "tqdm",
        "pyyaml",  # config.yaml in and out
    ],
    extras_require={
        # Training's TensorBoard logs and curves.png; without them a run keeps metrics.jsonl
        # and says what it skipped. The ops alone need neither.
        "train": ["tensorboard", "matplotlib"],
        # DALI is ~250 MB with its codecs and only pays off with a GPU: see README. The wheel
        # is built per CUDA major version: [dali] for CUDA 13 drivers, [dali-cuda12] for 12.
        "dali": ["nvidia-dali-cuda130"],
        "dali-cuda12": ["nvidia-dali-cuda120"],
        "dev": ["pytest", "pytest-benchmark", "ruff", "tensorboard", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastmoco=fastmoco.cli:main"]},
)
