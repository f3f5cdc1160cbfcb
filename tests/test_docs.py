"""Every documented error example in README.md and docs/*.md runs, and prints what the docs say.

The format (docs/guarantees.md, "Documented error examples"): in an indented block, a line
`$ distill <arguments>` directly followed by the line it prints, `distill <command>: error: <message>`.
`...` in the message stands for any text (figures of the machine: free memory). Each command runs in
process, in an empty folder holding the files `_example_files` writes, and must fail before training."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import run_distill_in_process

from distill_cli.core.checkpoint import model_checkpoint, save_atomic
from distill_cli.core.config import ModelConfig
from distill_cli.data import DatasetInfo
from distill_cli.losses import LOSSES
from distill_cli.models import build_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = re.compile(r"^ {4}\$ distill (?P<command>.+)$")
ERROR = re.compile(r"^ {4}(?P<line>distill \w+: error: .+)$")


def documented_errors() -> list[tuple[str, str, str]]:
    """(where, the command's arguments, the one line it prints) of every error example in the docs."""
    examples = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for number, (line, following) in enumerate(zip(lines, lines[1:] + [""]), start=1):
            prompt, error = PROMPT.match(line), ERROR.match(following)
            if prompt and error:
                examples.append((f"{path.relative_to(ROOT)}:{number}", prompt["command"], error["line"]))
    return examples


EXAMPLES = documented_errors()


def _example_files(folder: Path) -> None:
    """What the examples read: `cnn100/best.pt`, an untrained cnn of 100 classes as `distill train` writes it."""
    info = DatasetInfo("digits", 100, 1, (8, 8), (0.5,), (0.5,), tuple(map(str, range(100))))
    model = build_model(ModelConfig(arch="cnn"), info, "teacher")
    save_atomic(model_checkpoint(model, "cnn", {}, 100, dataset="digits"), folder / "cnn100" / "best.pt")


def test_the_docs_hold_error_examples():
    assert len(EXAMPLES) >= 10 and any(where.startswith("README.md") for where, _, _ in EXAMPLES)


@pytest.mark.slow  # `distill` in process: ~1.5 s an example on a quiet 2-core machine (Hydra composes twice)
@pytest.mark.parametrize("where,command,expected", EXAMPLES, ids=[where for where, _, _ in EXAMPLES])
def test_a_documented_error_example_prints_what_the_docs_say(where, command, expected, tmp_path):
    _example_files(tmp_path)
    result = run_distill_in_process(*shlex.split(command), "device=cpu", cwd=tmp_path, check=False, timeout=60)
    printed = result.stderr.strip().splitlines()
    assert result.returncode != 0 and printed, f"{where}: `distill {command}` did not fail: {result.stdout[-500:]}"
    pattern = ".*".join(map(re.escape, expected.split("...")))
    assert re.fullmatch(pattern, printed[-1]), f"{where}: `distill {command}` printed\n{printed[-1]}\nnot\n{expected}"
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt")), "it trained"


def test_the_readme_and_the_methods_doc_name_every_method_and_count_them_right():
    """Each registered method is in the README's `loss` row and in a row of docs/methods.md's table, and every
    "N KD methods" in the README says how many there are."""
    methods = LOSSES.names()
    readme = (ROOT / "README.md").read_text()
    [loss_row] = [line for line in readme.splitlines() if line.startswith("| `loss` |")]
    assert sorted(re.findall(r"`(\w+)`", loss_row.split("|")[2])) == sorted(methods)
    table = (ROOT / "docs" / "methods.md").read_text()
    assert [name for name in methods if f"\n| `{name}` |" not in table] == []
    counts = re.findall(r"(\d+) KD methods", readme)
    assert counts and set(counts) == {str(len(methods))}
