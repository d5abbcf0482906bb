"""fusedit.bench.environment: the git commit stamped on results is fusedit's own, or none."""
import shutil
import subprocess

import pytest

from fusedit.bench import environment as bench_environment

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")


def _git(folder, *arguments):
    return subprocess.run(["git", "-C", str(folder), *arguments], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def outer_repository(tmp_path):
    """A repository with one commit and an uncommitted change to a tracked file."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("one\n")
    _git(tmp_path, "add", "tracked.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    (tmp_path / "tracked.txt").write_text("two\n")
    return tmp_path


@pytest.mark.parametrize("tracked_change, dirty", [(True, True), (False, False)])
def test_a_checkout_stamps_its_commit_and_changes_to_tracked_files(outer_repository, monkeypatch, tracked_change, dirty):
    if not tracked_change:  # an untracked file (a result just written, say) is no change to the code
        (outer_repository / "tracked.txt").write_text("one\n")
        (outer_repository / "untracked.json").write_text("{}\n")
    monkeypatch.setattr(bench_environment, "_REPOSITORY", str(outer_repository))
    stamped = bench_environment.environment("cpu")
    assert stamped["git_commit"] == _git(outer_repository, "rev-parse", "HEAD") and stamped["git_dirty"] is dirty


def test_an_installed_copy_inside_another_repository_stamps_no_commit(outer_repository, monkeypatch):
    # site-packages/fusedit of a virtual environment kept inside some project's checkout
    installed = outer_repository / ".venv" / "site-packages" / "fusedit"
    installed.mkdir(parents=True)
    monkeypatch.setattr(bench_environment, "_REPOSITORY", str(installed))
    stamped = bench_environment.environment("cpu")
    assert stamped["git_commit"] is None and stamped["git_dirty"] is None
