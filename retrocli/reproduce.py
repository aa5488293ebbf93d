"""`retro reproduce`: a recipe end to end, one stage after another, each skipped when its outputs are complete,
so a rerun after a failure (or a kill) continues where it stopped.

    db build -> pretrain (Retro) [-> pretrain the GPT baseline] -> ppl (Retro with and without retrieval, the
    GPT; validation documents and each reproduce.ppl_data file) [-> sft (Retro) -> sft (GPT) -> generate
    (each reproduce.contexts mode, each model) -> score] [-> showcase] -> WORKSPACE/report.md (+ loss.png)

Each stage is the `retro` verb a user would type, run as a child process with the same TOML and `--set`
overrides (so torchrun, resumption and error messages are those of the verb), and recorded with its
command line and time in WORKSPACE/reproduce/results.json, written after every stage. The GPT baseline is
the same TOML with `pretrain.run = "gpt"` and `model.retro_layers = []`, instruction-tuned as run "sft-gpt".

`reproduce.showcase` (recipes/tiny.toml) ends the run on what a model this small does show, since its QA
scores are near zero: `db query` answers with their sources, a new fact added to the database and removed
again, and Retro's perplexity with and without retrieval against the GPT, paired per token. It calls the
library the verbs call (database.query, edits.add / remove, ppl), in this process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import Config, load_config
from .data.corpus import data_file
from .db import database
from .db import edit as edits
from .db.database import open_tokenizer, workspace_of
from .errors import UserError
from .eval.ppl import checkpoint_token_losses, paired_difference
from .eval.score import read_predictions, score
from .runtime import Interrupted, console, log, run_child, set_kept_note
from .train import checkpoint
from .train.job import TrainSettings
from .workspace import Workspace, write_json_atomic, write_text_atomic

GPT = ["--set", 'pretrain.run="gpt"', "--set", "model.retro_layers=[]"]


@dataclass
class Stage:
    name: str
    args: list[str]  # after `retro`, before -c and the user's --set overrides
    done: Callable[[], bool]
    result_key: str = ""  # where the JSON the verb prints (--json) is kept in results["results"]


class Reproduction:
    def __init__(self, source: Path, sets: list[str]):
        self.source, self.sets = source.resolve(), list(sets)
        self.cfg: Config = load_config(self.source, sets)
        self.ws: Workspace = workspace_of(self.cfg)
        self.results_path = self.ws.reproduce_results
        previous = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.results: dict[str, Any] = {"recipe": str(self.source), "sets": self.sets,
                                        "stages": previous.get("stages", {}), "results": previous.get("results", {})}
        if self.cfg.reproduce.showcase and SHOWCASE_CORPUS not in self.cfg.corpus.train:
            raise UserError(f"reproduce.showcase = true in {self.source} queries the corpus {SHOWCASE_CORPUS}, but "
                            f"corpus.train is {self.cfg.corpus.train}: add {SHOWCASE_CORPUS!r} to it, or set "
                            "reproduce.showcase = false")

    # ---------------------------------------------------------------------------------------- stages

    def _trained(self, run: str, section: Any, seq_length: int) -> Callable[[], bool]:
        cfg = self.cfg
        steps = TrainSettings.from_section(section, cfg.workspace.seed, seq_length).train_steps

        def done() -> bool:
            found = checkpoint.latest(self.ws.run_dir(run), announce=False)
            return found is not None and checkpoint.read_meta(found).get("step", 0) >= steps

        return done

    def _measured(self, key: str, run: str) -> Callable[[], bool]:
        """A ppl result is current when it was measured on the run's latest checkpoint."""

        def done() -> bool:
            found = checkpoint.latest(self.ws.run_dir(run), announce=False)
            return found is not None and self.results["results"].get(key, {}).get("checkpoint") == str(found)

        return done

    def qa_outputs(self) -> list[tuple[str, str, Path]]:
        """(model, contexts, answers file) of every generate stage."""
        r = self.cfg.reproduce
        if not (r.sft and r.qa_task):
            return []
        stem = Path(r.qa_task.removeprefix("builtin:")).name.split(".")[0]
        models = [self.cfg.sft.run] + (["sft-gpt"] if r.baseline else [])
        return [(run, mode, self.ws.generate_dir / f"{stem}.{mode}.{run}.jsonl")
                for run in models for mode in r.contexts]

    def stages(self) -> list[Stage]:
        cfg, r = self.cfg, self.cfg.reproduce
        seq = cfg.model.seq_length
        out = [Stage("db build", ["db", "build"], lambda: False),  # db build itself skips what is complete
               Stage("pretrain", ["pretrain"], self._trained(cfg.pretrain.run, cfg.pretrain, seq))]
        if r.baseline:
            out.append(Stage("pretrain gpt", ["pretrain", *GPT], self._trained("gpt", cfg.pretrain, seq)))
        for data in [None, *r.ppl_data]:
            extra = [] if data is None else ["--data", str(data_file(data, cfg.base_dir, self.ws.root))]
            name = "valid" if data is None else Path(data).name
            runs = [(cfg.pretrain.run, "retrieval", []), (cfg.pretrain.run, "no-retrieval", ["--no-retrieval"])]
            runs += [("gpt", "gpt", GPT)] if r.baseline else []
            for run, mode, flags in runs:
                key = f"ppl/{name}/{mode}"
                out.append(Stage(f"ppl {name} {mode}", ["ppl", "--json", *extra, *flags], self._measured(key, run),
                                 result_key=key))
        if not r.sft:
            return out
        if not cfg.sft.blend:
            raise UserError(f"reproduce.sft is true but [sft] in {self.source} has no [[sft.blend]] datasets: add "
                            f"them, or set reproduce.sft = false")
        out.append(Stage("sft", ["sft"], self._trained(cfg.sft.run, cfg.sft, seq)))
        if r.baseline:
            gpt_init = self.ws.run_dir("gpt")
            out.append(Stage("sft gpt", ["sft", *GPT, "--set", 'sft.run="sft-gpt"', "--set",
                                         f"sft.init_from={json.dumps(str(gpt_init))}", "--set", 'sft.neighbors="none"'],
                             self._trained("sft-gpt", cfg.sft, seq)))
        for run, mode, path in self.qa_outputs():
            args = ["generate", r.qa_task, "--out", str(path), "--checkpoint", str(self.ws.run_dir(run)),
                    "--set", f'generate.contexts="{mode}"'] + (["--limit", str(r.qa_limit)] if r.qa_limit else [])
            out.append(Stage(f"generate {mode} {run}", args, path.is_file))
        return out

    # --------------------------------------------------------------------------------------- running

    def command(self, stage: Stage) -> list[str]:
        sets = [a for s in self.sets for a in ("--set", s)]
        return [sys.executable, "-m", "retrocli", *stage.args, "-c", str(self.source), *sets]

    def run(self) -> dict[str, Any]:
        stages = self.stages()
        for i, stage in enumerate(stages, 1):
            cmd = self.command(stage)
            shown = "retro " + shlex.join(cmd[3:])
            if stage.done():
                log(f"[{i}/{len(stages)}] {stage.name}: complete, skipped")
                self.results["stages"].setdefault(stage.name, {"command": shown, "seconds": None})
                continue
            log(f"[bold][{i}/{len(stages)}] {stage.name}[/bold]: {shown}")
            started = time.time()
            code, out, signum = run_child(cmd, capture=bool(stage.result_key))  # a signal reaches the stage too
            seconds = time.time() - started
            if signum:
                set_kept_note(f"reproduce: the stages before '{stage.name}' are complete, and it kept what it said")
                raise Interrupted(signum)
            if code != 0:
                raise UserError(f"stage '{stage.name}' failed (exit {code}): {shown}\nfix the problem "
                                "above and rerun `retro reproduce`: finished stages are skipped")
            self.results["stages"][stage.name] = {"command": shown, "seconds": round(seconds, 1)}
            if stage.result_key:
                self.results["results"][stage.result_key] = json.loads(out.strip().splitlines()[-1])
            write_json_atomic(self.results_path, self.results)
        order = [st.name for st in stages]  # report the stages in the order they run
        self.results["stages"] = {n: self.results["stages"][n] for n in order if n in self.results["stages"]}
        self.score()
        if self.cfg.reproduce.showcase:
            self.results["showcase"] = Showcase(self.cfg, self.ws).run(self.results["results"])
        write_json_atomic(self.results_path, self.results)
        report = self.report()
        self.results["report"] = str(report)
        return self.results

    def score(self) -> None:
        for run, mode, path in self.qa_outputs():
            s = score(read_predictions(path))
            self.results["results"][f"qa/{mode}/{run}"] = {k: s[k] for k in ("exact_match", "f1", "count")}

    # ---------------------------------------------------------------------------------------- report

    def report(self) -> Path:
        res, r = self.results["results"], self.cfg.reproduce
        lines = [f"# Reproduction report: {self.source.name}", "",
                 f"`retro reproduce -c {self.source}`" + "".join(f" --set {s}" for s in self.sets)
                 + f" on {time.strftime('%Y-%m-%d %H:%M')}; {machine()}.", "",
                 "## Stages", "", "| stage | seconds | command |", "|---|---|---|"]
        for name, st in self.results["stages"].items():
            secs = "done earlier" if st["seconds"] is None else f"{st['seconds']:.1f}"
            lines.append(f"| {name} | {secs} | `{st['command']}` |")
        lines += ["", "## Perplexity", "", "| data | model | retrieval | tokens | perplexity | bits per byte |",
                  "|---|---|---|---|---|---|"]
        for key, v in res.items():
            if key.startswith("ppl/"):
                _, data, mode = key.split("/")
                model = "GPT" if mode == "gpt" else "Retro"
                lines.append(f"| {data} | {model} | {'on' if v['retrieval'] else 'off'} | {v['tokens']:,} | "
                             f"{v['perplexity']:.2f} | {v['bits_per_byte']:.4f} |")
        qa = [(k, v) for k, v in res.items() if k.startswith("qa/")]
        if qa:
            lines += ["", f"## QA after instruction tuning: {r.qa_task}" + (f" (first {r.qa_limit})" if r.qa_limit
                                                                            else ""), "",
                      "| model | contexts | questions | EM | F1 |", "|---|---|---|---|---|"]
            for key, v in qa:
                _, mode, run = key.split("/")
                model = "GPT" if run == "sft-gpt" else "Retro"
                lines.append(f"| {model} | {mode} | {v['count']:,} | {v['exact_match']:.2f} | {v['f1']:.2f} |")
        plot = self.plot()
        lines += ["", "## Training curves", "",
                  f"![loss]({plot.name})" if plot else "(install matplotlib, `pip install retrocli[plot]`, for the "
                                                      "plot of training and validation loss)", ""]
        if sc := self.results.get("showcase"):
            lines += ["## What this run shows", "",
                      f"Measured by `reproduce.showcase` in {sc['seconds']:.0f} s, with the library the verbs "
                      "`retro db query`, `db add`, `db remove` and `retro ppl` call.", ""]
            for part in showcase_sections(sc):
                lines += [f"### {part['title']}", ""]
                if part["header"]:
                    cells = [[cell.replace("|", "\\|").replace("*", "\\*") for cell in row] for row in part["rows"]]
                    lines += ["| " + " | ".join(part["header"]) + " |", "|" + "---|" * len(part["header"])]
                    lines += ["| " + " | ".join(row) + " |" for row in cells] + [""]
                for note in part["notes"]:
                    lines += [note, ""]
        path = self.ws.report
        write_text_atomic(path, "\n".join(lines))
        return path

    def plot(self) -> Path | None:
        """WORKSPACE/loss.png: training loss (smoothed) and validation loss per step, Retro against the GPT."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for run, label, colour in [(self.cfg.pretrain.run, "Retro", "tab:blue"), ("gpt", "GPT", "tab:orange")]:
            path = self.ws.run_dir(run) / "metrics.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            train = [(x["step"], x["loss"]) for x in rows if x.get("loss") is not None]
            evals = [(x["step"], x["eval_loss"]) for x in rows if x.get("eval_loss") is not None]
            if train:
                smooth, ema = [], train[0][1]
                for _, loss in train:
                    ema = 0.9 * ema + 0.1 * loss
                    smooth.append(ema)
                ax.plot([s for s, _ in train], smooth, color=colour, lw=1.2, label=f"{label} train (EMA 0.9)")
            if evals:
                ax.plot(*zip(*evals), color=colour, ls="--", marker="o", ms=4, label=f"{label} validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(f"{self.source.name}: Retro against the GPT of the same decoder")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.ws.loss_plot
        tmp = out.with_name(out.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        return out


# ------------------------------------------------------------------------------------------ showcase
# A model of ~2M parameters trained for a few minutes answers no QA question, but the parts around it work
# at any size: the database finds what a question is about and says where from, an edit to it changes what
# is retrieved without training anything, and perplexity shows what the model does with its neighbours.

SHOWCASE_CORPUS = "builtin:tiny"
SHOWCASE_QUERIES = [  # questions whose topic the language reference in builtin:tiny covers
    "How are keyword arguments passed to a function?",
    "What does a with statement do?",
    "What happens when a generator function is called?",
]
SHOWCASE_K = 3  # hits searched per query; a fact counts as found when it is among them
FACT = {"id": "retro-demo:mascot", "title": "The retro demo's mascot",
        "text": "The mascot of the retro demo is a tortoise named Ada. Ada is slow but never forgets: she lives in "
                "the retrieval database, so a model that reads its neighbours can answer questions about her "
                "without being trained again."}
FACT_QUERY = "What is the mascot of the retro demo?"
# What shows more, as measured in docs/results.md ("Copy windows in `retro pretrain`", "With models that copy").
BEYOND = ("recipes/copy-cpu.toml (~50 min on 2 CPU cores) first teaches its models to copy: its Retro's validation "
          "perplexity is 178.83 against its GPT's 181.49 (7 standard errors), and it scores F1 10.8 on held-out "
          "SQuAD with the gold paragraph (GPT 8.4). recipes/gpu-small.toml (49M pretraining tokens) and "
          "recipes/gpu-125m.toml (125M parameters) run the same chain on a GPU (not measured yet).")


class Showcase:
    """What the run shows at this scale, measured on the finished workspace (results.json "showcase")."""

    def __init__(self, cfg: Config, ws: Workspace):
        if cfg.db.embed_precision == "auto":
            # 'auto' picks bf16 or fp32 by timing a probe each time the embedder loads, and a busy machine can flip
            # that pick between two searches (distances move by ~1e-3, near ties swap): the showcase compares
            # searches, so its texts are embedded in fp32 every time
            cfg = dataclasses.replace(cfg, db=dataclasses.replace(cfg.db, embed_precision="fp32"))
        self.cfg, self.ws = cfg, ws

    def run(self, results: dict[str, Any]) -> dict[str, Any]:
        log("[bold]showcase[/bold]: db query, db add / remove of a new fact, paired perplexity")
        started = time.time()
        perplexity = self.perplexity()  # before the edit, though no validation neighbour can name the fact
        queries, fact = self.edit()
        f1 = [v["f1"] for k, v in results.items() if k.startswith("qa/")]
        return {"queries": queries, "fact": fact, "perplexity": perplexity, "best_f1": max(f1) if f1 else None,
                "pretrain_tokens": self.pretrain_tokens(), "seconds": round(time.time() - started, 1)}

    def search(self, texts: list[str]) -> list[list[dict[str, Any]]]:
        return database.query(self.cfg, texts, SHOWCASE_K)

    def edit(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The topic queries, then the fact: searched before `db add`, after it, and after `db remove`. Searches
        end as they began (a fact that a killed run left behind is removed first), so a rerun reads the same
        database; what stays is the removed segment of each run (a few KB in db/edits, as any `db remove`
        leaves)."""
        texts = [FACT_QUERY, *SHOWCASE_QUERIES]
        before = self.search(texts)
        if found(before[0]):
            log(f"the showcase fact {FACT['id']} is still in the database (a run stopped before removing it): "
                "removed first")
            edits.remove(self.cfg, [FACT["id"]], [])
            before = self.search(texts)
        path = (self.ws.showcase_dir / "new-fact.jsonl").resolve()
        write_text_atomic(path, json.dumps(FACT, ensure_ascii=False) + "\n")
        added = edits.add(self.cfg, [str(path)])
        after_add = self.search([FACT_QUERY])[0]
        removed = edits.remove(self.cfg, [FACT["id"]], [])
        after = self.search(texts)
        same = [[(h["chunk_id"], round(h["distance"], 4)) for h in hits] for hits in before] == \
               [[(h["chunk_id"], round(h["distance"], 4)) for h in hits] for hits in after]
        queries = [{"query": q, "hits": [brief(h) for h in hits]} for q, hits in zip(SHOWCASE_QUERIES, after[1:])]
        fact = {"file": str(path), "doc_id": FACT["id"], "query": FACT_QUERY,
                "chunks_added": added["chunks"], "chunks_removed": removed["removed_chunks"],
                "before": [brief(h) for h in before[0]], "after_add": [brief(h) for h in after_add],
                "after_remove": [brief(h) for h in after[0]], "found_before": found(before[0]),
                "found_after_add": found(after_add), "found_after_remove": found(after[0]),
                "unchanged_after_remove": same}
        return queries, fact

    def perplexity(self) -> dict[str, Any]:
        """Retro with and without retrieval (and the GPT) on the same validation tokens: perplexity, and the
        per-token loss difference against the first model with its standard error."""
        cfg, ws = self.cfg, self.ws
        tok = open_tokenizer(ws)
        retro = checkpoint.resolve_checkpoint(ws, None, cfg.pretrain.run)
        models = [("GPT", checkpoint.resolve_checkpoint(ws, None, "gpt"), False)] if cfg.reproduce.baseline else []
        models += [("Retro", retro, True), ("Retro", retro, False)]
        losses = [checkpoint_token_losses(cfg, ws, tok, path, retrieval)[0] for _, path, retrieval in models]
        rows = []
        for (model, path, retrieval), nll in zip(models, losses):
            row = {"model": model, "retrieval": retrieval, "checkpoint": str(path), "tokens": len(nll),
                   "perplexity": math.exp(float(nll.mean()))}
            if rows:
                row |= paired_difference(nll, losses[0])
            rows.append(row)
        return {"data": "validation documents", "tokens": len(losses[0]), "reference": models[0][0],
                "rows": rows, "retrieval_effect": paired_difference(losses[-2], losses[-1])}

    def pretrain_tokens(self) -> int:
        p = self.cfg.pretrain
        return p.train_steps * p.global_batch_size * self.cfg.model.seq_length


def found(hits: list[dict[str, Any]]) -> bool:
    return any(h["doc_id"] == FACT["id"] for h in hits)


def brief(hit: dict[str, Any]) -> dict[str, Any]:
    """A search hit as the showcase keeps it: where from, how near, the start of its text."""
    text = " ".join(hit["text"].split())
    return {"doc_id": hit["doc_id"], "title": hit["title"], "chunk_id": hit["chunk_id"],
            "distance": round(hit["distance"], 4), "text": text[:100] + ("..." if len(text) > 100 else "")}


def nearest(hits: list[dict[str, Any]]) -> list[str]:
    """The first hit as table cells: its document (the source), distance, the start of its text."""
    if not hits:
        return ["-", "", ""]
    return [str(hits[0]["doc_id"]), f"{hits[0]['distance']:.3f}", hits[0]["text"]]


def showcase_sections(sc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each part of the showcase as {title, header, rows, notes, lead}: the terminal and report.md show the same.
    `lead`: on the terminal, a row's first cell goes on a line of its own (a question above its answer)."""
    out = []
    rows = [[q["query"], *nearest(q["hits"])] for q in sc["queries"]]
    out.append({"title": "retro db query: the nearest chunk of each question, and its source", "lead": True,
                "header": ["query", "document", "distance", "text"], "rows": rows, "notes": []})
    f = sc["fact"]
    rows = [[step, "yes" if f[key] else "no", *nearest(f[hits])]
            for step, key, hits in [("before db add", "found_before", "before"),
                                    ("after db add", "found_after_add", "after_add"),
                                    ("after db remove", "found_after_remove", "after_remove")]]
    notes = [f"Query \"{f['query']}\", fact {shown(f['file'])} ({f['chunks_added']} chunks, written by this run); "
             f"found: among the nearest {SHOWCASE_K}. Nothing was trained in between. "
             + ("After db remove every query finds what it found before db add." if f["unchanged_after_remove"]
                else "After db remove the queries find OTHER chunks than before db add.")]
    out.append({"title": "retro db add / db remove: a new fact, retrieved at once, then gone", "lead": False,
                "header": ["database", "fact found", "nearest", "distance", "text"], "rows": rows, "notes": notes})
    p = sc["perplexity"]
    rows = [[r["model"], "on" if r["retrieval"] else "off", f"{r['perplexity']:.2f}",
             f"{r['diff']:+.4f} +- {r['se']:.4f}" if "diff" in r else "(reference)"] for r in p["rows"]]
    e = p["retrieval_effect"]
    note = f"Retrieval on against off, the same Retro: {e['diff']:+.4f} +- {e['se']:.4f} nats per token, {effect(e)}."
    if p["reference"] == "GPT":
        off = p["rows"][-1]
        note += f" Retro without retrieval against the GPT: {effect(off)}"
        helps, ahead = effect(e).startswith("perplexity lower"), effect(off).startswith("perplexity lower")
        note += ", so its lead does not come from what it retrieves." if ahead and not helps else "."
    out.append({"title": f"Perplexity on the {p['data']}: every model scores the same {p['tokens']:,} tokens",
                "lead": False, "rows": rows, "notes": [note],
                "header": ["model", "retrieval", "perplexity", f"nats per token against the {p['reference']} +- 1 SE"]})
    f1 = "" if sc["best_f1"] is None else f" (best F1 {sc['best_f1']:.1f})"
    note = (f"QA scores are near zero at this size{f1}: after {sc['pretrain_tokens']:,} tokens of pretraining a "
            f"model this small does not yet copy an answer out of its context (docs/results.md, the copy probe). "
            + BEYOND)
    out.append({"title": "Why QA scores are near zero here, and what shows more", "lead": False, "header": [],
                "rows": [], "notes": [note]})
    return out


def shown(path: str) -> str:
    """A path as short as it reads: relative to the current folder where it lies inside it."""
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else path


def effect(paired: dict[str, float]) -> str:
    """A paired difference in words: how much, and how many standard errors from zero."""
    z = abs(paired["diff"]) / paired["se"] if paired["se"] > 0 else float("inf")
    if z < 2:
        return f"no measurable difference ({z:.1f} standard errors)"
    change = abs(paired["ratio"] - 1) * 100
    return f"perplexity {'lower' if paired['diff'] < 0 else 'higher'} by {change:.2f}% ({z:.1f} standard errors)"


def aligned(cells: list[str], widths: list[int]) -> str:
    """Cells padded to their column's width, two spaces apart; the last one as it is."""
    return "  ".join([c.ljust(w) for c, w in zip(cells[:-1], widths)] + cells[-1:])


def print_showcase(sc: dict[str, Any]) -> None:
    """The last screen of `retro reproduce` with reproduce.showcase: aligned columns, one line per row, a
    chunk's text cut at the terminal's width (report.md has it whole)."""
    from rich.markup import escape
    from rich.rule import Rule

    def show(text: str) -> None:
        console.print(escape(text), no_wrap=True, overflow="ellipsis", highlight=False)

    console.print(Rule("what this run shows"))
    for part in showcase_sections(sc):
        console.print(f"[bold]{escape(part['title'])}[/bold]")
        header, rows = part["header"], part["rows"]
        if part["lead"]:
            header, rows = header[1:], [row[1:] for row in rows]
        if header:
            widths = [max(len(cell) for cell in column) for column in zip(*([] if part["lead"] else [header]), *rows)]
            if not part["lead"]:
                show("  " + aligned(header, widths))
            for full, row in zip(part["rows"], rows):
                if part["lead"]:
                    show("  " + full[0])
                show(("    " if part["lead"] else "  ") + aligned(row, widths))
        for note in part["notes"]:
            console.print(escape(note), highlight=False)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def print_summary(results: dict[str, Any]) -> None:
    """The short table of time per stage, perplexity with and without retrieval, EM / F1 per contexts mode;
    then, with reproduce.showcase, what the run shows (`make demo` ends with it)."""
    from rich.table import Table

    table = Table(title="retro reproduce")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, st in results["stages"].items():
        table.add_row(f"time: {name}", "done earlier" if st["seconds"] is None else f"{st['seconds']:.0f} s")
    if results.get("showcase"):
        table.add_row("time: showcase", f"{results['showcase']['seconds']:.0f} s")
    for key, v in results["results"].items():
        if key.startswith("ppl/"):
            table.add_row(f"perplexity: {key[4:]}", f"{v['perplexity']:.2f}")
        elif key.startswith("qa/"):
            table.add_row(f"EM / F1: {key[3:]}", f"{v['exact_match']:.1f} / {v['f1']:.1f}")
    console.print(table)
    console.print(f"report: {results['report']}")
    if results.get("showcase"):
        print_showcase(results["showcase"])


def run(source: Path, sets: list[str]) -> dict[str, Any]:
    results = Reproduction(source, sets).run()
    print_summary(results)
    return results
