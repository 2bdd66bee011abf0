"""The command line answers at once and tells the truth: --help, --version and argument errors import no
stage (no torch, numpy or pandas); every command and option is described; Ctrl-C names the command's own
way to continue; a closed pipe exits quietly; seeds, --out and --device are refused before any work."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import robustmargin
from robustmargin.cli import common
from robustmargin.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "pandas", "scipy", "matplotlib", "seaborn")
LIGHT_OWN = ("robustmargin", "robustmargin.errors", "robustmargin.presets")  # besides robustmargin.cli.*

# one argument list per command (the least that reaches the command's run)
MINIMAL = {
    "train": ["--preset", "quick"],
    "attack": ["--run", "RUN"],
    "analyze": ["--run", "RUN"],
    "report": ["--run", "RUN"],
    "reproduce": ["--preset", "quick"],
    "status": ["--run", "RUN"],
    "sweep": ["--config", "SWEEP.toml", "--out", "OUT"],
    "compare": ["DIR"],
    "theory": ["--out", "OUT"],
}


def python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT, **kwargs)


def run_main(argv: list[str]) -> int:
    try:
        return cli_main.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- no stage is imported to parse ----------------------------------------------------------------------

PARSE_ONLY = [["--help"], ["--version"], [], ["--bogus"], ["--", "--version"], ["train", "--seed", "-1"],
              ["train", "--seed", str(10 ** 20)], ["attack", "--no-such-flag"], ["attack", "--budget", "huge"],
              *([name, "--help"] for name in cli_main.COMMANDS)]


def test_parsing_imports_no_stage():
    """Each argument list, in a fresh interpreter: the modules loaded once main has answered."""
    code = textwrap.dedent(f"""
        import json, sys
        from robustmargin.cli.main import main
        seen = []
        for argv in {PARSE_ONLY!r}:
            try:
                main(argv)
            except SystemExit:
                pass
            seen.append(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}
                               or m.startswith("robustmargin") and m not in {LIGHT_OWN!r}
                               and not m.startswith("robustmargin.cli")))
        print(json.dumps(seen), file=sys.stderr)
    """)
    proc = python(code)
    seen = json.loads(proc.stderr.strip().splitlines()[-1])
    assert len(seen) == len(PARSE_ONLY)
    for argv, modules in zip(PARSE_ONLY, seen):
        assert modules == [], (argv, modules[:10])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["attack", "--bogus"]])
def test_program_imports_no_torch(argv):
    """`python -X importtime -m robustmargin ...`: the real program path (__main__, package __init__)."""
    proc = python("", "-X", "importtime", "-m", "robustmargin", *argv)
    assert proc.returncode == (0 if "--help" in argv else 2), proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "robustmargin.cli.main" in imported  # the report really lists our imports
    assert not {m for m in imported if m.split(".")[0] in HEAVY}


def test_version():
    proc = python("", "-m", "robustmargin", "--version")
    assert proc.returncode == 0 and proc.stdout == f"robustmargin {robustmargin.__version__}\n" == "robustmargin 0.1.0\n"


def test_package_import_is_light():
    proc = python("import sys, robustmargin; print(robustmargin.__version__, 'torch' in sys.modules)")
    assert proc.stdout == "0.1.0 False\n", proc.stderr[-3000:]


def test_train_stays_the_function():
    """Importing the submodule binds it on the package (setattr, as the import system does): refused."""
    module = importlib.import_module("robustmargin.train")
    setattr(robustmargin, "train", module)
    assert robustmargin.train is module.train and callable(robustmargin.train)
    import robustmargin.train as imported  # `import a.b as c` reads the attribute: the function, as before

    assert imported is module.train


def test_package_names_are_unchanged():
    import robustmargin.attacks
    import robustmargin.checkpoints
    import robustmargin.config
    import robustmargin.data
    import robustmargin.errors
    import robustmargin.external
    import robustmargin.robustness
    import robustmargin.rundir

    homes = {"Config": robustmargin.config, "UserError": robustmargin.errors, "evaluate": robustmargin.external,
             "adversarial_examples": robustmargin.rundir, "load_dataset": robustmargin.data,
             "load_checkpoint": robustmargin.checkpoints, "load_config": robustmargin.config,
             "load_preset": robustmargin.config, "load_split": robustmargin.rundir,
             "minimal_distances": robustmargin.attacks, "robust_accuracy_curve": robustmargin.robustness,
             "train": importlib.import_module("robustmargin.train")}
    assert sorted(homes) == robustmargin.__all__
    star: dict = {}
    exec("from robustmargin import *", star)
    for name, home in homes.items():
        assert getattr(robustmargin, name) is getattr(home, name) is star[name], name
    assert callable(robustmargin.train) and robustmargin.train.__module__ == "robustmargin.train"
    with pytest.raises(AttributeError, match="no_such_name"):
        robustmargin.no_such_name


def test_train_attribute_can_be_replaced(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(robustmargin, "train", sentinel)
    assert robustmargin.train is sentinel
    monkeypatch.undo()
    assert robustmargin.train is importlib.import_module("robustmargin.train").train


def test_name_lists_match_the_registries():
    from robustmargin import config
    from robustmargin.attacks import runner

    assert common.ATTACKS == tuple(runner.ATTACKS)
    assert common.BUDGETS == tuple(runner.BUDGETS)
    assert common.ENSEMBLES == runner.ENSEMBLES
    assert common.SCHEDULES == config.SCHEDULES
    assert common.preset_names() == config.preset_names() and "quick" in common.preset_names()


# --- help that is there and true ---------------------------------------------------------------------------

def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli_main.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_option_is_described():
    parser = cli_main.build_parser()
    assert "dispatches" not in parser.description and "--help" not in parser.description
    assert all(name in parser.description for name in cli_main.COMMANDS)
    for name, sub in subparsers().items():
        assert sub.description and len(sub.description) > 40, name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)


def test_help_states_what_the_code_does():
    subs = subparsers()
    attack = {a.dest: a for a in subs["attack"]._actions}
    assert "at most" not in attack["n"].help and "default 100" in attack["n"].help
    assert "attack --model" in next(a.help for a in subs["analyze"]._actions if a.dest == "run_dir")
    train = {a.dest: a for a in subs["train"]._actions}
    assert "2**63 - 2" in train["seed"].help and "epochs" in train["epochs"].help
    # defaults named in the help are the parser's defaults
    sweep = {a.dest: a for a in subs["sweep"]._actions}
    assert f"default {sweep['n'].default}" in sweep["n"].help and sweep["stages"].default in sweep["stages"].help
    assert f"default {subs['reproduce'].get_default('n')}" in " ".join(
        a.help for a in subs["reproduce"]._actions if a.dest == "n")


# --- Ctrl-C ---------------------------------------------------------------------------------------------------

def interrupt(monkeypatch, capsys, command: str, argv: list[str]) -> str:
    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[f"robustmargin.cli.{command}"], "run", stopped)
    assert run_main([command, *argv]) == 130
    return one_line(capsys)


@pytest.mark.parametrize("command", cli_main.COMMANDS)
def test_interrupt_names_the_way_to_continue(monkeypatch, capsys, command):
    line = interrupt(monkeypatch, capsys, command, MINIMAL[command])
    assert line.startswith(f"robustmargin {command}: interrupted")
    if command == "train":
        assert "--resume" in line
    else:
        assert "--resume" not in line and "rerun" in line
    if command in ("attack", "sweep", "reproduce"):
        assert "same command" in line and "kept" in line


def test_train_interrupt_prints_a_command_that_resumes(monkeypatch, capsys, tmp_path):
    out = tmp_path / "my run"
    line = interrupt(monkeypatch, capsys, "train", ["--preset", "quick", "--out", str(out), "--epochs", "5"])
    words = shlex.split(line.split(": robustmargin ", 1)[1])
    args = cli_main.build_parser().parse_args(words)
    assert (args.command, args.preset, args.out, args.epochs, args.resume) == ("train", "quick", out, 5, True)
    line = interrupt(monkeypatch, capsys, "train", ["--resume", "--out", str(out)])
    assert line.count("--resume") == 1


# --- broken pipes -------------------------------------------------------------------------------------------

PIPE_SCRIPT = """
import sys
import robustmargin.cli.status as status
def run(args):
    if {raise_it}:
        raise BrokenPipeError(32, "Broken pipe")  # a socket's, say: stdout is fine
    for i in range(100000):
        print(f"line {{i}}")
    return 0
status.run = run
from robustmargin.cli.main import main
sys.exit(main(["status", "--run", "DIR"]))
"""


def closed_reader(args: list[str]) -> subprocess.CompletedProcess:
    """Run python with stdout a pipe whose reader has already gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, "", err.decode())


def test_closed_pipe_exits_quietly():
    proc = closed_reader(["-c", PIPE_SCRIPT.format(raise_it=False)])
    assert proc.returncode == 141 and proc.stderr == ""
    proc = closed_reader(["-m", "robustmargin", "--help"])
    assert proc.returncode in (0, 141) and proc.stderr == ""  # argparse drops a failed help write itself


def test_other_broken_pipes_are_not_hidden():
    proc = python(PIPE_SCRIPT.format(raise_it=True))
    assert proc.returncode == 1 and "BrokenPipeError" in proc.stderr


def test_status_into_head_has_no_traceback(tmp_path):
    """The real command: `robustmargin status --run SWEEP --json | head -c 10`, with more text than a pipe
    holds."""
    sweep = tmp_path / "sweep"
    for i in range(150):  # ~600 bytes of JSON each: past the 64 KiB a pipe buffers
        run = sweep / "runs" / f"seed={i}"
        run.mkdir(parents=True)
        (run / "config.toml").write_text("")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m robustmargin status --run {shlex.quote(str(sweep))} "
                          f"--json | head -c 10", shell=True, capture_output=True, text=True, timeout=120, env=env)
    assert len(proc.stdout) == 10 and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


# --- arguments checked before any work -----------------------------------------------------------------------

@pytest.mark.parametrize("value, ok", [("0", True), (str(2 ** 63 - 2), True), (str(2 ** 63 - 1), False),
                                       ("-1", False), (str(10 ** 20), False), ("1.5", False)])
def test_seed_range(capsys, value, ok):
    if ok:
        assert cli_main.build_parser().parse_args(["train", "--seed", value]).seed == int(value)
    else:
        assert run_main(["train", "--preset", "quick", "--seed", value]) == 2
        assert "--seed" in one_line(capsys)


def test_largest_seed_is_usable():
    """The bound is real: torch takes both seeds the run draws from (seed and seed + 1)."""
    import torch

    torch.Generator().manual_seed(common.SEED_MAX)
    torch.Generator().manual_seed(common.SEED_MAX + 1)


@pytest.mark.parametrize("argv", [
    ["train", "--preset", "quick", "--out", "FILE"],
    ["train", "--preset", "quick", "--out", "FILE/sub"],
    ["sweep", "--config", "SWEEP.toml", "--out", "FILE"],
    ["compare", "--runs", "A", "B", "--out", "FILE"],
    ["theory", "--out", "FILE", "--quick"],
    ["reproduce", "--preset", "quick", "--out", "FILE"],
])
def test_out_naming_a_file(tmp_path, capsys, argv):
    file = tmp_path / "taken"
    file.write_text("keep me")
    argv = [str(file) + a[4:] if a.startswith("FILE") else a for a in argv]
    assert run_main(argv) == 2
    line = one_line(capsys)
    assert str(file) in line and "not a directory" in line
    assert file.read_text() == "keep me"


def test_default_out_naming_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quick").write_text("")
    assert run_main(["train", "--preset", "quick", "--quiet"]) == 2
    assert "runs/quick" in one_line(capsys)


def test_cuda_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = tmp_path / "run"
    run.mkdir()
    for argv in (["train", "--preset", "quick", "--out", tmp_path / "t"],
                 ["reproduce", "--preset", "quick", "--out", tmp_path / "r"],
                 ["attack", "--run", run], ["analyze", "--run", run],
                 ["attack", "--model", tmp_path / "absent.py:net", "--data", "mnist5k", "--out", tmp_path / "m"]):
        assert run_main([*argv, "--device", "cuda", "--quiet"]) == 2, argv
        line = one_line(capsys)
        assert "CUDA" in line, (argv, line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing was made
