"""Muon: momentum SGD whose update for each weight matrix is orthogonalized.

For a 2-D parameter, the Nesterov momentum update G is replaced by the nearest semi-orthogonal
matrix U V^T (G = U S V^T), approximated by a few Newton-Schulz iterations; every direction
then moves by the same amount, however small its gradient was. Only for hidden matrices:
embeddings, the output head and vectors (norms, biases) stay with AdamW (trainer.build_optimizers).

Under DDP the gradients are already averaged over processes when step() runs (DDP all-reduces
them during backward), so every process takes the same plain per-parameter step: no extra
communication is needed and the replicas stay identical.
"""
import torch

# quintic coefficients (modded-nanogpt): pushes singular values into roughly [0.7, 1.2] fast,
# trading exact convergence to 1 for a steep slope near 0
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps=5, eps=1e-7):
    """Approximately U V^T for G = U S V^T; bfloat16 on GPUs with native bf16 (tensor cores), float32
    elsewhere (a V100 or T4 would emulate bf16, slowly)."""
    a, b, c = NS_COEFFS
    native_bf16 = G.is_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    X = G.to(torch.bfloat16 if native_bf16 else torch.float32)
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + eps)  # spectral norm <= Frobenius norm <= 1: inside the region that converges
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, Newton-Schulz orthogonalized, scaled by sqrt(max(1, rows/cols)),
    with decoupled weight decay (p <- p * (1 - lr * weight_decay)). 2-D parameters only."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"bad Muon settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes only matrices; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(g)
                update = g.add(buf, alpha=mom) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_steps"])
                update *= max(1.0, p.size(0) / p.size(1)) ** 0.5
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss
