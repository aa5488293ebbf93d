"""`retro generate`: the KV cache gives the logits and tokens of full recomputation, live retrieval asks for
every chunk the text completes, decoding options, and the verb end to end (contexts from the file, the
database or none; resume after a kill; two ranks; errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from retrocli.config import ModelConfig, load_config
from retrocli.eval.generate import Decoding, generate, pick_next
from retrocli.model.decode import DecodeCache
from retrocli.model.retro import RetroModel

from .conftest import cli_in_process, run_cli
from .test_sft import sft_workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M, K, R, V = 4, 2, 8, 61


MEGATRON = {"encoder_context": "cca_query", "retrieval_rope": False, "encoder_norm": False, "retro_gate": 0.5}


def tiny_model(retro: bool = True, position: str = "rope", seed: int = 0, **keys) -> RetroModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(layers=3, hidden=32, heads=4, seq_length=128, vocab_size=V, position=position,
                      retro_layers=[2, 3] if retro else [], encoder_layers=1, num_neighbors=K, retrieved_length=R,
                      **keys)
    return RetroModel(cfg, M, pad_id=0).eval()


def fake_retriever(log: list | None = None):
    """Neighbours that are a fixed function of the chunk's tokens, ids derived from them."""

    def neighbours_of(rows: list[int], chunks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        if log is not None:
            log.extend((row, list(c)) for row, c in zip(rows, chunks))
        toks = np.stack([(np.arange(K * R).reshape(K, R) * 7 + sum(c)) % (V - 1) + 1 for c in chunks])
        return toks.astype(np.int64), np.array([[sum(c), sum(c) + 1] for c in chunks], dtype=np.int64)

    return neighbours_of


def prompts(lengths=(5, 9, 3, 12), seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V - 1, n).tolist() for n in lengths]


@pytest.mark.parametrize("retro,position,keys", [(True, "rope", {}), (True, "learned", {}), (False, "rope", {}),
                                                 (True, "rope", MEGATRON)], ids=["retro", "learned", "gpt", "megatron"])
def test_cached_steps_give_the_logits_of_the_full_forward(retro: bool, position: str, keys: dict) -> None:
    """Megatron's retrieval (the encoder reading the first CCA layer's query, no positions in retrieval, no
    encoder norm, a gate) decodes as its full forward computes too."""
    model = tiny_model(retro, position, **keys)
    total, lengths = 22, [5, 8, 3, 11]  # prompts shorter than, equal to and spanning several chunks
    rng = np.random.default_rng(0)
    seqs = [torch.from_numpy(rng.integers(1, V, total)) for _ in lengths]
    nbrs = [torch.from_numpy(rng.integers(0, V, (total // M + 1, K, R))) for _ in lengths]  # per chunk
    with torch.no_grad():
        full = [model(s[None], n[None, : -(-total // M)])[0] for s, n in zip(seqs, nbrs)]  # (total, v)
        rows, firsts = [], []
        for s, n, length in zip(seqs, nbrs, lengths):
            row = DecodeCache(model, 1, length)
            firsts.append(model(s[None, :length], n[None, : -(-length // M)], cache=row)[0, -1])
            rows.append(row)
        cache = DecodeCache.left_padded(model, rows, capacity=40)
        for first, f, length in zip(firsts, full, lengths):
            torch.testing.assert_close(first, f[length - 1], atol=1e-5, rtol=1e-5)
        pos = list(lengths)
        for _ in range(total - max(lengths)):
            tokens = torch.stack([s[p] for s, p in zip(seqs, pos)])
            chunk_nbrs = torch.stack([n[p // M] for n, p in zip(nbrs, pos)])  # read where p completes a chunk
            logits = model.step(tokens, cache, chunk_nbrs)
            for i, p in enumerate(pos):
                torch.testing.assert_close(logits[i], full[i][p], atol=1e-5, rtol=1e-5)
            pos = [p + 1 for p in pos]
    if retro:  # and the neighbours matter: other neighbours for one chunk change later logits
        other = [n.clone() for n in nbrs]
        other[0][1] = (other[0][1] + 5) % V
        with torch.no_grad():
            changed = model(seqs[0][None], other[0][None, : -(-total // M)])[0]
        assert torch.equal(changed[: 2 * M - 1], full[0][: 2 * M - 1])  # chunk 1 reaches position 2m-1 first
        assert not torch.allclose(changed[2 * M - 1 :], full[0][2 * M - 1 :])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cached_and_uncached_decoding_give_the_same_tokens(temperature: float) -> None:
    model = tiny_model()
    d = Decoding(max_new_tokens=25, temperature=temperature, top_k=30, top_p=0.95)
    args = dict(eos_id=V - 1, neighbours_of=fake_retriever(), seeds=[11, 12, 13, 14])
    cached = generate(model, prompts(), d, **args)
    uncached = generate(model, prompts(), d, use_cache=False, **args)
    assert [a.tokens for a in cached] == [a.tokens for a in uncached]
    assert [a.neighbour_ids for a in cached] == [a.neighbour_ids for a in uncached]
    assert sum(len(a.tokens) for a in cached) > 40  # something was generated


def test_live_retrieval_asks_for_each_chunk_the_text_completes() -> None:
    model = tiny_model()
    log: list = []
    ps = prompts()
    answers = generate(model, ps, Decoding(max_new_tokens=20), eos_id=-1, neighbours_of=fake_retriever(log))
    for i, (p, a) in enumerate(zip(ps, answers)):
        text = p + a.tokens
        asked = [c for row, c in log if row == i]
        # chunk c is asked for once, in order, with exactly its tokens; generated chunks included
        assert asked == [text[c * M : (c + 1) * M] for c in range(len(asked))]
        assert len(asked) >= (len(text) - 1) // M > len(p) // M
        assert a.neighbour_ids == [[sum(c), sum(c) + 1] for c in asked]


def test_a_prompt_decodes_the_same_alone_and_in_a_left_padded_batch() -> None:
    model = tiny_model()
    d, nb = Decoding(max_new_tokens=15), fake_retriever()
    batch = generate(model, prompts(), d, eos_id=-1, neighbours_of=nb)
    for p, a in zip(prompts(), batch):
        assert generate(model, [p], d, eos_id=-1, neighbours_of=nb)[0].tokens == a.tokens


def test_eos_and_stop_strings_end_an_answer() -> None:
    model = tiny_model()
    p = prompts()[:1]
    decode = lambda ids: "".join(f"<{t}>" for t in ids)  # noqa: E731
    d = Decoding(max_new_tokens=20, temperature=1.0)
    free = generate(model, p, d, eos_id=-1, decode=decode, seeds=[5])[0]
    assert free.stopped == "length" and len(free.tokens) == 20
    at = next(i for i in range(2, 20) if free.tokens[i] not in free.tokens[:i])  # a token not seen before
    eos = generate(model, p, d, eos_id=free.tokens[at], seeds=[5])[0]
    assert eos.stopped == "eos" and eos.tokens == free.tokens[:at]
    stop = f"<{free.tokens[at]}>"
    cut = generate(model, p, Decoding(max_new_tokens=20, temperature=1.0, stop=(stop,)), eos_id=-1, decode=decode,
                   seeds=[5])[0]
    assert cut.stopped == "stop" and cut.text == decode(free.tokens[:at])


def test_pick_next_greedy_top_k_top_p_and_seeds() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    assert torch.equal(pick_next(logits, Decoding(), gens()), greedy)
    assert torch.equal(pick_next(logits, Decoding(temperature=1.0, top_k=1), gens()), greedy)
    assert torch.equal(pick_next(logits, Decoding(temperature=1.0, top_p=1e-6), gens()), greedy)
    hot = Decoding(temperature=5.0)
    draws = torch.stack([pick_next(logits, hot, gens()) for _ in range(3)])
    assert (draws == draws[0]).all()  # the same seeds draw the same tokens
    spread = {tuple(pick_next(logits, hot, [torch.Generator().manual_seed(s)] * 3).tolist()) for s in range(20)}
    assert len(spread) > 1
    top3 = set(logits[0].topk(3).indices.tolist())
    drawn = {int(pick_next(logits[:1], Decoding(temperature=5.0, top_k=3), [torch.Generator().manual_seed(s)]))
             for s in range(30)}
    assert drawn <= top3 and len(drawn) > 1


# --------------------------------------------------------------------------------------------- the verb


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A pretrained tiny Retro (2 steps) and the colour-facts SQuAD file of the SFT tests."""
    return sft_workspace(tmp_path_factory.mktemp("generate"))


def answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def squad_ids(toml: Path) -> list[str]:
    data = json.loads((toml.parent / "squad.json").read_text())
    return [qa["id"] for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


GEN = ["--set", "generate.max_new_tokens=6", "--set", "generate.batch_size=4"]


@pytest.mark.parametrize("contexts", ["file", "database", "none"])
def test_generate_writes_one_traceable_answer_per_question(workspace: Path, contexts: str) -> None:
    out = workspace.parent / f"answers-{contexts}.jsonl"
    proc = run_cli("generate", str(workspace.parent / "squad.json"), "-c", str(workspace), "--out", str(out),
                   "--limit", "10", "--set", f'generate.contexts="{contexts}"', "--set", "generate.num_contexts=1",
                   *GEN, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = answers(out)
    assert [a["id"] for a in got] == squad_ids(workspace)[:10]
    for a in got:
        assert isinstance(a["prediction"], str) and a["gold"] and 0 <= a["tokens"] <= 6
        assert a["stopped"] in ("eos", "length")
        # a pretrained Retro answers with live database retrieval: each complete chunk's neighbours traced
        assert a["neighbour_chunks"] and all(len(ids) == 2 and ids[0] >= 0 for ids in a["neighbour_chunks"])
        sources = {c["source"] for c in a["contexts"]}
        assert sources == {"file": {"file"}, "database": {"database"}, "none": set()}[contexts]
        if contexts == "database":
            assert all(c["chunk_id"] >= 0 and c["doc_id"] for c in a["contexts"])
    assert not list(out.parent.glob(out.name + ".*.partial"))  # merged and cleaned up
    scored = run_cli("score", str(out), "--json")
    assert scored.returncode == 0 and json.loads(scored.stdout)["count"] == 10


def test_a_killed_generate_resumes_and_writes_what_an_uninterrupted_run_writes(workspace: Path) -> None:
    squad = str(workspace.parent / "squad.json")
    straight, resumed = workspace.parent / "straight.jsonl", workspace.parent / "resumed.jsonl"
    args = ["generate", squad, "-c", str(workspace), "--limit", "12", *GEN]
    env = {"OMP_NUM_THREADS": "1"}
    run_cli(*args, "--out", str(straight), env=env, check=True)
    killed = run_cli(*args, "--out", str(resumed), env={**env, "RETRO_FAULT": "generate:batch:2"})
    assert killed.returncode == 137 and not resumed.exists()
    partial = list(resumed.parent.glob(resumed.name + ".*.partial"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 8  # two batches of 4 kept
    with open(partial[0], "a", encoding="utf-8") as f:  # and a record torn by the kill mid-write
        f.write('{"index": 8, "id": "q1-')
    again = run_cli(*args, "--out", str(resumed), env=env)
    assert again.returncode == 0 and "8 of 12 questions were answered" in again.stderr.replace("\n", " ")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(answers(resumed)) == strip(answers(straight))


def test_two_ranks_share_the_questions_and_merge_them_in_order(workspace: Path) -> None:
    squad = str(workspace.parent / "squad.json")
    one, two = workspace.parent / "one-rank.jsonl", workspace.parent / "two-ranks.jsonl"
    args = ["generate", squad, "-c", str(workspace), "--limit", "10", *GEN]
    run_cli(*args, "--out", str(one), env={"OMP_NUM_THREADS": "1"}, check=True)
    proc = run_cli(*args, "--out", str(two), "--set", "launch.nproc_per_node=2", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(answers(two)) == strip(answers(one))


def test_the_default_output_names_the_checkpoint_so_a_second_model_keeps_the_first_ones_answers(
        workspace: Path) -> None:
    import shutil

    from retrocli.config import load_config
    from retrocli.db.database import workspace_of
    from retrocli.eval.generate import run
    from retrocli.train import checkpoint

    cfg = load_config(workspace, ["generate.max_new_tokens=2", 'generate.contexts="none"'])
    ws = workspace_of(cfg)
    first = checkpoint.latest(ws.run_dir("pretrain"))
    second = ws.run_dir("other") / first.name
    shutil.copytree(first, second)
    squad = workspace.parent / "squad.json"
    a = Path(run(cfg, str(squad), limit=2, checkpoint_path=first)["out"])
    b = Path(run(cfg, str(squad), limit=3, checkpoint_path=second)["out"])
    assert a.parent == b.parent == ws.root / "generate"
    assert (a.name, b.name) == (f"squad.none.pretrain.{first.name}.jsonl", f"squad.none.other.{first.name}.jsonl")
    assert len(answers(a)) == 2 and len(answers(b)) == 3  # the first model's answers are still there


def test_prompts_from_the_command_line_and_stdin(workspace: Path) -> None:
    proc = run_cli("generate", "-c", str(workspace), "--prompt", "what colour is the apple?", "--prompt",
                   "and the river?", *GEN, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.splitlines()) == 2
    piped = run_cli("generate", "-", "-c", str(workspace), *GEN, env={"OMP_NUM_THREADS": "1"},
                    stdin="what colour is the apple?\n\nand the river?\n")
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout.splitlines() == proc.stdout.splitlines()  # greedy: the same answers


def test_generate_errors_name_the_problem(workspace: Path, capsys) -> None:
    for args, needle in [(["nowhere.json"], "nowhere.json"),
                         (["--prompt", "hi", "--set", "generate.max_new_tokens=500"], "generate.max_new_tokens"),
                         (["--prompt", "hi", "--set", 'generate.contexts="web"'], "generate.contexts"),
                         ([], "--prompt")]:
        code, err = cli_in_process(capsys, "generate", "-c", str(workspace), *args)
        assert code == 2 and needle in "".join(err.split()), (args, err)  # (rich may wrap a long line)


def test_context_neighbours_are_the_prompt_contexts_as_in_sft() -> None:
    from retrocli.data.qa import context_neighbours
    from retrocli.eval.generate import neighbour_source

    class Chars:  # a tokenizer of characters
        def encode(self, texts):
            return [[ord(ch) % (V - 2) + 1 for ch in t] for t in texts]

    model = tiny_model()
    contexts = [[{"title": "fruit", "text": "the apple is red"}, {"text": "a second context, long enough to be cut"}],
                []]
    source = neighbour_source("context", contexts, Chars(), None, None, model)
    toks, ids = source([1, 0, 0], [[1, 2, 3, 4]] * 3)
    assert toks.shape == (3, K, R) and (ids == -1).all()
    first = context_neighbours(Chars(), contexts[0], K, R, model.pad_id)
    assert (toks[1] == first).all() and (toks[2] == first).all() and (toks[0] == model.pad_id).all()
    assert first[0].tolist() == Chars().encode(["fruit: the apple is red"])[0][:R]  # titled, cut to r
    assert neighbour_source("none", contexts, Chars(), None, None, model) is None


def test_an_empty_answer_says_so_on_a_terminal_and_stays_exact_in_a_pipe(workspace: Path) -> None:
    """Every printable character is a stop string, so the answer is cut to nothing: a terminal shows
    "(empty answer)", a pipe gets the exact (empty) line."""
    import os
    import pty
    import string
    import subprocess
    import sys

    stops = json.dumps(sorted(set(string.printable) - set("\n\r\x0b\x0c")))
    args = ["generate", "-c", str(workspace), "--prompt", "what colour is the apple?", *GEN,
            "--set", f"generate.stop={stops}"]
    piped = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert piped.stdout == "\n"
    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "retrocli", *args], stdout=follower, stderr=subprocess.PIPE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    os.close(follower)
    shown = os.read(leader, 4096).decode()
    os.close(leader)
    assert proc.returncode == 0 and shown.strip() == "(empty answer)", shown


def test_export_hands_a_model_retro_pretrained_to_transformers(workspace: Path, tmp_path: Path) -> None:
    """A model of retro's own shape and SentencePiece tokenizer goes out as GPT-NeoX with a Hugging Face tokenizer
    of the same ids; transformers computes its logits, and retro reads the folder back as the same Retro."""
    import transformers

    from retrocli.data.tokenizer import SentencePieceTokenizer
    from retrocli.db.database import workspace_of
    from retrocli.train import checkpoint

    from .test_cli import retro

    out = tmp_path / "exported"
    proc = retro("export", "-c", str(workspace), "--out", str(out))
    assert proc.returncode == 0 and "gpt_neox" in proc.stderr, proc.stdout + proc.stderr
    ws = workspace_of(load_config(workspace))
    step = checkpoint.latest(ws.run_dir("pretrain"))
    model, _ = checkpoint.load_model(ws, step)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = SentencePieceTokenizer(ws.tokenizer_model)
    text = "What colour is the  sky?\nThe sky is blue, 42 times."
    ids = sp.encode([text])[0]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    tokens = torch.tensor([ids * 3])
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens, retrieval=False)).abs().max() <= 1e-4
    back, _ = checkpoint.load_model(ws, out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # an exported folder is never overwritten
    again = retro("export", "-c", str(workspace), "--out", str(out))
    assert again.returncode == 2 and str(out) in again.stdout + again.stderr
