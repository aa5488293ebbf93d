"""The model's invariants on microscopic configs: shapes, causality of the decoder and of CCA, the GPT/Retro
equivalence behind retro-fitting and the encoder ablation, padding neighbours, overfitting, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from retrocli.config import ModelConfig, config_from_dict, head_dim
from retrocli.errors import UserError
from retrocli.model.flops import flops_per_sequence
from retrocli.model.retro import RetroModel, resolve_retro_layers
from retrocli.train.evaluator import token_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M = 4  # chunk length
V = 50  # vocabulary


def tiny(**changes) -> ModelConfig:
    base = ModelConfig(layers=4, hidden=32, heads=4, seq_length=32, vocab_size=V, retro_layers=[2, 4],
                       encoder_layers=2, num_neighbors=2, retrieved_length=2 * M)
    return dataclasses.replace(base, **changes)


def build(cfg: ModelConfig, seed: int = 0, double: bool = True) -> RetroModel:
    torch.manual_seed(seed)
    model = RetroModel(cfg, chunk_length=M).eval()
    return model.double() if double else model


def batch(b: int, n: int, k: int = 2, r: int = 2 * M, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, V, (b, n), generator=g)
    neighbours = torch.randint(1, V, (b, -(-n // M), k, r), generator=g)  # no padding (pad_id 0)
    return tokens, neighbours


def training_loss(model: RetroModel, inputs: torch.Tensor, targets: torch.Tensor,
                  neighbours: torch.Tensor | None) -> torch.Tensor:
    """(b, n) next-token losses as training computes them (train.loop.token_nll), every target counted."""
    batch = {"tokens": inputs, "targets": targets, "neighbours": neighbours,
             "loss_mask": torch.ones(targets.shape)}
    return token_nll(model, batch)


VARIANTS = [
    {},
    {"position": "learned", "norm": "rmsnorm", "mlp": "swiglu"},
    {"rotary_percent": 0.5},
    # what imported decoders need: grouped keys, wider heads, biases, q/k norms, an untied head, scaled RoPE
    {"kv_heads": 2, "head_dim": 16, "qkv_bias": True, "out_bias": True, "mlp_bias": True, "qk_norm": True,
     "tie_embeddings": False, "mlp": "gelu_tanh", "rope_theta": 500000.0, "rope_scaling": "llama3",
     "rope_factor": 8.0, "rope_original_length": 16, "norm_eps": 1e-6},
    # Megatron's retrieval: the encoder reads the first CCA layer's query, no positions in it, no encoder norm
    {"encoder_context": "cca_query", "retrieval_rope": False, "encoder_norm": False, "retro_gate": 0.5},
]


@pytest.mark.parametrize("changes", VARIANTS)
@pytest.mark.parametrize("n", [16, 13, 3])
def test_shapes(changes: dict, n: int) -> None:
    model = build(tiny(**changes), double=False)
    tokens, neighbours = batch(2, n)
    logits = model(tokens, neighbours)
    assert logits.shape == (2, n, V)
    assert torch.isfinite(logits).all()
    assert model(tokens, None).shape == (2, n, V)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        RetroModel(tiny(vocab_size=0), chunk_length=M)
    model = build(tiny())
    tokens, neighbours = batch(1, 16)
    with pytest.raises(ValueError, match="chunks 4"):
        model(tokens, neighbours[:, :3])


def test_default_retro_layers() -> None:
    assert resolve_retro_layers(ModelConfig(layers=12)) == [6, 9, 12]
    assert resolve_retro_layers(ModelConfig(layers=24)) == [9, 12, 15, 18, 21, 24]
    assert resolve_retro_layers(ModelConfig(layers=4)) == [4]
    assert resolve_retro_layers(ModelConfig(layers=4, retro_layers=[])) == []
    assert resolve_retro_layers(ModelConfig(layers=4, retro_layers=[3, 1])) == [1, 3]


@pytest.mark.parametrize("model, needle", [
    ({"layers": 4, "retro_layers": [5]}, "model.retro_layers [5] must lie in 1..4 (model.layers)"),
    ({"hidden": 8, "heads": 4, "rotary_percent": 0.4}, "model.rotary_percent 0.4 rotates no dimension of a head"),
])
def test_the_config_checks_what_the_model_relies_on(model: dict, needle: str) -> None:
    """The [model] values are checked in one place, config.validate; the model trusts its ModelConfig."""
    with pytest.raises(UserError) as e:
        config_from_dict({"model": model})
    assert needle in str(e.value)


def test_rotary_percent_is_not_checked_without_rope() -> None:
    config_from_dict({"model": {"hidden": 8, "heads": 4, "rotary_percent": 0.4, "position": "learned"}})


@pytest.mark.parametrize("changes", VARIANTS[:2])
def test_token_causality(changes: dict) -> None:
    """Changing tokens at positions >= p changes no logit before p, and changes the logits at p."""
    model = build(tiny(**changes))
    n = 14  # not a multiple of M
    tokens, neighbours = batch(1, n)
    with torch.no_grad():
        ref = model(tokens, neighbours)
        for p in range(n):
            changed = tokens.clone()
            changed[:, p:] = (changed[:, p:] + 7) % (V - 1) + 1
            diff = (model(changed, neighbours) - ref).abs().amax(dim=(0, 2))  # (n,)
            assert p == 0 or diff[:p].max() < 1e-12, (p, diff)
            assert diff[p] > 1e-6, (p, diff)


def test_cca_causality() -> None:
    """Neighbours of chunk i change no logit before i*m + m-1 and do change the logit at i*m + m-1."""
    model = build(tiny(retro_layers=[2]))
    n = 16
    tokens, neighbours = batch(1, n)
    with torch.no_grad():
        ref = model(tokens, neighbours)
        for i in range(n // M):
            changed = neighbours.clone()
            changed[:, i] = (changed[:, i] + 11) % (V - 1) + 1
            diff = (model(tokens, changed) - ref).abs().amax(dim=(0, 2))  # (n,)
            first = i * M + M - 1
            assert diff[:first].max().item() < 1e-12, (i, diff)
            assert diff[first] > 1e-6 and (diff[first:] > 1e-6).all(), (i, diff)


def test_gpt_equals_retro_with_gate_off() -> None:
    """A GPT state_dict loads into a Retro model (retro-fitting); gated off, the two give the same logits."""
    gpt = build(tiny(retro_layers=[]), seed=0)
    retro = build(tiny(), seed=1)
    assert not any(name.startswith("encoder.") or ".cca." in name for name in gpt.state_dict())
    missing, unexpected = retro.load_state_dict(gpt.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("encoder.") or ".cca." in k or ".norm_cca." in k for k in missing)

    tokens, neighbours = batch(2, 13)
    with torch.no_grad():
        expected = gpt(tokens, neighbours)  # neighbours ignored by a GPT
        torch.testing.assert_close(gpt(tokens, None), expected, rtol=0, atol=0)
        torch.testing.assert_close(retro(tokens, neighbours, retrieval=False), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(retro(tokens, None), expected, rtol=0, atol=1e-12)
        retro.cca_gate_off = True
        torch.testing.assert_close(retro(tokens, neighbours), expected, rtol=0, atol=1e-12)
        retro.cca_gate_off = False
        assert (retro(tokens, neighbours) - expected).abs().max() > 1e-6  # with retrieval it differs


def test_padding_neighbours() -> None:
    model = build(tiny())
    tokens, neighbours = batch(2, 16)
    with torch.no_grad():
        gated_off = model(tokens, None)
        # every neighbour all padding: exactly the gated-off model, and no NaN
        out = model(tokens, torch.zeros_like(neighbours))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, gated_off, rtol=0, atol=1e-12)
        # one all-padding neighbour out of two: the same as having only the other one
        padded = neighbours.clone()
        padded[:, :, 1] = 0
        torch.testing.assert_close(model(tokens, padded), model(tokens, neighbours[:, :, :1]), rtol=0, atol=1e-10)
        # trailing padding inside a neighbour: the same as the shorter neighbour
        padded = neighbours.clone()
        padded[..., M:] = 0
        torch.testing.assert_close(model(tokens, padded), model(tokens, neighbours[..., :M]), rtol=0, atol=1e-10)

    # gradients stay finite when whole chunks have no real neighbour
    model.train()
    padded = neighbours.clone()
    padded[:, 1:3] = 0
    F.cross_entropy(model(tokens, padded).flatten(0, 1), tokens.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = RetroModel(tiny(layers=2, retro_layers=[2], encoder_layers=1), chunk_length=M).train()
    tokens, neighbours = batch(2, 17, seed=3)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    neighbours = neighbours[:, :4]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):  # noqa: B007 (reported on failure)
        loss = training_loss(model, inputs, targets, neighbours).mean()
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, (step, loss.item())


def copy_task_loss(retro_layers: list[int], steps: int = 120) -> float:
    """Random token sequences whose chunk i has one neighbour: chunk i itself and the chunk that follows
    it, i.e. the exact continuation. Train on fresh batches, then the held-out loss on the positions that
    chunk 0's neighbours already reach (from m - 1 on)."""
    torch.manual_seed(0)
    m, n, vocab = 4, 16, 64
    cfg = dataclasses.replace(tiny(layers=2, hidden=64, retro_layers=retro_layers, encoder_layers=1, num_neighbors=1),
                              vocab_size=vocab, seq_length=n)
    model = RetroModel(cfg, chunk_length=m).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = torch.randint(1, vocab, (b, n + m))
        neighbours = torch.stack([tokens[:, i * m : (i + 2) * m] for i in range(n // m)], 1)[:, :, None]
        return tokens[:, :n], tokens[:, 1 : n + 1], neighbours  # neighbours (b, l, 1, 2m)

    for _ in range(steps):
        inputs, targets, neighbours = batch(32)
        loss = training_loss(model, inputs, targets, neighbours).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs, targets, neighbours = batch(256)
    with torch.no_grad():
        return training_loss(model, inputs, targets, neighbours)[:, m - 1 :].mean().item()


def test_retro_learns_to_copy_the_continuation_from_its_neighbour() -> None:
    """The retrieval path carries information to the right positions and is learnable quickly: a GPT cannot
    beat chance (log 64 = 4.16) on random tokens, a Retro reading the continuation falls far below it
    (RoPE in the neighbour's frame puts each query at relative distance 0 from the token it predicts)."""
    assert copy_task_loss([]) > 4.0
    assert copy_task_loss([2]) < 0.5


def test_training_loss_counts_only_masked_targets() -> None:
    """The model's logits as training scores them: cross-entropy per target, 0 where loss_mask is 0 (SFT: 1 on
    the answer and its EOS only)."""
    model = build(tiny(), double=False)
    tokens, neighbours = batch(2, 5)
    targets = torch.randint(0, V, (2, 5))
    mask = torch.zeros(2, 5)
    mask[0, 2] = 1
    with torch.no_grad():
        losses = token_nll(model, {"tokens": tokens, "targets": targets, "neighbours": neighbours, "loss_mask": mask})
        expected = F.cross_entropy(model(tokens, neighbours)[0, 2:3], targets[0, 2:3])
    torch.testing.assert_close(losses[0, 2], expected)
    assert losses.count_nonzero() == 1


def test_activation_checkpointing_changes_memory_not_results() -> None:
    """Recomputed layers give the same loss and gradients (dropout included: its RNG state is replayed)."""
    tokens, neighbours = batch(2, 16)
    results = []
    for on in (False, True):
        model = build(tiny(dropout=0.1)).train()
        model.activation_checkpointing = on
        torch.manual_seed(3)
        loss = training_loss(model, tokens[:, :-1], tokens[:, 1:], neighbours[:, :4]).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.encoder.activation_checkpointing
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-12) for n in grads_a)


@pytest.mark.parametrize("changes", [{"retro_layers": []}, {}, {"mlp": "swiglu"}, VARIANTS[-1]])
def test_flops_match_a_count_of_the_forward(changes: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """flops_per_sequence = torch's FLOP counter (matmuls) + attention counted from the SDPA calls' shapes
    (torch's counter does not see the CPU attention kernel)."""
    model = build(tiny(**changes), double=False)
    n, b = 16, 2
    tokens, neighbours = batch(b, n, k=model.cfg.num_neighbors, r=model.retrieved_length)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    attention_flops = []

    def counting_sdpa(q, k, v, **kwargs):
        s, e = q.shape[-2:]
        attention_flops.append(2 * 2 * q[..., 0, 0].numel() * s * k.shape[-2] * e)  # QK^T and AV, all heads
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(tokens, neighbours)
    assert flops_per_sequence(model, n) * b == counter.get_total_flops() + sum(attention_flops)
    # a causal kernel computes n(n+1)/2 of the n*n (query, key) pairs of each decoder layer: QK^T and AV
    inner = model.cfg.heads * head_dim(model.cfg)  # the width of queries and values
    skipped = model.cfg.layers * 2 * 2 * inner * (n * n - n * (n + 1) // 2)
    assert flops_per_sequence(model, n, causal_full=False) == flops_per_sequence(model, n) - skipped
    if model.retro_layers:
        assert flops_per_sequence(model, n, retrieval=False) < flops_per_sequence(model, n)
