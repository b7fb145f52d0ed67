"""Publishing a bundle: old or new at every instant, never neither nor a mix; a killed compile's leftovers go.

Each kill test runs a real publish in a forked child and SIGKILLs it at one step (a patched function kills the
process where it is called), then checks what the output name holds, and that the next compile at that name
finishes or undoes the killed one and leaves nothing hidden behind.
"""

import json
import multiprocessing
import os
import shutil
import signal

import pytest
import torch

from kernl.artifacts import publish
from kernl.artifacts.archive import manifest_of_archive, pack
from kernl.artifacts.reader import open_bundle
from kernl.artifacts.writer import BundleWriter
from kernl.errors import KernlError
from tests.artifacts.bundles import write_bundle


def digest(folder) -> str:
    with open_bundle(folder) as files:
        files.check_all(keep=False)
        return files.manifest["digest"]


def archive_digest(path) -> str | None:
    raw = manifest_of_archive(path) if path.exists() else None
    return json.loads(raw)["digest"] if raw is not None else None


def hidden(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def weights() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(64, 33), "b": torch.randn(5)}


def _die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _publish_and_die(out, where: str, archive) -> None:
    """In a child: publish a new bundle at out, killed at `where`."""
    if where == "writing":
        publish.hold = _wrap_then(publish.hold, _die)  # the folder exists and is locked: killed mid-compile
    elif where == "packing":
        import kernl.artifacts.archive as archive_module

        archive_module._add = _die
    elif where == "after the folder":
        publish.exchange = _wrap_then(publish.exchange, _die)
    elif where == "between two renames":
        publish.exchange = lambda a, b: False  # a file system without exchange
        real = os.rename

        def rename(src, dst):
            real(src, dst)
            if str(src).endswith(out.name):  # the old folder moved aside, the new one not yet in
                _die()

        os.rename = rename
    elif where == "moving the old archive aside":
        real = os.rename

        def rename(src, dst):
            real(src, dst)
            if str(dst).endswith(publish.REMOVED_SUFFIX):
                _die()

        os.rename = rename
    write_bundle(out, weights(), overwrite=True, archive=archive)


def _wrap_then(fn, then):
    def wrapped(*args, **kwargs):
        result = fn(*args, **kwargs)
        then()
        return result

    return wrapped


def killed_publish(out, where: str, archive=True) -> None:
    child = multiprocessing.get_context("fork").Process(target=_publish_and_die, args=(out, where, archive))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed {where}: exit code {child.exitcode}"


@pytest.mark.parametrize("where", ["writing", "packing", "after the folder", "between two renames"])
def test_a_killed_publish_leaves_old_or_new_and_the_next_compile_tidies(tmp_path, where):
    out = write_bundle(tmp_path / "bundle", weights(), archive=True)
    packed = tmp_path / "bundle.kernl"
    old = digest(out)
    assert archive_digest(packed) == old
    killed_publish(out, where)
    if where == "between two renames":  # no exchange on this file system: the name is empty until the next compile
        assert not out.exists()
    else:
        now = digest(out)
        assert now == old if where in ("writing", "packing") else now != old
        assert archive_digest(packed) == old  # the archive follows the folder at the next compile
    with BundleWriter(out, overwrite=True, archive=True):  # the next compile, killed or failed before publishing
        pass
    assert hidden(tmp_path) == [], "leftovers of the killed compile"
    assert archive_digest(packed) == digest(out)
    if where == "between two renames":
        assert digest(out) == old  # the old bundle was put back


def test_killed_while_removing_a_stale_archive(tmp_path):
    out = write_bundle(tmp_path / "bundle", weights(), archive=True)
    old = digest(out)
    killed_publish(out, "moving the old archive aside", archive=False)
    assert digest(out) == old and not (tmp_path / "bundle.kernl").exists()
    with BundleWriter(out, overwrite=True, archive=False):
        pass
    assert hidden(tmp_path) == [] and archive_digest(tmp_path / "bundle.kernl") == old  # put back with its folder


def test_the_folder_and_its_archive_are_one_name(tmp_path):
    out = write_bundle(tmp_path / "bundle", weights(), archive=True)
    shutil.rmtree(out)  # the folder deleted by hand: its archive still holds the name
    with pytest.raises(KernlError, match="bundle.kernl already exists"):
        BundleWriter(out, archive=False)
    write_bundle(out, weights(), overwrite=True, archive=False)
    assert not (tmp_path / "bundle.kernl").exists(), "an archive of another bundle left beside the folder"
    assert hidden(tmp_path) == []


def test_publish_replaces_in_one_step(tmp_path, monkeypatch):
    """The old folder is exchanged with the new one: a reader never finds the name empty."""
    out = write_bundle(tmp_path / "bundle", weights())
    seen = []
    real = publish.exchange

    def exchange(a, b):
        seen.append(os.path.exists(b))
        done = real(a, b)
        seen.append(os.path.exists(b))
        return done

    monkeypatch.setattr(publish, "exchange", exchange)
    write_bundle(out, weights(), overwrite=True)
    assert seen == [True, True]
    assert hidden(tmp_path) == []


def test_a_live_compile_is_left_alone(tmp_path):
    out = tmp_path / "bundle"
    with BundleWriter(out) as first:
        first.write_text("program.json", "{}")
        with BundleWriter(out, overwrite=True):  # a second compile at the same name starts meanwhile
            pass
        assert first.root.is_dir() and (first.root / "program.json").is_file()
    assert hidden(tmp_path) == []


def test_killed_pack_is_removed(tmp_path):
    out = write_bundle(tmp_path / "bundle", weights())
    child = multiprocessing.get_context("fork").Process(target=_pack_and_die, args=(out,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL
    assert len(hidden(tmp_path)) == 1 and not (tmp_path / "bundle.kernl").exists()
    with BundleWriter(out, overwrite=True, archive=True):
        pass
    assert hidden(tmp_path) == []


def _pack_and_die(out) -> None:
    import kernl.artifacts.archive as archive_module

    archive_module._add = _die
    pack(out)


def test_leftovers_of_an_earlier_kernl(tmp_path):
    """The two-rename publish of earlier versions, killed between its renames: the old bundle comes back."""
    out = write_bundle(tmp_path / "bundle", weights())
    old = digest(out)
    os.rename(out, tmp_path / ".bundle.kernl-old-1a2b3c4d")
    (tmp_path / ".bundle.kernl-tmp-5e6f7a8b").mkdir()  # and a temporary folder of the same era
    with BundleWriter(out, overwrite=True):
        pass
    assert digest(out) == old and hidden(tmp_path) == []


def _compile_at(out, start, index) -> None:
    start.wait(timeout=60)
    write_bundle(out, {"w": torch.full((8, 3), float(index))}, overwrite=True, archive=True)


def test_concurrent_compiles_leave_one_consistent_bundle(tmp_path):
    out = tmp_path / "bundle"
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(4)
    children = [ctx.Process(target=_compile_at, args=(out, start, i)) for i in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0] * 4
    assert archive_digest(tmp_path / "bundle.kernl") == digest(out)
    assert hidden(tmp_path) == []


def test_archive_and_folder_readable_by_all(tmp_path):
    old = os.umask(0o077)
    try:
        out = write_bundle(tmp_path / "bundle", weights(), archive=True)
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*"), tmp_path / "bundle.kernl"]:
        assert (path.stat().st_mode & 0o777) == (0o755 if path.is_dir() else 0o644), path
