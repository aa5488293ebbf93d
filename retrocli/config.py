"""The workspace TOML as strict dataclasses.

One dataclass per TOML section; each field's `help` is its documentation (shown by `retro init` in the
commented TOML). Precedence, stated once: `--set section.key=value` > the TOML file > the defaults here.
Unknown sections and keys are errors naming `section.key` and the file.

Who reads what: components inside a stage take their own section (the training loop its [pretrain] or [sft]
keys as `TrainSettings`, the prompt template [sft], a `Decoding` the [generate] keys). The stages themselves
(db build and edit, pretrain, sft, ppl, generate, reproduce) still take the whole `Config`: each reads
several sections (pretraining [db], [model] and [pretrain]; generation [generate], [sft] and [pretrain].run;
ppl the checkpoint's model with [db] and [corpus]), and `cfg.resolve` turns the paths in them into paths
relative to the TOML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, check

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


INT32_MAX = 2**31 - 1  # Faiss and SentencePiece take seeds, nprobe, efSearch and vocabulary sizes as C ints
# The widest neighbour search (neighbours.search_excluding): bounds the memory of the widening search for chunks
# of very long documents, and so db.num_neighbors_query.
MAX_SEARCH_K = 16384


def opt(default: Any, help: str, path: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A config field with its one-line documentation; `path`: its value is a path relative to the TOML file
    (or a list of them), which `retro init` rewrites when it copies a recipe elsewhere; `choices`: the values it
    may take (each item, for a list), checked in one place (`_check_choices`) for every field that has them."""
    meta = {"help": help, "path": path, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class WorkspaceConfig:
    dir: str = opt("runs/default", "folder for every artefact of this workspace, relative to the TOML file",
                   path=True)
    seed: int = opt(1234, "seed for the train/valid split, index-training sample and training")


@dataclass
class CorpusConfig:
    train: list[str] = opt(
        [], "globs of corpus files relative to the TOML file: .txt (one document), .jsonl, .json (+ .gz); "
        "the name 'builtin:tiny' is the small corpus shipped with the package", path=True
    )
    text_key: str = opt("text", "JSON key holding a document's text")
    valid_fraction: float = opt(0.02, "fraction of documents held out (seeded hash of the id) for `retro ppl`")
    on_bad_line: str = opt("error", "'error' stops at the first bad line/file; 'skip' skips it and counts it",
                           choices=("error", "skip"))


@dataclass
class TokenizerConfig:
    type: str = opt("sentencepiece", "'sentencepiece' (trained on the corpus, or loaded) or 'hf' (a local folder)",
                    choices=("sentencepiece", "hf"))
    path: str = opt("", "a tokenizer to load (.model file or HF folder); empty: train SentencePiece on the corpus",
                    path=True)
    vocab_size: int = opt(8000, "vocabulary size when training a tokenizer")
    train_bytes: int = opt(100_000_000, "at most this many bytes of corpus text are used to train the tokenizer")


@dataclass
class DBConfig:
    chunk_length: int = opt(64, "tokens per chunk (RETRO's m)")
    embedder: str = opt(
        "all-MiniLM-L6-v2", "'all-MiniLM-L6-v2' (packaged), a local Hugging Face encoder folder, or 'lexical' "
        "(model-free hashing of word n-grams: thousands of chunks/s, lower recall on paraphrases)", path=True
    )
    embed_batch_size: int = opt(128, "chunks per forward pass of the embedder")
    embed_precision: str = opt("auto", "'auto' (bf16 where it matches fp32 to cosine >= 0.99), 'bf16', 'fp32'",
                               choices=("auto", "bf16", "fp32"))
    index: str = opt(
        "auto", "Faiss index factory string ('Flat', 'IVF1024,SQ8', 'OPQ32_64,IVF65536_HNSW8,PQ32', ...) or 'auto': "
        "exact below 20k chunks, IVF(~4 sqrt n),SQ8 up to 10M, OPQ/IVF-HNSW/PQ32 beyond"
    )
    nprobe: int = opt(64, "IVF lists visited per query")
    ef_search: int = opt(64, "HNSW search depth (efSearch)")
    rerank: int = opt(-1, "N > 0: the index's top N put in exact order by the stored embeddings (db/embed), "
                          "N x dim x 2 bytes read per query; for PQ32 codes of 1-10M chunks recall@10 rises from "
                          "0.34-0.49 to 0.90-0.97 at N = 200 (docs/benchmarks.md); 0: the index's order; "
                          "-1: 200 for PQ indexes, else 0")
    index_train_samples: int = opt(200_000, "embeddings drawn at random (not a prefix) to train the index; -1: 39 "
                                            "per k-means centroid (IVF list, or 256 per PQ sub-quantizer), as "
                                            "Faiss advises, capped by the database's training chunks")
    index_storage: str = opt("memory", "where an IVF index keeps its inverted lists: 'memory' (read whole by every "
                                       "process), 'ondisk' (added block by block, merged into one .ivfdata file "
                                       "that searches map: for databases bigger than memory), or 'auto' (ondisk "
                                       "where the lists would take more than half the available memory; "
                                       "docs/scaling.md)", choices=("memory", "ondisk", "auto"))
    min_chunk_tokens: int = opt(0, "chunks shorter than this (a document's short tail) stay out of the index: a "
                                   "fragment of a few words matches too many queries and carries nothing; "
                                   "0: chunk_length / 4")
    num_neighbors_query: int = opt(20, "neighbours stored per chunk, before sample-level exclusion")
    block_size: int = opt(10_000, "chunks per embedding / neighbour block (the unit of resume)")
    lexical_index: str = opt("none", "'bm25': `retro db build` also builds a BM25 index of the chunks, each with "
                                      "its document's title (bm25s, stemmed), for "
                                      "db.query_mode 'bm25' or 'hybrid'; 'none': no lexical index",
                             choices=("none", "bm25"))
    query_mode: str = opt("dense", "how `retro db query`, `retro db eval` and generate.contexts = 'database' search "
                                   "free texts: 'dense' (the embeddings' index), 'bm25' (needs db.lexical_index "
                                   "'bm25'), or 'hybrid' (both rankings fused, db.fusion); the neighbours Retro "
                                   "reads stay dense", choices=("dense", "bm25", "hybrid"))
    fusion: str = opt("linear", "how db.query_mode 'hybrid' fuses the two rankings: 'linear' (db.hybrid_weight x "
                                "the dense scores + the rest x the BM25 scores, each min-max normalised per "
                                "question) or 'rrf' (reciprocal rank fusion, k = 60)", choices=("linear", "rrf"))
    hybrid_weight: float = opt(0.5, "with db.fusion 'linear': the dense ranking's weight in [0, 1] (BM25 has the "
                                    "rest); 0.5 was chosen on tuning questions (docs/results.md)")


def min_chunk_tokens(d: DBConfig) -> int:
    """db.min_chunk_tokens with 0 resolved."""
    return d.min_chunk_tokens or max(1, d.chunk_length // 4)


@dataclass
class ModelConfig:
    layers: int = opt(6, "decoder layers")
    hidden: int = opt(384, "model width")
    heads: int = opt(6, "attention heads")
    ffn_hidden: int = opt(0, "MLP width; 0: 4 x hidden (gelu) or 8/3 x hidden rounded to 64 (swiglu)")
    seq_length: int = opt(512, "tokens per training sequence (a multiple of db.chunk_length is best)")
    vocab_size: int = opt(0, "0: taken from the workspace tokenizer")
    position: str = opt("rope", "'rope' or 'learned'", choices=("rope", "learned"))
    rotary_percent: float = opt(1.0, "fraction of each head's dimensions rotated by RoPE (843M recipe: 0.5)")
    norm: str = opt("layernorm", "'layernorm' or 'rmsnorm'", choices=("layernorm", "rmsnorm"))
    mlp: str = opt("gelu", "'gelu', 'gelu_tanh' (GELU's tanh approximation, GPT-2) or 'swiglu'",
                   choices=("gelu", "gelu_tanh", "swiglu"))
    dropout: float = opt(0.0, "dropout probability")
    retro_layers: typing.Optional[list[int]] = opt(
        None, "1-based decoder layers with chunked cross-attention; unset: Megatron's "
        "range(6 if layers <= 15 else 9, layers + 1, 3), at least one; [] gives a plain GPT"
    )
    kv_heads: int = opt(0, "key/value heads of the decoder's self-attention (grouped-query attention: a divisor "
                           "of heads); 0: as many as heads")
    head_dim: int = opt(0, "dimensions per attention head; 0: hidden / heads")
    rope_theta: float = opt(10000.0, "RoPE base")
    rope_scaling: str = opt("none", "RoPE frequency scaling for long contexts: 'none', 'linear' (positions divided "
                                    "by rope_factor) or 'llama3' (Llama 3.1's: low frequencies divided by "
                                    "rope_factor, high ones kept, a smooth ramp between)",
                            choices=("none", "linear", "llama3"))
    rope_factor: float = opt(1.0, "RoPE scaling factor (rope_scaling 'linear' or 'llama3')")
    rope_low_freq_factor: float = opt(1.0, "'llama3' scaling: wavelengths above original_length / this are scaled")
    rope_high_freq_factor: float = opt(4.0, "'llama3' scaling: wavelengths below original_length / this are kept")
    rope_original_length: int = opt(8192, "'llama3' scaling: the context length the model was pretrained with")
    max_positions: int = opt(0, "rows of the learned position table (position 'learned'); 0: seq_length")
    sliding_window: int = opt(0, "the decoder's attention window as pretrained (Mistral); 0: none. Sequences are "
                                 "refused beyond it rather than computed with a window retro does not apply")
    tie_embeddings: bool = opt(True, "the LM head is the token embedding matrix; false: a separate lm_head")
    qkv_bias: bool = opt(False, "biases on the decoder's query, key and value projections (Qwen2, GPT-2)")
    out_bias: bool = opt(False, "a bias on the decoder's attention output projection (GPT-2)")
    mlp_bias: bool = opt(False, "biases on the decoder's MLP projections (GPT-2)")
    qk_norm: bool = opt(False, "RMSNorm of each head's queries and keys before RoPE (Qwen3)")
    norm_eps: float = opt(1e-5, "epsilon of every norm")
    retro_gate: float = opt(1.0, "the CCA's output is multiplied by this (Megatron's retro_attention_gate; NVIDIA's "
                                 "InstructRetro models were tuned and evaluated with 0: the decoder alone)")
    encoder_context: str = opt("layer_input", "what the encoder's first layer cross-attends to: 'layer_input' (the "
                                              "states entering the first CCA layer, normed by the encoder) or "
                                              "'cca_query' (that layer's CCA query: after its self-attention and "
                                              "norm_cca, as Megatron's Retro)", choices=("layer_input", "cca_query"))
    retrieval_rope: bool = opt(True, "RoPE in the encoder and the CCA (in the neighbour's frame); false: retrieval "
                                     "without positions, as Megatron's Retro")
    encoder_norm: bool = opt(True, "a final norm after the encoder (Megatron's Retro has none)")
    encoder_layers: int = opt(2, "layers of the bidirectional retrieval encoder")
    num_neighbors: int = opt(2, "neighbours read per chunk (k)")
    retrieved_length: int = opt(0, "tokens per neighbour (r); 0: 2 x db.chunk_length (chunk + continuation)")


def head_dim(m: ModelConfig) -> int:
    """e, the dimensions of one attention head: model.head_dim, or 0 -> hidden / heads."""
    return m.head_dim or m.hidden // max(m.heads, 1)


def kv_heads(m: ModelConfig) -> int:
    """The decoder's key/value heads: model.kv_heads, or 0 -> heads (multi-head attention)."""
    return m.kv_heads or m.heads


def retrieved_length(m: ModelConfig, chunk_length: int) -> int:
    """r, the tokens of each neighbour: model.retrieved_length, or 0 -> 2 x chunk_length (chunk + continuation)."""
    return m.retrieved_length or 2 * chunk_length


@dataclass
class TrainingConfig:
    """The training keys [pretrain] and [sft] share (one loop reads them, as `train.job.TrainSettings`)."""

    micro_batch_size: int = opt(8, "sequences per forward pass on each process")
    global_batch_size: int = opt(32, "sequences per optimizer step, all processes together (a multiple of "
                                     "micro_batch_size x processes; the rest is gradient accumulation)")
    lr: float = opt(3e-4, "peak learning rate (AdamW)")
    min_lr: float = opt(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = opt(100, "steps of linear warmup from 0 to lr")
    decay: str = opt("cosine", "learning-rate decay after warmup: 'cosine', 'linear' or 'constant'",
                     choices=("cosine", "linear", "constant"))
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only; not norms, biases or embeddings)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0: no clipping")
    train_steps: int = opt(1000, "optimizer steps in total (a resumed run continues up to this)")
    train_tokens: int = opt(0, "if > 0: train on this many tokens instead of train_steps (steps = "
                               "ceil(train_tokens / (global_batch_size x model.seq_length)))")
    eval_interval: int = opt(100, "evaluate on the validation documents every this many steps (and at the end)")
    eval_steps: int = opt(10, "batches of global_batch_size validation sequences in each evaluation")
    save_interval: int = opt(500, "write a checkpoint every this many steps (and at the end)")
    keep_last: int = opt(3, "checkpoints kept (older ones are deleted); 0: keep all")
    precision: str = opt("fp32", "'fp32' or 'bf16' (autocast; weights and optimizer stay fp32); bf16 pays off on "
                         "GPUs and on CPUs with AVX-512 BF16 or AMX (1.6x faster Retro steps on a Zen 4)",
                         choices=("fp32", "bf16"))
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "recompute each decoder and encoder layer's activations in the "
                                                "backward pass instead of keeping them: about a third more compute "
                                                "for activation memory of one layer instead of all (large models, "
                                                "long sequences)")
    fsdp: bool = opt(False, "with several processes ([launch]): shard parameters, gradients and optimizer state "
                            "across them (FSDP) instead of replicating them (DDP), for models that do not fit one "
                            "device; checkpoints are then written as shards, one per process, and load into any "
                            "number of processes")
    resume: str = opt("auto", "'auto': continue from the latest complete checkpoint of the run if there is one; "
                              "'never': start fresh (an error if the run already has checkpoints)",
                      choices=("auto", "never"))
    tensorboard: bool = opt(False, "also write the metrics of metrics.jsonl as TensorBoard events in the run's "
                                   "tensorboard/ folder (`tensorboard --logdir WORKSPACE/checkpoints`); needs "
                                   "`pip install 'retrocli[tensorboard]'`")


@dataclass
class PretrainConfig(TrainingConfig):
    init_from: str = opt("", "start from this checkpoint folder (GPT or Retro; a GPT's CCA and encoder weights "
                             "start fresh, no optimizer state: retro-fitting); empty: random init", path=True)
    freeze_decoder: bool = opt(False, "train only the retrieval encoder and CCA; the decoder keeps the weights of "
                                      "init_from (RETRO's retrofitting of a pretrained GPT, Borgeaud et al. §4.4)")
    copy_warmup_steps: int = opt(0, "train the first this many steps on copy windows only (random token ids "
                                    "repeated with a random period, and neighbours that hold the continuation): "
                                    "a small model forms the copy circuit there, which text alone does not teach "
                                    "it at CPU scale (retrocli/train/curriculum.py)")
    copy_share: float = opt(0.0, "after copy_warmup_steps, this share of the training samples are copy windows "
                                 "(keeps the circuit while text trains the rest)")
    run: str = opt("pretrain", "name of this training run: checkpoints in WORKSPACE/checkpoints/RUN/ (e.g. 'gpt' "
                               "for a baseline with model.retro_layers = [] beside the Retro run)")


SFT_FORMATS = ("squad", "qed", "nq", "instructretro", "chat", "self_instruct", "qa")


@dataclass
class BlendEntry:
    name: str = opt("", "dataset name, for tables and per-dataset eval loss")
    path: str = opt("", "the file, relative to the TOML (.gz accepted)", path=True)
    format: str = opt("", "'squad', 'qed', 'nq', 'instructretro', 'chat', 'self_instruct' or 'qa'", choices=SFT_FORMATS)
    weight: float = opt(1.0, "sampling weight: probability = weight / sum of weights")


INSTRUCTRETRO_SYSTEM = ("System: This is a chat between a user and an artificial intelligence assistant. The "
                        "assistant gives helpful, detailed, and polite answers to the user's questions based on the "
                        "context. The assistant should also indicate when the answer cannot be found in the context.")


@dataclass
class SFTConfig(TrainingConfig):
    blend: list[BlendEntry] = opt([], "the datasets, one [[sft.blend]] table each (name, path, format, weight)")
    neighbors: str = opt("none", "retrieval during SFT: 'none' (encoder gated off, InstructRetro), 'context' "
                                 "(the sample's own contexts as neighbours) or 'database' (retrieved per chunk)",
                         choices=("none", "context", "database"))
    num_contexts: int = opt(5, "contexts put in the prompt (the first ones of the record)")
    valid_fraction: float = opt(0.05, "records of each dataset held out for eval loss (whole SQuAD articles)")
    on_bad_record: str = opt("error", "'error': stop at a malformed record, naming file and line; 'skip': count it",
                             choices=("error", "skip"))
    system: str = opt(INSTRUCTRETRO_SYSTEM, "the system line that opens every prompt")
    context_template: str = opt("title: {title}, source: {text}", "how each context is written in the prompt")
    user_template: str = opt("User: {question}\n\nAssistant:", "the user turn; the answer follows it")
    chat_template: str = opt("auto", "'auto': a Hugging Face tokenizer's own chat template writes the prompt when "
                                     "it has one (system, contexts and question as the user turn); 'never': always "
                                     "the templates above (InstructRetro's prompt)", choices=("auto", "never"))
    init_from: str = opt("", "the checkpoint to fine-tune; empty: the latest complete checkpoint of the "
                             "pretraining run (pretrain.run)", path=True)
    run: str = opt("sft", "name of this run: checkpoints in WORKSPACE/checkpoints/RUN/")
    # InstructRetro's SFT: lr 5e-6, beta2 0.98, weight decay 0.01, 1000 steps of 128
    lr: float = opt(5e-6, "peak learning rate (AdamW)")
    min_lr: float = opt(5e-7, "learning rate at the end of the decay")
    warmup_steps: int = opt(10, "steps of linear warmup from 0 to lr")
    adam_beta2: float = opt(0.98, "AdamW beta2")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only)")
    global_batch_size: int = opt(128, "sequences per optimizer step, all processes together")
    train_steps: int = opt(1000, "optimizer steps in total")


GENERATE_CONTEXTS = ("file", "database", "none")
GENERATE_NEIGHBORS = ("auto", "database", "context", "none")


@dataclass
class GenerateConfig:
    checkpoint: str = opt("", "the checkpoint to answer with (a step folder or a run folder); empty: the latest "
                              "complete checkpoint of the SFT run (sft.run), else of the pretraining run",
                    path=True)
    contexts: str = opt("file", "contexts in the prompt: 'file' (the task file's own paragraphs / ctxs), "
                                "'database' (retrieved with the question as the query: open-domain QA) or "
                                "'none' (closed book)", choices=GENERATE_CONTEXTS)
    num_contexts: int = opt(5, "contexts put in the prompt (cut to fit the sequence; answers keep their room)")
    neighbors: str = opt("auto", "the CCA's neighbours while writing: 'database' (each chunk's nearest database "
                                 "chunks, retrieved again whenever the text crosses a chunk boundary), 'context' "
                                 "(the prompt's contexts), 'none' (CCA off); 'auto': as the checkpoint was trained",
                         choices=GENERATE_NEIGHBORS)
    max_new_tokens: int = opt(64, "tokens generated at most per answer")
    temperature: float = opt(0.0, "0: greedy; > 0: sample from softmax(logits / temperature)")
    top_k: int = opt(0, "sample from the k most likely tokens only; 0: all")
    top_p: float = opt(1.0, "sample from the smallest set of tokens whose probability reaches top_p")
    stop: list[str] = opt([], "strings that end an answer (cut before them); the end-of-sequence token always does")
    batch_size: int = opt(8, "questions decoded together (left-padded)")
    cache: bool = opt(True, "keep keys and values between tokens (KV cache); false: recompute the whole "
                            "sequence for every token (slow; for comparison)")
    precision: str = opt("fp32", "'fp32' or 'bf16' (autocast)", choices=("fp32", "bf16"))
    user_template: str = opt("", "the user turn of the prompt, with {question}; empty: sft.user_template")


@dataclass
class ReproduceConfig:
    baseline: bool = opt(True, "also train and instruction-tune the GPT of the identical decoder (runs 'gpt' and "
                               "'sft-gpt', model.retro_layers = []): every claim is measured against it")
    sft: bool = opt(True, "run instruction tuning ([[sft.blend]]) and the QA stages after pretraining")
    qa_task: str = opt("", "the QA file answered and scored after SFT (relative to this file, or "
                           "'builtin:tiny-cloze-test'); empty: no QA stages", path=True)
    qa_limit: int = opt(0, "answer the first qa_limit questions of qa_task; 0: all")
    contexts: list[str] = opt(["file", "database", "none"], "generate.contexts modes answered and scored",
                              choices=GENERATE_CONTEXTS)
    ppl_data: list[str] = opt([], "more held-out text files for `retro ppl --data` (relative to this file)",
                              path=True)
    showcase: bool = opt(False, "end with what a run on builtin:tiny does show, on the terminal and in report.md: "
                                "`db query` answers with their sources, a fact added and removed again (`db add` / "
                                "`db remove`), Retro's perplexity with and without retrieval against the GPT (+- the "
                                "standard error of the paired per-token difference)")


@dataclass
class LaunchConfig:
    nproc_per_node: int = opt(1, "processes per machine; > 1 (or nnodes > 1): `retro pretrain` starts itself "
                                 "through torchrun (one per GPU; gloo on CPU)")
    nnodes: int = opt(1, "machines in the job (run the same command on each, with its own node_rank)")
    node_rank: int = opt(0, "this machine's rank, 0..nnodes-1")
    master_addr: str = opt("127.0.0.1", "address of the node_rank 0 machine, reachable from every node")
    master_port: int = opt(29500, "a free TCP port on the master")
    rdzv_endpoint: str = opt("", "host:port of a c10d rendezvous (elastic multi-node: torchrun assigns node ranks, "
                                 "launch.node_rank / master_addr / master_port are then unused); empty: static")
    rdzv_id: str = opt("retro", "the job's id at the rendezvous: the same on every node, another for each job")
    backend: str = opt("auto", "process-group backend: 'auto' (nccl on GPUs, gloo on CPUs), 'nccl' or 'gloo'",
                       choices=("auto", "nccl", "gloo"))


# Sections of earlier versions that never had a key: a file that still has one empty (`retro init` and every
# checkpoint's config.toml wrote `[score]`) loads as before; a key in one is an unknown section.
RETIRED_SECTIONS = ("score",)

SECTIONS: dict[str, type] = {
    "workspace": WorkspaceConfig,
    "corpus": CorpusConfig,
    "tokenizer": TokenizerConfig,
    "db": DBConfig,
    "model": ModelConfig,
    "pretrain": PretrainConfig,
    "sft": SFTConfig,
    "generate": GenerateConfig,
    "reproduce": ReproduceConfig,
    "launch": LaunchConfig,
}


@dataclass
class Config:
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    db: DBConfig = field(default_factory=DBConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reproduce: ReproduceConfig = field(default_factory=ReproduceConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    source: Path = Path("retro.toml")
    """The TOML file this came from; relative paths in it are relative to its folder."""
    origins: dict[str, str] = field(default_factory=dict)
    """Where each key given was set, by `section.key`: the file that set it (the TOML or a file it `extends`), or
    `--set`. A key not in it has its default."""

    @property
    def base_dir(self) -> Path:
        return self.source.resolve().parent

    def resolve(self, path: str) -> Path:
        """A path written in the TOML, relative to the TOML file's folder."""
        expanded = os.path.expanduser(path)
        if expanded.startswith("~"):  # (Path.expanduser raises a RuntimeError)
            raise UserError(f"{self.source}: the path {path!r} starts with {path.split('/')[0]!r}, but there is no "
                            "such user's home folder")
        p = Path(expanded)
        return p if p.is_absolute() else self.base_dir / p

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


# ----------------------------------------------------------------------------------------------- loading


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if tp is float:  # an integer only where a float holds it exactly
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and abs(value) <= 2**53)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _bad_scalar(value: Any) -> str | None:
    """What is wrong with a value of the right type that no stage can use, or None: an integer beyond 64 bits
    (TOML's own limit; numpy and torch overflow), NaN or infinity (every comparison with NaN is false, so it
    would pass the range checks), a NUL character (no path or file can hold one)."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
            return f"must fit in a 64-bit integer, got {v}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v}"
        if isinstance(v, str) and "\x00" in v:
            return f"must not contain a NUL character (\\u0000), got {v!r}"
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item,
                                                                                                     str(item))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _table_type(tp: Any) -> type | None:
    """The dataclass of a `list[SomeDataclass]` field (an array of TOML tables), else None."""
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):
            return item
    return None


def _origin(origins: dict[str, str], dotted: str, default: str) -> str:
    """Where a key's value came from, as an error message says it: `in FILE` or `given by --set`."""
    src = origins.get(dotted, default)
    return "given by --set" if src == SET else f"in {src}"


def _did_you_mean(word: str, known: typing.Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _build_section(name: str, cls: type, values: dict[str, Any], where: str, problems: list[str],
                   origins: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        origin = _origin(origins, name.split("[")[0] if "[" in name else f"{name}.{key}", where)
        if key not in known:
            close = _did_you_mean(key, known)
            if close:
                hint = f": did you mean '{name}.{close}'?"
            else:
                hint = f" (known keys: {', '.join(sorted(known))})" if known else " (this section has no keys yet)"
            problems.append(f"unknown key '{name}.{key}' {origin}{hint}")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and hints[key] is float and abs(value) <= 2**53:
            value = float(value)  # exactly: a larger integer stays one and is named (a float would round it)
        table = _table_type(hints[key])
        if table is not None:  # an array of tables ([[sft.blend]]): each one built and checked like a section
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(f"'{name}.{key}' must be a list of tables ([[{name}.{key}]]), got {value!r} "
                                f"({origin})")
                continue
            kwargs[key] = [_build_section(f"{name}.{key}[{i}]", table, v, where, problems, origins)
                           for i, v in enumerate(value)]
            continue
        if not _type_ok(value, hints[key]):
            hint = ""
            if typing.get_origin(hints[key]) is list and not isinstance(value, list) and origin == "given by --set":
                hint = f"; write a TOML list: --set {name}.{key}='{_toml_value([value])}'"
            problems.append(f"'{name}.{key}' must be {_type_name(hints[key])}, got {value!r} ({origin}){hint}")
            continue
        bad = _bad_scalar(value)
        if bad:
            problems.append(f"'{name}.{key}' {bad} ({origin})")
            continue
        kwargs[key] = value
    return cls(**kwargs)


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as TOML, else taken as a string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set db.nprobe=32 (one --set for each "
                        "value)")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML (TOMLDecodeError), an integer of 4,300+ digits, deep nesting
        value = raw
    return section, key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a workspace TOML, apply `--set` overrides, and validate everything, reporting all problems at once."""
    source = Path(path) if path is not None else Path("retro.toml")
    if not source.is_file():
        how = "pass -c/--config PATH" if path is None else "check the path"
        raise UserError(f"workspace file {source} not found: {how}, or create one with `retro init DIR`")
    origins: dict[str, str] = {}
    data = _expand_env(_read_with_extends(source, [], origins), source)
    return config_from_dict(data, overrides, source, origins)


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(data: Any, source: Path, where: str = "") -> Any:
    """`${NAME}` and `${NAME:-default}` in string values, from the environment (e.g. a recipe's
    `${DATA_DIR:-../../shared/data}/corpus/...`, so that `DATA_DIR=/my/copy retro ...` points it elsewhere)."""
    if isinstance(data, dict):
        return {k: _expand_env(v, source, f"{where}.{k}" if where else k) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, source, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def value(m: re.Match) -> str:
        found = os.environ.get(m.group(1))
        if found is None and m.group(2) is None:
            raise UserError(f"{source}: {where} uses ${{{m.group(1)}}}, which is not set in the environment (set it, "
                            f"or write ${{{m.group(1)}:-default}})")
        return found if found is not None else m.group(2)

    return _ENV_VAR.sub(value, data)


def _read_with_extends(source: Path, chain: list[Path], origins: dict[str, str]) -> dict[str, Any]:
    """The TOML of `source`; a top-level `extends = "base.toml"` (relative to it) starts from that file's
    sections and replaces them key by key (an array of tables as a whole). Paths written in the base file
    are read relative to the extending file, so keep both in one folder (as recipes/ does)."""
    if source.resolve() in chain:
        raise UserError(f"{source}: `extends` makes a cycle: " + " -> ".join(str(p) for p in chain + [source]))
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{source} is not valid TOML: {e}") from None
    except ValueError:  # Python's own limit on int(): TOML integers have 64 bits, so the file is wrong anyway
        raise UserError(f"{source} is not valid TOML: an integer of more than 4,300 digits") from None
    except RecursionError:
        raise UserError(f"{source} is not valid TOML: arrays or tables nested too deeply") from None
    base = data.pop("extends", None)
    for name, values in data.items():  # this file sets these keys (an extending file then replaces some)
        for key in values if isinstance(values, dict) else [""]:
            origins[f"{name}.{key}" if key else name] = str(source)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"{source}: `extends` must be a path (a string), got {base!r}")
    base_path = source.parent / base
    if not base_path.is_file():
        raise UserError(f"{source}: extends {base!r}, but {base_path} "
                        + ("is a folder" if base_path.is_dir() else "does not exist"))
    origins_here = dict(origins)
    merged = _read_with_extends(base_path, chain + [source.resolve()], origins)
    origins.update(origins_here)  # the extending file's keys win
    for name, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **values}
        else:
            merged[name] = values
    return merged


SET = "--set"  # the origin of a value given on the command line


def config_from_dict(data: dict[str, Any], overrides: list[str] = (), source: Path = Path("retro.toml"),
                     origins: dict[str, str] | None = None) -> Config:
    problems: list[str] = []
    origins = dict(origins or {})
    for item in overrides:
        section, key, value = parse_override(item)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise UserError(f"--set {item!r}: [{section}] is not a section")
        data[section][key] = value
        origins[f"{section}.{key}"] = SET
    sections = {}
    for name, values in data.items():
        if name in RETIRED_SECTIONS and values == {}:
            continue
        if name not in SECTIONS:
            close = _did_you_mean(name, SECTIONS)
            hint = f": did you mean [{close}]?" if close else f" (known: {', '.join(SECTIONS)})"
            where = _origin(origins, next((k for k in origins if k.startswith(f"{name}.") or k == name), name),
                            str(source))
            problems.append(f"unknown section [{name}] {where}{hint}")
            continue
        if not isinstance(values, dict):
            problems.append(f"'{name}' must be a [section] table in {source}")
            continue
        sections[name] = _build_section(name, SECTIONS[name], values, str(source), problems, origins)
    check(problems, "invalid workspace configuration")
    cfg = Config(**sections, source=source, origins=origins)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field and range checks, all collected before raising."""
    p: list[str] = []
    c, t, d, m = cfg.corpus, cfg.tokenizer, cfg.db, cfg.model
    for name in SECTIONS:
        _check_choices(name, getattr(cfg, name), p)
    if not 0 <= cfg.workspace.seed <= INT32_MAX:
        p.append(f"workspace.seed must be in 0..{INT32_MAX} (Faiss takes a 32-bit seed), got {cfg.workspace.seed}")
    _validate_paths(cfg, p)
    if not 0.0 <= c.valid_fraction < 1.0:
        p.append(f"corpus.valid_fraction must be in [0, 1), got {c.valid_fraction}")
    if t.type == "hf" and not t.path:
        p.append("tokenizer.type = 'hf' needs tokenizer.path (a local Hugging Face tokenizer folder)")
    if not 100 <= t.vocab_size <= INT32_MAX:
        p.append(f"tokenizer.vocab_size must be in 100..{INT32_MAX}, got {t.vocab_size}")
    if t.train_bytes <= 0:
        p.append(f"tokenizer.train_bytes must be positive, got {t.train_bytes}")
    if d.chunk_length < 1:
        p.append(f"db.chunk_length must be positive, got {d.chunk_length}")
    for key in ("embed_batch_size", "nprobe", "ef_search", "block_size"):
        if getattr(d, key) < 1:
            p.append(f"db.{key} must be positive, got {getattr(d, key)}")
    if d.index_storage == "ondisk" and d.index != "auto" and not any(
            part.strip().startswith(("IVF", "IMI")) for part in d.index.split(",")):
        p.append(f"db.index_storage = 'ondisk' keeps an IVF index's inverted lists on disk, but db.index {d.index!r} "
                 "has none: use an IVF index (e.g. 'IVF4096,SQ8', 'IVF65536_HNSW32,PQ32') or db.index_storage "
                 "'memory' or 'auto'")
    if d.index_train_samples < 1 and d.index_train_samples != -1:
        p.append(f"db.index_train_samples must be positive, or -1 (39 per centroid), got {d.index_train_samples}")
    if d.chunk_length >= 1 and not 0 <= d.min_chunk_tokens <= d.chunk_length:
        p.append(f"db.min_chunk_tokens must be in 0..db.chunk_length ({d.chunk_length}), got {d.min_chunk_tokens}")
    for key in ("nprobe", "ef_search"):
        if getattr(d, key) > INT32_MAX:
            p.append(f"db.{key} must be at most {INT32_MAX} (Faiss takes a C int), got {getattr(d, key)}")
    if not -1 <= d.rerank <= MAX_SEARCH_K:
        p.append(f"db.rerank must be -1 (auto) or in 0..{MAX_SEARCH_K} (the widest search), got {d.rerank}")
    if not 0.0 <= d.hybrid_weight <= 1.0:
        p.append(f"db.hybrid_weight must be in [0, 1] (the dense ranking's share), got {d.hybrid_weight}")
    if d.num_neighbors_query > MAX_SEARCH_K:
        p.append(f"db.num_neighbors_query must be at most {MAX_SEARCH_K} (the widest search), "
                 f"got {d.num_neighbors_query}")
    for key in ("layers", "hidden", "heads", "seq_length", "encoder_layers", "num_neighbors"):
        if getattr(m, key) < 1:
            p.append(f"model.{key} must be positive, got {getattr(m, key)}")
    for key in ("vocab_size", "ffn_hidden", "retrieved_length"):
        if getattr(m, key) < 0:
            p.append(f"model.{key} must be >= 0 (0: derived), got {getattr(m, key)}")
    for key in ("kv_heads", "head_dim", "max_positions", "sliding_window"):
        if getattr(m, key) < 0:
            p.append(f"model.{key} must be >= 0 (0: derived or none), got {getattr(m, key)}")
    if m.heads >= 1 and m.head_dim == 0 and m.hidden % m.heads:
        p.append(f"model.hidden ({m.hidden}) must be divisible by model.heads ({m.heads}), or set model.head_dim")
    if m.kv_heads > 0 and m.heads >= 1 and m.heads % m.kv_heads:
        p.append(f"model.heads ({m.heads}) must be a multiple of model.kv_heads ({m.kv_heads})")
    if m.sliding_window > 0 and m.seq_length > m.sliding_window:
        p.append(f"model.seq_length ({m.seq_length}) exceeds the model's sliding attention window "
                 f"(model.sliding_window {m.sliding_window}), which retro does not apply: use a seq_length of at "
                 f"most {m.sliding_window}")
    if m.position == "learned" and m.max_positions and m.seq_length > m.max_positions:
        p.append(f"model.seq_length ({m.seq_length}) exceeds the learned positions (model.max_positions "
                 f"{m.max_positions})")
    if m.rope_theta <= 0 or m.norm_eps <= 0 or m.rope_factor <= 0:
        p.append("model.rope_theta, model.rope_factor and model.norm_eps must be positive, got "
                 f"{m.rope_theta}, {m.rope_factor}, {m.norm_eps}")
    if not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout must be in [0, 1), got {m.dropout}")
    if not 0.0 < m.rotary_percent <= 1.0:
        p.append(f"model.rotary_percent must be in (0, 1], got {m.rotary_percent}")
    elif m.position == "rope" and m.heads >= 1 and int(head_dim(m) * m.rotary_percent) // 2 * 2 == 0:
        p.append(f"model.rotary_percent {m.rotary_percent} rotates no dimension of a head of size "
                 f"{head_dim(m)} (model.head_dim, or model.hidden / model.heads)")
    if m.retro_layers is not None and any(not 1 <= i <= m.layers for i in m.retro_layers):
        p.append(f"model.retro_layers {m.retro_layers} must lie in 1..{m.layers} (model.layers)")
    if m.num_neighbors > d.num_neighbors_query:
        p.append(f"model.num_neighbors ({m.num_neighbors}) exceeds db.num_neighbors_query ({d.num_neighbors_query})")
    _validate_training("pretrain", cfg.pretrain, p)
    if cfg.pretrain.copy_warmup_steps < 0:
        p.append(f"pretrain.copy_warmup_steps must be >= 0, got {cfg.pretrain.copy_warmup_steps}")
    if not 0 <= cfg.pretrain.copy_share < 1:
        p.append(f"pretrain.copy_share must be in [0, 1), got {cfg.pretrain.copy_share}")
    _validate_training("sft", cfg.sft, p)
    _validate_sft(cfg.sft, p)
    _validate_generate(cfg.generate, p)
    _validate_reproduce(cfg.reproduce, p)
    lc = cfg.launch
    for key in ("nproc_per_node", "nnodes"):
        if getattr(lc, key) < 1:
            p.append(f"launch.{key} must be positive, got {getattr(lc, key)}")
    if not 0 <= lc.node_rank < max(lc.nnodes, 1):
        p.append(f"launch.node_rank must be in 0..launch.nnodes-1 ({lc.nnodes - 1}), got {lc.node_rank}")
    if not 1 <= lc.master_port <= 65535:
        p.append(f"launch.master_port must be a TCP port (1..65535), got {lc.master_port}")
    if lc.rdzv_endpoint and not re.fullmatch(r"[^\s:]+:\d{1,5}", lc.rdzv_endpoint):
        p.append(f"launch.rdzv_endpoint must be HOST:PORT, got {lc.rdzv_endpoint!r}")
    check([_with_origin(cfg, problem) for problem in p], "invalid values")


_DOTTED_KEY = re.compile(r"\b([a-z]+)\.([a-z_]+)\b")


def _with_origin(cfg: Config, problem: str) -> str:
    """A value check's message with where its keys were set: `(given by --set)` when any of them was, else the
    file that set one, else `(the defaults)`."""
    keys = [f"{s}.{k}" for s, k in _DOTTED_KEY.findall(problem) if s in SECTIONS]
    given = sorted((k for k in keys if k in cfg.origins), key=lambda k: cfg.origins[k] != SET)  # --set first
    if given:
        return f"{problem} ({_origin(cfg.origins, given[0], str(cfg.source))})"
    return f"{problem} ({'the defaults' if keys else f'in {cfg.source}'})"


def _validate_paths(cfg: Config, p: list[str]) -> None:
    """The paths whose misuse the filesystem would only report deep inside a stage. A workspace.dir outside the
    TOML's folder is allowed (runs often live on another disk); one that is, or lies under, a file is not."""
    root = _resolved(cfg, "workspace.dir", cfg.workspace.dir, p)
    tok = _resolved(cfg, "tokenizer.path", cfg.tokenizer.path, p) if cfg.tokenizer.path else None
    try:
        existing = next((a for a in (root, *root.parents) if a.exists()), None) if root is not None else None
        tok_is_folder = tok is not None and tok.is_dir()
    except OSError:  # a folder this user may not look into: the stage that uses the path reports it
        return
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == root else f"lies under {existing}, which is a file"
        p.append(f"workspace.dir {root} {where}: it must be a folder (or not exist yet)")
    if tok_is_folder and cfg.tokenizer.type == "sentencepiece":
        p.append(f"tokenizer.path {tok} is a folder: tokenizer.type = 'sentencepiece' loads a .model file (set "
                 "tokenizer.type = 'hf' for a Hugging Face tokenizer folder)")


def _resolved(cfg: Config, key: str, value: str, p: list[str]) -> Path | None:
    try:
        return cfg.resolve(value)
    except UserError as e:
        p.append(f"{key}: {e}")
        return None


def _one_of(choices: tuple[str, ...]) -> str:
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


def _check_choices(where: str, section: Any, p: list[str]) -> None:
    """Every field declared with `choices` holds one of them (each item, for a list), with the nearest one
    suggested; arrays of tables ([[sft.blend]]) are checked entry by entry."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                named = f" ({item.name})" if getattr(item, "name", "") else ""  # [[sft.blend]] entries by name
                _check_choices(f"{where}.{f.name}[{i}]{named}", item, p)
            continue
        choices = f.metadata.get("choices")
        if not choices:
            continue
        for v in value if isinstance(value, list) else [value]:
            if v not in choices:
                close = _did_you_mean(str(v), choices)
                hint = f" (did you mean {close!r}?)" if close else ""
                p.append(f"{where}.{f.name} must be {_one_of(choices)}, got {v!r}{hint}")


def _validate_reproduce(r: ReproduceConfig, p: list[str]) -> None:
    if r.qa_limit < 0:
        p.append(f"reproduce.qa_limit must be >= 0 (0: all), got {r.qa_limit}")


def _validate_generate(g: GenerateConfig, p: list[str]) -> None:
    for key in ("max_new_tokens", "batch_size"):
        if getattr(g, key) < 1:
            p.append(f"generate.{key} must be positive, got {getattr(g, key)}")
    if g.num_contexts < 0 or g.top_k < 0:
        p.append(f"generate.num_contexts and generate.top_k must be >= 0, got {g.num_contexts} and {g.top_k}")
    if not g.temperature >= 0.0:
        p.append(f"generate.temperature must be >= 0 (0: greedy), got {g.temperature}")
    if not 0.0 < g.top_p <= 1.0:
        p.append(f"generate.top_p must be in (0, 1], got {g.top_p}")
    if any(not s for s in g.stop):
        p.append("generate.stop must not contain an empty string")


def _validate_training(name: str, t: PretrainConfig | SFTConfig, p: list[str]) -> None:
    for key in ("micro_batch_size", "global_batch_size", "train_steps", "eval_interval", "eval_steps",
                "save_interval"):
        if getattr(t, key) < 1:
            p.append(f"{name}.{key} must be positive, got {getattr(t, key)}")
    if t.micro_batch_size >= 1 and t.global_batch_size % t.micro_batch_size:
        p.append(f"{name}.global_batch_size ({t.global_batch_size}) must be a multiple of "
                 f"{name}.micro_batch_size ({t.micro_batch_size})")
    if t.lr <= 0:
        p.append(f"{name}.lr must be positive, got {t.lr}")
    if not 0 <= t.min_lr <= t.lr:
        p.append(f"{name}.min_lr must be in [0, {name}.lr], got {t.min_lr}")
    for key in ("warmup_steps", "keep_last", "train_tokens"):
        if getattr(t, key) < 0:
            p.append(f"{name}.{key} must be >= 0, got {getattr(t, key)}")
    if t.weight_decay < 0:
        p.append(f"{name}.weight_decay must be >= 0, got {t.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, key) < 1:
            p.append(f"{name}.{key} must be in [0, 1), got {getattr(t, key)}")
    if t.grad_clip < 0:
        p.append(f"{name}.grad_clip must be >= 0, got {t.grad_clip}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t.run):
        p.append(f"{name}.run must be a plain folder name (letters, digits, '_', '.', '-'), got {t.run!r}")


# ------------------------------------------------------------------------------------ commented TOML out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a TOML basic string: the escapes JSON writes are valid TOML
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_commented_toml(cfg: Config, header: str = "") -> str:
    """The resolved configuration as TOML with every key documented (for `retro init`, checkpoints, reports)."""
    lines = [header.rstrip()] if header else []
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        fields = dataclasses.fields(cls)
        lines.append(f"\n[{name}]")
        if not fields:
            lines.append("# (filled by later versions)")
        tables = []
        for f in fields:
            value = getattr(section, f.name)
            table = _table_type(f.type if not isinstance(f.type, str) else typing.get_type_hints(cls)[f.name])
            if table is not None:
                tables.append((f, table, value))
                continue
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"# {f.name} =  (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
        for f, table, items in tables:  # arrays of tables last: TOML puts no plain key after them
            lines.append(f"# {f.metadata['help']}")
            for item in items or [table()]:
                lines.append(f"{'' if items else '# '}[[{name}.{f.name}]]")
                for g in dataclasses.fields(table):
                    lines.append(f"{'' if items else '# '}{g.name} = {_toml_value(getattr(item, g.name))}"
                                 f"  # {g.metadata['help']}")
    return "\n".join(lines).lstrip("\n") + "\n"


def to_annotated_toml(cfg: Config) -> str:
    """The resolved configuration as TOML, each value followed by where it came from (`retro config show`): its
    default, the TOML file, a file it `extends`, or `--set`."""

    def origin(dotted: str) -> str:
        src = cfg.origins.get(dotted)
        if src is None:
            return "default"
        if src == SET:
            return SET
        return "file" if Path(src) == cfg.source else f"extends {src}"

    lines = [f"# {cfg.source}, as `retro` reads it (precedence: --set > the file > a file it extends > defaults)"]
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        lines.append(f"\n[{name}]")
        tables = []
        for f in dataclasses.fields(cls):
            value = getattr(section, f.name)
            if _table_type(typing.get_type_hints(cls)[f.name]) is not None:
                tables.append((f, value))
                continue
            line = f"{f.name} = {_toml_value(value)}" if value is not None else f"# {f.name} = (unset)"
            lines.append(f"{line}  # {origin(f'{name}.{f.name}')}")
        for f, items in tables:  # arrays of tables last: TOML puts no plain key after them
            lines.append(f"# [[{name}.{f.name}]]: {origin(f'{name}.{f.name}')}")
            for item in items:
                lines.append(f"[[{name}.{f.name}]]")
                lines += [f"{g.name} = {_toml_value(getattr(item, g.name))}" for g in dataclasses.fields(item)]
    return "\n".join(lines) + "\n"


def rebase_paths(cfg: Config, base: Path) -> None:
    """Rewrite the relative paths of `cfg` (the fields declared with `path=True`) as absolute ones, so that the
    configuration means the same when written to a TOML file in another folder (`retro init`). Names that are
    not paths stay: `builtin:...`, and an embedder name that is no folder beside the TOML."""

    def fix(value: str, must_exist: bool = False) -> str:
        if not value or value.startswith("builtin:") or Path(os.path.expanduser(value)).is_absolute():
            return value
        full = base / value
        return str(full) if not must_exist or full.exists() else value

    def walk(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                for item in value:
                    walk(item)
            elif f.metadata.get("path"):
                exists_only = f.name == "embedder"  # a packaged model's name, or a local folder
                setattr(obj, f.name, [fix(v) for v in value] if isinstance(value, list) else fix(value, exists_only))

    for name in SECTIONS:
        walk(getattr(cfg, name))


def _validate_sft(t: SFTConfig, p: list[str]) -> None:
    if t.num_contexts < 0:
        p.append(f"sft.num_contexts must be >= 0, got {t.num_contexts}")
    if not 0.0 <= t.valid_fraction < 1.0:
        p.append(f"sft.valid_fraction must be in [0, 1), got {t.valid_fraction}")
    if "{question}" not in t.user_template:
        p.append(f"sft.user_template must contain {{question}}, got {t.user_template!r}")
    names = [e.name for e in t.blend]
    for i, e in enumerate(t.blend):
        where = f"sft.blend[{i}]" + (f" ({e.name})" if e.name else "")
        if not e.name:
            p.append(f"{where}.name is missing")
        elif names.count(e.name) > 1:
            p.append(f"{where}.name {e.name!r} is used twice")
        if not e.path:
            p.append(f"{where}.path is missing")
        if not e.weight > 0:
            p.append(f"{where}.weight must be positive, got {e.weight}")
