"""Hugging Face decoders: imported with the logits transformers computes, retrofitted with the decoder frozen,
exported back to a folder transformers loads, and bad folders refused. Every model is a tiny random one made here
(tests/tiny_hf.py): no download."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from retrocli.config import ModelConfig
from retrocli.eval.generate import Decoding, generate
from retrocli.train import checkpoint, hf
from retrocli.workspace import Workspace

from .test_cli import retro, snapshot
from .tiny_hf import FAMILIES, make_model, make_tokenizer

VOCAB = 320  # the embedding rows of every tiny model; the tokenizer has 300 tokens


def imported(folder: Path, **keys) -> torch.nn.Module:
    """The folder as retro's model: its decoder, a CCA layer and an encoder made new (fp32, eval mode)."""
    f = hf.open_folder(folder)
    cfg = dataclasses.replace(ModelConfig(), **{**f.decoder, "seq_length": 128, "retro_layers": [2],
                                                "encoder_layers": 1, **keys})
    return hf.load(folder, cfg, 16, 0)[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_imported_decoder_computes_the_logits_and_greedy_tokens_of_transformers(family: str, tmp_path: Path) -> None:
    reference = make_model(family, tmp_path, VOCAB)
    model = imported(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 100))
    neighbours = torch.randint(1, VOCAB, (2, 7, 2, 32))
    with torch.no_grad():
        expected = reference(tokens).logits
        off = model(tokens, retrieval=False)
        on = model(tokens, neighbours)  # the new CCA's output starts at zero: retrieval changes nothing yet
    assert (off - expected).abs().max() <= 1e-4 and (on - expected).abs().max() <= 1e-4
    assert hf.open_folder(tmp_path).family == family.split("-")[0]
    # greedy decoding with retro's KV cache, 20 tokens, as transformers' generate
    prompt = tokens[0, :13]
    ours = generate(model, [prompt.tolist()], Decoding(max_new_tokens=20), eos_id=-1)[0].tokens
    with torch.no_grad():
        theirs = reference.generate(prompt[None], max_new_tokens=20, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, 13:].tolist()
    assert ours == theirs


def test_the_families_differ_where_retro_must_follow_them(tmp_path: Path) -> None:
    """The configs the table covers really are the variants (GQA, tying, biases, q/k norms, scaling, Conv1D)."""
    keys = {}
    for name in FAMILIES:
        make_model(name, tmp_path / name, VOCAB)
        keys[name] = hf.open_folder(tmp_path / name).decoder
    assert keys["llama"]["kv_heads"] < keys["llama"]["heads"] and not keys["llama"]["tie_embeddings"]
    assert keys["llama-tied-mha-scaled"]["tie_embeddings"] and keys["llama-tied-mha-scaled"]["rope_scaling"] == "llama3"
    assert keys["qwen2"]["qkv_bias"] and not keys["qwen2"]["out_bias"]
    assert keys["qwen3"]["qk_norm"] and keys["qwen3"]["head_dim"] * keys["qwen3"]["heads"] != keys["qwen3"]["hidden"]
    assert keys["mistral"]["sliding_window"] == 256 and keys["mistral"]["kv_heads"] == 1
    assert keys["gpt2"]["position"] == "learned" and keys["gpt2"]["mlp"] == "gelu_tanh" and keys["gpt2"]["mlp_bias"]


def test_bf16_weights_stay_bf16_and_a_mistral_window_is_never_exceeded(tmp_path: Path) -> None:
    make_model("mistral", tmp_path, VOCAB, dtype=torch.bfloat16)
    model = imported(tmp_path, seq_length=256)
    decoder = {p.dtype for n, p in model.named_parameters() if not checkpoint.is_cca_or_encoder(n)}
    assert decoder == {torch.bfloat16}  # no fp32 copy of the decoder
    with pytest.raises(ValueError, match="sliding attention window of 256"):
        model(torch.zeros(1, 257, dtype=torch.long))


# ------------------------------------------------------------------------------ a workspace from a model


SETS = ["--set", 'corpus.train=["builtin:tiny"]', "--set", 'db.embedder="lexical"', "--set", 'db.index="Flat"',
        "--set", "model.seq_length=128", "--set", "model.encoder_layers=1", "--set", "pretrain.train_tokens=0",
        "--set", "pretrain.micro_batch_size=2", "--set", "pretrain.global_batch_size=2", "--set",
        "pretrain.eval_interval=3", "--set", "pretrain.eval_steps=1", "--set", "pretrain.save_interval=3",
        "--set", "pretrain.warmup_steps=0", "--set", "pretrain.lr=1e-2", "--set", 'pretrain.precision="fp32"',
        "--set", "launch.nproc_per_node=1"]


def inputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of two chunks and their neighbours, for the workspace's model."""
    m, k, r = model.chunk_length, model.cfg.num_neighbors, model.retrieved_length
    return torch.randint(0, 300, (2, 2 * m)), torch.randint(1, 300, (2, 2, k, r))


@pytest.fixture(scope="module")
def retrofit(tmp_path_factory) -> dict:
    """A Llama folder with its tokenizer, `retro init --from-hf`, the database, a 3-step retrofit, and an export."""
    root = tmp_path_factory.mktemp("retrofit")
    model_dir = root / "model"
    n = make_tokenizer(model_dir)
    assert n < VOCAB
    make_model("llama", model_dir, VOCAB)
    proc = retro("init", str(root / "ws"), "--from-hf", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    toml = str(root / "ws" / "retro.toml")
    for args in (["db", "build"], ["pretrain", "--set", "pretrain.train_steps=3"]):
        proc = retro(*args, "-c", toml, *SETS)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = retro("export", "-c", toml, *SETS, "--out", str(root / "exported"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"root": root, "model": model_dir, "toml": toml, "ws": Workspace(root / "ws"),
            "step": root / "ws" / "checkpoints" / "pretrain" / "step-000003", "exported": root / "exported"}


def test_init_from_hf_fills_the_workspace_from_the_folder(retrofit: dict) -> None:
    import tomllib

    toml = tomllib.loads(Path(retrofit["toml"]).read_text(encoding="utf-8"))
    model = str(retrofit["model"].resolve())
    assert toml["tokenizer"] == {**toml["tokenizer"], "type": "hf", "path": model}
    assert toml["pretrain"]["init_from"] == model and toml["pretrain"]["freeze_decoder"] is True
    config = json.loads((retrofit["model"] / "config.json").read_text())
    assert toml["model"]["layers"] == config["num_hidden_layers"] and toml["model"]["kv_heads"] == 2
    assert toml["model"]["retro_layers"] == [2]  # Megatron's rule gives none below 6 layers: the last one


def test_a_frozen_retrofit_trains_only_retrieval_and_keeps_the_models_logits(retrofit: dict) -> None:
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(retrofit["model"])).eval()
    model, meta = checkpoint.load_model(retrofit["ws"], retrofit["step"])
    assert meta["hf"]["family"] == "llama" and meta["trained_parameters"] < sum(p.numel() for p in model.parameters())
    start = imported(retrofit["model"], seq_length=128, encoder_layers=1)  # the same model at step 0
    weights, initial = model.state_dict(), start.state_dict()
    retrieval = [k for k in weights if checkpoint.is_cca_or_encoder(k)]
    assert retrieval and all(not torch.equal(weights[k], initial[k]) for k in retrieval if k.endswith("weight"))
    assert all(torch.equal(weights[k], initial[k]) for k in weights if k not in retrieval)  # the decoder is frozen
    tokens, neighbours = inputs(model)
    with torch.no_grad():
        expected = reference(tokens).logits
        assert (model(tokens, retrieval=False) - expected).abs().max() <= 1e-4
        assert (model(tokens, neighbours) - expected).abs().max() > 1e-3  # retrieval now changes the logits


def test_export_round_trip(retrofit: dict) -> None:
    import transformers

    out = retrofit["exported"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "retro.safetensors",
            "retro_config.json"} <= {p.name for p in out.iterdir()}
    assert "exported by retro" in (out / "README.md").read_text()
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    original = transformers.AutoTokenizer.from_pretrained(str(retrofit["model"]))
    assert tokenizer("a capital of France")["input_ids"] == original("a capital of France")["input_ids"]
    model, _ = checkpoint.load_model(retrofit["ws"], retrofit["step"])
    back, meta = checkpoint.load_model(retrofit["ws"], out)  # the folder as a checkpoint: the whole Retro
    assert back.retro_layers == model.retro_layers and meta["chunk_length"] == model.chunk_length
    tokens, neighbours = inputs(model)
    with torch.no_grad():
        assert (exported(tokens).logits - model(tokens, retrieval=False)).abs().max() <= 1e-4
        assert (back(tokens, neighbours) - model(tokens, neighbours)).abs().max() <= 1e-5
    # and pretrain.init_from = the exported folder continues the Retro, not a fresh retrofit
    proc = retro("pretrain", "-c", retrofit["toml"], *SETS, "--set", f"pretrain.init_from={json.dumps(str(out))}",
                 "--set", 'pretrain.run="again"', "--set", "pretrain.train_steps=1", "--set", "pretrain.lr=1e-9",
                 "--set", "pretrain.min_lr=0",
                 "--set", "pretrain.save_interval=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again, _ = checkpoint.load_model(retrofit["ws"], retrofit["ws"].run_dir("again") / "step-000001")
    assert all(torch.allclose(again.state_dict()[k], v, atol=1e-6) for k, v in model.state_dict().items())


def test_every_verb_takes_a_model_folder_as_its_checkpoint(retrofit: dict) -> None:
    """ppl scores the imported model as transformers would, generate answers with an exported folder, and SFT
    fine-tunes the imported model itself (sft.init_from = the folder)."""
    import math

    import transformers

    from .test_sft import qa_files

    toml, model_dir = retrofit["toml"], retrofit["model"]
    proc = retro("ppl", "-c", toml, *SETS, "--checkpoint", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    assert result["tokens"] > 0 and math.isfinite(result["perplexity"])
    # the Retro on the folder's decoder, retrieving with its CCA at zero: the model's own loss on the same tokens
    model, _ = checkpoint.load_model(retrofit["ws"], model_dir)
    tokens, neighbours = inputs(model)
    with torch.no_grad():
        assert (model(tokens, neighbours) - reference(tokens).logits).abs().max() <= 1e-4
    proc = retro("generate", "-c", toml, *SETS, "--checkpoint", str(retrofit["exported"]), "--prompt",
                 "The capital of France", "--set", "generate.max_new_tokens=5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    squad, _ = qa_files(retrofit["root"])
    blend = f'sft.blend=[{{name="squad", path={json.dumps(str(squad))}, format="squad", weight=1.0}}]'
    proc = retro("sft", "-c", toml, *SETS, "--set", blend, "--set", f"sft.init_from={json.dumps(str(model_dir))}",
                 "--set", "sft.train_steps=2", "--set", "sft.micro_batch_size=2", "--set", "sft.global_batch_size=2",
                 "--set", "sft.eval_interval=2", "--set", "sft.save_interval=2", "--set", 'sft.precision="fp32"',
                 "--set", 'sft.system=""', "--set", "sft.num_contexts=1",
                 "--set", "sft.activation_checkpointing=false")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tuned, meta = checkpoint.load_model(retrofit["ws"], retrofit["ws"].run_dir("sft") / "step-000002")
    assert meta["sft"]["init_from"] == str(model_dir.resolve()) or meta["sft"]["init_from"] == str(model_dir)
    assert not torch.equal(tuned.state_dict()["layers.0.mlp.up.weight"], model.state_dict()["layers.0.mlp.up.weight"])


# ----------------------------------------------------------------------------------------------- refusals


def expect_refused(args: list[str], *words: str, untouched: Path | None = None) -> None:
    before = snapshot(untouched) if untouched is not None else None
    proc = retro(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and all(w in proc.stdout + proc.stderr for w in words), proc.stdout
    if untouched is not None:
        assert snapshot(untouched) == before


def test_bad_folders_are_refused_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    make_model("llama", good, VOCAB)
    other = tmp_path / "unsupported"
    other.mkdir()
    config = json.loads((good / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"],
                                                   "model_type": "falcon"}))
    expect_refused(["init", str(tmp_path / "ws1"), "--from-hf", str(other)], "FalconForCausalLM",
                   "LlamaForCausalLM")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((good / "config.json").read_text())
    expect_refused(["init", str(tmp_path / "ws2"), "--from-hf", str(empty)], str(empty), "no weights")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    marker = tmp_path / "unpickled"
    (pickled / "pytorch_model.bin").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())  # runs if unpickled
    proc = retro("init", str(tmp_path / "ws3"), "--from-hf", str(pickled))
    assert proc.returncode == 2 and "pytorch_model.bin" in proc.stderr and "never unpickles" in proc.stderr
    assert not marker.exists()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_refused(["init", str(tmp_path / "ws4"), "--from-hf", str(truncated)], "model.safetensors", "truncated")
    assert not any((tmp_path / f"ws{i}" / "retro.toml").exists() for i in range(1, 5))


def test_a_tokenizer_that_is_not_the_models_is_refused_before_training(retrofit: dict, tmp_path: Path) -> None:
    ws_root = retrofit["root"] / "ws"
    # the same model, but with fewer embedding rows than the workspace tokenizer has tokens
    small = tmp_path / "small-vocab"
    make_model("llama", small, 200)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (small / name).write_bytes((retrofit["model"] / name).read_bytes())
    expect_refused(["pretrain", "-c", retrofit["toml"], *SETS, "--set", f"pretrain.init_from={json.dumps(str(small))}",
                    "--set", 'pretrain.run="bad1"'], "embedding matrix", "200 rows", untouched=ws_root)
    # a model whose own tokenizer is another one than the database was chunked with
    other = tmp_path / "other-tokenizer"
    make_tokenizer(other, vocab_size=280)
    make_model("llama", other, VOCAB)
    expect_refused(["pretrain", "-c", retrofit["toml"], *SETS, "--set", f"pretrain.init_from={json.dumps(str(other))}",
                    "--set", 'pretrain.run="bad2"'], "chunked with the tokenizer", str(other), untouched=ws_root)
    # [model] keys that contradict config.json
    expect_refused(["pretrain", "-c", retrofit["toml"], *SETS, "--set", "model.layers=3", "--set",
                    'pretrain.run="bad3"'], "model.layers = 3", "config.json", untouched=ws_root)


@pytest.mark.parametrize("shape", [{}, {"norm": "rmsnorm", "mlp": "swiglu", "kv_heads": 2, "tie_embeddings": False},
                                   {"position": "learned", "mlp": "gelu_tanh"}])
def test_a_model_retro_trained_exports_to_the_family_of_its_shape_and_back(shape: dict, tmp_path: Path) -> None:
    """retro's default shape (RoPE on part of each head, LayerNorm, GELU, no biases) goes out as GPT-NeoX, the
    Llama shape as Llama, learned positions as GPT-2; transformers computes its logits, and the folder comes back
    as the same Retro."""
    import transformers

    from retrocli.model.retro import RetroModel

    cfg = dataclasses.replace(ModelConfig(), layers=2, hidden=64, heads=4, vocab_size=VOCAB, seq_length=128,
                              rotary_percent=0.5 if not shape else 1.0, retro_layers=[2], encoder_layers=1, **shape)
    torch.manual_seed(0)
    model = RetroModel(cfg, 16, 0).eval()
    family = hf.family_for(cfg)
    assert family == {0: "gpt_neox", 4: "llama", 2: "gpt2"}[len(shape)]
    hf.export(model, tmp_path / "out", family, eos_id=1, pad_id=0, chunk_length=16, tokenizer_files=[], card="card",
              retro_extra={})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    folder = hf.open_folder(tmp_path / "out")
    back = hf.load(tmp_path / "out", hf.model_config(folder, cfg, frozenset(dataclasses.asdict(cfg))), 16, 0)[0]
    assert back.cfg == cfg
    tokens, neighbours = torch.randint(0, VOCAB, (2, 40)), torch.randint(1, VOCAB, (2, 3, 2, 32))
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens, retrieval=False)).abs().max() <= 1e-4
        assert (back(tokens, neighbours) - model(tokens, neighbours)).abs().max() <= 1e-5
