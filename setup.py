"""Build of hstu_kvcache: the C core and, when nvcc is found, the CUDA kernels.

Environment:
  HSTU_KVCACHE_CUDA=0|1     force the CUDA part off / on (default: on if nvcc found)
  HSTU_KVCACHE_CUDA_ARCHS   semicolon list of SM versions (default "80;90")
  HSTU_KVCACHE_WERROR=1     turn compiler warnings into errors (CI)
  NVCC_CCBIN                host compiler for nvcc (e.g. /usr/bin/g++)
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def find_nvcc():
    """Path of nvcc, or None when the CUDA part is not to be built."""
    flag = os.environ.get("HSTU_KVCACHE_CUDA", "").strip()
    if flag == "0":
        return None
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    if flag == "1":
        sys.exit("HSTU_KVCACHE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    return None


NVCC = find_nvcc()
WERROR = os.environ.get("HSTU_KVCACHE_WERROR") == "1"
C_FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if WERROR:
    C_FLAGS.append("-Werror")

c_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c"))
if NVCC:
    c_sources.remove("csrc/cuda_stub.c")
cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda").glob("*.cu")) if NVCC else []


def cuda_lib_dir():
    """Folder holding libcudart_static.a: from CUDA_HOME, nvcc's install, or
    the usual /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if os.path.isfile(os.path.join(root, sub, "libcudart_static.a")):
                return os.path.join(root, sub)
    sys.exit("nvcc was found but not libcudart_static.a; set CUDA_HOME "
             "(or HSTU_KVCACHE_CUDA=0 for a CPU-only build)")


class BuildExt(build_ext):
    """Compiles cuda/*.cu with nvcc and links them and the static CUDA runtime."""

    def build_extension(self, ext):
        if cu_sources:
            objects = self.compile_cuda()
            ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.library_dirs = list(ext.library_dirs or []) + [cuda_lib_dir()]
            # Static runtime: only the driver (libcuda) is needed at run time,
            # and it is loaded lazily, so import works on machines without one.
            ext.libraries = list(ext.libraries or []) + [
                "cudart_static", "rt", "dl", "pthread", "stdc++"]
        super().build_extension(ext)

    def compile_cuda(self):
        archs = os.environ.get("HSTU_KVCACHE_CUDA_ARCHS", "80;90")
        archs = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall",
                 "-Xcompiler", "-Wextra", "-Xcompiler", "-fvisibility=hidden",
                 "-Icsrc"]
        if WERROR:
            flags += ["-Werror", "all-warnings"]
        for a in archs:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        if os.environ.get("NVCC_CCBIN"):
            flags += ["-ccbin", os.environ["NVCC_CCBIN"]]
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)

        def one(src):
            obj = out_dir / (Path(src).stem + ".o")
            newest_input = max([os.path.getmtime(src)] +
                               [os.path.getmtime(h) for h in
                                list((ROOT / "cuda").glob("*.cuh")) +
                                list((ROOT / "csrc").glob("*.h"))])
            if obj.exists() and obj.stat().st_mtime >= newest_input and not self.force:
                return str(obj)
            cmd = [NVCC, *flags, "-c", src, "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
            return str(obj)

        workers = max(1, min(len(cu_sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, cu_sources))


setup(
    ext_modules=[
        Extension(
            "hstu_kvcache._C",
            sources=c_sources,
            include_dirs=["csrc"],
            extra_compile_args=C_FLAGS,
            libraries=["pthread", "dl"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
