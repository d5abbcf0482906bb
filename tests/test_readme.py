"""The README keeps its promises: its two set-up commands are the ones CI runs, every results
file it names is committed, and every benchmark figure it shows stands in a committed results
file that names the device which made it."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "bench" / "results"


def section(text, heading):
    """The text under `heading` (a whole line), up to the next heading of its level or above."""
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    end = re.search(r"^#{1,%d} " % len(heading.split()[0]), text[start:], re.M)
    return text[start:start + end.start()] if end else text[start:]


def named_results(text):
    """The bench/results/ files `text` names, with `stem.{json,md}` taken as both files."""
    names = []
    for stem, suffixes in re.findall(r"bench/results/([\w.+-]+?)\.(\{[\w,]+\}|json|md)(?!\w)", text):
        names += [f"{stem}.{suffix}" for suffix in suffixes.strip("{}").split(",")]
    return names


def test_the_first_command_block_holds_the_install_and_test_commands_ci_runs():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2, f"the README opens with two commands, found {block}"
    install, test = block
    steps = [step.strip() for step in install.split("&&")]
    assert steps[-1] == "fusedit bench", "the first command ends by running the main job on its default"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for step in steps[:-1]:
        assert step.startswith("pip install ")
        assert step.replace("pip install ", "pip install -q ", 1) in ci, f".ci/run does not run the README's `{step}`"
    assert test in ci, f".ci/run does not run the README's test command `{test}`"


def test_every_results_file_the_readme_names_is_committed():
    names = named_results(README)
    assert names, "the README names no results file"
    for name in names:
        assert (RESULTS / name).is_file(), f"README names bench/results/{name}, which is not committed"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_each_committed_results_file_names_its_device_and_has_its_markdown(path):
    results = json.loads(path.read_text())
    assert path.with_suffix(".md").is_file(), f"{path.name} has no markdown twin"
    if "arch" in results:  # a compile report: registers and spills, no timing
        assert results["arch"] and results["commit"] and results["records"]
        assert f"sm_{results['arch']}" in path.with_suffix(".md").read_text()
        return
    environment = results["environment"]
    assert results["kind"] in ("models", "kernels") and path.stem.endswith("_" + results["kind"])
    assert environment["device"] and environment["git_commit"] and environment["date"], path.name
    assert results["records"], f"{path.name} holds no records"
    assert environment["device"] in path.with_suffix(".md").read_text()


def check_latest_results(readme):
    latest = section(readme, "### Latest results")
    jsons = [name for name in named_results(latest) if name.endswith(".json")]
    assert len(jsons) == 1, f"the latest results should name one results JSON, found {jsons}"
    results = json.loads((RESULTS / jsons[0]).read_text())
    markdown = (RESULTS / jsons[0]).with_suffix(".md").read_text().strip()
    assert markdown in latest, "the README's latest table differs from the committed markdown it names"
    rows = [line for line in latest.splitlines() if line.startswith("|")]
    assert rows and all(row in markdown.splitlines() for row in rows), "a table row stands in no committed file"
    assert f"Measured on {results['environment']['device']}" in latest
    shown = [row.split("|")[1].strip() for row in rows[2:]]
    labels = [record["backend"] + (f" ({record['compile_mode']})" if record.get("compile_mode") else "")
              for record in results["records"]]
    assert shown == labels, "the table's backends are not the committed file's records"
    for label, record in zip(labels, results["records"]):
        if record["status"] == "ok" and record["forward_images_per_s"] is not None:
            assert f"| {label} | {record['forward_images_per_s']:.1f}<br>" in latest


def test_the_latest_results_shown_are_a_committed_file_word_for_word():
    check_latest_results(README)


def test_a_changed_figure_or_row_in_the_latest_table_is_caught():
    row = next(line for line in section(README, "### Latest results").splitlines() if line.startswith("| reference |"))
    figure = re.search(r"\| reference \| ([\d.]+)<br>", row).group(1)
    with pytest.raises(AssertionError, match="differs from the committed markdown"):
        check_latest_results(README.replace(row, row.replace(f"| {figure}<br>", f"| {float(figure) * 2:.1f}<br>", 1)))
    with pytest.raises(AssertionError, match="differs from the committed markdown"):
        check_latest_results(README.replace(row + "\n", ""))
