"""The retrieval database: chunk store, embedders, Faiss index, neighbour search, the stages that build it,
and its edits."""
