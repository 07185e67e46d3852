"""Linear algebra of Hermitian positive-definite matrices with explicit backward rules: Cholesky that names the
unstable points (`UnstableError`), the inverse and the quadratic form by Cholesky, and sums over chunks of q whose
backward recomputes one chunk at a time; used by `ThermalCovariance`."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .chunks import map_chunks

class UnstableError(ArithmeticError):
    """Force constants that are not dynamically stable (D(q) not positive definite at some q)."""


def positive_cholesky(dyn: torch.Tensor, where: str) -> torch.Tensor:
    """L (B, m, m) with dyn = LL†, or UnstableError counting the matrices that are not positive definite.

    Args:
        dyn: Hermitian matrices (B, m, m), e.g. D(q) in eV/Å²/amu.
        where: what the B matrices belong to, for the error message (e.g. "Q").

    Returns:
        The lower-triangular Cholesky factors L (B, m, m).

    Raises:
        UnstableError: some of the matrices are not positive definite.
    """
    chol, info = torch.linalg.cholesky_ex(dyn)
    if torch.any(info > 0):
        raise UnstableError(f"dynamical matrix not positive definite at {int(torch.count_nonzero(info > 0))} of "
                            f"{info.numel()} {where}")
    return chol


class HermitianInverse(torch.autograd.Function):
    """D⁻¹ (B, m, m) of Hermitian positive-definite D (B, m, m) by Cholesky, with the backward −D⁻¹·G·D⁻¹.

    The explicit rule replaces autograd through the factorisation and `cholesky_inverse` (several
    times slower for 96×96 blocks). UnstableError where D is not positive definite (`where` names the points).
    """

    @staticmethod
    def forward(ctx, dyn, where: str):
        """D⁻¹ by Cholesky; saves it for the backward.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context.
            dyn (torch.Tensor): D (B, m, m), Hermitian positive definite.
            where: what the B matrices belong to, for the error message.

        Returns:
            (torch.Tensor): D⁻¹ (B, m, m).

        Raises:
            UnstableError: D is not positive definite at some of the B points.
        """
        inverse = torch.cholesky_inverse(positive_cholesky(dyn, where))
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad):
        """−D⁻¹·G·D⁻¹.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context of `forward`.
            grad (torch.Tensor): G, the gradient with respect to D⁻¹, (B, m, m).

        Returns:
            (tuple[torch.Tensor, None]): the gradient with respect to D (B, m, m), and None for `where`.
        """
        (inverse,) = ctx.saved_tensors
        return -(inverse @ grad @ inverse), None


class InverseForm(torch.autograd.Function):
    """v†D⁻¹v (B,) for Hermitian positive-definite D (B, m, m) and real v (B, m), by D = LL† and y = L⁻¹v.

    Backward with w = D⁻¹v (one more triangular solve): −g·ww† for D and 2g·Re w for v, instead of
    autograd through the factorisation. First derivatives only (a second backward raises).
    """

    @staticmethod
    def forward(ctx, dyn, v, where: str):
        """‖y‖² with y = L⁻¹v, D = LL†; saves L and y for the backward.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context.
            dyn (torch.Tensor): D (B, m, m), Hermitian positive definite.
            v (torch.Tensor): real (B, m).
            where: what the B matrices belong to, for the error message.

        Returns:
            (torch.Tensor): v†D⁻¹v (B,) real.

        Raises:
            TypeError: a complex v.
            UnstableError: D is not positive definite at some of the B points.
        """
        if v.is_complex():
            raise TypeError("InverseForm takes a real v (its backward 2g·Re w holds for real v only)")
        chol = positive_cholesky(dyn, where)
        y = torch.linalg.solve_triangular(chol, v.to(chol.dtype)[..., None], upper=False)
        ctx.save_for_backward(chol, y)
        return (y.abs() ** 2).sum((-2, -1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        """−g·ww† for D and 2g·Re w for v, w = D⁻¹v.

        Args:
            ctx (torch.autograd.function.FunctionCtx): the autograd context of `forward`.
            grad (torch.Tensor): g (B,), the gradient with respect to v†D⁻¹v.

        Returns:
            (tuple[torch.Tensor | None, torch.Tensor | None, None]): the gradients with respect to D (B, m, m) and
                v (B, m) (None where not needed), and None for `where`.
        """
        chol, y = ctx.saved_tensors
        w = torch.linalg.solve_triangular(chol.mH, y, upper=True)  # (B, m, 1)
        grad_dyn = -grad.to(w.dtype)[:, None, None] * (w @ w.mH) if ctx.needs_input_grad[0] else None
        grad_v = 2 * grad[:, None] * w[..., 0].real if ctx.needs_input_grad[1] else None
        return grad_dyn, grad_v, None


class ChunkSum(torch.autograd.Function):
    """Σ_chunks func(chunk) of a function of the source's θ, with a backward that recomputes one chunk at a time.

    The forward keeps no graph; the backward evaluates each chunk again with its graph, takes its θ-gradient and
    frees it: memory of one chunk, whatever the number of chunks (a 32-atom cell's Debye–Waller meshes 12³ + 24³
    held more than 24 GB in one graph). The backward evaluates with the θ the forward saw, also where that θ was
    swapped in by torch.func.functional_call. Used as ChunkSum.apply(source.theta, source, func, q, chunk).
    """

    @staticmethod
    def forward(ctx, theta, source, func, q, chunk):
        ctx.theta, ctx.source, ctx.func, ctx.q, ctx.chunk = theta, source, func, q, chunk
        return sum(map_chunks(func, (q,), chunk))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        def every_chunk(q):  # called with the forward's θ in the source
            theta = ctx.source.theta

            def gradient(qc):
                (part,) = torch.autograd.grad(ctx.func(qc), theta, grad, allow_unused=True)
                return torch.zeros_like(theta) if part is None else part

            return sum(map_chunks(gradient, (q,), ctx.chunk))

        with torch.enable_grad():
            total = torch.func.functional_call(_Bound(ctx.source, every_chunk), {"source.theta": ctx.theta}, (ctx.q,))
        return total, None, None, None, None


class ChunkConcat(torch.autograd.Function):
    """torch.cat of func(chunk) over the chunks of q, a function of the source's θ, with a backward that recomputes one
    chunk at a time (as `ChunkSum`): memory of one chunk's graph, for a value over many q (a large crystal's C̃ on
    its whole mesh). Used as ChunkConcat.apply(source.theta, source, func, q, chunk).
    """

    @staticmethod
    def forward(ctx, theta, source, func, q, chunk):
        ctx.theta, ctx.source, ctx.func, ctx.q, ctx.chunk = theta, source, func, q, chunk
        return torch.cat(map_chunks(func, (q,), chunk))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        def every_chunk(q):  # called with the forward's θ in the source
            theta = ctx.source.theta

            def gradient(qc, gc):
                (part,) = torch.autograd.grad(ctx.func(qc), theta, gc, allow_unused=True)
                return torch.zeros_like(theta) if part is None else part

            return sum(map_chunks(gradient, (q, grad), ctx.chunk))

        with torch.enable_grad():
            total = torch.func.functional_call(_Bound(ctx.source, every_chunk), {"source.theta": ctx.theta}, (ctx.q,))
        return total, None, None, None, None


class _Bound(torch.nn.Module):
    """`func(q)` as a module holding the source, so that functional_call can bind the source's θ around it."""

    def __init__(self, source, func):
        super().__init__()
        self.source, self.func = source, func

    def forward(self, q):
        return self.func(q)
