"""Builds tcfa._C (the C++ CPU kernels) and installs the Triton kernels as tcfa.kernels.

No CUDA toolkit or GPU is needed: the GPU path is Triton, compiled at run time.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

# -march=native: the extension is built on the machine that runs it (make test,
# pip install -e .); the vector code in csrc/cpu/common.h then uses AVX-512.
# TCFA_PORTABLE=1 drops it for a wheel meant for other machines.
arch = [] if os.environ.get("TCFA_PORTABLE") else ["-march=native"]
setup(
    name="tcfa",
    packages=["tcfa", "tcfa.kernels"],
    package_dir={"tcfa": "tcfa", "tcfa.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            "tcfa._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", *arch],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
