"""The workspace TOML: strict sections and keys, typed overrides, errors that name the key and the file."""

from pathlib import Path

import pytest

from retrocli.config import load_config, parse_override, to_commented_toml
from retrocli.errors import UserError

from .conftest import run_cli, write_toml


def test_defaults_and_precedence(tmp_path: Path):
    toml = write_toml(tmp_path / "w.toml", {"db": {"nprobe": 8, "index": "IVF16,SQ8"}})
    cfg = load_config(toml, ["db.nprobe=32", "corpus.train=[\"a.txt\", \"b.txt\"]", "db.embedder=lexical"])
    assert cfg.db.nprobe == 32  # --set beats the TOML
    assert cfg.db.index == "IVF16,SQ8"  # the TOML beats the default
    assert cfg.db.chunk_length == 64  # the default
    assert cfg.corpus.train == ["a.txt", "b.txt"]  # typed: a TOML list
    assert cfg.db.embedder == "lexical"  # a bare word is a string
    assert cfg.resolve("x/y") == tmp_path / "x" / "y"  # relative to the TOML's folder


def test_int_accepted_for_float(tmp_path: Path):
    cfg = load_config(write_toml(tmp_path / "w.toml", {"corpus": {"valid_fraction": 0}}))
    assert cfg.corpus.valid_fraction == 0.0 and isinstance(cfg.corpus.valid_fraction, float)


@pytest.mark.parametrize("sections, needle", [
    ({"db": {"chunk_lenght": 64}}, "unknown key 'db.chunk_lenght'"),
    ({"dbase": {"x": 1}}, "unknown section [dbase]"),
    ({"db": {"nprobe": "many"}}, "'db.nprobe' must be an integer"),
    ({"db": {"chunk_length": 0}}, "db.chunk_length must be positive"),
    ({"db": {"rerank": -2}}, "db.rerank must be -1 (auto) or in 0..16384 (the widest search), got -2"),
    ({"corpus": {"valid_fraction": 1.5}}, "corpus.valid_fraction must be in [0, 1)"),
    ({"db": {"num_neighbors_query": 3}, "model": {"num_neighbors": 5}},
     "model.num_neighbors (5) exceeds db.num_neighbors_query (3)"),
    ({"model": {"hidden": 100, "heads": 3}}, "model.hidden (100) must be divisible by model.heads (3)"),
    ({"tokenizer": {"type": "hf"}}, "needs tokenizer.path"),
    ({"pretrain": {"run": "../elsewhere"}}, "pretrain.run must be a plain folder name"),
    ({"pretrain": {"global_batch_size": 10, "micro_batch_size": 4}}, "must be a multiple of"),
    ({"launch": {"fsdp": True}}, "'launch.fsdp' in"),  # the old place: the message says where it moved
    ({"launch": {"backend": "mpi"}}, "launch.backend must be 'auto', 'nccl' or 'gloo'"),
    ({"launch": {"rdzv_endpoint": "node0"}}, "launch.rdzv_endpoint must be HOST:PORT"),
    ({"pretrain": {"copy_warmup_steps": -1}}, "pretrain.copy_warmup_steps must be >= 0, got -1"),
    ({"pretrain": {"copy_share": 1.0}}, "pretrain.copy_share must be in [0, 1), got 1.0"),
])
def test_bad_values_name_the_key_and_file(tmp_path: Path, sections, needle):
    toml = write_toml(tmp_path / "w.toml", sections)
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert needle in str(e.value)
    assert str(toml) in str(e.value)


def test_all_problems_reported_at_once(tmp_path: Path):
    toml = write_toml(tmp_path / "w.toml", {"db": {"chunk_length": -1, "block_size": 0, "nope": 1}})
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert "db.nope" in str(e.value)  # key errors come first; fix them and the value errors follow
    toml = write_toml(tmp_path / "w.toml", {"db": {"chunk_length": -1, "block_size": 0}})
    with pytest.raises(UserError) as e:
        load_config(toml)
    assert "db.chunk_length" in str(e.value) and "db.block_size" in str(e.value)


def test_malformed_toml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[db\nchunk_length = 64\n")
    with pytest.raises(UserError, match="bad.toml is not valid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_override_syntax():
    assert parse_override("db.nprobe=32") == ("db", "nprobe", 32)
    assert parse_override("db.index=IVF1024,SQ8") == ("db", "index", "IVF1024,SQ8")
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("nprobe=32")


def test_commented_toml_round_trips(tmp_path: Path):
    cfg = load_config(write_toml(tmp_path / "w.toml", {"db": {"nprobe": 3}, "model": {"retro_layers": [2]}}))
    text = to_commented_toml(cfg)
    out = tmp_path / "again.toml"
    out.write_text(text)
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()
    assert "# IVF lists visited per query" in text


def test_cli_exit_codes(tmp_path: Path):
    toml = write_toml(tmp_path / "w.toml", {"db": {"bogus": 1}})
    proc = run_cli("db", "info", "-c", str(toml))
    assert proc.returncode == 2
    assert "db.bogus" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "-c", str(write_toml(tmp_path / "ok.toml", {})))  # nothing to answer
    assert proc.returncode == 2 and "--prompt" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("db", "build", "-c", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and "nope.toml" in proc.stderr and "Traceback" not in proc.stderr


def test_init_writes_a_loadable_workspace(tmp_path: Path):
    proc = run_cli("init", str(tmp_path / "new"), "--recipe", "tiny")
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(tmp_path / "new" / "retro.toml")
    assert cfg.corpus.train == ["builtin:tiny"]
    proc = run_cli("init", str(tmp_path / "new"))
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_extends_layers_a_recipe_on_another(tmp_path: Path):
    base = write_toml(tmp_path / "base.toml", {"workspace": {"dir": "runs/x"}, "db": {"nprobe": 8, "ef_search": 9}})
    top = tmp_path / "top.toml"
    top.write_text('extends = "base.toml"\n[db]\nnprobe = 16\n[[sft.blend]]\nname = "a"\npath = "a.jsonl"\n'
                   'format = "qa"\n')
    cfg = load_config(top, ["db.ef_search=11"])
    assert (cfg.workspace.dir, cfg.db.nprobe, cfg.db.ef_search) == ("runs/x", 16, 11)
    assert [e.name for e in cfg.sft.blend] == ["a"] and cfg.sft.blend[0].weight == 1.0
    base.write_text('extends = "top.toml"\n')
    with pytest.raises(UserError, match="cycle"):
        load_config(top)
    top.write_text('extends = "gone.toml"\n')
    with pytest.raises(UserError, match="gone.toml"):
        load_config(top)
    top.write_text('[[sft.blend]]\nname = "a"\nweight = "heavy"\npathh = "x"\n')
    with pytest.raises(UserError) as e:
        load_config(top)
    assert "sft.blend[0].pathh" in str(e.value) and "'sft.blend[0].weight' must be a number" in str(e.value)


def test_launch_becomes_torchrun_options(tmp_path: Path):
    from retrocli.runtime import torchrun_args

    def args(**launch) -> list[str]:
        return torchrun_args(load_config(write_toml(tmp_path / "w.toml", {"launch": launch})).launch)

    assert args(nproc_per_node=8) == ["--nproc_per_node=8", "--standalone"]
    assert args(nproc_per_node=8, nnodes=4, node_rank=2, master_addr="10.0.0.1", master_port=29400) == [
        "--nproc_per_node=8", "--nnodes=4", "--node_rank=2", "--master_addr=10.0.0.1", "--master_port=29400"]
    assert args(nproc_per_node=8, nnodes=4, rdzv_endpoint="node0:29400", rdzv_id="job7") == [
        "--nproc_per_node=8", "--nnodes=4", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400", "--rdzv_id=job7"]


def test_an_unknown_key_gets_the_nearest_known_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"unknown key 'db.num_neighbors' in .*: did you mean 'db.num_neighbors_query'"):
        load_config(write_toml(tmp_path / "old.toml", {"db": {"num_neighbors": 4}}))


def test_a_value_outside_its_choices_is_named_with_the_nearest_choice(tmp_path: Path):
    """Each key with a fixed set of values declares them once (its `choices`): the file, --set and every
    [[sft.blend]] entry are checked against them, and a near miss gets a suggestion."""
    toml = tmp_path / "retro.toml"
    toml.write_text('[model]\nnorm = "rmsnrom"\n[[sft.blend]]\nname = "a"\npath = "a.json"\nformat = "squadd"\n')
    with pytest.raises(UserError) as e:
        load_config(toml, ['reproduce.contexts=["file", "web"]', "pretrain.precision=fp16"])
    msg = str(e.value)
    assert f"model.norm must be 'layernorm' or 'rmsnorm', got 'rmsnrom' (did you mean 'rmsnorm'?) (in {toml})" in msg
    assert "sft.blend[0] (a).format must be 'squad', " in msg and "(did you mean 'squad'?)" in msg
    assert "reproduce.contexts must be 'file', 'database' or 'none', got 'web' (given by --set)" in msg
    assert "pretrain.precision must be 'fp32' or 'bf16', got 'fp16'" in msg
