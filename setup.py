"""Build of the native extension mmr_ext._C (see README "Building").

Build against the torch you already have: ``pip install --no-build-isolation .``.
A CUDAExtension is built when torch has CUDA and nvcc is found, else a CppExtension with the CPU
sources only. ``FORCE_CUDA=1`` / ``FORCE_CPU=1`` override the detection.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # an isolated build environment has no torch: fail fast, do not pull one
    sys.exit(
        "mmr_ext builds against the torch you already have, and none is importable here (pip's "
        "isolated build environment?). Install torch first (e.g. `pip install torch==2.13.0`), then "
        "run `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _use_cuda():
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _nvidia_wheel_includes():
    """include/ folders of the nvidia-* wheels next to torch (cusparse.h etc. for CUDA 13 builds)."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def _extension():
    # csrc/*.cpp: the schemas (ops.cpp), the argument checks and the empty Python module;
    # csrc/cpu and csrc/cuda: the kernels of each backend, registered with the dispatcher
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _use_cuda():
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "**", "*.cu"), recursive=True))
        return cpp_extension.CUDAExtension(
            "mmr_ext._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "mmr_ext._C",
        cpu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
