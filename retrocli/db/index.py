"""Embeddings -> a trained Faiss index holding every training chunk (Faiss id = chunk row).

The index is built from `db.index`, any Faiss factory string ("Flat", "IVF1024,SQ8",
"OPQ32_64,IVF65536_HNSW8,PQ32"), trained on a seeded random sample of the training chunks' embeddings (not a
prefix: the first chunks of a corpus are rarely representative), then filled block by block. Vectors are
normalised and compared by inner product (cosine similarity), so a chunk with an all-zero embedding (no
words, for the lexical embedder) is never closer than a related one. Training runs on the GPU when faiss
has one.
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from ..errors import UserError
from ..workspace import atomic_path


def auto_spec(num_vectors: int) -> str:
    """The index `db.index = "auto"` builds for a database of this many chunks, chosen by measurement
    (docs/benchmarks.md): exact search while it is cheap; then IVF with ~4 sqrt(n) lists (at least 39
    training vectors per list) and 8-bit scalar quantisation, which keeps recall@10 >= 0.9 on MiniLM
    embeddings where PQ32 loses half of it; beyond 10 M chunks, OPQ + PQ32 codes (40 B a chunk) with an
    HNSW coarse quantizer, as Megatron used for billions."""
    if num_vectors < 20_000:
        return "Flat"
    nlist = 1 << max(6, round(math.log2(4 * math.sqrt(num_vectors))))
    while nlist > 64 and nlist * 39 > num_vectors:
        nlist //= 2
    if num_vectors <= 10_000_000:
        return f"IVF{nlist},SQ8"
    return f"OPQ32_64,IVF{nlist}_HNSW32,PQ32"


RERANK_PQ = 200  # db.rerank = -1 for PQ codes: recall@10 0.34-0.49 -> 0.90-0.97 at 1-10M (docs/benchmarks.md)


def stores_pq_codes(spec: str) -> bool:
    """Whether the index keeps product-quantised codes ("PQ32", "IVF4096,PQ32", "OPQ32_64,...,PQ32x8")."""
    return any(part.strip().startswith("PQ") for part in spec.split(","))


def rerank_depth(rerank: int, spec: str) -> int:
    """db.rerank resolved for an index built as `spec`: -1 gives RERANK_PQ for PQ codes and 0 otherwise."""
    return rerank if rerank >= 0 else RERANK_PQ if stores_pq_codes(spec) else 0


def new_index(spec: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else str(e)
        raise UserError(f"db.index = {spec!r} is not a Faiss index factory string Faiss accepts: {first}. "
                        "Examples: \"Flat\", \"IVF1024,SQ8\", \"IVF4096,PQ32\", \"HNSW32\"") from None


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def min_train_samples(spec: str, dim: int) -> int:
    """Training vectors an index needs at the least (IVF: one per list; PQ: 256 per sub-quantizer)."""
    index = new_index(spec, dim)
    ivf = ivf_of(index)
    return max(ivf.nlist if ivf is not None else 1, 256 if "PQ" in spec else 1)


def train(spec: str, sample: np.ndarray, seed: int) -> faiss.Index:
    """A trained, empty index. `sample` is (n, dim) float32; `spec` a factory string, not "auto"."""
    n, dim = sample.shape
    index = new_index(spec, dim)
    if index.is_trained:
        return _with_ids(index)
    need = min_train_samples(spec, dim)
    if n < need:
        raise UserError(f"db.index = {spec!r} needs at least {need} training vectors but the database has only "
                        f"{n} training chunks: use a smaller index (e.g. \"Flat\" or fewer IVF lists)")
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if faiss.get_num_gpus() > 0 and ivf is not None:
        # Train the coarse quantizer's k-means on the GPU; the rest of the index stays on the CPU.
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return _with_ids(index)


def _with_ids(index: faiss.Index) -> faiss.Index:
    """IVF indexes store ids themselves; others are wrapped so that Faiss ids are chunk rows."""
    return index if ivf_of(index) is not None else faiss.IndexIDMap2(index)


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int) -> None:
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = nprobe
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = ef_search
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = ef_search


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index under the id map and the transforms, which does the searching."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def filters_cheaply(index: faiss.Index) -> bool:
    """Whether Faiss leaves ids out of a search of this index by an IDSelector (in its search parameters) at
    about no cost: IVF (any codes), HNSW and flat scalar-quantised codes, which check each candidate as they
    scan. Not exact flat search (an IDSelector takes it off its BLAS path: 2.6x slower at 8,000 chunks,
    docs/benchmarks.md), nor flat PQ codes or refined indexes (which refuse search parameters)."""
    inner = _innermost(index)
    return ivf_of(index) is not None or isinstance(inner, (faiss.IndexScalarQuantizer, faiss.IndexHNSW))


def search_parameters(index: faiss.Index, sel: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying `sel` for an index that `filters_cheaply`. Given parameters replace the
    index's own settings for that search, so they repeat them (`set_search_params`): IVF's nprobe and
    max_codes (a HNSW quantizer keeps its own efSearch), HNSW's efSearch."""
    ivf = ivf_of(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
    inner = _innermost(index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


def save(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load(path: Path, mmap: bool = False) -> faiss.Index:
    """The index in `path`. `mmap`: for searching only, map the file instead of reading it, so the processes
    of one machine (torchrun ranks, concurrent queries) share one copy in the page cache rather than each
    holding its own (flat codes and IVF lists both; measured in docs/benchmarks.md). Faiss reads its own binary
    format (no pickle: nothing in the file runs), and only files `retro db build` / `db add` wrote."""
    if not path.exists():
        raise UserError(f"the index {path} is missing: run `retro db build`")
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError:
            pass  # an index type Faiss cannot map: read it (a damaged file fails below with its message)
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise UserError(f"the index {path} is damaged ({str(e).strip().splitlines()[-1]}); "
                        "rebuild it with `retro db build --rebuild index`") from None
