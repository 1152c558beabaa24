"""Every kernel compiles for the GPU (sm_90 cubin) on a machine without one.

The interpreter runs the kernels' arithmetic but is more permissive than the compiler (types,
layouts, what may be a tensor). Here every public op runs forward and backward with the launches
replaced by ``triton.compile`` for an H100 target, using Triton's bundled ptxas; nothing executes.
"""

import pytest
import torch

import fused_kernels
from fused_kernels import _triton, kernel_backend

triton = pytest.importorskip("triton")

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TARGET_ARCH = 90


def _signature(jit, args, kwargs):
    bound = dict(zip(jit.arg_names, args))
    bound.update({k: v for k, v in kwargs.items() if k in jit.arg_names})
    signature, constexprs = {}, {}
    for param, name in zip(jit.params, jit.arg_names):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{jit.__name__}: unexpected argument {name}={value!r}")
    return signature, constexprs


def _probe_kernel(X, BLOCK: triton.language.constexpr):
    offs = triton.language.arange(0, BLOCK)
    triton.language.store(X + offs, triton.language.zeros([BLOCK], dtype=triton.language.float32))


@pytest.fixture
def compile_instead_of_launch(monkeypatch):
    """Replace kernel launches by a compile for sm_90; yields {kernel name: number of variants}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, said explicitly (silences a warning)
    target = GPUTarget("cuda", _TARGET_ARCH, 32)
    if not isinstance(triton.language.standard.zeros, triton.runtime.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreted-only in this process")
    try:  # the toolchain (NVIDIA backend, ptxas) ships in the triton wheel; skip if this one lacks it
        probe = triton.runtime.JITFunction(_probe_kernel)
        triton.compile(ASTSource(probe, {"X": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16}), target=target)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cannot compile for sm_{_TARGET_ARCH} here: {type(exc).__name__}: {exc}"[:200])

    compiled: dict[str, set] = {}

    def getitem(self, grid):
        def launch(*args, num_warps=4, **kwargs):
            jit = triton.runtime.JITFunction(self.fn)
            signature, constexprs = _signature(jit, args, kwargs)
            constants = tuple(sorted((k, str(v)) for k, v in constexprs.items()))
            key = (tuple(sorted(signature.items())), constants, num_warps)
            if key not in compiled.setdefault(self.__name__, set()):
                triton.compile(ASTSource(jit, signature, constexprs), target=target, options={"num_warps": num_warps})
                compiled[self.__name__].add(key)

        return launch

    monkeypatch.setattr(_triton.TritonKernel, "__getitem__", getitem)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the dispatcher send CPU tensors down the Triton path
    with kernel_backend("triton"):
        yield compiled


def _fwd_bwd(fn, *inputs):
    leaves = [x.requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out))


def test_every_kernel_compiles_for_sm90(compile_instead_of_launch):
    compiled = compile_instead_of_launch
    bf16 = torch.bfloat16

    def randn(*shape, dtype=bf16):
        return torch.randn(*shape, dtype=dtype)

    _fwd_bwd(lambda x, w: fused_kernels.rms_norm(x.permute(0, 2, 3, 1), w), randn(2, 96, 4, 4), randn(96))
    _fwd_bwd(lambda x, w, b: fused_kernels.grn(x, w, b), randn(2, 4, 4, 384), randn(1, 1, 1, 384), randn(1, 1, 1, 384))
    _fwd_bwd(lambda x, c, h: fused_kernels.modulate(x, *c.chunk(2, 1), h.permute(0, 3, 1, 2)),
             randn(2, 96, 4, 4), randn(2, 192), randn(2, 4, 4, 96))
    _fwd_bwd(lambda v: fused_kernels.rf_loss_per_sample(v, randn(2, 4, 8, 8), randn(2, 4, 8, 8)), randn(2, 4, 8, 8))
    _fwd_bwd(lambda p: fused_kernels.repa_cosine(p, randn(2, 16, 128)), randn(2, 16, 128))
    fp32 = torch.float32
    fused_kernels.flow_interpolate(randn(2, 4, 8, 8, dtype=fp32), randn(2, 4, 8, 8, dtype=fp32), torch.rand(2), bf16)
    fused_kernels.cfg_euler_step(randn(2, 4, 8, 8, dtype=fp32), randn(2, 4, 8, 8), randn(2, 4, 8, 8), 2.0, 0.1)

    defined = {
        obj.__name__
        for module in (fused_kernels.norms, fused_kernels.modulation, fused_kernels.flow, fused_kernels.repa)
        for obj in vars(module).values()
        if isinstance(obj, _triton.TritonKernel)
    }
    assert defined - set(compiled) == set(), f"kernels never compiled: {sorted(defined - set(compiled))}"
