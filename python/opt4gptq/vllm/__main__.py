"""python -m opt4gptq.vllm SCRIPT [ARGS...]: run a vLLM script unchanged, with
its GPTQ layers served by opt4gptq.

Sets OPT4GPTQ_PATCH_VLLM=1 (so processes that import opt4gptq.vllm inherit the
patch) and patches vLLM's GPTQ module when the script imports it.
"""

import os
import runpy
import sys

from opt4gptq.vllm import ENV_VAR, install_import_hook


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    os.environ[ENV_VAR] = "1"
    install_import_hook()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
