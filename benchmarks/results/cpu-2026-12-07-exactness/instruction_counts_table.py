"""The table of instruction_counts.py's callgrind dumps: python instruction_counts_table.py BEFORE_DIR AFTER_DIR."""
import glob
import math
import re
import sys

ELEMENTS = {"2048x256": 2048 * 256, "16x32768": 16 * 32768, "256x2048": 256 * 2048}


def load(folder):
    counts = {}
    for path in glob.glob(f"{folder}/cg.*"):
        text = open(path).read()
        cell = re.search(r"Client Request: (\S+)", text[:2000])
        total = re.search(r"\nsummary: (\d+)", text) or re.search(r"\ntotals: (\d+)", text)
        if cell and total:
            counts[cell.group(1)] = int(total.group(1))
    return counts


before, after = load(sys.argv[1]), load(sys.argv[2])
ratios = []
print("| op | dtype | rows × n | phase | instructions an element, before | after | after ÷ before |")
print("|---|---|---|---|---|---|---|")
for cell in sorted(before):
    if cell not in after:
        continue
    op, dtype, shape, phase = cell.split("-")
    n = ELEMENTS[shape]
    ratio = after[cell] / before[cell]
    ratios.append(ratio)
    print(f"| {op} | {dtype} | {shape} | {phase} | {before[cell] / n:.2f} | {after[cell] / n:.2f} | {ratio:.3f} |")
print(f"\n{len(ratios)} cells; geometric mean {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}; "
      f"max {max(ratios):.3f}; above 1.02: {sum(r > 1.02 for r in ratios)}")
