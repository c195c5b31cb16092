"""Which code produced a benchmark's numbers: shared by the benchmark scripts."""

import os
import subprocess


def git_commit() -> str:
    """OPT4GPTQ_COMMIT (for copies of the tree without .git), else git's HEAD."""
    if os.environ.get("OPT4GPTQ_COMMIT"):
        return os.environ["OPT4GPTQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"
