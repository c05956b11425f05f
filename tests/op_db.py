# Moved to torch_vjp/testing.py (issue 8). This re-export stays only until tests/test_cuda.py and
# benchmarks/sanitize_cases.py (owned by other branches) import from there; delete it then.
from torch_vjp.testing import *  # noqa: F401,F403
