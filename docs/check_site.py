"""Checks the built site in a real headless browser, and every internal link (``make docs-check``).

Serves ``docs/_build/html`` on a localhost port and, for the index, the API page and one guide,
asks Chromium (``chromium --headless``) for a screenshot and the rendered DOM. A page fails when
the screenshot is missing or one uniform colour, or when the rendered DOM lacks the page's main
heading as an ``<h1>`` (taken from the Markdown source, not from the HTML). Then every ``href``
to a local page on every built page must name an existing file, and its ``#anchor`` an existing
``id`` there; every local stylesheet, script and image must exist.

Needs ``chromium`` on the PATH (Debian: ``apt-get install chromium``) and Pillow (installed with
matplotlib, a test dependency). Screenshots go to ``docs/_build/screenshots``. Exit status 0 when
everything passes; otherwise every failure is printed.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

DOCS = Path(__file__).resolve().parent
# page -> its Markdown source, whose first "# " line is the heading the DOM must show.
PAGES = {"index.html": "index.md", "api.html": "api.md", "guides/linen.html": "guides/linen.md"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class _Scan(HTMLParser):
  """The ids a page defines and the local references it makes."""

  def __init__(self) -> None:
    super().__init__(convert_charrefs=True)
    self.ids: set[str] = set()
    self.links: list[str] = []  # <a href>: may carry a #fragment
    self.assets: list[str] = []  # stylesheets, scripts, images: files only

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    a = {k: v for k, v in attrs if v is not None}
    if "id" in a:
      self.ids.add(a["id"])
    if tag == "a" and "name" in a:
      self.ids.add(a["name"])
    if tag == "a" and "href" in a:
      self.links.append(a["href"])
    elif tag == "link" and "href" in a and "stylesheet" in a.get("rel", ""):
      self.assets.append(a["href"])
    elif tag in ("script", "img") and "src" in a:
      self.assets.append(a["src"])


def _scan(path: Path) -> _Scan:
  scan = _Scan()
  scan.feed(path.read_text(encoding="utf-8"))
  return scan


def _is_local(ref: str) -> bool:
  parts = urlsplit(ref)
  return not parts.scheme and not parts.netloc and not ref.startswith("//")


def check_links(root: Path) -> tuple[list[str], int]:
  """Every local link and asset of every page under ``root``; returns (failures, links checked)."""
  scans = {p: _scan(p) for p in sorted(root.rglob("*.html"))}
  failures, checked = [], 0
  for page, scan in scans.items():
    where = page.relative_to(root)
    for ref, needs_file in [(r, False) for r in scan.links] + [(r, True) for r in scan.assets]:
      if not _is_local(ref):
        continue
      checked += 1
      parts = urlsplit(ref)
      target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
      if target.is_dir():
        target = target / "index.html"
      if not target.is_file():
        failures.append(f"{where}: {ref!r} -> missing file {target}")
        continue
      fragment = unquote(parts.fragment)
      if needs_file or not fragment or target.suffix != ".html":
        continue
      ids = scans[target].ids if target in scans else _scan(target).ids
      if fragment not in ids:
        failures.append(f"{where}: {ref!r} -> no id {fragment!r} in {target.relative_to(root)}")
  return failures, checked


def _heading(source: Path) -> str:
  for line in source.read_text(encoding="utf-8").splitlines():
    if line.startswith("# "):
      return re.sub(r"`([^`]*)`", r"\1", line[2:]).strip()
  raise ValueError(f"{source} has no '# ' heading")


def _h1_texts(dom: str) -> list[str]:
  """The text of every ``<h1>`` in the rendered DOM (tags stripped, entities decoded)."""
  return [" ".join(html.unescape(re.sub(r"(?s)<[^>]+>", " ", inner)).replace("\N{PILCROW SIGN}",
                                                                            " ").split())
          for inner in re.findall(r"(?is)<h1\b[^>]*>(.*?)</h1>", dom)]


def _browser(name: str | None) -> str:
  for candidate in (name,) if name else BROWSERS:
    found = shutil.which(candidate)
    if found:
      return found
  raise SystemExit(f"check_site: no browser found (tried {name or ', '.join(BROWSERS)}); "
                   "install one, e.g. `apt-get install chromium`.")


def _chromium(browser: str, url: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
  command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1280,1600", *extra, url]
  return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def check_page(browser: str, base: str, page: str, heading: str, shots: Path) -> list[str]:
  """Renders ``page``: a screenshot that is not blank and a DOM that shows ``heading``."""
  failures = []
  shot = shots / (page.replace("/", "_").removesuffix(".html") + ".png")
  shot.unlink(missing_ok=True)
  with tempfile.TemporaryDirectory() as profile:
    _chromium(browser, base + page, profile, f"--screenshot={shot}")
  if not shot.is_file():
    failures.append(f"{page}: no screenshot written")
  else:
    with Image.open(shot) as image:
      rgb = image.convert("RGB")
    extrema = rgb.getextrema()  # (min, max) per channel
    if all(low == high for low, high in extrema):
      failures.append(f"{page}: the screenshot is one uniform colour {extrema}")
    print(f"  {page}: screenshot {shot.name} {rgb.size[0]}x{rgb.size[1]}, "
          f"{len(rgb.getcolors(1 << 24))} distinct colours")
  with tempfile.TemporaryDirectory() as profile:
    dom = _chromium(browser, base + page, profile, "--dump-dom")
  headings = _h1_texts(dom.stdout)
  if heading not in headings:
    failures.append(f"{page}: the rendered DOM ({len(dom.stdout)} chars) has no <h1> {heading!r} "
                    f"(h1s: {headings}); browser stderr: {dom.stderr[-500:]}")
  else:
    print(f"  {page}: rendered DOM {len(dom.stdout)} chars, <h1> {heading!r} present")
  return failures


def main() -> int:
  """Runs every check; returns the exit status."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--html", type=Path, default=DOCS / "_build" / "html")
  parser.add_argument("--screenshots", type=Path, default=DOCS / "_build" / "screenshots")
  parser.add_argument("--browser", default=None, help="browser executable (default: chromium)")
  args = parser.parse_args()
  root = args.html.resolve()
  if not (root / "index.html").is_file():
    raise SystemExit(f"check_site: {root}/index.html is missing; run `make docs` first.")
  browser = _browser(args.browser)
  args.screenshots.mkdir(parents=True, exist_ok=True)

  handler = functools.partial(_QuietHandler, directory=str(root))
  server = _Server(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  base = f"http://127.0.0.1:{server.server_address[1]}/"
  failures: list[str] = []
  try:
    print(f"check_site: serving {root} at {base}, browser {browser}")
    for page, source in PAGES.items():
      failures += check_page(browser, base, page, _heading(DOCS / source), args.screenshots)
  finally:
    server.shutdown()
    server.server_close()
  link_failures, checked = check_links(root)
  failures += link_failures
  print(f"check_site: {checked} local links and assets on "
        f"{len(list(root.rglob('*.html')))} pages checked")
  for failure in failures:
    print(f"FAIL {failure}")
  print("check_site: " + (f"{len(failures)} failure(s)" if failures else "all checks passed"))
  return 1 if failures else 0


class _Server(http.server.ThreadingHTTPServer):
  def handle_error(self, request: object, client_address: object) -> None:
    """A browser closing a connection early (it has its screenshot) is not an error."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, format: str, *args: object) -> None:  # noqa: A002
    """Keeps the browser's requests out of the report."""


if __name__ == "__main__":
  sys.exit(main())
