"""`retro reproduce`: a recipe end to end, one stage after another, each skipped when its outputs are complete,
so a rerun after a failure (or a kill) continues where it stopped.

    db build -> pretrain (Retro) [-> pretrain the GPT baseline] -> ppl (Retro with and without retrieval, the
    GPT; validation documents and each reproduce.ppl_data file) [-> sft (Retro) -> sft (GPT) -> generate
    (each reproduce.contexts mode, each model) -> score] -> WORKSPACE/report.md (+ loss.png)

Each stage is the `retro` verb a user would type, run as a child process with the same TOML and `--set`
overrides (so torchrun, resumption and error messages are those of the verb), and recorded with its
command line and time in WORKSPACE/reproduce/results.json, written after every stage. The GPT baseline is
the same TOML with `pretrain.run = "gpt"` and `model.retro_layers = []`, instruction-tuned as run "sft-gpt".
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import checkpoint
from .config import Config, load_config
from .corpus import data_file
from .db import workspace_of
from .errors import UserError
from .pretrain import run_dir
from .runtime import console, log
from .score import read_predictions, score
from .train import TrainSettings
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
        self.results_path = self.ws.root / "reproduce" / "results.json"
        previous = json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}
        self.results: dict[str, Any] = {"recipe": str(self.source), "sets": self.sets,
                                        "stages": previous.get("stages", {}), "results": previous.get("results", {})}

    # ---------------------------------------------------------------------------------------- stages

    def _trained(self, run: str, section: Any, seq_length: int) -> Callable[[], bool]:
        cfg = self.cfg
        steps = TrainSettings.from_section(section, cfg.workspace.seed, seq_length).train_steps

        def done() -> bool:
            found = checkpoint.latest(run_dir(self.ws, run), announce=False)
            return found is not None and checkpoint.read_meta(found).get("step", 0) >= steps

        return done

    def _measured(self, key: str, run: str) -> Callable[[], bool]:
        """A ppl result is current when it was measured on the run's latest checkpoint."""

        def done() -> bool:
            found = checkpoint.latest(run_dir(self.ws, run), announce=False)
            return found is not None and self.results["results"].get(key, {}).get("checkpoint") == str(found)

        return done

    def qa_outputs(self) -> list[tuple[str, str, Path]]:
        """(model, contexts, answers file) of every generate stage."""
        r = self.cfg.reproduce
        if not (r.sft and r.qa_task):
            return []
        stem = Path(r.qa_task.removeprefix("builtin:")).name.split(".")[0]
        models = [self.cfg.sft.run] + (["sft-gpt"] if r.baseline else [])
        return [(run, mode, self.ws.root / "generate" / f"{stem}.{mode}.{run}.jsonl")
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
            gpt_init = run_dir(self.ws, "gpt")
            out.append(Stage("sft gpt", ["sft", *GPT, "--set", 'sft.run="sft-gpt"', "--set",
                                         f"sft.init_from={json.dumps(str(gpt_init))}", "--set", 'sft.neighbors="none"'],
                             self._trained("sft-gpt", cfg.sft, seq)))
        for run, mode, path in self.qa_outputs():
            args = ["generate", r.qa_task, "--out", str(path), "--checkpoint", str(run_dir(self.ws, run)),
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
            proc = subprocess.run(cmd, stdout=subprocess.PIPE if stage.result_key else None, text=True)
            seconds = time.time() - started
            if proc.returncode != 0:
                raise UserError(f"stage '{stage.name}' failed (exit {proc.returncode}): {shown}\nfix the problem "
                                "above and rerun `retro reproduce`: finished stages are skipped")
            self.results["stages"][stage.name] = {"command": shown, "seconds": round(seconds, 1)}
            if stage.result_key:
                self.results["results"][stage.result_key] = json.loads(proc.stdout.strip().splitlines()[-1])
            write_json_atomic(self.results_path, self.results)
        order = [st.name for st in stages]  # report the stages in the order they run
        self.results["stages"] = {n: self.results["stages"][n] for n in order if n in self.results["stages"]}
        self.score()
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
        path = self.ws.root / "report.md"
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
            path = run_dir(self.ws, run) / "metrics.jsonl"
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
        out = self.ws.root / "loss.png"
        tmp = out.with_name(out.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(out)
        return out


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
    """The short table `make demo` ends with: time per stage, perplexity with and without retrieval, EM / F1
    per contexts mode."""
    from rich.table import Table

    table = Table(title="retro reproduce")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, st in results["stages"].items():
        table.add_row(f"time: {name}", "done earlier" if st["seconds"] is None else f"{st['seconds']:.0f} s")
    for key, v in results["results"].items():
        if key.startswith("ppl/"):
            table.add_row(f"perplexity: {key[4:]}", f"{v['perplexity']:.2f}")
        elif key.startswith("qa/"):
            table.add_row(f"EM / F1: {key[3:]}", f"{v['exact_match']:.1f} / {v['f1']:.1f}")
    console.print(table)
    console.print(f"report: {results['report']}")


def run(source: Path, sets: list[str]) -> dict[str, Any]:
    results = Reproduction(source, sets).run()
    print_summary(results)
    return results
