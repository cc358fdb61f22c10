"""The VMM's test guest (pageflip.vm.image): the sources build with gcc and make into an
x86-64 PVH ELF, the cache keeps one build per version of the sources (a second call builds
nothing, a changed source builds a new file, concurrent builds are safe), and a missing
compiler or a broken source is one clear line."""

from __future__ import annotations

import pickle
import shutil
import struct
import threading
import tomllib
from pathlib import Path

import pytest

from pageflip.errors import GuestImageError, PageflipError
from pageflip.vm import guest_elf, image

ROOT = Path(__file__).resolve().parents[1]

needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in image.BUILD_TOOLS),
    reason="building the test guest needs gcc and make (apt-get install gcc make)",
)

PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of the test's own (XDG_CACHE_HOME), so that no test sees another's builds."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "pageflip"


@pytest.fixture
def sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the guest's sources that the image module builds from instead."""
    copy = tmp_path / "guest"
    shutil.copytree(image.guest_source_dir(), copy, ignore=shutil.ignore_patterns("*.elf"))
    monkeypatch.setattr(image, "guest_source_dir", lambda: copy)
    return copy


def _pvh_entry(data: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    """(ELF entry, PVH entry from the Xen note, [(paddr, memsz) of each PT_LOAD])."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (2, 62), "not an x86-64 executable (ET_EXEC, EM_X86_64)"
    (entry,) = struct.unpack_from("<Q", data, 24)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads: list[tuple[int, int]] = []
    pvh: int | None = None
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type == PT_LOAD:
            loads.append((paddr, memsz))
        elif p_type == PT_NOTE:
            pos, end = offset, offset + filesz
            while pos + 12 <= end:
                namesz, descsz, kind = struct.unpack_from("<III", data, pos)
                name = data[pos + 12 : pos + 12 + namesz]
                desc_at = pos + 12 + (namesz + 3) // 4 * 4
                if name == b"Xen\0" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
                    (pvh,) = struct.unpack_from("<I", data, desc_at)
                pos = desc_at + (descsz + 3) // 4 * 4
    assert pvh is not None, "no XEN_ELFNOTE_PHYS32_ENTRY note: not bootable as PVH"
    return entry, pvh, loads


@needs_tools
def test_the_sources_build_an_x86_64_pvh_elf(cache: Path) -> None:
    path = guest_elf()
    assert path.parent == cache
    assert path.name.startswith("pfguest-") and path.suffix == ".elf"
    entry, pvh, loads = _pvh_entry(path.read_bytes())
    assert pvh == entry == 0x100000
    # Loaded at 1 MiB, and everything (bss, page tables, stacks) ends below the
    # generation counters at 8 MiB.
    assert min(paddr for paddr, _ in loads) == 0x100000
    assert max(paddr + memsz for paddr, memsz in loads) <= 8 << 20
    assert b"PFGUEST start" in path.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [path.name], "build leftovers in the cache"


@needs_tools
def test_an_unchanged_source_is_not_built_again(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = guest_elf()
    stat = first.stat()

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"built again: {args}")

    monkeypatch.setattr(image.subprocess, "run", no_build)
    again = guest_elf()
    assert again == first
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    monkeypatch.undo()
    # rebuild=True builds anyway, into the same name: a new file replaced the old one.
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parent))
    rebuilt = guest_elf(rebuild=True)
    assert rebuilt == first and rebuilt.stat().st_ino != stat.st_ino


@needs_tools
def test_a_changed_source_builds_a_new_file(cache: Path, sources: Path) -> None:
    first = guest_elf()
    main = sources / "main.c"
    main.write_text(main.read_text().replace('"PFGUEST start"', '"PFGUEST-CHANGED start"'))
    second = guest_elf()
    assert second != first and second.parent == first.parent == cache
    assert b"PFGUEST-CHANGED start" in second.read_bytes()
    assert b"PFGUEST-CHANGED" not in first.read_bytes(), "the old build was overwritten"
    # The README is documentation: changing it does not make a new build.
    (sources / "README.md").write_text("changed\n")
    assert guest_elf() == second


@needs_tools
def test_concurrent_builds_leave_one_whole_file(cache: Path) -> None:
    results: list[Path | BaseException] = []

    def build() -> None:
        try:
            results.append(guest_elf(rebuild=True))
        except BaseException as err:
            results.append(err)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and isinstance(results[0], Path), results
    _pvh_entry(results[0].read_bytes())
    assert [p.name for p in cache.iterdir()] == [results[0].name]


def test_missing_gcc_and_make_is_one_line_saying_what_to_install(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(GuestImageError) as info:
        guest_elf()
    err = info.value
    assert isinstance(err, PageflipError) and isinstance(err, OSError)
    assert str(err) == (
        "cannot build the test guest: gcc and make not found "
        "(install them: apt-get install gcc make)"
    )
    assert err.missing == ["gcc", "make"]
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.missing) == (GuestImageError, str(err), err.missing)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_missing_gcc_alone_is_named(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").symlink_to(shutil.which("make") or "make")
    monkeypatch.setenv("PATH", str(bin_dir))
    only_gcc = r"^cannot build the test guest: gcc not found \(install them: apt-get install"
    with pytest.raises(GuestImageError, match=only_gcc) as info:
        guest_elf()
    assert "\n" not in str(info.value) and info.value.missing == ["gcc"]


@needs_tools
def test_a_broken_source_is_a_clear_error_and_leaves_nothing(cache: Path, sources: Path) -> None:
    (sources / "main.c").write_text('#error "deliberately broken"\n')
    failed = r"^building the test guest failed \(make exit 2\): .*main.c:1:2: error: #error"
    with pytest.raises(GuestImageError, match=failed) as info:
        guest_elf()
    assert "\n" not in str(info.value)
    assert "deliberately broken" in (info.value.output or "")
    assert list(cache.iterdir()) == [], "a failed build left files in the cache"


def test_the_sources_ship_with_the_package() -> None:
    """pyproject's package-data covers every source file and the README."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pageflip"]
    package = ROOT / "src" / "pageflip"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    source = image.guest_source_dir()
    for name in (*image.GUEST_SOURCES, "README.md"):
        assert source / name in shipped, f"{name} is not in pyproject's package-data"
