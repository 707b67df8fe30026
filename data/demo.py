"""
Demo data that needs no network and no download: the documentation every Python
install ships with, tokenized with the byte-level tokenizer into normal shards.

    pydoc_data.topics    the ~80 long help texts behind help("topics") (~0.5 MB)
    stdlib docstrings    module, class and function docstrings of the standard
                         library's source files, read with ast (~2 MB)

ensure_demo_shards() builds them on first use and afterwards finds them in place.
The text, and so the shards, depend only on the Python version.
"""

import ast
import os
import secrets
import shutil
import sysconfig
from pathlib import Path

from pydoc_data.topics import topics

from data.prepare import tokenize_to_shards

DEFAULT_DIR = Path(__file__).parent / "cache" / "demo"
VAL_FRACTION = 0.05
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}  # third-party code and test suites


def ensure_demo_shards(out_dir=None):
    """Build the demo shards in out_dir (default DEFAULT_DIR) unless they are there already;
    returns out_dir as a Path."""
    out_dir = Path(out_dir or DEFAULT_DIR)
    if has_demo_shards(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename it into place: a crash leaves no
    # half-built demo, and ranks racing to build it cannot mix their files.
    build_dir = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        train, val = tokenize_to_shards(demo_documents(), build_dir, tokenizer="bytes",
                                        val_fraction=VAL_FRACTION, progress=False)
        os.rename(build_dir, out_dir)  # fails if out_dir holds files, e.g. another rank won the race
    except OSError:
        if not has_demo_shards(out_dir):
            raise
    else:
        print(f"demo data: built {train.total_tokens:,} train + {val.total_tokens:,} val tokens "
              f"(byte-level) from Python's bundled docs in {out_dir}")
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return out_dir


def has_demo_shards(out_dir):
    return (out_dir / "train_000000.bin").is_file() and (out_dir / "val_000000.bin").is_file()


def demo_documents():
    """The help topics, then one document per stdlib module: its docstrings joined by blank lines."""
    for name in sorted(topics):
        yield topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS.isdisjoint(path.relative_to(stdlib).parts):
            docstrings = module_docstrings(path)
            if docstrings:
                yield "\n\n".join(docstrings)


def module_docstrings(path):
    # Parsed, never imported: importing every stdlib module has side effects
    # (antigravity opens a browser). A file that is not valid Python for this
    # interpreter has no docstrings to offer.
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return []
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = (node for node in ast.walk(tree) if isinstance(node, documented))
    return [doc for doc in map(ast.get_docstring, nodes) if doc]
