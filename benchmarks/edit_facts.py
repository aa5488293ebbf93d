"""Knowledge updates on real data: does an answer follow the database when a fact in it is edited?

For N SQuAD questions (the shared held-out slice, which SFT never saw) whose answer appears in their
paragraph, the question is asked with the database as the context source (`generate.contexts =
"database"`: the question is the query). The database holds the paragraph already: the small recipes'
corpus includes corpus/qa_paragraphs.jsonl.gz (document id `squad-TITLE-N`). Then that document is removed
(`retro db remove --doc`) and an edited copy added (`retro db add`), in which every occurrence of the
answer is replaced by another question's answer (an answer with digits by the same with every digit
shifted, "over 5,100" -> "over 8,433"), and the question is asked
again. No training step happens in between.

Reported per model (the Retro SFT checkpoint and the GPT SFT baseline, whose prompts get the same retrieved
paragraphs), before and after the edit:
  - cited: the question's first retrieved context is the (original / edited) paragraph;
  - answer: the prediction contains the (original / edited) answer (normalised as SQuAD does);
  - follows: after the edit, the prediction contains the new answer and not the old one.

The workspace is used through a copy whose database files are hard links (every write of `retro` replaces
files by rename, so the original workspace is never changed); the edits land in the copy only.

    python benchmarks/edit_facts.py --recipe recipes/sft-cpu.toml --n 60 [--json FILE]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from retrocli.config import load_config  # noqa: E402
from retrocli.eval.score import normalize_answer  # noqa: E402


def retro(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "retrocli", *args], capture_output=True, text=True,
                          env={**os.environ, "RETRO_PROGRESS": "0", **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"retro {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def pick_questions(squad: Path, n: int, seed: int, doc_ids: dict[str, str]) -> list[dict]:
    """n questions (one per paragraph) whose first answer occurs in the paragraph and whose paragraph is a
    database document (`doc_ids`: text -> id), each with a substitute answer from another question of the
    kind (digits shifted for an answer with digits)."""
    with gzip.open(squad, "rt", encoding="utf-8") if squad.suffix == ".gz" else open(squad, encoding="utf-8") as f:
        data = json.load(f)["data"]
    items = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                answer = qa["answers"][0]["text"].strip()
                if 1 <= len(answer.split()) <= 4 and answer in para["context"] and para["context"] in doc_ids:
                    items.append({"id": qa["id"], "question": qa["question"], "answer": answer,
                                  "title": article["title"], "context": para["context"],
                                  "doc_id": doc_ids[para["context"]]})
                    break  # one question per paragraph: each edit changes one fact
    rng = random.Random(seed)
    rng.shuffle(items)
    chosen = items[:n]
    words = [it["answer"] for it in items if not re.search(r"\d", it["answer"])]
    for it in chosen:
        old = normalize_answer(it["answer"])
        if re.search(r"\d", it["answer"]):  # "over 5,100" -> "over 8,433": every digit shifted alike
            shift = rng.randint(1, 9)
            new = re.sub(r"\d", lambda d, k=shift: str((int(d.group()) + k) % 10), it["answer"])
        else:
            new = next(a for a in rng.sample(words, len(words)) if normalize_answer(a) != old
                       and normalize_answer(a) not in normalize_answer(it["context"]))
        it["new_answer"] = new
        it["edited_context"] = it["context"].replace(it["answer"], new)
    return chosen


def ask(toml: Path, sets: list[str], questions: list[dict], gold_key: str, out: Path, checkpoint: Path) -> list[dict]:
    task = out.with_suffix(".task.jsonl")
    task.write_text("".join(json.dumps({"id": q["id"], "question": q["question"], "answer": [q[gold_key]]}) + "\n"
                            for q in questions), encoding="utf-8")
    retro("generate", str(task), "-c", str(toml), *sets, "--format", "qa", "--out", str(out),
          "--checkpoint", str(checkpoint), "--set", 'generate.contexts="database"', env={"OMP_NUM_THREADS": "2"})
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def contains(prediction: str, answer: str) -> bool:
    return normalize_answer(answer) in normalize_answer(prediction)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(REPO / "recipes/sft-cpu.toml"))
    ap.add_argument("--squad", default=None, help="default: DATA_DIR/qa/squad_dev_shared.json.gz")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="sft,sft-gpt", help="checkpoint runs of the workspace to ask")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cfg = load_config(Path(a.recipe))
    ws = cfg.resolve(cfg.workspace.dir)
    data_dir = Path(os.environ.get("DATA_DIR", REPO.parent / "shared" / "data"))
    squad = Path(a.squad) if a.squad else data_dir / "qa" / "squad_dev_shared.json.gz"
    with gzip.open(data_dir / "corpus" / "qa_paragraphs.jsonl.gz", "rt", encoding="utf-8") as f:
        doc_ids = {r["text"]: r["id"] for r in map(json.loads, f)}
    questions = pick_questions(squad, a.n, a.seed, doc_ids)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="edit-facts-") as tmp:
        copy = Path(tmp) / "ws"
        copy.mkdir()
        shutil.copytree(ws / "db", copy / "db", copy_function=os.link,
                        ignore=shutil.ignore_patterns("edits", "retro.lock"))
        sets = ["--set", f"workspace.dir={json.dumps(str(copy))}"]
        edited = Path(tmp) / "edited.jsonl"
        edited.write_text("".join(json.dumps({"id": f"edit-{q['id']}", "title": q["title"],
                                              "text": q["edited_context"]}) + "\n" for q in questions),
                          encoding="utf-8")
        before = {m: ask(Path(a.recipe), sets, questions, "answer", Path(tmp) / f"{m}.before.jsonl",
                         ws / "checkpoints" / m) for m in a.models.split(",")}
        retro("db", "remove", *[x for q in questions for x in ("--doc", q["doc_id"])], "-c", a.recipe, *sets)
        retro("db", "add", str(edited), "-c", a.recipe, *sets)
        after = {m: ask(Path(a.recipe), sets, questions, "new_answer", Path(tmp) / f"{m}.after.jsonl",
                        ws / "checkpoints" / m) for m in a.models.split(",")}
    by_id = {q["id"]: q for q in questions}
    rows = []
    for m in a.models.split(","):
        b = {r["id"]: r for r in before[m]}
        f = {r["id"]: r for r in after[m]}
        n = len(questions)

        def cited(rec: dict, doc_id: str) -> bool:
            return bool(rec["contexts"]) and rec["contexts"][0].get("doc_id") == doc_id

        row = {"model": m, "questions": n,
               "cited_original_before": sum(cited(b[i], q["doc_id"]) for i, q in by_id.items()) / n,
               "cited_edited_after": sum(cited(f[i], f"edit-{i}") for i in by_id) / n,
               "cited_original_after": sum(cited(f[i], q["doc_id"]) for i, q in by_id.items()) / n,
               "answer_original_before": sum(contains(b[i]["prediction"], q["answer"]) for i, q in by_id.items()) / n,
               "answer_new_after": sum(contains(f[i]["prediction"], q["new_answer"]) for i, q in by_id.items()) / n,
               "answer_original_after": sum(contains(f[i]["prediction"], q["answer"]) for i, q in by_id.items()) / n}
        followed = [i for i, q in by_id.items()
                    if contains(f[i]["prediction"], q["new_answer"]) and not contains(f[i]["prediction"], q["answer"])]
        row["follows"] = len(followed)
        # every question that followed its edit, then the first others, up to 5
        shown = (followed + [i for i in by_id if i not in followed])[: max(5, len(followed))]
        row["examples"] = [{"question": by_id[i]["question"], "old": by_id[i]["answer"], "new": by_id[i]["new_answer"],
                            "before": b[i]["prediction"], "after": f[i]["prediction"], "follows": i in followed}
                           for i in shown]
        rows.append(row)
    print(f"{len(questions)} edited facts, {time.time() - started:.0f} s; contexts from the database "
          f"(question as the query), workspace {ws}")
    print(f"{'model':<10}{'cited orig before':>18}{'cited edit after':>17}{'cited orig after':>17}"
          f"{'ans orig before':>16}{'ans new after':>14}{'ans orig after':>15}{'follows':>9}")
    for r in rows:
        print(f"{r['model']:<10}{r['cited_original_before']:>18.2f}{r['cited_edited_after']:>17.2f}"
              f"{r['cited_original_after']:>17.2f}{r['answer_original_before']:>16.2f}{r['answer_new_after']:>14.2f}"
              f"{r['answer_original_after']:>15.2f}{r['follows']:>6}/{r['questions']}")
        for ex in r["examples"]:
            print(f"  {'*' if ex['follows'] else ' '} {ex['question'][:60]!r}: {ex['old']!r} -> {ex['new']!r}; "
                  f"before {ex['before'][:40]!r}, after {ex['after'][:40]!r}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
