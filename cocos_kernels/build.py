"""How the compiled extensions are built: sources, flags, the CUDA toolkit, and the JIT build folder
and its lock. Used by both ways of building: on first use (`cpu.py`, `cuda.py`) and at install
(`setup.py`, which loads this file by path before the package's dependencies can be imported: so
the standard library only at import, torch imported inside the functions that need it, and no
relative imports).

A JIT build goes to its own folder under $TORCH_EXTENSIONS_DIR (else torch's default root), named by
torch's version and a hash of everything the binary depends on (`build_key`): Python, torch's
version, git revision and CUDA version, the compilers, the flags (the SIMD ones depend on the
machine), the CUDA toolkit and architectures, and the sources' contents. Two torch installs never
share a folder, and an upgraded torch or an edited kernel builds afresh instead of loading a binary
built for another ABI.

Processes building one folder take turns through `build_lock`, an OS lock (flock) on
`<folder>/cocos_kernels.lock`, which the kernel releases when its holder dies, however it dies. The
file records the holder (pid, host, start): a waiter says which folder it waits for and since when,
and gives up after $COCOS_KERNELS_BUILD_LOCK_TIMEOUT seconds (default 1800) with an error naming the
lock file. A record still there when the lock is taken was left by a build that died, and is
reported. Whoever takes the lock clears the lock file torch itself keeps in the folder (`lock`,
whose mere existence makes torch < 2.14 wait forever): every builder holds ours first, so by then
torch's is stale.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
from pathlib import Path

CPU_SOURCES = ("correspondence_warp.cpp", "contextual_loss.cpp", "bindings.cpp")
CPU_LDFLAGS = ("-fopenmp",)
# One dtype per translation unit, so that ninja compiles them in parallel.
CUDA_SOURCES = ("correspondence_warp_float32.cu", "correspondence_warp_float16.cu", "correspondence_warp_bfloat16.cu",
                "prologue.cu", "contextual_loss.cu", "bindings.cpp")
CUDA_CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "-std=c++20", "--expt-relaxed-constexpr")
# What setup.py prebuilds for without $TORCH_CUDA_ARCH_LIST: A100, H100, and PTX newer cards compile.
PREBUILD_ARCHS = "8.0+PTX;9.0a"

LOCK_NAME = "cocos_kernels.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's own, inside the build folder
LOCK_TIMEOUT_S = 1800.0
LOCK_POLL_S = 0.5
# A waiter says so after this long (a finished build's load holds the lock for well under it), then
# again every LOCK_REMIND_S.
LOCK_ANNOUNCE_S = 2.0
LOCK_REMIND_S = 300.0


def say(message: str) -> None:
    print(f"cocos_kernels: {message}", file=sys.stderr, flush=True)


def source_dir(kind: str) -> Path | None:
    """Where the sources of the "cpu" or "cuda" extension are: inside the package (a wheel, see
    setup.py) or beside it (a checkout)."""
    here = Path(__file__).resolve().parent
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    for candidate in (here / "csrc" / kind, here.parent / "csrc" / kind):
        if all((candidate / s).is_file() for s in sources):
            return candidate
    return None


def cpu_features() -> set[str]:
    """The processor's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return set()


def simd_flags() -> list[str]:
    """Build for the vector units this machine has: the CPU kernel's exp loops vectorise with AVX2/FMA."""
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= cpu_features() else []


def cpu_cflags() -> list[str]:
    return ["-O3", "-fopenmp", *simd_flags()]


def toolkit_root(nvcc: Path) -> Path | None:
    """The toolkit an `nvcc` belongs to: <root>/bin/nvcc, through symlinks, or the nvcc a wrapper
    script execs (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    real = nvcc.resolve()
    if (real.parent.parent / "include" / "cuda_runtime.h").is_file():
        return real.parent.parent
    try:
        if real.stat().st_size < 4096:
            match = re.search(r"(/\S+)/bin/nvcc\b", real.read_text(errors="replace"))
            if match and (Path(match.group(1)) / "include" / "cuda_runtime.h").is_file():
                return Path(match.group(1))
    except OSError:
        pass
    return None


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME / $CUDA_PATH (None if it has no bin/nvcc), else the
    one `nvcc` on PATH belongs to, else /usr/local/cuda. (torch guesses dirname(dirname(which nvcc)),
    which is wrong for a wrapper script in /usr/local/bin: the link then fails on -lcudart.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if (Path(os.environ[var]) / "bin" / "nvcc").exists() else None
    nvcc = shutil.which("nvcc")
    if nvcc is not None and (root := toolkit_root(Path(nvcc))) is not None:
        return str(root)
    default = Path("/usr/local/cuda")
    return str(default) if (default / "bin" / "nvcc").exists() else None


NO_TOOLKIT = "no CUDA toolkit found: set CUDA_HOME to one (the folder of bin/nvcc)"


def build_environment() -> None:
    """Points torch's extension builder at the right toolkit (see `cuda_home`)."""
    home = cuda_home()
    if home is None:
        return
    os.environ.setdefault("CUDA_HOME", home)
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = home  # read once at its import, maybe before CUDA_HOME was set


def sources_digest(directory: Path) -> str:
    """sha256 of every file directly in `directory` (sources and headers), names included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _cuda_archs() -> str:
    """The architectures torch's builder targets: $TORCH_CUDA_ARCH_LIST, else the visible cards'."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    return ";".join(sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())}))


def build_key(src: Path, cflags, ldflags=(), cuda_cflags=None) -> dict:
    """Everything the binary built from the sources in `src` with these flags depends on."""
    import torch

    key = {
        "python": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}-{platform.machine()}",
        "torch": torch.__version__, "torch_git": torch.version.git_version, "torch_cuda": torch.version.cuda,
        "cxx": os.environ.get("CXX", "c++"), "cflags": list(cflags), "ldflags": list(ldflags),
        "sources": sources_digest(src),
    }
    if cuda_cflags is not None:
        home = cuda_home()
        key.update(cuda_cflags=list(cuda_cflags), cuda_home=home and str(Path(home).resolve()),
                   cc=os.environ.get("CC"), cuda_archs=_cuda_archs())
    return key


def build_directory(name: str, key: dict) -> Path:
    """The folder (created) of extension `name` built under `key`: named by torch's version, for
    people, and a hash of the whole key, which it also holds as build_key.json."""
    from torch.utils.cpp_extension import get_default_build_root

    text = json.dumps(key, sort_keys=True)
    torch_version = re.sub(r"[^\w.]+", "_", str(key.get("torch")))
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    directory = root / f"{name}-torch{torch_version}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "build_key.json").is_file():
        (directory / "build_key.json").write_text(json.dumps(key, sort_keys=True, indent=1) + "\n")
    return directory


def _holder(path: Path) -> dict | None:
    """The holder a lock file records ({"pid", "host", "started"}), None if it records none."""
    try:
        record = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(holder: dict | None, fallback_since: float) -> str:
    since = holder.get("started", fallback_since) if holder else fallback_since
    clock = time.strftime("%H:%M:%S", time.localtime(since))
    who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
    return f"held by {who} since {clock}, {time.time() - since:.0f} s ago"


def lock_timeout() -> float:
    value = os.environ.get("COCOS_KERNELS_BUILD_LOCK_TIMEOUT")
    try:
        return LOCK_TIMEOUT_S if value is None else float(value)
    except ValueError:
        raise ValueError(f"COCOS_KERNELS_BUILD_LOCK_TIMEOUT={value!r} is not a number of seconds") from None


@contextlib.contextmanager
def build_lock(directory: Path, timeout: float | None = None):
    """Holds the build lock of `directory` (see the module's docstring). Raises TimeoutError naming
    the lock file after `timeout` seconds (default `lock_timeout()`) of waiting."""
    import fcntl  # here, not at the top: setup.py loads this module on Windows too

    timeout = lock_timeout() if timeout is None else timeout
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        began, next_note = time.time(), time.time() + LOCK_ANNOUNCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                raise OSError(f"cannot lock {path} ({e}): the file system may not support locks; point "
                              "TORCH_EXTENSIONS_DIR at a folder on a local disk") from e
            now = time.time()
            if now - began >= timeout:
                raise TimeoutError(
                    f"gave up after {now - began:.0f} s waiting for another build in {directory} (lock {path}, "
                    f"{_describe(_holder(path), began)}); if no build is running there, delete {path}, or raise "
                    "COCOS_KERNELS_BUILD_LOCK_TIMEOUT")
            if now >= next_note:
                say(f"waiting for another build in {directory} (lock {path}, {_describe(_holder(path), began)}); "
                    f"giving up {timeout - (now - began):.0f} s from now")
                next_note = now + LOCK_REMIND_S
            time.sleep(LOCK_POLL_S)
        if (left := _holder(path)) is not None:
            say(f"the build in {directory} by pid {left.get('pid')} on {left.get('host')} (started "
                f"{time.strftime('%H:%M:%S', time.localtime(left.get('started', 0)))}) died holding its lock; "
                "clearing it and building again")
        # Every builder of this folder holds our lock first, so a torch lock file here is stale.
        (directory / TORCH_LOCK_NAME).unlink(missing_ok=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(),
                  0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # only a process that dies holding the lock leaves its record
    finally:
        os.close(fd)  # releases the lock


def load(name: str, src: Path, sources, *, cflags, ldflags=(), cuda_cflags=None):
    """`torch.utils.cpp_extension.load` of `sources` (file names in `src`) as module `name`, in the
    folder of their build key, holding its build lock."""
    from torch.utils.cpp_extension import load as torch_load

    directory = build_directory(name, build_key(src, cflags, ldflags, cuda_cflags))
    with build_lock(directory):
        return torch_load(
            name=name, sources=[str(src / s) for s in sources], extra_cflags=list(cflags),
            extra_ldflags=list(ldflags), extra_cuda_cflags=None if cuda_cflags is None else list(cuda_cflags),
            build_directory=str(directory), verbose=os.environ.get("COCOS_KERNELS_VERBOSE_BUILD") == "1",
        )
