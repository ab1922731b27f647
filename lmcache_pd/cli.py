"""`lmcache-pd` command line: config check, demo, self-checks, benchmarks, proxy.

Commands implemented elsewhere are loaded lazily and take their own argv, so each part
owns its flags: ``lmcache-pd proxy ...`` -> ``lmcache_pd.router.proxy.main(argv)``,
``lmcache-pd check kernels ...`` -> ``lmcache_pd.kernel_check.main(argv)``,
``lmcache-pd bench NAME ...`` -> ``benchmarks/NAME.py``.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
config_app = typer.Typer(no_args_is_help=True, help="Inspect configuration.")
check_app = typer.Typer(help="Self-tests: transport (default) and kernels.")
app.add_typer(config_app, name="config")
app.add_typer(check_app, name="check")
console = Console()
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _call_main(target: str, argv: list[str]) -> None:
    module, func = target.split(":")
    raise typer.Exit(int(getattr(importlib.import_module(module), func)(argv) or 0))


@config_app.command("check")
def config_check(file: Path = typer.Argument(..., help="yaml config file")) -> None:
    """Print the resolved config (file + LMCACHE_* env) or the errors (exit 2)."""
    from lmcache_pd.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        console.print(f"[red]{file}: invalid[/red]")
        for line in exc.errors:
            console.print(f"  - {line}", markup=False)
        raise typer.Exit(2) from None
    console.print(to_yaml(cfg), markup=False, end="")


@app.command("demo", context_settings=PASSTHROUGH)
def demo(ctx: typer.Context) -> None:
    """Sender + receiver processes on this box: real KV handoff, verified, with figures."""
    _call_main("lmcache_pd.demo:main", list(ctx.args))


@check_app.callback(invoke_without_command=True)
def check(
    ctx: typer.Context,
    json_path: Path | None = typer.Option(None, "--json", help="write results as JSON"),
    size_mb: int = typer.Option(64, "--size-mb", help="bytes per WRITE, MiB"),
    reps: int = typer.Option(5, "--reps", help="WRITEs to time (best is reported)"),
    idle_seconds: float = typer.Option(5.0, "--idle-seconds", help="idle CPU window"),
    receiver: str | None = typer.Option(
        None, "--receiver", help="tcp://HOST:PORT of a receiver on another host"
    ),
    layout: str = typer.Option("tiny", "--layout", help="the remote receiver's layout"),
    chunk_size: int = typer.Option(256, "--chunk-size", help="the remote receiver's chunk"),
) -> None:
    """Transport self-test: a NIXL WRITE between two agents vs memcpy; UCX path; idle CPU."""
    if ctx.invoked_subcommand is None:
        argv = ["--size-mb", str(size_mb), "--reps", str(reps), "--idle-seconds", str(idle_seconds)]
        if json_path:
            argv += ["--json", str(json_path)]
        if receiver:
            argv += ["--receiver", receiver, "--layout", layout, "--chunk-size", str(chunk_size)]
        _call_main("lmcache_pd.selfcheck:main", argv)


@check_app.command("kernels", context_settings=PASSTHROUGH)
def check_kernels(ctx: typer.Context) -> None:
    """Compile the CUDA kernels with NVRTC; on a GPU run a round trip and print GB/s."""
    _call_main("lmcache_pd.kernel_check:main", list(ctx.args))


@app.command("bench", context_settings=PASSTHROUGH)
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="transfer|kernels|tiers|remote|proxy|e2e|soak"),
) -> None:
    """Run benchmarks/NAME.py with the remaining arguments (--quick --json F --png P)."""
    script = BENCH_DIR / f"{name}.py"
    known = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    if name in ("-h", "--help"):
        console.print("usage: lmcache-pd bench NAME [--quick] [--json F] [--png P]")
        console.print(f"benchmarks: {', '.join(known)}  (lmcache-pd bench NAME --help)")
        raise typer.Exit(0)
    if not script.exists():
        console.print(f"[red]no benchmark {name!r}[/red]; available: {', '.join(known)}")
        raise typer.Exit(2)
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")


@app.command("proxy", context_settings=PASSTHROUGH)
def proxy(ctx: typer.Context) -> None:
    """OpenAI-compatible proxy router (prefill -> handoff -> decode)."""
    _call_main("lmcache_pd.router.proxy:main", list(ctx.args))


if __name__ == "__main__":
    app()
