"""A Hugging Face tokenizer's chat template writes the SFT and generation prompt (sft.chat_template = "auto"),
with the loss still on the answer and its EOS only; "never", or a tokenizer without a template, keeps
InstructRetro's prompt; generation stops at every end token the model folder lists (generation_config.json,
config.json). The tokenizers are byte-level BPE models trained here on the test corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrocli.config import SFTConfig, load_config
from retrocli.data.qa import ChatPrompt, PromptTemplate, Record, encode_sample, fit_prompt, render_prompt, template_of
from retrocli.data.tokenizer import HFTokenizer
from retrocli.errors import UserError
from retrocli.eval import generate as gen
from retrocli.train.pretrain import run as pretrain
from retrocli.train.sft import build

from .conftest import run_cli, synthetic_documents
from .test_generate import prompts, tiny_model
from .test_pretrain import make_workspace
from .test_sft import SFT, qa_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SYSTEM = "Answer with one word."


def hf_tokenizer(folder: Path, texts: list[str], chat_template: str | None) -> Path:
    """A byte-level BPE tokenizer folder (<s> BOS, </s> EOS, <pad>), with `chat_template` when given. Like Llama's,
    it puts BOS before a text when asked to add special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", bpe.token_to_id("<s>"))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", chat_template=chat_template)
    tok.save_pretrained(str(folder))
    return folder


def corpus_texts(root: Path) -> list[str]:
    squad, qa = qa_files(root)
    return [d["text"] for d in synthetic_documents(24, 120)] + [squad.read_text(), qa.read_text()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A pretrained tiny Retro whose workspace tokenizer is a Hugging Face folder with a chat template, and an
    [[sft.blend]] of a SQuAD file and a QA file."""
    root = tmp_path_factory.mktemp("chat")
    folder = hf_tokenizer(root / "hf-tokenizer", corpus_texts(root), CHAT)
    toml = make_workspace(root, tokenizer={"type": "hf", "path": str(folder)}, model={"seq_length": 128},
                          pretrain={"train_steps": 2, "save_interval": 2, "eval_interval": 2},
                          sft={**SFT, "system": SYSTEM, "train_steps": 2, "save_interval": 2, "eval_interval": 2})
    pretrain(load_config(toml))
    with open(toml, "a", encoding="utf-8") as f:
        f.write('[[sft.blend]]\nname = "squad"\npath = "squad.json"\nformat = "squad"\nweight = 1\n'
                '[[sft.blend]]\nname = "facts"\npath = "qa.jsonl"\nformat = "qa"\nweight = 1\n')
    return toml


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory) -> HFTokenizer:
    """The same BPE model without a chat template."""
    root = tmp_path_factory.mktemp("plain")
    return HFTokenizer(hf_tokenizer(root / "hf-tokenizer", corpus_texts(root), None))


def first_with_contexts(job) -> tuple[Record, dict]:
    """A SQuAD training record of the job (it has contexts) and its sample, with the contexts used."""
    s = job.train
    record = next(rec for rec in s.records if rec.contexts)
    sample, stats = encode_sample(record, s.template, s.tok, s.seq_length, s.num_contexts)
    assert stats["skipped_too_long"] == 0
    return record, sample


def test_sft_samples_use_the_chat_template_and_the_loss_covers_the_answer_and_eos(workspace: Path) -> None:
    from transformers import AutoTokenizer

    job, *_ = build(load_config(workspace))
    tok = job.train.tok
    assert isinstance(job.train.template, ChatPrompt)
    record, sample = first_with_contexts(job)
    assert sample["contexts"] == record.contexts[:2]  # nothing cut: the prompt below is the whole one

    # the prompt as the tokenizer's own apply_chat_template writes it from the messages
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    contexts = "\n\n".join(f"title: {c['title']}, source: {c['text']}" for c in record.contexts[:2])
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{contexts}\n\n{record.question}"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\nAnswer with one word.<|end|>\n<|user|>\ntitle: ")
    assert text.endswith(f"{record.question}<|end|>\n<|assistant|>\n")
    prompt = hf(text, add_special_tokens=False)["input_ids"]
    answer = hf(record.answers[0], add_special_tokens=False)["input_ids"]  # no space after the template's turn
    full = prompt + answer + [tok.eos_id]
    n = len(full) - 1
    assert sample["tokens"][:n].tolist() == full[:-1] and sample["targets"][:n].tolist() == full[1:]
    assert (sample["tokens"][n:] == tok.pad_id).all()
    assert tok.decode(sample["tokens"][: len(prompt)]) == text
    assert hf("x")["input_ids"][0] == hf.bos_token_id  # the tokenizer adds BOS when asked: encoding does not ask
    assert sample["tokens"].tolist().count(hf.bos_token_id) == 1  # the template's BOS, not doubled
    # the loss: exactly the targets that are answer tokens and the EOS
    assert np.flatnonzero(sample["loss_mask"]).tolist() == list(range(len(prompt) - 1, n))
    assert sample["targets"][sample["loss_mask"] > 0].tolist() == answer + [tok.eos_id]


def test_chat_template_never_gives_the_instructretro_prompt(workspace: Path) -> None:
    job, *_ = build(load_config(workspace, ['sft.chat_template="never"']))
    tok = job.train.tok
    assert job.train.template == PromptTemplate(system=SYSTEM)
    record, sample = first_with_contexts(job)
    prompt = tok.encode([render_prompt(record, job.train.template, sample["contexts"])])[0]
    assert sample["tokens"][: len(prompt)].tolist() == prompt
    text = tok.decode(prompt)
    assert text.startswith(SYSTEM + "\n\ntitle: ") and text.endswith(f"User: {record.question}\n\nAssistant:")
    assert "<|user|>" not in text and "<s>" not in text


def test_a_tokenizer_without_a_chat_template_gives_the_instructretro_prompt(plain_tokenizer: HFTokenizer) -> None:
    tok = plain_tokenizer
    assert tok.chat_template is None
    sft = SFTConfig(system=SYSTEM)
    assert sft.chat_template == "auto"
    template = template_of(sft, tok)
    assert template == PromptTemplate(system=SYSTEM)
    record = Record("r", "what colour is the apple?", ["red"], [{"title": "fruit", "text": "the apple is red."}])
    sample, _ = encode_sample(record, template, tok, 96, 1)
    full = tok.encode([render_prompt(record, template, record.contexts)])[0] + tok.encode([" red"])[0] + [tok.eos_id]
    assert sample["tokens"][: len(full) - 1].tolist() == full[:-1]


def test_contexts_are_cut_to_fit_a_chat_template_prompt(workspace: Path) -> None:
    tok = HFTokenizer(Path(load_config(workspace).tokenizer.path))
    template = template_of(SFTConfig(system=SYSTEM), tok)
    assert isinstance(template, ChatPrompt)
    long = " ".join(["the apple is red and the stone is grey."] * 8)
    record = Record("r", "what colour is the stone?", ["grey"], [{"title": f"t{i}", "text": long} for i in range(3)])
    bare = len(tok.encode([template.render(record, [], tok)])[0])
    whole = len(tok.encode([template.render(record, record.contexts, tok)])[0])
    budget = (bare + whole) // 2
    stats: dict = {}
    ids, used = fit_prompt(record, template, tok, record.contexts, budget, stats)
    assert bare < len(ids) <= budget and 0 < len(used) < 3 and stats["context_tokens_cut"] > 0
    assert ids == tok.encode([template.render(record, used, tok)])[0]
    text = tok.decode(ids)
    assert text.startswith("<s><|system|>") and text.endswith("what colour is the stone?<|end|>\n<|assistant|>\n")
    assert fit_prompt(record, template, tok, record.contexts, bare - 1, {}) is None


def test_generation_stops_at_every_end_token_the_model_folder_lists(workspace: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(load_config(workspace).tokenizer.path, tmp_path / "model")
    eos = HFTokenizer(folder).eos_id
    model, p = tiny_model(), prompts()[:1]
    d = gen.Decoding(max_new_tokens=20, temperature=1.0)
    free = gen.generate(model, p, d, eos_id=-1, seeds=[5])[0]
    at = next(i for i in range(2, 20) if free.tokens[i] not in free.tokens[:i])  # a token not seen before
    assert eos not in free.tokens[: at + 1]

    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, free.tokens[at]]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": eos}))
    tok = HFTokenizer(folder)
    assert tok.eos_id == eos and tok.eos_ids == {eos, free.tokens[at]}
    stopped = gen.generate(model, p, d, eos_id=tok.eos_ids, seeds=[5])[0]
    assert stopped.stopped == "eos" and stopped.tokens == free.tokens[:at]
    assert gen.generate(model, p, d, eos_id=eos, seeds=[5])[0].tokens[: at + 1] == free.tokens[: at + 1]

    (folder / "config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(UserError, match=r"config.json: eos_token_id must be a token id"):
        HFTokenizer(folder)


def test_sft_then_generate_through_the_cli_stop_at_the_folders_end_tokens(workspace: Path) -> None:
    sets = ["--set", "sft.train_steps=1", "--set", "sft.save_interval=1", "--set", "sft.eval_interval=1"]
    proc = run_cli("sft", "-c", str(workspace), *sets, env={"OMP_NUM_THREADS": "1"}, check=True)
    assert "prompts written by the tokenizer's chat template" in proc.stdout + proc.stderr

    cfg = load_config(workspace, ["generate.max_new_tokens=4"])
    questions = ["what colour is the apple?", "what colour is the stone?"]
    written = gen.run(cfg, prompts=questions)["answers"]  # the end token of the tokenizer alone
    assert all(a["tokens"] > 0 for a in written), written

    folder = Path(cfg.tokenizer.path)
    every_id = list(range(HFTokenizer(folder).vocab_size))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": every_id}))
    try:
        out = workspace.parent / "answers.jsonl"
        run_cli("generate", "-c", str(workspace), str(workspace.parent / "qa.jsonl"), "--limit", "2", "--out",
                str(out), "--set", "generate.max_new_tokens=4", env={"OMP_NUM_THREADS": "1"}, check=True)
    finally:
        (folder / "generation_config.json").unlink()
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(a["stopped"], a["tokens"], a["prediction"]) for a in answers] == [("eos", 0, "")] * 2
