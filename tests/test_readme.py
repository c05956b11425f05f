"""The README is true: its Python example runs, and its Quick start is exactly what CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
BUILD_VARIABLES = ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA", "USE_CUDA", "TORCH_CUDA_ARCH_LIST", "ATEN_CPU_CAPABILITY")


def quick_start_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_quick_start_verbatim_and_first():
    """Each Quick start command is a line of .ci/run, in the README's order, and no line before them sets a
    build variable (a new user's shell has none)."""
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in CI.splitlines()]
    positions = [ci_lines.index(command) for command in commands]  # ValueError: the CI drifted from the README
    assert positions == sorted(positions)
    for line in ci_lines[: positions[0]]:
        if line.startswith("#"):
            continue
        for name in BUILD_VARIABLES:
            assert not re.search(rf"(^|\s)(export\s+)?{name}=", line), f".ci/run sets {name} before the Quick start: {line}"


DOCS = {"README.md": README, "docs/vjp.md": (ROOT / "docs" / "vjp.md").read_text()}


def test_docs_cite_only_files_in_the_repository():
    """Every repository path a doc names (in backticks or as a link) exists; `<family>` stands for any."""
    for doc, text in DOCS.items():
        base = (ROOT / doc).parent
        assert "/work/" not in text, doc
        cited = re.findall(r"`((?:csrc|torch_vjp|benchmarks|tests|docs|\.ci)/[^`\s]*)`", text)
        linked = [link for link in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in link]
        assert cited, doc  # the pattern finds what it should
        for path in cited:
            assert list(ROOT.glob(re.sub(r"<[^>]+>", "*", path))), f"{doc} cites {path}, which is not in the repository"
        for link in linked:
            assert (base / link).exists(), f"{doc} links {link}, which is not in the repository"


def test_docs_name_only_ops_that_exist():
    import torch

    import torch_vjp

    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("torch_vjp::")}
    for doc, text in DOCS.items():
        for name in re.findall(r"torch\.ops\.torch_vjp\.(\w+)", text):
            assert name in registered or name == "name", (doc, name)
        for name in re.findall(r"(?<!ops\.)torch_vjp\.(\w+)", text):
            assert hasattr(torch_vjp, name) or name in ("nn", "testing"), (doc, name)
        for name in re.findall(r"`(\w+)_backward`", text):
            assert name + "_backward" in registered or name == "op", (doc, name)
