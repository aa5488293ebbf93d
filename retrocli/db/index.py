"""Embeddings -> a trained Faiss index holding every training chunk (Faiss id = chunk row).

The index is built from `db.index`, any Faiss factory string ("Flat", "IVF1024,SQ8",
"OPQ32_64,IVF65536_HNSW8,PQ32"), trained on a seeded random sample of the training chunks' embeddings (not a
prefix: the first chunks of a corpus are rarely representative), then filled block by block. Vectors are
normalised and compared by inner product (cosine similarity), so a chunk with an all-zero embedding (no
words, for the lexical embedder) is never closer than a related one. Training runs on the GPU when faiss
has one.

An IVF index may keep its inverted lists on disk (`db.index_storage`), the path Faiss documents for
billion-scale indexes: each block of embeddings is added into a copy of the trained empty index and only its
lists are written (`save_lists`), then the blocks' lists are merged into one `.ivfdata` file beside the index
file (`merge_lists`), which searches map instead of reading (`load`).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from ..errors import UserError
from ..runtime import fault_point
from ..workspace import atomic_path, write_bytes_atomic, write_failed


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


POINTS_PER_CENTROID = 39  # the fewest training vectors per centroid that Faiss' k-means accepts without a warning


def train_sample_size(samples: int, spec: str, dim: int, available: int) -> int:
    """db.index_train_samples resolved: -1 gives 39 training vectors per centroid of the index's largest k-means
    (IVF lists, or 256 per PQ sub-quantizer), as Faiss advises; both capped by the `available` training chunks."""
    wanted = POINTS_PER_CENTROID * min_train_samples(spec, dim) if samples == -1 else samples
    return min(wanted, available)


# ---------------------------------------------------------------------------------- inverted lists on disk

LIST_ID_BYTES = 8  # each vector of an inverted list is stored with its 64-bit id


def list_bytes(spec: str, dim: int, num_vectors: int) -> int | None:
    """The bytes of an IVF index's inverted lists holding `num_vectors` (codes and ids), or None for an index
    whose vectors are not all in inverted lists, which cannot be on disk: no IVF, or codes kept beside the
    lists (a refinement: `IVF…,PQ…+…`, `…,Refine(…)`)."""
    root = new_index(spec, dim)  # (held: the indexes inside it live as long as it does)
    index = _innermost(root)  # (under OPQ, PCA: applied before the IVF, nothing stored)
    if not isinstance(index, faiss.IndexIVF) or isinstance(index, faiss.IndexIVFPQR):
        return None
    return num_vectors * (index.code_size + LIST_ID_BYTES)


def available_memory() -> int:
    """Bytes of memory the machine can give without swapping (Linux: MemAvailable), else its free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_storage(storage: str, spec: str, dim: int, num_vectors: int, memory: int | None = None,
                    chosen: bool = False) -> str:
    """"memory" or "ondisk" for db.index_storage = `storage`. "auto" puts the lists on disk where an IVF index's
    lists (codes and ids of every vector) would take more than half the available `memory`: the add holds them
    all, and a list grows by doubling its capacity. "ondisk" with an index whose vectors are not all in
    inverted lists is a UserError naming both keys (`chosen`: `spec` is what db.index = "auto" chose)."""
    size = list_bytes(spec, dim, num_vectors)
    if storage == "ondisk" and size is None:
        named = (f"\"auto\", which chose {spec!r} for {num_vectors:,} chunks" if chosen else repr(spec))
        raise UserError(f"db.index_storage = \"ondisk\" needs an IVF index whose vectors are all in its inverted "
                        f"lists (what goes on disk), but db.index is {named}: use an IVF index such as "
                        "\"IVF4096,SQ8\" or \"IVF65536_HNSW32,PQ32\", or db.index_storage = \"memory\" (or \"auto\")")
    if storage == "auto":
        memory = available_memory() if memory is None else memory
        return "ondisk" if size is not None and size > memory // 2 else "memory"
    return storage


@contextmanager
def _faiss_quiet() -> Iterator[None]:
    """Faiss prints what it does with on-disk lists ("resizing ...", the folder it maps them from) on the C
    stdout: sent to /dev/null, it would otherwise land in the middle of `retro db query --json`'s output."""
    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    try:
        saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stdout to protect (closed by a daemon's launcher)
        yield
        return
    os.dup2(null, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _faiss_error(e: RuntimeError) -> str:
    """The line of a Faiss exception that says what failed (it starts with where in Faiss' source)."""
    text = str(e).strip()
    return text.splitlines()[-1].split("Error: ", 1)[-1] if text else repr(e)


def save_lists(index: faiss.Index, path: Path) -> None:
    """Write the inverted lists of an IVF `index` alone (not its quantizer, which every block shares: at
    billions of vectors the quantizer of each block would outweigh its lists), in Faiss' own format."""
    writer = faiss.VectorIOWriter()
    faiss.write_InvertedLists(ivf_of(index).invlists, writer)
    write_bytes_atomic(path, faiss.vector_to_array(writer.data).tobytes())


def read_lists(path: Path, num_vectors: int) -> faiss.InvertedLists | None:
    """The inverted lists `save_lists` wrote, mapped (not read: a merge of every block holds none in memory),
    or None when the file is missing, torn (Faiss checks each list against the file's size) or holds another
    number of vectors than `num_vectors`."""
    if not path.is_file():
        return None
    try:
        lists = faiss.read_InvertedLists(faiss.FileIOReader(str(path)), faiss.IO_FLAG_MMAP)
    except RuntimeError:
        return None
    return lists if lists.compute_ntotal() == num_vectors else None


def merge_lists(trained: faiss.Index, blocks: list[faiss.InvertedLists], data: Path) -> faiss.Index:
    """`trained` (the trained empty index) holding the lists of every block, in order, merged into the file
    `data` (Faiss' OnDiskInvertedLists): written under a temporary name, synced and renamed, and named in the
    index by its file name alone, which `load` looks for beside the index file. Returns the index to `save`
    (the lists stay mapped). A disk without room for the merged lists is a UserError naming `data`, before
    anything is written: a write into a mapped file that finds the disk full kills the process (SIGBUS)
    instead of failing."""
    ivf = ivf_of(trained)
    assert trained.ntotal == 0 and ivf is not None
    need = sum(b.compute_ntotal() for b in blocks) * (ivf.code_size + LIST_ID_BYTES)
    data.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(data.parent).free
    if need > free:
        raise write_failed(data, OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the merged lists need "
                                                       f"{need:,} bytes and {free:,} are free"))
    sources = faiss.InvertedListsPtrVector()
    for b in blocks:
        sources.push_back(b)
    with atomic_path(data) as tmp:
        merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp))
        try:
            with _faiss_quiet():
                ntotal = merged.merge_from_multiple(sources.data(), sources.size(), False)
        except RuntimeError as e:  # the file could not be made or sized (a file size limit, a read-only folder)
            raise write_failed(data, RuntimeError(_faiss_error(e))) from None
        fault_point("index:merge")
    merged.filename = data.name  # the final name, found beside the index file when read (IO_FLAG_ONDISK_SAME_DIR)
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # the index owns its lists now
    return trained


def lists_file(path: Path) -> Path:
    """Where the on-disk inverted lists of the index file `path` are: beside it, `<stem>.ivfdata`."""
    return path.with_suffix(".ivfdata")


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


# Inverted lists on disk are looked for beside the index file whatever folder they were merged in (the
# workspace may have moved), and mapped read-only: searches never write them.
_ONDISK_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def load(path: Path, mmap: bool = False) -> faiss.Index:
    """The index in `path`. `mmap`: for searching only, map the file instead of reading it, so the processes
    of one machine (torchrun ranks, concurrent queries) share one copy in the page cache rather than each
    holding its own (flat codes and IVF lists both; measured in docs/benchmarks.md). Lists on disk (an
    `.ivfdata` file beside `path`) are always mapped, whatever `mmap` says; their file is checked against the
    size the index expects first, as a torn one would kill the search that reads past its end (SIGBUS). Faiss
    reads its own binary format (no pickle: nothing in the file runs), and only files `retro db build` /
    `db add` wrote."""
    if not path.exists():
        raise UserError(f"the index {path} is missing: run `retro db build`")
    data = lists_file(path)
    if mmap and not data.exists():
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | _ONDISK_FLAGS)
        except RuntimeError:
            pass  # an index type Faiss cannot map: read it (a damaged file fails below with its message)
    try:
        with _faiss_quiet():  # (lists on disk print where they are found, also when they are missing)
            index = faiss.read_index(str(path), _ONDISK_FLAGS)
    except RuntimeError as e:
        if data.name in str(e):
            raise UserError(f"{data}, the inverted lists of the index {path}, is missing or unreadable "
                            f"({_faiss_error(e)}); rerun `retro db build` to make it again") from None
        raise UserError(f"the index {path} is damaged ({str(e).strip().splitlines()[-1]}); "
                        "rebuild it with `retro db build --rebuild index`") from None
    ivf = ivf_of(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists):
        if os.path.getsize(lists.filename) != lists.totsize:
            raise UserError(f"{data}, the inverted lists of the index {path}, is torn: "
                            f"{os.path.getsize(lists.filename):,} bytes where {lists.totsize:,} were written. Rerun "
                            "`retro db build`, which finds it and makes it again")
        # No prefetch threads (Faiss starts 32 per search to touch the lists about to be scanned): the
        # search's own threads fault the pages in, and from the page cache the prefetch only costs, 480 -> 720
        # queries/s at 1M vectors on 2 cores (docs/benchmarks.md).
        lists.prefetch_nthread = 0
    return index
