"""Make the published CUDA-built torchvision and torchaudio wheels importable beside a CPU torch.

torchvision's `_C` extension links libtorch_cuda and fails to load on a CPU torch; its
`_meta_registrations.py` then calls `register_fake("torchvision::nms")` on an operator that was
never defined and the import dies (and with it transformers, open_clip and vLLM).

This module is installed into the venv's site-packages with a `.pth` line that imports it at
interpreter start, so every process in the venv (pytest, Ray workers, vLLM's spawned engine) gets it.
On the first `import torchvision` it tries to load `_C`; only if that fails does it define the two
operator schemas torchvision expects (as a FRAGMENT, never DEF). A no-op where `_C` loads.

The published torchaudio wheel is a CUDA build too: its C++ extension cannot load, and transformers
(imported by vLLM) fails on it. `install` deletes that extension; torchaudio then imports without it.

    python tools/cpu_fixes.py install     # into the active interpreter's site-packages
"""
import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    done = False
    library = None  # keeps the registrations alive

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or _TorchvisionFinder.done:
            return None
        _TorchvisionFinder.done = True
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return spec
        _define_missing_ops(list(spec.submodule_search_locations)[0])
        return spec


def _define_missing_ops(package_dir: str) -> None:
    import torch

    so = [f for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith(".so")]
    if so:
        try:
            torch.ops.load_library(os.path.join(package_dir, so[0]))
            return  # a matching build: nothing to fix
        except (OSError, ImportError, RuntimeError):
            pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined
    _TorchvisionFinder.library = lib


def _torchaudio_loads(purelib: str) -> bool:
    import subprocess

    probe = "import torch, torchaudio, torchaudio.lib._torchaudio"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, cwd=purelib).returncode == 0


def install() -> None:
    import glob
    import shutil
    import sysconfig

    purelib = sysconfig.get_paths()["purelib"]
    shutil.copyfile(__file__, os.path.join(purelib, "_parapipe_tvfix.py"))
    with open(os.path.join(purelib, "zz_parapipe_tvfix.pth"), "w") as f:
        f.write("import _parapipe_tvfix\n")
    print(f"torchvision import hook installed in {purelib}")
    cuda_ext = glob.glob(os.path.join(purelib, "torchaudio", "lib", "*.so"))
    if cuda_ext and not _torchaudio_loads(purelib):
        for path in cuda_ext:
            os.remove(path)
        print(f"removed torchaudio's CUDA-only extension ({len(cuda_ext)} files)")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python tools/cpu_fixes.py install")
    install()
elif not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionFinder())
