"""Muon: momentum SGD whose update for each weight matrix is orthogonalized.

For a 2-D parameter, the Nesterov momentum update G is replaced by the nearest semi-orthogonal
matrix U V^T (G = U S V^T), approximated by a few Newton-Schulz iterations; every direction
then moves by the same amount, however small its gradient was. Only for hidden matrices:
embeddings, the output head and vectors (norms, biases) stay with AdamW (trainer.build_optimizers).

Under DDP the gradients are already averaged over processes when step() runs, so every process
holds the same momentum and would compute the same updates: the Newton-Schulz iterations, most
of Muon's cost, would be repeated on every GPU. Instead each process orthogonalizes only its
share of the matrices (largest first, each to the least-loaded process), and one all-gather
hands every process every update. Every process then applies every update, so the replicas stay
identical, and bit for bit equal to an unsharded step: the same function on the same inputs,
and the gather only copies bits. Every process keeps the momentum of every matrix (elementwise,
cheap), so the state_dict that rank 0 saves is complete and resumes on any number of processes.
The process group is found, not passed: sharding starts when torch.distributed is initialized
with more than one process (shard=False turns it off).
"""
import torch
import torch.distributed as dist

# Newton-Schulz variants: (margin, coefficients). Each iteration is X <- a X + (b A + c A^2) X with
# A = X X^T and the next (a, b, c) (the last repeats); the start is X / (margin * |X|_F).
NS_VARIANTS = {
    # modded-nanogpt's quintic, one polynomial throughout: pushes singular values into roughly
    # [0.7, 1.2] fast, trading exact convergence to 1 for a steep slope near 0
    "quintic": (1.0, ((3.4445, -4.7750, 2.0315),)),
    # Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932), the coefficients for 5
    # iterations, safety factor 2e-2 and cushion 2 that modded-nanogpt and nanochat use: each
    # iteration's polynomial is the minimax-optimal one for the interval the singular values then
    # lie in, so they end nearer 1; the 2% margin covers bfloat16's rounding
    "polar_express": (1.02, ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                             (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                             (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                             (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                             (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))),
}


def work_dtype(device):
    """bfloat16 on GPUs with native bf16 (tensor cores), float32 elsewhere (a V100 or T4 would
    emulate bf16, slowly)."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float32


def orthogonalize(G, steps, dtype, variant="quintic", eps=1e-7):
    """Approximately U V^T for G = U S V^T, computed and returned in `dtype`; variant: NS_VARIANTS."""
    margin, coefficients = NS_VARIANTS[variant]
    X = G.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.T
    X = X / (X.norm() * margin + eps)  # spectral norm <= Frobenius norm <= 1: inside the region that converges
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def newton_schulz(G, steps=5, variant="quintic", eps=1e-7):
    """orthogonalize() in the device's working dtype, returned in G's dtype."""
    return orthogonalize(G, steps, work_dtype(G.device), variant, eps).to(G.dtype)


def newton_schulz_cost(shape, blocks=1):
    """Multiply-adds of one Newton-Schulz iteration on the wide orientation (m <= n): X X^T, A A, B X;
    blocks: of a matrix orthogonalized as that many row blocks."""
    m, n = sorted((shape[0] // blocks, shape[1]))
    return blocks * (2 * m * m * n + m ** 3)


def assign_shares(shapes, world_size, blocks=None):
    """For each matrix (orthogonalized as blocks[i] row blocks; default 1), the process that
    orthogonalizes it: largest first, each to the process with the least work so far (ties to the
    lowest rank, so same-shape matrices go round-robin). Deterministic: every process computes the
    same assignment from the same shapes."""
    cost = [newton_schulz_cost(shape, b) for shape, b in zip(shapes, blocks or [1] * len(shapes))]
    load, owner = [0] * world_size, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -cost[i]):
        owner[i] = min(range(world_size), key=load.__getitem__)
        load[owner[i]] += cost[i]
    return owner


def orthogonalize_blocks(orthogonalize_fn, update, group, dtype):
    """orthogonalize_fn on each of the group's row blocks of update, or on the whole matrix."""
    steps, variant, blocks = group["ns_steps"], group["ns_variant"], group["blocks"]
    if blocks == 1:
        return orthogonalize_fn(update, steps, dtype, variant)
    return torch.cat([orthogonalize_fn(block, steps, dtype, variant) for block in update.chunk(blocks)])


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, Newton-Schulz orthogonalized, scaled by sqrt(max(1, rows/cols)),
    with decoupled weight decay (p <- p * (1 - lr * weight_decay)). 2-D parameters only.

    Per group: blocks, orthogonalize each matrix as that many row blocks, each scaled by its own
    shape (a fused Q/K/V input matrix of 3C x C as three C x C matrices, as if they were separate
    parameters); ns_variant, the Newton-Schulz coefficients (NS_VARIANTS).

    shard: under torch.distributed with more than one process, orthogonalize only this process's
    share and all-gather the rest (every process must then call step() with the same parameters
    holding gradients, as under DDP). compile: torch.compile the Newton-Schulz iterations; None
    means on CUDA where compiling works, and not on the CPU (seconds of compiling per matrix shape).
    `orthogonalized` counts the matrices this process has run Newton-Schulz on."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                 ns_variant="quintic", blocks=1, shard=True, compile=None):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"bad Muon settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
                        ns_variant=ns_variant, blocks=blocks)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["ns_variant"] not in NS_VARIANTS:
                raise ValueError(f"ns_variant={group['ns_variant']!r}; choose one of {tuple(NS_VARIANTS)}")
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes only matrices; got a parameter of shape {tuple(p.shape)}")
                if p.size(0) % group["blocks"]:
                    raise ValueError(f"a matrix of {p.size(0)} rows does not split into {group['blocks']} blocks")
        self.shard, self.compile = shard, compile
        self.orthogonalized = 0
        self._orthogonalize = None  # chosen at the first step, when the device is known

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # a state_dict saved before these settings existed: what it ran
            group.setdefault("ns_variant", "quintic")
            group.setdefault("blocks", 1)

    def _process_share(self):
        """(rank, world size) of the processes that split the Newton-Schulz work; (0, 1) alone."""
        if self.shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _newton_schulz(self, device):
        """orthogonalize, compiled or not; decided once."""
        if self._orthogonalize is None:
            wanted = self.compile
            if wanted is None:
                from runtime import compile_blocker
                wanted = device.type == "cuda" and compile_blocker(device) is None
            # one graph per matrix shape (four in a GPT: Q/K/V blocks are c_proj's C x C) and variant, each
            # compiled once: no recompile per call
            self._orthogonalize = torch.compile(orthogonalize, dynamic=False, fullgraph=True) if wanted \
                else orthogonalize
        return self._orthogonalize

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not items:
            return loss
        self._update_momentum()
        updates = self._orthogonalized_updates(items)
        for i, (p, group) in enumerate(items):
            update = updates[i].to(p.dtype)
            update *= max(1.0, p.size(0) / group["blocks"] / p.size(1)) ** 0.5
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])
        return loss

    def _update_momentum(self):
        """Every process keeps every matrix's momentum, so that its state_dict is complete."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])  # one kernel for all matrices, not one each
            torch._foreach_add_(buffers, [p.grad for p in params])

    def _orthogonalized_updates(self, items):
        """{index in items: orthogonalized update}, in the working dtype: this process's share
        computed here, the others' received from them."""
        rank, world_size = self._process_share()
        owner = assign_shares([tuple(p.shape) for p, _ in items], world_size, [group["blocks"] for _, group in items])
        device = items[0][0].device
        dtype, orthogonalize_fn = work_dtype(device), self._newton_schulz(device)
        updates = {}
        for i, (p, group) in enumerate(items):
            if owner[i] == rank:
                buf = self.state[p]["momentum_buffer"]
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                updates[i] = orthogonalize_blocks(orthogonalize_fn, update, group, dtype)
                self.orthogonalized += 1
        if world_size > 1:
            updates = self._all_gather(items, owner, updates, rank, world_size, dtype)
        return updates

    @staticmethod
    def _all_gather(items, owner, updates, rank, world_size, dtype):
        """Every process's updates to every process, in one collective: each sends its share as one
        flat buffer, padded to the largest share (shares differ by about one matrix). In the working
        dtype: on GPUs bfloat16, half the bytes, and widening it afterwards is exact."""
        shares = [[i for i in range(len(items)) if owner[i] == r] for r in range(world_size)]
        sizes = [sum(items[i][0].numel() for i in share) for share in shares]
        width, device = max(sizes), items[0][0].device
        padding = torch.zeros(width - sizes[rank], dtype=dtype, device=device)
        sent = torch.cat([updates[i].flatten() for i in shares[rank]] + [padding])
        received = torch.empty(world_size * width, dtype=dtype, device=device)  # flat: gloo wants it so
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        all_gather(received, sent)
        received = received.view(world_size, width)
        gathered = {}
        for r, share in enumerate(shares):
            offset = 0
            for i in share:
                p = items[i][0]
                gathered[i] = received[r, offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
        return gathered
