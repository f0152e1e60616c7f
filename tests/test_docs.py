"""Every ```python block of README.md and docs/*.md runs as written; every shell command
there names a subcommand, option, file, extra or module that exists.

A block may use what the page says is the reader's own: ``model``, ``opt``, ``epochs`` and
the data (``base_set`` of ``(x, y)`` pairs, ``train_set`` with indices, ``loader``,
``eval_loader``; for a language-model block ``logits``, ``labels``, ``index`` and
``tracker``; for the Hugging Face block a transformers model, its TrainingArguments and
datasets). The test injects small stand-ins for exactly those names, the imports of the
page's earlier blocks (a page is read top to bottom), and runs the block in a temporary
directory. A block that imports an optional package which is not installed is skipped,
with the package's name. Tracker files a block reads (``"*.csl"``) are made first.
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import re
import socket
import warnings
from pathlib import Path

import pytest
import torch

import csl_fast

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

N, C = 64, 10  # stand-in data: N images 1x28x28 in C classes, as the snippets' networks take


def _blocks() -> list[tuple[Path, int, str, str]]:
    """(page, line, code, the imports of the page's earlier blocks) for every block."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        earlier: list[str] = []
        for m in FENCE.finditer(text):
            code = m.group(1)
            line = text.count("\n", 0, m.start()) + 1
            found.append((page, line, code, "\n".join(earlier)))
            tree = ast.parse(code)
            earlier += [
                ast.unparse(node)
                for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom))
            ]
    return found


BLOCKS = _blocks()


def _imported_modules(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


# What the integrations import beyond what csl_fast needs (their own modules import these).
NEEDS = {
    "csl_fast.integrations.lightning": ("pytorch_lightning",),
    "csl_fast.integrations.huggingface": ("transformers", "accelerate"),
}


#: Packages csl_fast imports only when a function needs them (scikit-learn for the gmm
#: rule and the metrics, pandas for data frames, ...).
OPTIONAL = {"sklearn", "pandas", "cleanlab", "matplotlib", "tqdm", "lightning", "transformers"}


def _missing(code: str) -> list[str]:
    missing = []
    for name in sorted(_imported_modules(code)):
        for dep in (name, *NEEDS.get(name, ())):
            if importlib.util.find_spec(dep.split(".")[0]) is None:
                missing.append(dep)
    return missing


def _data_stand_ins() -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 1, 28, 28, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    base_set = torch.utils.data.TensorDataset(x, y)
    train_set = csl_fast.data.IndexedDataset(base_set)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, C))
    # The language-model snippets: logits [B, T, V] of B = 4 sequences of T = 5 tokens over a
    # V = 11 vocabulary, their labels [B, T], dataset indices [B] and a tracker of N sequences.
    logits = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    return {
        "logits": logits,
        "labels": torch.randint(0, 11, (4, 5), generator=g),
        "index": torch.arange(4),
        "tracker": csl_fast.CSLTracker(N, 11),
        "base_set": base_set,
        "train_set": train_set,
        "loader": torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=True),
        "eval_loader": torch.utils.data.DataLoader(train_set, batch_size=32),
        "model": model,
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
        "epochs": 1,
    }


def _huggingface_stand_ins(out_dir: Path) -> dict:
    # The integration tests' tiny randomly initialised BERT and its dict examples.
    from integrations.test_huggingface import Examples, _args, _model

    return {
        "model": _model(),
        "training_args": _args(out_dir, 1),
        "train_dataset": Examples(),
        "eval_dataset": Examples(),
    }


def _tracker_files(code: str) -> None:
    """Saved runs a block reads, e.g. the seeds merge combines: a tracker file each."""
    for name in sorted(set(re.findall(r"[\"']([\w.-]+\.csl)[\"']", code))):
        tracker = csl_fast.CSLTracker(N, C)
        tracker.csl_sum.uniform_(0.0, 5.0)
        tracker.csl_count.fill_(1.0)
        tracker.save(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("page", "line", "code", "imports"),
    BLOCKS,
    ids=[f"{page.relative_to(ROOT)}:{line}" for page, line, _, _ in BLOCKS],
)
def test_block_runs_as_written(page, line, code, imports, tmp_path, monkeypatch):
    missing = _missing(imports + "\n" + code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, not installed")
    monkeypatch.chdir(tmp_path)
    # torchrun's environment for one process (the torch.distributed example).
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    namespace = {"__name__": "__doc_block__", **_data_stand_ins()}
    if "integrations.huggingface" in code:
        namespace.update(_huggingface_stand_ins(tmp_path / "hf"))
    _tracker_files(code)
    source = compile(imports + "\n" + code, f"{page.name}:{line}", "exec")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the trainers' advice about workers and devices
            exec(source, namespace)
    except ModuleNotFoundError as exc:  # a csl_fast call that imports an optional package
        if (exc.name or "").split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"needs {exc.name}, not installed")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_every_page_has_its_blocks_found():
    """The fence pattern finds the blocks (a change in fencing would silently test none)."""
    pages = {page.name for page, *_ in BLOCKS}
    assert {"README.md", "distributed.md"} <= pages
    assert len(BLOCKS) >= 6


def test_no_block_uses_a_name_nothing_defines():
    """Names a block reads are defined by the block, the page's earlier imports, Python, or
    the documented stand-ins: a new snippet cannot rely on a name the reader never gets."""
    stand_ins = set(_data_stand_ins()) | {"training_args", "train_dataset", "eval_dataset"}
    for page, line, code, imports in BLOCKS:
        tree = ast.parse(imports + "\n" + code)
        defined = stand_ins | set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        used = {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        assert used <= defined, f"{page.name}:{line} uses undefined {sorted(used - defined)}"


SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)


def _shell_commands() -> list[tuple[str, int, str]]:
    """(page, line, command) for every command of every shell block: comments dropped, and
    ``a && b`` split into its commands."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in SHELL_FENCE.finditer(text):
            first = text.count("\n", 0, m.start()) + 2
            for i, raw in enumerate(m.group(1).splitlines()):
                line = raw.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    found += [(page.name, first + i, c.strip()) for c in line.split("&&")]
    return found


def _cli_options() -> dict[str, set[str]]:
    import argparse

    from csl_fast.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()
    }


def _setup_extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {k.value for k in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


def test_shell_blocks_name_what_exists():
    """Every shell command of the docs asks for what the project has: csl-fast subcommands
    and their options, requirement files, setup.py's extras, modules run with -m. (The
    commands themselves install packages or train, so the CLI tests and CI run them.)"""
    commands = _shell_commands()
    assert any(c.startswith("csl-fast ") for _, _, c in commands)  # the pattern finds them
    cli, extras = _cli_options(), _setup_extras()
    for page, line, cmd in commands:
        where = f"{page}:{line}: {cmd}"
        words = cmd.split()
        if words[0] == "csl-fast":
            assert words[1] in cli, f"{where}: no subcommand {words[1]!r}"
            for flag in re.findall(r"(?<![\w-])--?[a-z][a-z-]*", cmd):
                assert flag in cli[words[1]], f"{where}: {words[1]} has no option {flag}"
        elif words[:2] == ["pip", "install"]:
            for i, w in enumerate(words):
                if w == "-r":
                    assert (ROOT / words[i + 1]).is_file(), f"{where}: no {words[i + 1]}"
            for spec in re.findall(r"\.\[([\w,-]+)\]", cmd):
                missing = set(spec.split(",")) - extras
                assert not missing, f"{where}: setup.py has no extra {sorted(missing)}"
        elif words[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module"
        else:
            raise AssertionError(f"{where}: a command this test does not know how to check")


def test_tracker_memory_figures_are_what_a_tracker_holds():
    """The bytes per sample that README.md and CSLTracker's docstring quote are what
    ``nbytes`` counts (the figure outlived the benchmark file it was first cited from)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quoted = re.search(r"default tracker holds (\d+) bytes per sample", readme)
    doc = csl_fast.CSLTracker.__doc__
    in_doc = re.search(r"takes \*\*(\d+) bytes per sample\*\*.*?; (\d+) in float64", doc, re.S)
    assert quoted and in_doc, "the memory figures moved: update this test"
    n = 1000
    float32 = csl_fast.CSLTracker(n, C).nbytes() / n
    float64 = csl_fast.CSLTracker(n, C, dtype=torch.float64).nbytes() / n
    assert int(quoted.group(1)) == float32
    assert (int(in_doc.group(1)), int(in_doc.group(2))) == (float32, float64)


def test_input_grad_speedup_says_what_it_times():
    """The input-gradient norms' speedup is that of the benchmark's kernel plus one
    index_add_ (csl_fast/bench/cases.py), not of watch's path, which adds
    record_input_grad's Python checks: the README read as if watch itself ran that fast."""
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    at = readme.find("1.5–2.8x faster")
    assert at >= 0, "the input-gradient speedup moved: update this test"
    said = readme[at : readme.index("Their cost in a training step", at)]
    assert "times the kernel and one `index_add_`" in said
    assert "record_input_grad`'s Python checks" in said


RESULT_PAGES = [*(ROOT / "benchmarks" / "results").glob("*.md")]
RESULT_PAGES += [*(ROOT / "benchmarks" / "paper" / "results").glob("*.md")]
DATE = re.compile(r"\b20\d\d-\d\d-\d\d(?!\d)")
MACHINE = re.compile(r"EPYC|H200|NVIDIA|x86_64|CPUs?\b|cores", re.I)


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_results_file_names_its_date_and_machine(page):
    """The docs quote their figures from these files; each says, near its top, when and on
    what machine they were measured (benchmarks/paper/common.py writes the line)."""
    head = "\n".join(page.read_text(encoding="utf-8").splitlines()[:12])
    assert DATE.search(head), f"{page.name}: no date in its first lines"
    assert MACHINE.search(head), f"{page.name}: no machine in its first lines"


DOC_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]
REPO_PATH = re.compile(r"(?<![\w/.-])((?:benchmarks|docs|csl_fast|csrc|examples|tests)/[\w./-]*\w)")


def test_every_path_the_docs_name_exists():
    """A file or folder of the repository named in the prose (a results file a figure is
    quoted from, a script to run) exists."""
    missing = [
        f"{page.relative_to(ROOT)}: {path}"
        for page in DOC_PAGES
        for path in REPO_PATH.findall(page.read_text(encoding="utf-8"))
        if not (ROOT / path).exists()
    ]
    assert not missing, missing


def test_readme_test_command_is_what_ci_runs():
    """README's "Two commands" block gives the test command CI runs, unchanged."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = SHELL_FENCE.search(readme, readme.index("## Two commands")).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_command = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_command == [commands[1]], (ci_command, commands)
    assert commands[0].startswith("pip install -r requirements.txt && ")


#: Import names whose distribution is called otherwise.
DISTRIBUTION = {"sklearn": "scikit-learn", "pytorch_lightning": "pytorch-lightning"}


def _module_level_imports(folder: Path, skip: tuple[str, ...] = ()) -> set[str]:
    local = {p.stem for p in folder.rglob("*.py")} | {p.name for p in folder.rglob("*/")}
    names = set()
    for path in folder.rglob("*.py"):
        if any(part in skip for part in path.relative_to(folder).parts):
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    stdlib = set(__import__("sys").stdlib_module_names) | {"__future__", "csl_fast"}
    return {DISTRIBUTION.get(n, n) for n in names - stdlib - local}


def _requirements(*files: str) -> set[str]:
    names = set()
    for name in files:
        for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r"):
                names.add(re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower())
    return names


def test_requirements_list_what_the_code_imports_at_module_level():
    """What ``import csl_fast`` needs is in setup.py's install_requires (its optional kernels
    and integrations import their packages behind a check); what the tests import at module
    level is in requirements-dev.txt (with requirements.txt)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    install = next(
        {re.split(r"[<>=!~ ]", e.value, maxsplit=1)[0] for e in node.value.elts}
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "install_requires"
    )
    package = _module_level_imports(ROOT / "csl_fast", skip=("_triton", "integrations"))
    assert package <= install, package - install
    tests = _module_level_imports(ROOT / "tests")
    dev = _requirements("requirements.txt", "requirements-dev.txt")
    assert tests <= dev, tests - dev


def _inline_spans(page: Path) -> list[str]:
    """The inline code spans of a page (its fenced blocks left out: their backticks would
    pair with the spans')."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"`([^`]+)`", text)


def _script_options(script: Path) -> set[str]:
    """The options a benchmark script's parser declares (read from its source: running
    ``--help`` imports torch, a few seconds each)."""
    options = {"-h", "--help"}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and str(a.value)[:1] == "-"
            }
    return options


def test_inline_commands_name_options_that_exist():
    """Commands quoted inline in the prose (`csl-fast clean RUN --out plan.csv`,
    `python benchmarks/run.py --device cuda`, `run.py --quick`) ask for options the command
    has, and benchmarks/README.md lists run.py's sections as they are."""
    from csl_fast.bench.runner import SECTIONS

    cli, scripts = _cli_options(), {}
    for page in DOC_PAGES:
        for span in _inline_spans(page):
            span = " ".join(span.split())
            words = span.split()
            flags = re.findall(r"(?<![\w-])--?[a-z][\w-]*", span)
            if words[0] == "csl-fast" and len(words) > 1 and words[1] in cli:
                missing = set(flags) - cli[words[1]]
            elif (m := re.search(r"(?:^|\s|/)(\w+)\.py\b", span)) and (
                ROOT / "benchmarks" / f"{m[1]}.py"
            ).is_file():
                script = ROOT / "benchmarks" / f"{m[1]}.py"
                scripts.setdefault(script, _script_options(script))
                missing = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", span)) - scripts[script]
            else:
                continue
            where = page.relative_to(ROOT)
            assert not missing, f"{where}: `{span}` has no option {sorted(missing)}"
    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"`--sections ([\w,]+)`", text)[1].split(",")
    assert tuple(listed) == SECTIONS


def _callable_named(name: str):
    """The csl_fast object a prose call names (``csl_fast.clean``, ``accumulate``,
    ``tracker.end_epoch``, ``CSLTracker.from_file``, ``RunSamples``, ...), or None."""
    from csl_fast import distributed, report

    parts = name.split(".")
    if parts[0] == "csl_fast":
        parts = parts[1:]
    roots = {"tracker": csl_fast.CSLTracker, "RunSamples": report.RunSamples}
    roots["sync"] = distributed.sync
    public = parts[0] in csl_fast.__all__ or parts[0] == "ops"
    obj = roots.get(parts[0], getattr(csl_fast, parts[0], None) if public else None)
    for part in parts[1:]:
        obj = getattr(obj, part, None)
    return obj if callable(obj) else None


def test_calls_in_the_prose_use_arguments_that_exist():
    """A csl_fast call quoted inline (`csl_fast.clean(tracker, policy="review", budget=k)`,
    `CSLTracker(N, num_labels=L)`) names keyword arguments its function has; a quoted
    signature (keyword-only marker ``*,``) shows the real defaults."""
    checked = 0
    for page in DOC_PAGES:
        for span in _inline_spans(page):
            code = " ".join(span.split())
            signature = ", *, " in code
            try:
                call = ast.parse(code.replace(", *, ", ", "), mode="eval").body
            except SyntaxError:
                continue
            if not isinstance(call, ast.Call):
                continue
            f = _callable_named(ast.unparse(call.func))
            if f is None:
                continue
            params = inspect.signature(f).parameters
            takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
            for kw in call.keywords:
                where = f"{page.relative_to(ROOT)}: `{code}`"
                assert kw.arg in params or takes_any, f"{where}: no argument {kw.arg!r}"
                if signature and isinstance(kw.value, (ast.Constant, ast.UnaryOp)):
                    shown = ast.literal_eval(kw.value)
                    assert shown == params[kw.arg].default, f"{where}: {kw.arg}={shown!r}"
            checked += 1
    assert checked >= 8  # the pattern finds the calls


def test_in_page_links_name_a_heading_of_the_page():
    """A ``[text](#anchor)`` link (README's contents line) leads to a heading of its page,
    by GitHub's rule: lowercase, punctuation dropped, spaces as hyphens."""
    for page in DOC_PAGES:
        text = page.read_text(encoding="utf-8")
        headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            assert anchor in slugs, f"{page.relative_to(ROOT)}: no heading for #{anchor}"


def test_torch_func_sentence_says_what_works_and_what_compiling_raises():
    """README's torch.func sentence named every csl_fast call as working eagerly under a
    transform (accumulate_bce and linear_cross_entropy refuse any), and quoted an error
    for a compiled transform ("... mutate a captured Tensor") that PyTorch does not raise."""
    from torch.func import grad

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    at = readme.find("A `torch.func` transform")
    assert at >= 0, "the torch.func sentence moved: update this test"
    said = readme[at : readme.index("run the transform eagerly", at)]
    works = said[: said.index("works eagerly")]
    i, y, csl = torch.arange(3), torch.tensor([0, 2, 1]), torch.zeros(3)
    calls = {
        "accumulate": lambda z: csl_fast.accumulate(z, y, i, csl),
        "record_loss": lambda z: csl_fast.record_loss(z.square().sum(1), i, csl).sum(),
        "accumulate_bce": lambda z: csl_fast.accumulate_bce(z, (z > 0).float(), i, csl),
        "linear_cross_entropy": lambda z: csl_fast.linear_cross_entropy(z, torch.eye(3), y),
    }
    for name, call in calls.items():
        try:
            grad(call)(torch.randn(3, 3))
            ran = True
        except RuntimeError:
            ran = False
        assert (f"`{name}`" in works) == ran, name
    torch._dynamo.reset()
    with pytest.raises(RuntimeError) as raised:
        torch.compile(lambda z: grad(calls["accumulate"])(z), backend="eager")(torch.randn(3, 3))
    message = " ".join(str(raised.value).split())
    quotes = re.findall(r'"([^"]+)"', said)
    assert any(all(p.strip() in message for p in q.split("...")) for q in quotes), message
