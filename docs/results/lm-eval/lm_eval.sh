#!/bin/sh
# lm-eval 0.4.x from its own virtualenv, whose python LMEVAL_PY names. That venv was installed without
# torch and transformers; lm-eval's hf model and its huggingface tokenizer backend import them, so
# the project's own site-packages (torch, transformers) are appended to the END of sys.path: the
# venv's packages win wherever both have one.
SYSTEM_SITE=$(python -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
exec "${LMEVAL_PY:?set LMEVAL_PY to the python of a virtualenv with lm-eval 0.4.x}" -c "import sys; sys.path.append('$SYSTEM_SITE'); sys.argv[0] = 'lm_eval'; \
from lm_eval.__main__ import cli_evaluate; cli_evaluate()" "$@"
