"""gblk.manpage: gblk(8) is written from the argument parser, so every subcommand and
every option the parser accepts is on the page, and the page is valid roff."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from gblk import __version__, manpage
from gblk.bench import _parser as bench_parser
from gblk.cli import build_parser


def subparsers(parser: argparse.ArgumentParser) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def option_strings(parser: argparse.ArgumentParser) -> List[str]:
    return [s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]


@pytest.fixture(scope="module")
def page() -> str:
    return manpage.render(date="2026-01-02")


def test_header_names_section_8_and_version(page: str) -> None:
    assert page.splitlines()[0].startswith('.\\"')
    assert f'.TH GBLK 8 "2026-01-02" "gblk {__version__}"' in page
    assert ("\n.SH NAME\ngblk, gblk\\-xl\\-hotplug, gblk\\-device\\-model \\- "
            "a userspace Xen paravirtual block backend\n") in page


def test_every_subcommand_has_a_section_and_a_synopsis(page: str) -> None:
    names = [name for name, _ in subparsers(build_parser())]
    assert {"serve", "demo", "config", "list", "stats", "status", "hash-password", "bench", "sim"} <= set(names)
    for name in names:
        esc = manpage.escape(name)
        assert f'.SS "gblk {esc}"' in page, name
        assert f"\\fBgblk {esc}\\fR " in page, name
    # in the order of `gblk --help`
    found = [m.group(1) for m in re.finditer(r'^\.SS "gblk (\S+)"$', page, re.M)]
    assert found == [manpage.escape(n) for n in names]


def test_every_option_of_every_subcommand_is_described(page: str) -> None:
    sections = re.split(r'^\.SS "gblk (\S+)"$', page, flags=re.M)
    by_name = dict(zip(sections[1::2], sections[2::2]))
    for name, sub in subparsers(build_parser()):
        text = by_name[manpage.escape(name)]
        wanted = option_strings(sub)
        if name == "bench":  # its arguments go to gblk.bench's own parser
            wanted += [s for s in option_strings(bench_parser()) if s not in ("-h", "--help")]
        for opt in wanted:
            assert manpage.escape(opt) in text, (name, opt)
    assert "\\-\\-metrics\\-address HOST:PORT" in by_name["serve"]
    assert "\\-\\-grant\\-mode" in by_name["bench"]


def test_a_new_option_appears_without_touching_the_generator() -> None:
    parser = build_parser()
    for name, sub in subparsers(parser):
        if name == "status":
            sub.add_argument("--brand-new-flag", metavar="X", help="a flag added later (%(default)s)",
                             default="dflt")
    text = manpage.render(parser, date="2026-01-02")
    assert "\\fB\\-\\-brand\\-new\\-flag X\\fR\na flag added later (dflt)" in text


def test_helper_programs_take_their_usage_from_their_modules(page: str) -> None:
    """gblk-xl-hotplug(8) and gblk-device-model(8) are links to this page."""
    from gblk import devicemodel, hotplug

    synopsis = page.split(".SH SYNOPSIS\n", 1)[1].split("\n.SH ", 1)[0]
    helpers = page.split(".SH HELPER PROGRAMS\n", 1)[1].split("\n.SH ", 1)[0]
    for text in (synopsis, helpers):
        assert "\\fBgblk\\-xl\\-hotplug\\fR add|remove\n" in text
        assert "\\fBgblk\\-device\\-model\\fR \\-xen\\-domid DOMID \\-machine xenpv" in text
    assert "usage:" not in synopsis
    assert hotplug.USAGE.startswith("usage: gblk-xl-hotplug add|remove")
    assert "-xen-domid DOMID" in devicemodel.USAGE


def test_exit_status_comes_from_the_cli_docstring(page: str) -> None:
    exit_section = page.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    assert "130 interrupted" in exit_section
    assert "2 a configuration or usage error" in exit_section
    assert ":class:" not in exit_section and "``" not in exit_section


def test_escape_keeps_roff_requests_out_of_text() -> None:
    assert manpage.escape("a\\b") == "a\\eb"
    assert manpage.escape("--x") == "\\-\\-x"
    assert manpage.escape(".TH oops") == "\\&.TH oops"
    assert manpage.escape("'quote") == "\\&'quote"


def test_source_date_epoch_dates_the_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = manpage.render()
    assert '"2023-11-14"' in first.splitlines()[1]
    assert manpage.render() == first


def test_main_writes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    out = tmp_path / "gblk.8"
    assert manpage.main(["-o", str(out)]) == 0
    assert out.read_text() == manpage.render()


def test_groff_renders_it_without_warnings(tmp_path: Path, page: str) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (apt-get install groff-base)")
    src = tmp_path / "gblk.8"
    src.write_text(page)
    proc = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(src)], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
