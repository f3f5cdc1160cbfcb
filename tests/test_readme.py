from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands_ci_runs():
    readme = ROOT.joinpath("README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```")]
    setup, tests = [line for line in block if line and not line.startswith("#")]
    ci = ROOT.joinpath(".ci", "run").read_text().splitlines()
    assert setup in ci and tests in ci
    assert ci.index(setup) < ci.index(tests)
