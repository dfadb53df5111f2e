"""Text unlike the default (code) corpus, for the domain-shift scenario: English prose from the installation."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from moe_understudy.data.corpus import read_text, stdlib_root, take_chars
from moe_understudy.errors import UserError


def domain_shift_texts(max_chars: int = 400_000) -> list[str]:
    """English prose that the default (stdlib) corpus never trains on, for the domain-shift scenario.

    The choice, in this order, all read from the running interpreter's installation (deterministic,
    offline): IDLE's prose files (`idlelib/*.txt`: news, history, readme, credits; idlelib is
    excluded from training), the Python licence (`LICENSE.txt`), IDLE's help page with the HTML
    tags stripped (`idlelib/help.html`), and the e-mail messages used as test data
    (`test/test_email/data/msg_*.txt`; test folders are excluded from training). Training text is
    mostly code, so this shifts both vocabulary and the routing it induces. Missing pieces (a
    distribution without tests or IDLE) are skipped; an empty result is an error.
    """
    root = stdlib_root()
    paths = sorted((root / "idlelib").glob("*.txt")) + [root / "LICENSE.txt"]
    texts = [read_text(p) for p in paths if p.is_file()]
    help_page = root / "idlelib" / "help.html"
    if help_page.is_file():
        texts.append(_html_text(read_text(help_page)))
    texts += [read_text(p) for p in sorted((root / "test" / "test_email" / "data").glob("msg_*.txt"))]
    texts = list(take_chars((t for t in texts if t.strip()), max_chars))
    if not texts:
        raise UserError(
            f"No domain-shift text found under {root}; pass a text file as the domain-shift source instead."
        )
    return texts


class _TextOnly(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style"):  # code, not prose
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _TextOnly()
    parser.feed(html)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()
