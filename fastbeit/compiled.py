"""The training step as one compiled graph, with an eager fallback where nothing can compile.

The step's model part (patch embedding → blocks → gathered loss, with backward) is written so that
``torch.compile(fullgraph=True)`` captures it whole: the Triton kernels are PyTorch operators
(``torch.library.custom_op`` with fake implementations and autograd formulas), the faithful
variable-count masks are gathered into static ``[B, max_masked]`` rows, and nothing reads a value
back to the host. Inductor then fuses the LayerNorm, GELU, LayerScale, residual and cast work
around the matmuls and our kernels.

``CompiledStep`` compiles lazily at the first call (that is when torch.compile really builds),
reports the build time once, and if the machine cannot compile at all (no C/C++ compiler for
Inductor on the CPU, no Triton on the GPU) says so in one line and runs the same module eagerly.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _is_compiler_failure(exc: BaseException) -> bool:
    """An error raised by torch.compile's machinery (dynamo, AOT autograd, Inductor), not by the model."""
    return any(cls.__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch"))
               for cls in type(exc).__mro__) or "compiler" in str(exc).lower()


def _is_graph_break(exc: BaseException) -> bool:
    """Dynamo met code it cannot put in the graph (under ``fullgraph=True`` an error): fastbeit's
    step is built to have none, so this is a defect in it or in a version of PyTorch it meets."""
    try:
        from torch._dynamo.exc import Unsupported
    except ImportError:  # pragma: no cover - every torch that has torch.compile has it
        return False
    return isinstance(exc, Unsupported)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:240]


class CompiledStep:
    """``module`` under ``torch.compile(fullgraph=fullgraph, mode=mode)``, falling back to eager once.

    ``say`` receives the one-line notes (compile time, fallback). With ``mode="reduce-overhead"``
    (CUDA graphs) each call starts a new graph step, and outputs are cloned so that a caller may
    keep them across steps (CUDA graphs reuse their output memory).
    """

    def __init__(self, module: Callable, mode: str = "default", say: Optional[Callable[[str], None]] = None,
                 backend: str = "inductor", what: str = "the step", dynamic: Optional[bool] = None,
                 fullgraph: bool = True) -> None:
        self.module = module
        self.mode = mode
        self.what = what
        self.say = say or (lambda msg: print(msg, file=sys.stderr))
        options = {} if backend != "inductor" else {"mode": None if mode == "default" else mode}
        self.compiled = torch.compile(module, fullgraph=fullgraph, backend=backend, dynamic=dynamic, **options)
        self.cuda_graphs = mode == "reduce-overhead"
        self.state = "pending"  # pending → compiled | eager
        self.compile_seconds: Optional[float] = None

    def __call__(self, *args: Any) -> Any:
        if self.state == "eager":
            return self.module(*args)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.state == "compiled":
            return self._own(self.compiled(*args))
        start = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as exc:
            if not _is_compiler_failure(exc):
                raise
            self.state = "eager"
            if _is_graph_break(exc):  # our code, not the machine: the fast path is lost, say so
                self.say(f"warning: {self.what} does not trace as one graph ({_first_line(exc)}); running it "
                         "eagerly, which is slower: a fastbeit bug, please report it with this line")
            else:
                self.say(f"note: torch.compile cannot build {self.what} here ({_first_line(exc)}); running it "
                         "eagerly (pass --no-compile to skip the attempt)")
            return self.module(*args)
        self.state = "compiled"
        self.compile_seconds = time.perf_counter() - start
        self.say(f"compiled {self.what} in {self.compile_seconds:.1f} s (once)")
        return self._own(out)

    def _own(self, out: Any) -> Any:
        if not self.cuda_graphs:
            return out
        return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in out)
