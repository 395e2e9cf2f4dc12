"""Muon under torch.distributed: each process orthogonalizes its share of the matrices, and the
all-gathered result is bit for bit the unsharded step (a fused Q/K/V matrix split into its blocks
included); rank 0's state resumes in one process; the compiled Newton-Schulz matches the eager
one, with one graph per matrix shape."""
import copy

import pytest
import torch
import torch._dynamo.utils
import torch.distributed as dist
import torch.multiprocessing as mp

import muon
from model import GPT, GPTConfig
from muon import Muon, assign_shares, newton_schulz_cost, orthogonalize
from runtime import compile_blocker

WORLD_SIZE = 2
STEPS, MORE_STEPS = 3, 2  # sharded steps before rank 0's state_dict is taken, and after
SETTINGS = dict(lr=0.05, momentum=0.9, weight_decay=0.1)
# float32: Newton-Schulz on CPUs; bfloat16: on GPUs, so what they gather (a CPU stand-in here)
WORK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hidden_matrices():
    """The matrices trainer.build_optimizers gives Muon, of a one-block GPT of the default recipe:
    five, of four shapes (a tall one, a wide one, a square one), an odd count for two processes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False,
                          mlp="swiglu", tie_embeddings=False))
    return [p for p in model.blocks.parameters() if p.dim() == 2]


def groups(params):
    """Muon's groups under --muon_split_qkv: the fused Q/K/V matrix (the first) as three blocks."""
    return [{"params": params[1:]}, {"params": params[:1], "blocks": 3}]


def blocks(params):
    return [3] + [1] * (len(params) - 1)


def set_gradients(params, step):
    """The same gradients in every process, as DDP leaves them after its all-reduce."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def sharded_and_alone(rank):
    """STEPS steps of a sharded Muon and an unsharded one on the same gradients, then MORE_STEPS
    of the sharded one alone; rank 0 keeps the state_dict in between, as a checkpoint would."""
    sharded_params = hidden_matrices()
    alone_params = [p.detach().clone().requires_grad_() for p in sharded_params]
    sharded, alone = Muon(groups(sharded_params), **SETTINGS), Muon(groups(alone_params), shard=False, **SETTINGS)
    for step in range(STEPS):
        for params, opt in ((sharded_params, sharded), (alone_params, alone)):
            set_gradients(params, step)
            opt.step()
    result = {"sharded": [p.detach().clone() for p in sharded_params],
              "alone": [p.detach().clone() for p in alone_params],
              "orthogonalized": sharded.orthogonalized, "alone_orthogonalized": alone.orthogonalized}
    if rank == 0:  # what trainer.Run.save writes
        result["state_dict"] = copy.deepcopy(sharded.state_dict())  # the steps below move its buffers
    for step in range(STEPS, STEPS + MORE_STEPS):
        set_gradients(sharded_params, step)
        sharded.step()
    result["continued"] = [p.detach().clone() for p in sharded_params]
    return result


def sharded_worker(rank, tmp):
    torch.set_num_threads(1)  # as the test process (conftest): the same matmul kernels
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for name, dtype in WORK_DTYPES.items():
            muon.work_dtype = lambda device: dtype
            results[name] = sharded_and_alone(rank)
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Two gloo processes, each stepping a sharded Muon and an unsharded one on the same gradients."""
    tmp = tmp_path_factory.mktemp("muon_sharded")
    mp.spawn(sharded_worker, args=(str(tmp),), nprocs=WORLD_SIZE)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("work_dtype", WORK_DTYPES)
def test_sharded_steps_equal_unsharded_steps_bit_for_bit(sharded_run, work_dtype):
    ranks = [results[work_dtype] for results in sharded_run]
    for r, result in enumerate(ranks):
        for sharded, alone in zip(result["sharded"], result["alone"]):
            assert torch.equal(sharded, alone), f"rank {r}: a sharded weight differs from the unsharded one"
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["continued"], ranks[1]["continued"]))


def test_each_process_orthogonalizes_only_its_share(sharded_run):
    params = hidden_matrices()
    shapes = [tuple(p.shape) for p in params]
    owner = assign_shares(shapes, WORLD_SIZE, blocks(params))
    counts = [results["float32"]["orthogonalized"] for results in sharded_run]
    assert counts == [STEPS * owner.count(r) for r in range(WORLD_SIZE)]
    assert sum(counts) == STEPS * len(shapes) and 0 < min(counts)
    assert all(results["float32"]["alone_orthogonalized"] == STEPS * len(shapes) for results in sharded_run)


def test_rank0_state_dict_resumes_in_a_single_process(sharded_run):
    """A checkpoint written under torchrun resumes on one process, exactly where the run went on."""
    rank0 = sharded_run[0]["float32"]
    params = hidden_matrices()
    for p, saved in zip(params, rank0["sharded"]):
        p.data.copy_(saved)
    opt = Muon(groups(params), **SETTINGS)
    opt.load_state_dict(rank0["state_dict"])
    for step in range(STEPS, STEPS + MORE_STEPS):
        set_gradients(params, step)
        opt.step()
    assert all(torch.equal(p, c) for p, c in zip(params, rank0["continued"]))


def test_shares_balance_newton_schulz_work():
    """GPT-2 small's 60 matrices on 8 GPUs: 7 or 8 each, loads within the smallest matrix's work."""
    c, hidden = 768, 2048  # the default recipe's SwiGLU width
    shapes = [(3 * c, c), (c, c), (hidden, c), (hidden, c), (c, hidden)] * 12
    owner = assign_shares(shapes, 8)
    counts = [owner.count(r) for r in range(8)]
    assert sum(counts) == 60 and max(counts) - min(counts) <= 1, counts
    work = [sum(newton_schulz_cost(s) for s, o in zip(shapes, owner) if o == r) for r in range(8)]
    assert max(work) - min(work) <= min(map(newton_schulz_cost, shapes)), work
    assert all(owner[i] == r for i, r in zip(range(0, 60, 5), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]))  # round-robin


def step_compiled_and_eager(shapes, device, steps=2, **group):
    """Two Muons, compiled and eager (group: Muon's group settings), stepped on the same weights and
    gradients; returns how far each moved the weights and how many graphs the compiled one made."""
    torch.manual_seed(0)
    weights = [torch.randn(shape, device=device) for shape in shapes]
    params = {"compiled": [torch.nn.Parameter(w.clone()) for w in weights],
              "eager": [torch.nn.Parameter(w.clone()) for w in weights]}
    compiled = Muon(params["compiled"], compile=True, **SETTINGS, **group)
    eager = Muon(params["eager"], compile=False, **SETTINGS, **group)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(steps):  # later steps reuse the first step's graphs
        for name, opt in (("compiled", compiled), ("eager", eager)):
            set_gradients(params[name], step)
            for p in params[name]:
                p.grad = p.grad.to(device)
            opt.step()
    assert compiled._orthogonalize is not orthogonalize and eager._orthogonalize is orthogonalize
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    moved = {name: [p.detach() - w for p, w in zip(ps, weights)] for name, ps in params.items()}
    return moved["compiled"], moved["eager"], graphs


def test_compiled_newton_schulz_matches_eager():
    blocker = compile_blocker(torch.device("cpu"))
    if blocker:
        pytest.skip(blocker)
    compiled, eager, graphs = step_compiled_and_eager([(48, 16)], "cpu")  # tall: the graph transposes too
    assert graphs == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_compiled_polar_express_on_qkv_blocks_matches_eager():
    blocker = compile_blocker(torch.device("cpu"))
    if blocker:
        pytest.skip(blocker)
    compiled, eager, graphs = step_compiled_and_eager([(48, 16)], "cpu", ns_variant="polar_express", blocks=3)
    assert graphs == 1  # the three 16 x 16 blocks share one graph
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_a_split_matrix_costs_its_blocks():
    # three C x C Gram matrices and their squares, where the fused matrix has one: 9 C^3 against 7 C^3
    assert newton_schulz_cost((96, 32), blocks=3) == 3 * newton_schulz_cost((32, 32)) == 9 / 7 * newton_schulz_cost((96, 32))
    # so a split Q/K/V matrix goes before a matrix that the fused one comes after
    middle = (32, 112)
    assert newton_schulz_cost((96, 32)) < newton_schulz_cost(middle) < newton_schulz_cost((96, 32), blocks=3)
    assert assign_shares([(96, 32), middle], 2) == [1, 0] and assign_shares([(96, 32), middle], 2, [3, 1]) == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_compile_is_the_default_and_makes_one_graph_per_shape():
    c, hidden = 64, 192
    shapes = [(3 * c, c), (c, c), (hidden, c), (hidden, c), (c, hidden)]  # a GPT block's four shapes
    compiled, eager, graphs = step_compiled_and_eager(shapes, "cuda", steps=3)
    assert graphs == 4
    assert Muon([torch.nn.Parameter(torch.zeros(4, 4, device="cuda"))])._newton_schulz(torch.device("cuda")) \
        is not orthogonalize
    # in bfloat16 on GPUs with native bf16: as close as bfloat16 rounding lets the two graphs be
    assert all((c - e).norm() < 0.02 * e.norm() for c, e in zip(compiled, eager))
