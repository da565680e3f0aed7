"""The docs cannot drift from the code: README.md and docs/*.md are read here and held to it.

- Every `python -m MODULE ...` command in a fenced code block (and torchrun's `-m MODULE ...`) is
  read by that module's own parser, with `\\` continuations joined and the variables its block sets
  (`R="..."`, `export X=...`, `for r in ...; do`) expanded. Nothing runs: the parsers are pure
  readings of the flags (each module's `build_parser()`, `training.__main__.parse_args`,
  `service.config.parse_config`), and no check of files or folders is called.
- A command said to be `= make X` (or `make X` said to be `= COMMAND`, or `the same with FLAGS`)
  reads to the same arguments as the line `make -n X` prints for that module.
- Every HTTP route the docs name exists in the FastAPI app `service.rest.app.build_app` builds, for
  the method they name; `/metrics` is the metrics port's (prometheus-client), not the app's.
- Every metric the docs name (`vae_...`) is a sample name (or a histogram's name) of
  `service.metrics.Metrics().registry`, and a label list written beside it is the metric's labels.

Each check also runs on a broken snippet (the `test_*_catches_*` tests), so it is known to fail.

Not read: commands of other programs (curl, make, docker, grpcurl; `docker run ... --flags` that
pass through to the server included), modules that are not the project's (NOT_OURS below), code
spans in prose written as synopses (with `...`, `[optional]` or `a|b`); in prose, required
arguments may be left out. Torchrun's own flags are read by torchrun's parser. Routes are found
after `localhost:PORT`, after an HTTP method, or as the API's prefixes (/v1, /v2, /docs,
/openapi.json, /metrics); a path under another prefix is not recognised as a route.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The project's commands and where their parsers are. `service` is read by parse_config (with an
# empty environment, so no VAE_* variable changes what a doc line means), `training` by its
# build_parser() for the comparison and by parse_args for the checks that flags make together.
PARSERS = {
    "training": "training.__main__",
    "training.features": "training.features",
    "training.evaluate": "training.evaluate",
    "training.top_prior": "training.top_prior",
    "training.compare": "training.compare",
    "training.curves": "training.curves",
    "export": "export.__main__",
    "export.triton": "export.triton",
    "bench": "bench.__main__",
    "bench.ab": "bench.ab",
    "bench.loading": "bench.loading",
    "bench.memory": "bench.memory",
    "service": "service.config",
    "service.client": "service.client",
}
# Modules that are not the project's: their commands are skipped, not read. None is in a code
# block today; a module in neither table fails the test (a misspelt module must not pass unread).
NOT_OURS = {
    "pip": "pip's own command line (installing), not the project's",
    "venv": "the standard library's",
    "pytest": "pytest's own command line",
    "grpc_tools.protoc": "grpcio-tools' compiler (make proto)",
}
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
TORCHRUNS = {"torchrun", ".venv/bin/torchrun"}
# The project's Parser writes its errors as `PROG: error: ...` (service/commands.py): docs show such
# lines as output, not as commands. Their PROG must still be a parser's own.
ERROR_LINE = re.compile(r"^(python -m [\w.]+): error: ")
# Words in the docs that look like metric names and are not: each with the reason.
NOT_METRICS = {
    "vae_sample": "the platform the Open Inference Protocol's NAME_sample model reports (service/oip_models.py)",
}
HTTP_PORT, METRICS_PORT = 8000, 9090  # the defaults the docs use (service/config.py)


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    module: str
    args: tuple[str, ...]


# ---- reading the docs ------------------------------------------------------------------------


def blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """Fenced shell blocks (```sh, ```bash, ```console or a bare ```): their first line's number and
    lines. ```python, ```json and the like hold no shell."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i + 1, fence.group(1)
        j = start
        while j < len(lines) and not re.match(r"^\s*```", lines[j]):
            j += 1
        if lang in ("", "sh", "bash", "shell", "console"):
            yield start + 1, lines[start:j]
        i = j + 1


def logical_lines(first: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """Lines with `\\` continuations joined, and each line's number. A comment that continues onto
    `#`-prefixed lines (a `make X  # = COMMAND \\` block) is joined without those `#`."""
    i = 0
    while i < len(lines):
        number, line = first + i, lines[i].rstrip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            following = lines[i].strip()
            if "#" in line and following.startswith("#"):
                following = following[1:].strip()
            line = line[:-1].rstrip() + " " + following.rstrip()
        yield number, line
        i += 1


def split(line: str) -> list[list[str]]:
    """A shell line as the words of each command in it: split at ; && || | & and comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    segments: list[list[str]] = [[]]
    for word in lexer:
        if word in (";", "&", "&&", "|", "||"):
            segments.append([])
        else:
            segments[-1].append(word)
    return [s for s in segments if s]


PROGRAM = re.compile(r"(?:^|[\s;&|])(?:\.venv/bin/)?(?:python3?|torchrun)\s")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(line: str, env: dict[str, list[str]]) -> list[str]:
    """The line with the block's variables put in (one line per value of a loop's variable); a
    variable the block does not set is a KeyError naming it."""
    used = {a or b for a, b in VARIABLE.findall(line)}
    missing = used - env.keys()
    if missing:
        raise KeyError(", ".join(f"${name}" for name in sorted(missing)))
    loops = [name for name in used if len(env[name]) > 1]
    if len(loops) > 1:
        raise KeyError(f"two loop variables at once: {loops}")
    out = []
    for value in env[loops[0]] if loops else [""]:
        values = {name: value if loops and name == loops[0] else env[name][0] for name in used}
        out.append(VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], line))
    return out


def read_block(where: str, first: int, lines: list[str]) -> tuple[list[Command], list[tuple[str, str, str]], list[str]]:
    """A code block's commands, its `= make X` claims (where, target, the command said to be it) and
    its problems. Claims: `COMMAND  # = make X`, `make X  # = COMMAND`, `make X  # the same with FLAGS`."""
    env: dict[str, list[str]] = {}
    commands: list[Command] = []
    claims: list[tuple[str, str, str]] = []
    problems: list[str] = []
    last_make: str | None = None  # the COMMAND of the block's last `make X  # = COMMAND`
    for number, raw in logical_lines(first, lines):
        at = f"{where}:{number}"
        ours = bool(PROGRAM.search(raw))  # a line that runs python or torchrun; others may be any text
        if ERROR_LINE.match(raw.strip()):
            prog = ERROR_LINE.match(raw.strip()).group(1)
            module = prog.removeprefix("python -m ")
            if module not in PARSERS or prog_of(module) != prog:
                problems.append(f"{at}: an error line of {prog!r}, which no parser of the project prints")
            continue
        made = re.match(r"^\s*make\s+([\w-]+)\s+#\s*(=|the same with)\s+(.*)$", raw)
        if made:
            target, kind, text = made.groups()
            if kind == "=":
                last_make = text
                claims.append((at, target, text))
            elif last_make is None:
                problems.append(f"{at}: 'the same with' follows no `make X  # = COMMAND` line")
            else:
                claims.append((at, target, f"{last_make} {text}"))
            continue
        try:
            expanded = expand(raw, env)
        except KeyError as err:
            if ours:
                problems.append(f"{at}: uses {err.args[0]}, which its code block does not set: spell it out")
            continue
        for line in expanded:
            try:
                segments = split(line)
            except ValueError as err:  # an unclosed quote
                if ours:
                    problems.append(f"{at}: cannot be read as a shell line ({err})")
                continue
            for words in segments:
                if words[0] in ("do", "then"):
                    words = words[1:]
                if words and words[0] == "for" and len(words) > 3 and words[2] == "in":
                    env[words[1]] = [w for w in words[3:] if w != "do"]
                    continue
                if words and words[0] == "export":
                    words = words[1:]
                assignments = 0
                while assignments < len(words) and re.match(r"^\w+=", words[assignments]):
                    assignments += 1
                if assignments == len(words):  # NAME=value: the block's variable
                    for word in words:
                        name, value = word.split("=", 1)
                        env[name] = [value]
                    continue
                command = command_of(at, words[assignments:])  # a prefix NAME=value is its environment
                if isinstance(command, str):
                    problems.append(command)
                elif command is not None:
                    commands.append(command)
                    said = re.search(r"#.*?\(?=\s*`?make\s+([\w-]+)", raw)
                    if said:
                        text = shlex.join([".venv/bin/python", "-m", command.module, *command.args])
                        claims.append((at, said.group(1), text))
    return commands, claims, problems


def command_of(at: str, words: list[str]) -> Command | str | None:
    """The project's command in these words (python -m M ... or torchrun ... -m M ...), None for
    any other program, or a problem."""
    if words[0] in PYTHONS and len(words) > 2 and words[1] == "-m":
        return Command(at, words[2], tuple(words[3:]))
    if words[0] in TORCHRUNS:
        from torch.distributed.run import get_args_parser

        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                launch = get_args_parser().parse_args(words[1:])
        except SystemExit:
            return f"{at}: torchrun's own parser refuses it: {err.getvalue().strip().splitlines()[-1]}"
        if not launch.module:
            return f"{at}: torchrun runs a script, not a module of the project (-m MODULE)"
        return Command(at, launch.training_script, tuple(launch.training_script_args))
    if words[0] in PYTHONS and "-m" in words:
        return f"{at}: python -m must come first, as `python -m MODULE ...`"
    return None


def inline_claims(where: str, text: str) -> list[tuple[str, str, str]]:
    """In prose: `COMMAND` (= `make X`) and `make X` (= `COMMAND`), code spans that may run over
    a line break."""
    claims = []
    for m in re.finditer(r"`([^`]+)`\s*\(=\s*`([^`]+)`", text):
        first, second = (" ".join(s.split()) for s in m.groups())
        at = f"{where}:{text.count(chr(10), 0, m.start()) + 1}"
        for command, make in ((first, second), (second, first)):
            target = re.fullmatch(r"make ([\w-]+)", make)
            if target:
                claims.append((at, target.group(1), command))
    return claims


@functools.cache
def docs() -> tuple[list[Command], list[tuple[str, str, str]], list[str]]:
    commands, claims, problems = [], [], []
    for path in DOCS:
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        for first, lines in blocks(text):
            c, k, p = read_block(name, first, lines)
            commands += c
            claims += k
            problems += p
        claims += inline_claims(name, prose(text))
    return commands, claims, problems


def prose(text: str) -> str:
    """The text with its fenced blocks blanked (their lines kept, so line numbers hold)."""
    out, inside = [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


# ---- the project's parsers -------------------------------------------------------------------


def prog_of(module: str) -> str:
    if module == "service":
        return "python -m service"
    return importlib.import_module(PARSERS[module]).build_parser().prog


def read(module: str, args: tuple[str, ...], partial: bool = False) -> dict[str, Any]:
    """The arguments as the module's own parser reads them, or SystemExit(message) as it refuses them.
    `partial`: a command named in prose, whose required arguments may be left out."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            if module == "service":
                from service.config import parse_config

                return dataclasses.asdict(parse_config(list(args), env={}))
            parser = importlib.import_module(PARSERS[module]).build_parser()
            strict(parser)
            if partial:
                optional(parser)
            elif module == "training":
                from training.__main__ import parse_args

                parse_args(list(args))  # the flags' own checks (ModelConfig, TrainConfig): pure
            return vars(parser.parse_args(list(args)))
        except SystemExit:
            raise SystemExit(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "refused") from None


def strict(parser: argparse.ArgumentParser) -> None:
    """No abbreviated flags (in its sub-commands neither): the docs spell flags out, since `--fp16`
    stops meaning `--fp16-decoder` once another flag starts so."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                strict(sub)


def optional(parser: argparse.ArgumentParser) -> None:
    """Every argument of the parser (and of its sub-commands) made optional."""
    for action in parser._actions:  # argparse keeps them here, and has no public way to list them
        action.required = False
        if action.nargs is None and not action.option_strings:
            action.nargs = "?"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                optional(sub)


def inline_commands(where: str, text: str) -> tuple[list[Command], list[str]]:
    """Commands named in prose code spans, `python -m MODULE ...`: a span with `...`, `[` or `|` is
    a synopsis (skipped), one with --help only names the help."""
    commands, problems = [], []
    for m in re.finditer(r"`((?:\.venv/bin/)?python3? -m [^`]+)`", text):
        span = " ".join(m.group(1).split())
        at = f"{where}:{text.count(chr(10), 0, m.start()) + 1}"
        if any(s in span for s in ("...", "[", "|")):
            continue
        try:
            (words,) = split(span)
        except ValueError as err:
            problems.append(f"{at}: `{span}` cannot be read as a shell command ({err})")
            continue
        if "--help" in words or "-h" in words:
            words = [w for w in words if w not in ("--help", "-h")]
        command = command_of(at, words)
        if isinstance(command, Command):
            commands.append(command)
    return commands, problems


def parse_problems(commands: list[Command], partial: bool = False) -> list[str]:
    problems = []
    for c in commands:
        if c.module in NOT_OURS:
            continue
        if c.module not in PARSERS:
            problems.append(f"{c.where}: python -m {c.module}: no such command of the project (nor a known other one)")
            continue
        try:
            read(c.module, c.args, partial)
        except SystemExit as refused:
            problems.append(f"{c.where}: {refused}")
    return problems


# ---- make -n --------------------------------------------------------------------------------


@functools.cache
def make_lines(target: str) -> tuple[str, ...]:
    """What `make -n` would run for the target, from the repository root, with the Makefile's own
    defaults (no environment that could set RUNS, NAME ...). --always-make: even what is built."""
    result = subprocess.run(
        ["make", "-n", "--always-make", "--no-print-directory", target], cwd=ROOT, capture_output=True, text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"make -n {target}: {result.stderr.strip()}")
    return tuple(line for _, line in logical_lines(1, result.stdout.splitlines()))


def make_problems(claims: list[tuple[str, str, str]]) -> list[str]:
    problems = []
    for at, target, text in claims:
        words = split(text)
        command = command_of(at, words[0]) if len(words) == 1 else None
        if not isinstance(command, Command) or command.module not in PARSERS:
            problems.append(f"{at}: `{text}` (= make {target}) is not one command of the project")
            continue
        try:
            lines = make_lines(target)
        except AssertionError as err:
            problems.append(f"{at}: {err}")
            continue
        runs = []
        for line in lines:
            for words in split(line):
                made = command_of(at, words)
                if isinstance(made, Command) and made.module == command.module:
                    runs.append(made)
        if len(runs) != 1:
            problems.append(f"{at}: make -n {target} runs python -m {command.module} {len(runs)} times, not once")
            continue
        try:
            said, done = read(command.module, command.args), read(command.module, runs[0].args)
        except SystemExit as refused:
            problems.append(f"{at}: {refused}")
            continue
        if said != done:
            differ = sorted(k for k in said.keys() | done.keys() if said.get(k) != done.get(k))
            changes = "; ".join(f"{k}: docs {said.get(k)!r}, make {done.get(k)!r}" for k in differ)
            problems.append(f"{at}: not what make {target} runs ({shlex.join(runs[0].args)}): {changes}")
    return problems


# ---- HTTP routes ---------------------------------------------------------------------------------

PATH_CHARS = r"[A-Za-z0-9_.~{}\[\],/?=&%-]"
ROUTE_MENTIONS = [
    # localhost:PORT/path (with or without http://)
    re.compile(rf"localhost:(?P<port>\d+)(?P<path>/{PATH_CHARS}*)"),
    # GET /path, POST /path ...
    re.compile(rf"\b(?P<method>GET|POST|HEAD|PUT|DELETE|PATCH) (?P<path>/{PATH_CHARS}*)"),
    # the API's own prefixes, standing alone (not inside a file path such as proto/vae/v1/)
    re.compile(rf"(?<![\w./:~-])(?P<path>/(?:v1|v2|docs|openapi\.json|metrics)(?:[/?]{PATH_CHARS}*)?)(?![\w])"),
]


def route_mentions(where: str, text: str) -> Iterator[tuple[str, str, str | None, int | None]]:
    """(file:line, path, method or None, port or None) for each route the text names."""
    for number, line in logical_lines(1, text.splitlines()):  # a curl's -d may be on its next line
        post = line.lstrip().startswith("curl") and bool(re.search(r"\s-(F|d|-data\S*|-form)\s", line))
        for pattern in ROUTE_MENTIONS:
            for m in pattern.finditer(line):
                found = m.groupdict()
                path = found["path"].split("?")[0]
                path = path if path.endswith("/...") else path.rstrip(".,;:")
                method = found.get("method") or ("POST" if post else None)
                port = int(found["port"]) if found.get("port") else None
                yield f"{where}:{number}", path, method, port


def variants(path: str) -> list[str]:
    """A doc path as concrete paths: [optional] parts both ways, {a,b} each, {param} a value."""
    opt = re.search(r"\[([^\[\]]*)\]", path)
    if opt:
        return variants(path[: opt.start()] + opt.group(1) + path[opt.end() :]) + variants(
            path[: opt.start()] + path[opt.end() :]
        )
    alt = re.search(r"\{([^{}]*)\}", path)
    if alt:
        choices = alt.group(1).split(",") if "," in alt.group(1) else ["x"]
        return [v for c in choices for v in variants(path[: alt.start()] + c + path[alt.end() :])]
    return [path]


@functools.cache
def http_app() -> Any:
    """The FastAPI app, built as service/server.py builds it, over no models (routes need none)."""
    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.rest.app import HttpSettings, build_app

    guard = build_app(DataPlane(None, Metrics()), None, HttpSettings())  # type: ignore[arg-type]
    return guard.app  # the FastAPI app inside the auth and body-size guard


def app_serves(path: str, method: str | None) -> bool:
    from starlette.routing import Match

    app = http_app()
    if path.endswith("/..."):  # a family of routes: some route below the prefix
        prefix = path[: -len("...")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FastAPI warns of the health routes' GET and HEAD ids
            paths = list(app.openapi()["paths"]) + [getattr(r, "path", "") for r in app.routes]
        return any(p.startswith(prefix) for p in paths)
    for m in [method] if method else ["GET", "POST"]:
        scope = {"type": "http", "path": path, "method": m, "root_path": "", "headers": [], "query_string": b""}
        if any(route.matches(dict(scope))[0] == Match.FULL for route in app.routes):
            return True
    return False


def metrics_port_serves(path: str) -> bool:
    """The metrics port: prometheus-client's WSGI app over the server's registry (service/metrics.py)."""
    from prometheus_client import make_wsgi_app

    from service.metrics import Metrics

    status: list[str] = []
    body = make_wsgi_app(Metrics().registry)(
        {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "HTTP_ACCEPT": "text/plain"},
        lambda s, headers, exc_info=None: status.append(s),
    )
    return status[0].startswith("200") and b"vae_" in b"".join(body)


def route_problems(mentions: list[tuple[str, str, str | None, int | None]]) -> list[str]:
    problems = []
    for at, path, method, port in mentions:
        on_metrics = port == METRICS_PORT or (port is None and path == "/metrics")
        if port not in (None, HTTP_PORT, METRICS_PORT):
            problems.append(f"{at}: {path} on port {port}, neither HTTP ({HTTP_PORT}) nor metrics ({METRICS_PORT})")
            continue
        for concrete in variants(path):
            if on_metrics:
                ok = concrete == "/metrics" and metrics_port_serves(concrete) and not app_serves(concrete, None)
                where = "the metrics port"
            else:
                ok = app_serves(concrete, method)
                where = "the HTTP app"
            if not ok:
                problems.append(f"{at}: {method or 'GET/POST'} {concrete} (from {path}) is no route of {where}")
    return problems


# ---- metrics ---------------------------------------------------------------------------------------

METRIC = re.compile(r"(?<![\w.-])(vae_[a-z0-9_]+)(?![\w-]|\.\w)(\{[^}]*\})?")


@functools.cache
def registered() -> dict[str, frozenset[str]]:
    """Every sample name of the server's registry (prometheus-client adds _total and _created to
    counters, _bucket, _count, _sum and _created to histograms) and a histogram's own name, each
    with its labels. A series of every metric is made first, so that each shows its samples."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    m = Metrics()
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase) and metric._labelnames:  # prometheus-client keeps the names here
            metric.labels(*["x"] * len(metric._labelnames))
    names: dict[str, frozenset[str]] = {}
    for family in m.registry.collect():
        assert family.samples, f"{family.name} showed no sample"
        for sample in family.samples:
            names[sample.name] = frozenset(sample.labels) - {"le"}
        if family.type == "histogram":
            names[family.name] = names[family.name + "_count"]
    return names


def metric_mentions(where: str, text: str) -> Iterator[tuple[str, str, str | None]]:
    for number, line in enumerate(text.splitlines(), 1):
        for m in METRIC.finditer(line):
            yield f"{where}:{number}", m.group(1), m.group(2)


def metric_problems(mentions: list[tuple[str, str, str | None]]) -> list[str]:
    names = registered()
    problems = []
    for at, name, labels in mentions:
        if name in NOT_METRICS:
            continue
        if name not in names:
            problems.append(f"{at}: {name} is not a metric of service/metrics.py (it has {', '.join(sorted(names))})")
            continue
        if labels:
            items = [item.strip() for item in labels.strip("{}").split(",") if item.strip()]
            keys = {item.split("=")[0].strip() for item in items}
            bare = all("=" not in item for item in items)
            if (bare and keys != names[name]) or not keys <= names[name]:
                problems.append(f"{at}: {name}{labels}: its labels are {{{','.join(sorted(names[name]))}}}")
    return problems


# ---- the tests -------------------------------------------------------------------------------------


def test_doc_commands_are_read_by_their_parsers() -> None:
    commands, _, problems = docs()
    assert len(commands) > 30, f"found only {len(commands)} commands: the docs reader broke"
    problems = problems + parse_problems(commands)
    assert not problems, "\n".join(problems)


def test_commands_in_prose_use_real_flags() -> None:
    """Code spans in prose name commands with some of their flags: each flag and value must be the
    parser's, though required ones may be left out."""
    commands, problems = [], []
    for path in DOCS:
        c, p = inline_commands(path.relative_to(ROOT).as_posix(), prose(path.read_text()))
        commands += c
        problems += p
    assert len(commands) > 30, f"found only {len(commands)} commands: the docs reader broke"
    problems += parse_problems(commands, partial=True)
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_equivalents_are_what_make_runs() -> None:
    _, claims, _ = docs()
    assert {target for _, target, _ in claims} >= {"train", "features", "export", "train-mnist", "bench"}, claims
    problems = make_problems(claims)
    assert not problems, "\n".join(problems)


def test_http_routes_exist() -> None:
    mentions = [m for path in DOCS for m in route_mentions(path.relative_to(ROOT).as_posix(), path.read_text())]
    assert len(mentions) > 20, f"found only {len(mentions)} routes: the docs reader broke"
    problems = route_problems(mentions)
    assert not problems, "\n".join(problems)


def test_metric_names_are_registered() -> None:
    mentions = [m for path in DOCS for m in metric_mentions(path.relative_to(ROOT).as_posix(), path.read_text())]
    assert len(mentions) > 10, f"found only {len(mentions)} metric names: the docs reader broke"
    problems = metric_problems(mentions)
    assert not problems, "\n".join(problems)


# ---- each check fails on a broken doc ---------------------------------------------------------------


BROKEN_BLOCK = """\
R="--likelihood gaussian --no-such-flag 1"
.venv/bin/python -m training --dataset digits $R --out runs/x
python -m export --checkpoint runs/x/best.pt --out models $UNSET
python -m trainig --dataset digits --out runs/x
python -m training --dataset digits --epochs 40 --out runs/digits   # = make train
python -m nonsense: error: a line no parser prints
"""


def test_commands_check_catches_a_broken_block() -> None:
    commands, claims, problems = read_block("broken.md", 1, BROKEN_BLOCK.splitlines())
    problems = problems + parse_problems(commands)
    text = "\n".join(problems)
    assert "broken.md:2: python -m training: error: unrecognized arguments: --no-such-flag 1" in text
    assert "broken.md:3: uses $UNSET" in text
    assert "broken.md:4: python -m trainig: no such command" in text
    assert "broken.md:6: an error line" in text
    assert [(at, target) for at, target, _ in claims] == [("broken.md:5", "train")]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_check_catches_a_stale_recipe() -> None:
    _, claims, _ = read_block("broken.md", 1, BROKEN_BLOCK.splitlines())
    (problem,) = make_problems(claims)
    assert problem.startswith("broken.md:5: not what make train runs")
    assert "free_bits: docs 0.1, make 0.0" in problem and "widths: docs None, make (32, 64)" in problem
    stale = "Command: `make features` (= `python -m training.features --dataset mnist --out runs/features-digits`)"
    (problem,) = make_problems(inline_claims("broken.md", stale))
    assert "dataset: docs 'mnist', make 'digits'" in problem


def test_prose_check_catches_a_wrong_flag() -> None:
    text = "`python -m bench --part single --modelrepo models`, `python -m export --fp16`,"
    text += " `python -m export --fp32-decoder`"
    text += " (a synopsis such as `python -m x ...` is not read)"
    commands, problems = inline_commands("broken.md", text)
    problems += parse_problems(commands, partial=True)
    assert len(problems) == 3 and "unrecognized arguments: --modelrepo models" in problems[0], problems
    assert "unrecognized arguments: --fp16" in problems[1], problems  # a flag spelt out, not abbreviated


def test_routes_check_catches_missing_routes() -> None:
    text = "`GET /v1/models/NAME/sampel.png`, `POST /v2/health/ready`, localhost:8000/metrics,"
    text += " `/v2/models[/M]/nothing`, localhost:8081/v2/health/live"
    problems = "\n".join(route_problems(list(route_mentions("broken.md", text))))
    assert "GET /v1/models/NAME/sampel.png (from" in problems
    assert "POST /v2/health/ready (from" in problems  # a route, but GET and HEAD only
    assert "GET/POST /metrics (from /metrics) is no route of the HTTP app" in problems  # the metrics port's
    assert "/v2/models/M/nothing (from /v2/models[/M]/nothing)" in problems  # (/v2/models/nothing is model metadata)
    assert "/v2/health/live on port 8081" in problems


def test_metrics_check_catches_stale_names_and_labels() -> None:
    text = "`vae_requests_total{rpc,code,model}` (version is missing), `vae_requests` (counters end in _total),"
    text += " `vae_no_such_seconds`, `vae_rejections_total{x=\"y\"}`, `vae_grpc.py` (a file), `vae_sample`"
    problems = metric_problems(list(metric_mentions("broken.md", text)))
    assert [p.split(":")[2].split()[0] for p in problems] == [
        "vae_requests_total{rpc,code,model}", "vae_requests", "vae_no_such_seconds", 'vae_rejections_total{x="y"}'
    ], problems
