"""The exception tree: every exception class pageflip defines is in it (or is named below
with the reason it is not), each is drawn in errors.py's docstring, the classes that
replaced built-in exceptions are still those built-ins, and the modules that used to
define some of them still export them."""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re
from collections.abc import Iterator

import pytest

import pageflip
from pageflip import errors
from pageflip._children import raise_failure
from pageflip.errors import (
    BadArgument,
    BadGuestState,
    BenchmarkError,
    DemoError,
    MigrateBenchmarkError,
    PageflipError,
    SpanError,
    UnknownGuest,
    WrongType,
)

#: Modules that run when imported (``python -m pageflip``, the pager's entry point).
SCRIPTS = {"pageflip.__main__", "pageflip._pager"}

#: Exception classes outside the tree on purpose, each with why.
OUTSIDE = {
    "pageflip.cli._base.Interrupted": "a KeyboardInterrupt on purpose: SIGTERM unwinds like "
    "Ctrl-C, past every `except Exception`",
    "pageflip.cli._base._Stopped": "private: carries an interrupt through click inside "
    "Group.main, which prints it as `Interrupted: SIG...`",
    "pageflip.transport._Refused": "private to the key handshake: it leaves the module as "
    "PeerRejected",
    "pageflip.stream.fields.Invalid": "internal to the stream codec: the decoder turns it into "
    "RemoteProtocolError before it leaves the package",
    "pageflip.bench.live.load._Failed": "private to the load generator: a failed request, "
    "recorded as a Failure and never raised out of its connection",
    "pageflip._sys.fds.TruncatedFds": "_sys speaks OSError like the kernel it wraps (errors "
    "from the kernel stay OSErrors); the CLI prints any OSError as one line",
}


def _modules() -> Iterator[str]:
    yield "pageflip"
    for info in pkgutil.walk_packages(pageflip.__path__, "pageflip."):
        if info.name not in SCRIPTS:
            yield info.name


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of pageflip, by its qualified name."""
    found: dict[str, type[BaseException]] = {}
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_is_in_the_tree() -> None:
    found = _exception_classes()
    outside = {name for name, cls in found.items() if not issubclass(cls, PageflipError)}
    assert outside == set(OUTSIDE), (
        "an exception class outside errors.py's tree: define it there (or name it in "
        f"OUTSIDE with the reason): {sorted(outside - set(OUTSIDE))}; "
        f"no longer there: {sorted(set(OUTSIDE) - outside)}"
    )
    # The tree itself lives in one module.
    homes = {cls.__module__ for cls in found.values() if issubclass(cls, PageflipError)}
    assert homes == {"pageflip.errors"}


def test_every_class_of_the_tree_is_drawn_and_exported() -> None:
    classes = {
        name
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, PageflipError)
    }
    assert classes == set(errors.__all__)
    drawn = errors.__doc__ or ""
    for name in classes:
        assert re.search(rf"── {name}\b", drawn), f"{name} is not drawn in errors.py's tree"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (BadArgument, ValueError),
        (SpanError, ValueError),
        (WrongType, TypeError),
        (WrongType, ValueError),
        (UnknownGuest, LookupError),
        (BadGuestState, ValueError),
        (BenchmarkError, RuntimeError),
        (MigrateBenchmarkError, RuntimeError),
        (DemoError, RuntimeError),
    ],
)
def test_what_replaced_a_builtin_exception_is_still_one(
    cls: type[PageflipError], builtin: type[Exception]
) -> None:
    assert issubclass(cls, builtin) and issubclass(cls, OSError)
    with pytest.raises(builtin, match="what to fix"):
        raise cls("what to fix")


def test_the_old_homes_still_export_them() -> None:
    from pageflip import guests
    from pageflip.bench import common, handoff, migrate
    from pageflip.demo import DemoError as from_demo
    from pageflip.guests import base

    assert from_demo is DemoError
    assert common.BenchmarkError is handoff.BenchmarkError is BenchmarkError
    assert migrate.MigrateBenchmarkError is MigrateBenchmarkError
    for module in (guests, base):
        assert module.GuestError is errors.GuestError
        assert module.UnknownGuest is UnknownGuest
        assert module.BadGuestState is BadGuestState
    assert pageflip.BadArgument is BadArgument and pageflip.WrongType is WrongType


def test_new_members_pickle_with_their_fields() -> None:
    err = pickle.loads(pickle.dumps(MigrateBenchmarkError("run 2 failed", {"runs": [1]})))
    assert (type(err), str(err), err.partial) == (
        MigrateBenchmarkError,
        "run 2 failed",
        {"runs": [1]},
    )
    bad = pickle.loads(pickle.dumps(BadArgument("repeat must be at least 1", argument="repeat")))
    assert (type(bad), bad.argument) == (BadArgument, "repeat")
    for cls in (DemoError, BenchmarkError, WrongType):
        assert type(pickle.loads(pickle.dumps(cls("x")))) is cls


def test_bad_arguments_to_the_library_are_bad_arguments() -> None:
    from pageflip.bench import handoff, migrate
    from pageflip.guests import Workload
    from pageflip.units import parse_size

    with pytest.raises(BadArgument, match="is not a size"):
        parse_size("4Q")
    with pytest.raises(BadArgument, match="repeat must be at least 1") as info:
        handoff.HandoffConfig(size=1 << 20, repeat=0)
    assert info.value.argument == "repeat"
    with pytest.raises(BadArgument, match="unknown mode") as info:
        migrate.MigrateConfig(modes=("teleport",))
    assert info.value.argument == "modes"
    with pytest.raises(BadArgument, match="at least one thread") as info:
        Workload.create(1 << 20, threads=0)
    assert info.value.argument == "threads"
    with pytest.raises(WrongType, match="slice"), pageflip.Region.movable(4096) as region:
        region[0]  # type: ignore[index]


def test_a_childs_failure_is_one_line_with_its_traceback_as_a_note() -> None:
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'ram'\n"
    with pytest.raises(DemoError) as info:
        raise_failure(("error", KeyError("ram"), text), DemoError, "receiver")
    assert str(info.value) == "the receiver failed: KeyError: 'ram'"
    assert info.value.__notes__ == [f"the receiver's traceback:\n{text}"]
    # An error that did not pickle: the traceback's last line names it.
    with pytest.raises(BenchmarkError) as bench:
        raise_failure(("error", None, text), BenchmarkError, "sender")
    assert str(bench.value) == "the sender failed: KeyError: 'ram'"
    # A pageflip error comes through as itself.
    with pytest.raises(SpanError, match="odd"):
        raise_failure(("error", SpanError("odd"), text), BenchmarkError, "sender")
