"""`retro pretrain` on a microscopic workspace: sample construction (layout, neighbour exclusion of in-sample
documents, continuation stopping at the document end, padding masked), the loss falling, exact resume after a
kill (in a step and in the middle of writing a checkpoint), retro-fitting from a GPT checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retrocli.cli import main
from retrocli.config import load_config
from retrocli.data.tokenizer import EOS_ID, PAD_ID
from retrocli.db import build as db
from retrocli.db import database
from retrocli.db.database import Database
from retrocli.errors import UserError
from retrocli.train import checkpoint
from retrocli.train.curriculum import PERIODS, CopyWindows
from retrocli.train.evaluator import batch_nll
from retrocli.train.pretrain import build, run
from retrocli.train.samples import collate, open_samples

from .conftest import run_cli, small_sections, synthetic_documents, write_jsonl, write_toml

MODEL = {"layers": 2, "hidden": 32, "heads": 2, "seq_length": 32, "retro_layers": [2], "encoder_layers": 1}
PRETRAIN = {"micro_batch_size": 2, "global_batch_size": 4, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1,
            "train_steps": 6, "eval_interval": 3, "eval_steps": 1, "save_interval": 2, "keep_last": 2}


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on a shared 2-core machine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_workspace(root: Path, build_db: bool = True, **overrides: dict) -> Path:
    write_jsonl(root / "corpus" / "docs.jsonl", synthetic_documents(24, 120))
    sections = small_sections(model=dict(MODEL), pretrain=dict(PRETRAIN))
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    toml = write_toml(root / "retro.toml", sections)
    if build_db:
        db.build(load_config(toml))
    return toml


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("pretrain"))


def pretrain_on_two_ranks(toml: Path, *sets: str, fsdp: bool = True, env: dict | None = None
                          ) -> subprocess.CompletedProcess:
    """`retro pretrain` started through `[launch] nproc_per_node = 2` (torchrun, gloo, one thread a rank), with
    FSDP unless fsdp=False; `sets`: further --set overrides."""
    flags = ["launch.nproc_per_node=2", *(["pretrain.fsdp=true"] if fsdp else []), *sets]
    return subprocess.run([sys.executable, "-m", "retrocli", "pretrain", "-c", str(toml),
                           *[a for f in flags for a in ("--set", f)]], capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD, **(env or {})}, timeout=300)


def metrics(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# ----------------------------------------------------------------------------------------------- samples


def test_samples_layout_and_masking(workspace: Path) -> None:
    cfg = load_config(workspace)
    ws = database.workspace_of(cfg)
    opened = Database.open(ws, 16)
    store = opened.store
    samples = open_samples(cfg, ws, "train", PAD_ID, EOS_ID, retrieval=True, database=opened)
    n, m, k, r = 32, 16, 2, 32
    # the stream, rebuilt by hand: each training document + EOS, padded to a multiple of m
    stream, real = [], []
    for d in np.flatnonzero(~store.docs["valid"]):
        row = store.docs[d]
        toks = list(store.tokens[row["token_start"] : row["token_start"] + row["num_tokens"]]) + [EOS_ID]
        pad = -len(toks) % m
        stream += toks + [PAD_ID] * pad
        real += [1] * len(toks) + [0] * pad
    assert len(samples) == (len(stream) - 1) // n
    for i in range(len(samples)):
        s = samples.get(i)
        assert s["tokens"].shape == (n,) and s["targets"].shape == (n,) and s["neighbours"].shape == (n // m, k, r)
        assert s["tokens"].tolist() == stream[i * n : i * n + n]
        assert s["targets"].tolist() == stream[i * n + 1 : i * n + n + 1]
        assert s["loss_mask"].tolist() == real[i * n + 1 : i * n + n + 1]  # padding targets are masked
    assert 0 in real  # there is padding to mask


def test_neighbours_exclude_sample_documents_and_stop_at_document_end(workspace: Path) -> None:
    cfg = load_config(workspace)
    ws = database.workspace_of(cfg)
    opened = Database.open(ws, 16)
    store = opened.store
    samples = open_samples(cfg, ws, "train", PAD_ID, EOS_ID, retrieval=True, database=opened)
    chunk_docs = store.chunks["doc"]
    # a neighbour table that offers each chunk's own neighbours behind the first chunks of the documents
    # just before and after it, which share samples with it: those must be skipped
    real_table = samples.table[np.arange(store.num_chunks)]
    first_chunk = store.docs["chunk_start"]
    offered = np.concatenate([first_chunk[np.clip(chunk_docs + 1, 0, len(first_chunk) - 1)][:, None],
                              first_chunk[np.clip(chunk_docs - 1, 0, len(first_chunk) - 1)][:, None], real_table], 1)
    samples.table = offered
    excluded_somewhere, stopped_at_end = 0, 0
    for i in range(len(samples)):
        s = samples.get(i)
        inside = set(s["docs"].tolist())
        for j in range(samples.l):
            c = i * samples.l + j  # stream chunk; map it to its database chunk (if any) through the layout
            d = int(np.searchsorted(samples.chunk_offsets, c, side="right")) - 1
            local = c - samples.chunk_offsets[d]
            if local >= samples.docs.num_keys[d]:
                assert (s["neighbour_ids"][j] == -1).all() and (s["neighbours"][j] == PAD_ID).all()
                continue
            row = offered[samples.docs.key_start[d] + local]
            expect = [int(x) for x in row if x >= 0 and int(chunk_docs[x]) not in inside][: samples.k]
            excluded_somewhere += sum(1 for x in row[:2] if int(chunk_docs[x]) in inside)
            assert s["neighbour_ids"][j].tolist() == expect + [-1] * (samples.k - len(expect))
            for slot, cid in enumerate(expect):
                assert int(chunk_docs[cid]) not in inside
                toks = store.chunk_ids(cid).tolist()
                nxt = store.continuation(cid)
                if nxt is not None:
                    toks += store.chunk_ids(nxt).tolist()
                else:
                    stopped_at_end += 1
                toks = toks[: samples.r]
                assert s["neighbours"][j, slot].tolist() == toks + [PAD_ID] * (samples.r - len(toks))
    assert excluded_somewhere > 0 and stopped_at_end > 0


def test_validation_samples_cover_every_token(workspace: Path) -> None:
    cfg = load_config(workspace)
    ws = database.workspace_of(cfg)
    samples = open_samples(cfg, ws, "valid", PAD_ID, EOS_ID, retrieval=True, drop_last=False)
    assert len(samples) > 0
    total = sum(float(samples.get(i)["loss_mask"].sum()) for i in range(len(samples)))
    assert total == int(samples.docs.lengths.sum()) + len(samples.docs.lengths) - 1  # tokens + EOS, minus the first
    assert set(np.asarray(samples.docs.doc_keys).tolist()).isdisjoint(
        np.flatnonzero(~Database.open(ws, 16).store.docs["valid"]).tolist())


def test_seq_length_must_be_a_multiple_of_the_chunk_length(workspace: Path) -> None:
    with pytest.raises(UserError, match="multiple of db.chunk_length"):
        build(load_config(workspace, ["model.seq_length=40"]))


def test_pretrain_needs_the_database(tmp_path: Path, capsys) -> None:
    toml = make_workspace(tmp_path, build_db=False)
    assert main(["pretrain", "-c", str(toml)]) == 2
    assert "retro db build" in capsys.readouterr().err


# ------------------------------------------------------------------------------ training, resume, init


@pytest.mark.faults
def test_loss_falls_and_resume_after_kills_reproduces_the_curve(workspace: Path) -> None:
    run_path = database.workspace_of(load_config(workspace)).run_dir()
    if run_path.exists():
        shutil.rmtree(run_path)
    run(load_config(workspace))  # the uninterrupted reference, in this process (one thread, like the others)
    reference = metrics(run_path)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    assert reference[6] < reference[1] - 0.3  # the loss falls
    assert [p.name for p in checkpoint.complete_steps(run_path)] == ["step-000006", "step-000004"]  # keep_last 2
    shutil.rmtree(run_path)

    # killed while writing the second checkpoint: only a temporary folder is left for step 4
    died = run_cli("pretrain", "-c", str(workspace), env={**ONE_THREAD, "RETRO_FAULT": "pretrain:checkpoint:2"})
    assert died.returncode == 137
    assert [p.name for p in checkpoint.complete_steps(run_path)] == ["step-000002"]
    assert list(run_path.glob(".step-000004.tmp-*"))
    # resumed from step 2, then killed after step 5 (step 4 was saved)
    died = run_cli("pretrain", "-c", str(workspace), env={**ONE_THREAD, "RETRO_FAULT": "pretrain:step:3"})
    assert died.returncode == 137 and "resuming pretrain from" in died.stderr
    assert checkpoint.latest(run_path).name == "step-000004"
    done = run_cli("pretrain", "-c", str(workspace), env=ONE_THREAD, check=True)
    assert "step-000004" in done.stderr
    resumed = metrics(run_path)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    assert not list(run_path.glob(".step-*"))  # temporary folders are cleaned up


@pytest.mark.faults
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(workspace: Path) -> None:
    import resource
    import signal

    run_path = database.workspace_of(load_config(workspace)).run_dir()
    if not checkpoint.complete_steps(run_path):
        run(load_config(workspace))
    last = checkpoint.latest(run_path)
    limit = (last / checkpoint.WEIGHTS).stat().st_size // 2  # the weights no longer fit; the metrics still do

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    step = int(last.name.split("-")[1])
    proc = subprocess.run([sys.executable, "-m", "retrocli", "pretrain", "-c", str(workspace), "--set",
                           f"pretrain.train_steps={step + 2}"], capture_output=True, text=True,
                          env={**os.environ, **ONE_THREAD}, preexec_fn=full_disk, timeout=300)
    said = "".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in said, proc.stderr[-2000:]
    assert f"cannotwrite{checkpoint.step_dir(run_path, step + 2)}" in said and "Filetoolarge" in said
    assert checkpoint.latest(run_path) == last and checkpoint.problem(last) is None  # intact, still the latest
    assert not list(run_path.glob(".step-*"))  # the torn write was cleared


def test_init_from_gpt_loads_the_decoder_and_starts_cca_fresh(tmp_path: Path) -> None:
    toml = make_workspace(tmp_path, pretrain={"train_steps": 2, "save_interval": 2, "eval_interval": 2})
    gpt_cfg = load_config(toml, ["model.retro_layers=[]"])
    run(gpt_cfg)
    ws = database.workspace_of(gpt_cfg)
    gpt_dir = ws.root / "gpt"
    ws.run_dir().rename(gpt_dir)
    gpt_weights = checkpoint.load_weights(gpt_dir / "step-000002")
    assert not any("cca" in k or k.startswith("encoder.") for k in gpt_weights)

    job, _, resume_from = build(load_config(toml, [f"pretrain.init_from={json.dumps(str(gpt_dir))}"]))
    assert resume_from is None
    retro_state = job.model.state_dict()
    for name, value in gpt_weights.items():
        assert torch.equal(retro_state[name], value), name  # the decoder comes from the GPT
    fresh = build(load_config(toml))[0].model.state_dict()  # same seed, no init_from
    cca = [k for k in retro_state if "cca" in k or k.startswith("encoder.")]
    assert cca
    for name in cca:  # CCA and encoder start fresh, each CCA's output projection at zero
        if name.endswith("cca.attn.out_proj.weight"):
            assert not retro_state[name].any(), name
        else:
            assert torch.equal(retro_state[name], fresh[name]), name
    # so at step 0 the Retro, retrieving, computes the GPT's logits exactly
    gpt = checkpoint.load_model(ws, gpt_dir / "step-000002")[0]
    tokens = torch.randint(1, 100, (2, 3 * job.model.chunk_length))
    neighbours = torch.randint(1, 100, (2, 3, job.model.cfg.num_neighbors, job.model.retrieved_length))
    with torch.no_grad():
        assert torch.equal(job.model.eval()(tokens, neighbours), gpt(tokens))
    summary = run(load_config(toml, [f"pretrain.init_from={json.dumps(str(gpt_dir))}"]))
    assert summary["step"] == 2  # a new run from step 0: the GPT's optimizer state is not used
    with pytest.raises(UserError, match="cannot resume .*model.layers: checkpoint 2, config 3"):
        run(load_config(toml, ["model.layers=3"]))  # resuming into another model shape

    shutil.rmtree(ws.run_dir())
    # retro-fitting with the decoder frozen: only the encoder and CCA move
    init = f"pretrain.init_from={json.dumps(str(gpt_dir))}"
    frozen = checkpoint.load_weights(Path(run(load_config(toml, [init, "pretrain.freeze_decoder=true"]))["checkpoint"]))
    for name, value in gpt_weights.items():
        assert torch.equal(frozen[name], value), name
    assert all(not torch.equal(frozen[name], retro_state[name]) for name in cca if name.endswith(".weight"))
    with pytest.raises(UserError, match="trained [0-9,]+ parameters, this run would train [0-9,]+ .*freeze_decoder"):
        run(load_config(toml, [init, "pretrain.train_steps=3"]))  # resuming it with every weight training
    shutil.rmtree(ws.run_dir())
    # the same under FSDP on two ranks (the same global batches): the same weights, written as shards
    proc = pretrain_on_two_ranks(toml, init, "pretrain.freeze_decoder=true")
    assert proc.returncode == 0 and "view tensor" not in proc.stderr, proc.stderr[-3000:]
    assert (checkpoint.step_dir(ws.run_dir(), 2) / "shards").is_dir()
    sharded = checkpoint.load_weights(checkpoint.step_dir(ws.run_dir(), 2))
    for name, value in frozen.items():
        assert torch.allclose(sharded[name], value, atol=1e-6), name
    shutil.rmtree(ws.run_dir())
    # a problem the user can fix, met by the ranks: its message and exit 2, as in one process (not torchrun's 1)
    bad = pretrain_on_two_ranks(toml, 'pretrain.init_from="missing-gpt"', "pretrain.freeze_decoder=true")
    assert bad.returncode == 2 and "missing-gpt" in bad.stdout + bad.stderr, bad.stderr[-3000:]
    assert "ChildFailedError" not in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(UserError, match="freeze_decoder = true needs pretrain.init_from"):
        build(load_config(toml, ["pretrain.freeze_decoder=true"]))
    with pytest.raises(UserError, match="nothing to train in a plain GPT"):
        build(load_config(toml, [init, "pretrain.freeze_decoder=true", "model.retro_layers=[]"]))
    with pytest.raises(UserError, match="decoder shapes differ"):
        build(load_config(toml, [f"pretrain.init_from={json.dumps(str(gpt_dir))}", "model.hidden=64"]))


def test_copy_windows_repeat_carry_their_continuation_and_are_fixed_by_position() -> None:
    n, m, k, r, vocab = 32, 16, 2, 32, 50
    w = CopyWindows(n, m, k, r, vocab, {PAD_ID, EOS_ID}, warmup_samples=100, share=0.25, seed=7, neighbours=True)
    made = [w.at(p) for p in range(4000)]
    assert all(x is not None for x in made[:100])  # the warmup: copy windows only
    share = np.mean([x is not None for x in made[100:]])
    assert 0.22 < share < 0.28, share
    again = w.at(5)
    assert all(np.array_equal(again[key], made[5][key]) for key in again)  # a resumed run sees the same window
    matched = slots = repeating = 0
    for x in made[:100]:
        assert np.array_equal(x["tokens"][1:], x["targets"][:-1]) and x["loss_mask"].all()
        assert not np.isin(x["neighbours"], [PAD_ID, EOS_ID]).any() and not np.isin(x["tokens"], [PAD_ID, EOS_ID]).any()
        stream = np.concatenate([x["tokens"], x["targets"][-1:]])
        # the shortest period the window shows (the 33 tokens hold one when it is shorter than 32)
        shown = [p for p in range(1, n) if np.array_equal(stream[p:], stream[:-p])]
        assert not shown or shown[0] >= PERIODS[0]
        repeating += bool(shown)
        for j in range(n // m):
            for slot in x["neighbours"][j]:
                slots += 1
                if np.array_equal(slot[:m], x["tokens"][j * m : (j + 1) * m]):  # the chunk itself, then ...
                    matched += 1
                    known = stream[j * m : j * m + r]
                    assert np.array_equal(slot[: len(known)], known)  # ... its continuation
    assert 8 <= repeating <= 35  # periods 8..31 of 8..128: about a fifth
    assert 0.4 < matched / slots < 0.6
    gpt = CopyWindows(n, m, k, r, vocab, {PAD_ID}, warmup_samples=0, share=0.5, seed=7, neighbours=False)
    assert all("neighbours" not in x for x in map(gpt.at, range(50)) if x is not None)


def test_pretrain_copy_warmup_trains_on_the_copy_windows(workspace: Path) -> None:
    cfg = load_config(workspace, ["pretrain.copy_warmup_steps=1", "pretrain.copy_share=0.5", "pretrain.run='copy'",
                                  "pretrain.train_steps=1"])
    job, settings, _ = build(cfg)
    windows = [job.synthetic(p) for p in range(settings.global_batch_size)]
    assert all(w is not None for w in windows)
    assert any(job.synthetic(p) is None for p in range(settings.global_batch_size, 10 * settings.global_batch_size))
    batch = {key: torch.from_numpy(v) for key, v in collate(windows).items()}
    with torch.no_grad():
        expected = float(batch_nll(job.model, batch)) / float(batch["loss_mask"].sum())  # at the initial weights
    run(cfg)
    assert metrics(database.workspace_of(cfg).run_dir("copy"))[1] == pytest.approx(expected, rel=1e-5)


def test_pretrain_in_bf16_on_the_cpu_trains_under_autocast_and_keeps_fp32_weights(workspace: Path) -> None:
    """pretrain.precision = 'bf16' on a CPU (1.6x faster Retro steps where it has AVX-512 BF16, docs/benchmarks.md):
    the forward runs in bf16, so the first logged loss is close to the fp32 run's but not equal to it; the
    loss falls; the checkpoint holds fp32 weights."""
    from safetensors.torch import load_file

    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(workspace, [f"pretrain.precision='{precision}'", f"pretrain.run='p-{precision}'"])
        run(cfg)
        losses[precision] = metrics(database.workspace_of(cfg).run_dir(f"p-{precision}"))
    assert losses["bf16"][1] == pytest.approx(losses["fp32"][1], rel=2e-2)
    assert losses["bf16"][1] != losses["fp32"][1]  # autocast was on
    assert losses["bf16"][6] < losses["bf16"][1] - 0.3
    last = checkpoint.latest(database.workspace_of(load_config(workspace)).run_dir("p-bf16"))
    weights = load_file(last / checkpoint.WEIGHTS)
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_tokenizer_mismatch_names_both_values() -> None:
    meta = {"tokenizer": {"vocab_size": 300, "fingerprint": "aaa", "path": "/a/tokenizer.model"}}
    with pytest.raises(UserError, match="vocabulary 300.*vocabulary 8000"):
        checkpoint.check_tokenizer(meta, {"vocab_size": 8000, "fingerprint": "bbb", "path": "/b/t.model"}, Path("c"))
    with pytest.raises(UserError, match="fingerprint aaa.*fingerprint bbb"):
        checkpoint.check_tokenizer(meta, {"vocab_size": 300, "fingerprint": "bbb", "path": "/b/t.model"}, Path("c"))


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_through_launch_reproduce_the_one_process_loss(tmp_path: Path, fsdp: bool) -> None:
    """micro 2 x 2 processes x 1 accumulation against micro 2 x 1 process x 2 accumulation: the same global
    batches, so the same loss curve. `[launch] nproc_per_node = 2` makes `retro pretrain` start itself
    through torchrun (gloo on CPU); with `pretrain.fsdp` the model is sharded, and its checkpoint is written as
    shards, one per rank, which a one-process run resumes from."""
    toml = make_workspace(tmp_path, pretrain={"train_steps": 3, "save_interval": 2, "eval_interval": 3})
    cfg = load_config(toml)
    run(cfg)
    run_path = database.workspace_of(cfg).run_dir()
    one = metrics(run_path)
    shutil.rmtree(run_path)
    if not fsdp:  # one rank dies after step 2: the job ends promptly, non-zero, and the rerun resumes
        started = time.time()
        kill_rank_1 = {"RETRO_FAULT": "pretrain:step:2", "RETRO_FAULT_RANK": "1"}
        died = pretrain_on_two_ranks(toml, fsdp=fsdp, env=kill_rank_1)
        assert died.returncode != 0 and "dying at pretrain:step" in died.stderr, died.stderr[-3000:]
        assert time.time() - started < 120  # no hang on the collective the dead rank never joins
    proc = pretrain_on_two_ranks(toml, fsdp=fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 process(es)" in proc.stdout + proc.stderr
    assert not (database.workspace_of(cfg).root / "retro.lock").exists()  # released by the job's rank 0
    two = metrics(run_path)
    assert sorted(two) == [1, 2, 3]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # the sharded run's checkpoint at step 2 (one shard file per rank, nothing gathered) resumes in one process
    # and reaches the same step-3 loss
    step2 = checkpoint.step_dir(run_path, 2)
    if fsdp:
        assert sorted(p.name for p in (step2 / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert not (step2 / checkpoint.WEIGHTS).exists() and checkpoint.problem(step2) is None
    shutil.rmtree(checkpoint.step_dir(run_path, 3))
    run(load_config(toml, ["pretrain.train_steps=3"]))
    assert metrics(run_path)[3] == pytest.approx(one[3], rel=1e-5)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_sharded_on_two_ranks(tmp_path: Path) -> None:
    """The other direction of a change of world size: a plain checkpoint (model.safetensors) taken up by two
    FSDP ranks, which reach the one-process step-3 loss and write their step as shards."""
    toml = make_workspace(tmp_path, pretrain={"train_steps": 3, "save_interval": 2, "eval_interval": 3})
    cfg = load_config(toml)
    run(cfg)
    run_path = database.workspace_of(cfg).run_dir()
    one = metrics(run_path)
    shutil.rmtree(checkpoint.step_dir(run_path, 3))
    assert (checkpoint.step_dir(run_path, 2) / checkpoint.WEIGHTS).is_file()
    proc = pretrain_on_two_ranks(toml)
    assert proc.returncode == 0 and "resuming pretrain from" in proc.stderr, proc.stderr[-3000:]
    assert metrics(run_path)[3] == pytest.approx(one[3], rel=1e-5)
    assert (checkpoint.step_dir(run_path, 3) / "shards").is_dir()


@pytest.mark.parametrize("flags,warned", [({"avx2", "fma"}, True), ({"avx2", "avx512_bf16"}, False), (None, False)])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about_once(monkeypatch, capsys, flags, warned) -> None:
    from retrocli import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    runtime._warn_slow_cpu_bf16.cache_clear()
    for _ in range(2):
        with runtime.autocast(torch.device("cpu"), "bf16"):
            pass
    err = capsys.readouterr().err.replace("\n", " ")
    assert err.count("emulated") == (1 if warned else 0)
    runtime._warn_slow_cpu_bf16.cache_clear()
