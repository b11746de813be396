"""Triton kernels of dvtrain, imported as `dvtrain.kernels`.

Each kernel ships as a Triton kernel body + a `torch.library.custom_op` (fake and autograd registered, so
torch.compile traces through it) + a pure-torch reference + one dispatch function:

  dvtrain.kernels.swiglu.swiglu(x12)          fused SwiGLU of the packed w12 output (ViT SwiGLU FFN)
  dvtrain.kernels.koleo.koleo_loss(x, eps)    KoLeo loss with a streamed nearest-neighbour search

Dispatch: CUDA tensors -> Triton; any other device -> the reference. The explicit Triton entry points
(`swiglu_triton`, `koleo_loss_triton`) run on CPU tensors in the Triton interpreter (tests).
Submodules are imported on use, so `import dvtrain.kernels` stays cheap.
"""

__all__ = ["swiglu", "koleo"]
