"""Builds tcfa's compiled parts; the Triton kernels (tcfa/kernels) need no build step.

- ``tcfa._C``: the op schemas (csrc/ops.cpp) and the CPU dispatcher
  (csrc/cpu_dispatch.cpp), compiled for the architecture's baseline.
- ``tcfa._cpu_<level>``: every CPU kernel (csrc/cpu/*.cpp), one source compiled once
  per instruction-set level. At import tcfa loads the best level the CPU runs
  (docs/architecture.md, "CPU dispatch"). No level uses -march=native, so a wheel
  built here runs on any x86-64 CPU.

``TCFA_BUILD_NATIVE=1`` adds a ``native`` level (-march=native) to compare the
portable levels against; it is only used when TCFA_CPU_CAPABILITY=native asks for it.
"""
import glob
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# x86-64 psABI levels: v4 = AVX-512 F/BW/CD/DQ/VL (+ v3), v3 = AVX2, FMA, BMI2, F16C.
X86_LEVELS = {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "default": ["-march=x86-64"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    LEVELS = dict(X86_LEVELS)
else:  # other architectures: one build for the compiler's default target
    LEVELS = {"default": []}
if os.environ.get("TCFA_BUILD_NATIVE", "") not in ("", "0"):
    LEVELS["native"] = ["-march=native"]

# -Wno-psabi: GCC notes that 64-byte vector arguments change the calling convention
# without AVX-512; these are internal inline helpers, never an ABI boundary.
# -g0: Python's own CFLAGS carry -g, which made each level library 13 MB and slowed the build.
COMMON = ["-O3", "-fno-math-errno", "-Wno-psabi", "-g0"]
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True))
KERNELS = sorted(glob.glob("csrc/cpu/*.cpp"))


def level_extension(level, flags):
    return CppExtension(
        f"tcfa._cpu_{level}",
        KERNELS,
        depends=HEADERS,
        # hidden: the library exports only tcfa_cpu_kernels, the table _C looks up
        extra_compile_args=[*COMMON, "-fopenmp", "-fvisibility=hidden", *flags,
                            f'-DTCFA_CPU_LEVEL="{level}"'],
        extra_link_args=["-fopenmp"],
    )


class BuildPerExtension(BuildExtension):
    """One build directory per extension: the levels compile the same sources with
    different flags, and a shared directory would overwrite their objects (and make
    every rebuild a full one instead of ninja's incremental one)."""

    def build_extension(self, ext):
        base = self.build_temp
        self.build_temp = os.path.join(base, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base


setup(
    packages=find_packages(include=["tcfa", "tcfa.*"]),
    # no data files: without this an in-place build's libraries (a native level
    # among them) would be swept into the wheel as package data
    include_package_data=False,
    ext_modules=[
        CppExtension("tcfa._C", ["csrc/ops.cpp", "csrc/cpu_dispatch.cpp"], depends=HEADERS,
                     extra_compile_args=COMMON),
        *(level_extension(level, flags) for level, flags in LEVELS.items()),
    ],
    cmdclass={"build_ext": BuildPerExtension},
)
