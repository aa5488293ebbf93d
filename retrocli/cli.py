"""The `retro` command: the registry of verbs (retrocli/commands/), the options every command takes, and `main`,
which turns usage mistakes, user errors and signals into one message and an exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.markup import escape
from typer import _click as click  # typer vendors click: its exceptions are these, not the `click` package's

from .allocator import tune_allocator
from .commands import config, db, export, generate, imports, init, ppl, pretrain, reproduce, score, set_argv, sft
from .errors import UserError
from .runtime import console


def _bare_flags(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""  # typer writes `<bool>` after a flag in --help, as if it took a value
    return params


class _BareFlags:
    def get_params(self, ctx):
        return _bare_flags(super().get_params(ctx))


class _Command(_BareFlags, typer.core.TyperCommand):
    pass


class _Group(_BareFlags, typer.core.TyperGroup):
    pass


def _typer(help: str, completion: bool = False) -> typer.Typer:
    return typer.Typer(cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                       context_settings={"help_option_names": ["-h", "--help"]}, help=help,
                       add_completion=completion)


app = _typer("retro: retrieval-enhanced language models (RETRO / InstructRetro) from a corpus to a scored, "
             "instruction-tuned model.\n\nStart with `retro init my-ws`, then `retro db build -c my-ws/retro.toml`; "
             "`retro VERB -h` shows each verb with examples.", completion=True)
db_app = _typer("The retrieval database: build it, query it, inspect it, edit it.")
app.add_typer(db_app, name="db")
config_app = _typer("The workspace TOML as `retro` reads it: show it with the origin of every value, or check it.")
app.add_typer(config_app, name="config")
import_app = _typer("Models from elsewhere, converted once into a retro workspace (Hugging Face folders need no "
                    "import: give them as pretrain.init_from or --checkpoint).")
app.add_typer(import_app, name="import")


def _print_version(value: bool) -> None:
    if not value:
        return
    import platform
    from importlib.metadata import version

    import faiss
    import torch

    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available() else "no CUDA device")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    for line in (f"retro {version('retrocli')}", f"python {platform.python_version()} ({sys.executable})",
                 f"torch {torch.__version__} ({cuda}; {os.cpu_count()} CPU cores)",
                 f"faiss {faiss.__version__} ({gpus} GPU(s) for Faiss)",
                 f"transformers {version('transformers')}, typer {version('typer')}"):
        sys.stdout.write(line + "\n")
    raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the versions of retro, python, torch (and its device), faiss "
                                            "and transformers, then exit")):
    pass


# ---------------------------------------------------------------------------------------------- verbs
# The registry: every verb, in the order of the data flow (tests/test_cli.py pins the list through --help).

for name, verb in (("init", init.init), ("pretrain", pretrain.pretrain), ("ppl", ppl.ppl), ("sft", sft.sft),
                   ("generate", generate.generate), ("score", score.score), ("export", export.export),
                   ("reproduce", reproduce.reproduce)):
    app.command(name, cls=_Command)(verb)
for name, verb in (("build", db.db_build), ("query", db.db_query), ("eval", db.db_eval), ("info", db.db_info),
                   ("verify", db.db_verify), ("add", db.db_add), ("remove", db.db_remove)):
    db_app.command(name, cls=_Command)(verb)
for name, verb in (("show", config.config_show), ("check", config.config_check)):
    config_app.command(name, cls=_Command)(verb)
import_app.command("megatron", cls=_Command)(imports.import_megatron)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. A usage mistake or a `UserError` prints one message and exits 2; SIGINT / SIGTERM exit
    130 / 143 saying what was kept; anything else is a bug and keeps its traceback (exit 1)."""
    from .runtime import Interrupted, install_interrupt_handlers, kept_note

    set_argv(list(sys.argv[1:] if argv is None else argv))
    tune_allocator()  # CPU steps re-faulted their largest tensors every time (retrocli/allocator.py)
    install_interrupt_handlers()
    try:
        code = app(args=argv, prog_name="retro", standalone_mode=False)
    except UserError as e:
        return _error(str(e))
    except Interrupted as e:
        console.print(f"interrupted ({e.name}): {kept_note()}; rerun the same command to continue",
                      highlight=False, soft_wrap=True)
        return 128 + e.signum
    except OSError as e:
        from .workspace import WRITE_ERRNOS, write_failed

        if e.errno not in WRITE_ERRNOS:
            raise
        return _error(str(write_failed(Path(e.filename) if e.filename else Path("(a file)"), e)))
    except click.exceptions.NoArgsIsHelpError as e:  # bare `retro` / `retro db`: the help, as a usage mistake
        console.file.write(e.ctx.get_help() + "\n")
        return 2
    except click.exceptions.ClickException as e:  # usage mistakes: unknown verb or option, bad value, missing one
        ctx = getattr(e, "ctx", None)
        hint = f"\n(see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _error(e.format_message() + hint)
    except typer.Abort:  # end of input at a prompt
        return 130
    except SystemExit as e:  # typer's own exits (a closed stdout: exit 1)
        return e.code if isinstance(e.code, int) else 1
    return code if isinstance(code, int) else 0


def _error(message: str) -> int:
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    return 2
