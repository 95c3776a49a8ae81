"""Summarises `mutmut results --all true` (stdin) for the mutants matching the patterns given as arguments:
per module, killed of those run, and the names of the others (survived, timeout, no tests...)."""
import collections
import fnmatch
import sys

patterns = sys.argv[1:] or ["*"]
by_module = collections.defaultdict(collections.Counter)
others = collections.defaultdict(list)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if not name or not any(fnmatch.fnmatch(name, p) for p in patterns) or status == "not checked":
        continue
    module = name.split(".x_")[0].split(".xǁ")[0]
    by_module[module][status] += 1
    if status != "killed":
        others[module].append(f"{name}: {status}")
total = collections.Counter()
for module, counts in sorted(by_module.items()):
    run = sum(counts.values())
    total.update(counts)
    print(f"{module}: {counts['killed']}/{run} killed ({100 * counts['killed'] / run:.0f}%)"
          + "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s != "killed"))
    for line in others[module]:
        print(f"    {line}")
run = sum(total.values())
if run:
    print(f"all: {total['killed']}/{run} killed ({100 * total['killed'] / run:.0f}%)")
