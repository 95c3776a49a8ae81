"""Writes the JSONL files of gptlab's offline lm-eval tasks (gptlab/eval_tasks/) from the standard library.

    python dev/make_eval_tasks.py [--items=100]

Both tasks predict the next line of code from the lines before it, in the held-out
packages' test-split blocks (gptlab/data/held_out.py, task_corpora.split_of_block), so no
pretraining preset and no fine-tuning task's training split ever read them:
- next_line_mc.jsonl: `context` (up to 6 lines, at most 200 characters), `choices` (the
  true next line and 3 lines of the same indentation from other test-split blocks),
  `label` (the index of the true one);
- next_line.jsonl: `context` and `target` (the next line, without its newline).
Deterministic: the same Python version writes the same files (the shipped ones: Python 3.11).
"""
import argparse
import hashlib
import json
import pathlib
import sysconfig

from gptlab.data import corpora, held_out, task_corpora

OUT = pathlib.Path(__file__).resolve().parents[1] / "gptlab" / "eval_tasks"
CONTEXT_LINES, CONTEXT_CHARS = 6, 200
MIN_LINE, MAX_LINE = 12, 60  # characters of a target line without its indentation


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def candidates() -> list:
    """(key, context, line) for every usable line of a test-split block of a held-out package."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = []
    for package in held_out.PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not corpora.selected(rel, held_out.globs(), held_out.STDLIB_TESTS):
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
            starts, lines = task_corpora.top_level_blocks(source), source.splitlines()
            for number in range(CONTEXT_LINES, len(lines)):  # 0-based index of the target line
                line = lines[number]
                block = task_corpora.block_of(starts, number + 1)
                if task_corpora.split_of_block(rel, block) != "test" or number + 1 - CONTEXT_LINES < block:
                    continue  # the context must lie in the same (test-split) block
                body = line.strip()
                if not MIN_LINE <= len(body) <= MAX_LINE or body.startswith(("#", '"', "'")):
                    continue
                context = lines[number - CONTEXT_LINES:number]
                while context and len("\n".join(context)) + 1 > CONTEXT_CHARS:
                    context = context[1:]
                if len(context) < 2 or not any(c.strip() for c in context):
                    continue
                found.append((f"{rel}:{number + 1}", "\n".join(context) + "\n", line))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100, help="items per task")
    args = parser.parse_args()
    pool = candidates()
    ordered = sorted(pool, key=lambda c: _rank(c[0]))
    by_indent = {}
    for key, _, line in pool:
        by_indent.setdefault(len(line) - len(line.lstrip()), []).append((key, line))
    per_file, mc, gen = {}, [], []
    for key, context, line in ordered:
        file = key.rsplit(":", 1)[0]
        if per_file.get(file, 0) >= 4:  # spread the items over many files
            continue
        indent = len(line) - len(line.lstrip())
        others = sorted({other for k, other in by_indent[indent] if k.rsplit(":", 1)[0] != file and other != line},
                        key=lambda o: _rank(key + o))[:3]
        if len(mc) < args.items and len(others) == 3:
            choices = sorted([line] + others, key=lambda o: _rank("order" + key + o))
            mc.append({"id": key, "context": context, "choices": [c + "\n" for c in choices],
                       "label": choices.index(line)})
        elif len(gen) < args.items:
            gen.append({"id": key, "context": context, "target": line})
        else:
            break
        per_file[file] = per_file.get(file, 0) + 1
    for name, rows in (("next_line_mc.jsonl", mc), ("next_line.jsonl", gen)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {OUT / name}: {len(rows)} items")


if __name__ == "__main__":
    main()
